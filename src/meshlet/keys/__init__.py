"""meshlet.keys."""
