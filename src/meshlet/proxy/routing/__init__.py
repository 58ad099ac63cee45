"""meshlet.proxy.routing."""
