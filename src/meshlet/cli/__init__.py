"""meshlet.cli."""
