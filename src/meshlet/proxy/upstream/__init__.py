"""meshlet.proxy.upstream."""
