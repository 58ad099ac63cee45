"""meshlet.control."""
