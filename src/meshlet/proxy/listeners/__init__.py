"""meshlet.proxy.listeners."""
