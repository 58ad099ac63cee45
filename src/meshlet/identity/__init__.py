"""meshlet.identity."""
