"""meshlet.dashboard."""
