"""meshlet.proxy.http."""
