"""meshlet.tls."""
