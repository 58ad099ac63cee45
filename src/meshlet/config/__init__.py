"""meshlet.config."""
