"""meshlet.proxy.observe."""
