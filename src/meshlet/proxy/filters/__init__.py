"""meshlet.proxy.filters."""
