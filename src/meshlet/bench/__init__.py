"""meshlet.bench."""
