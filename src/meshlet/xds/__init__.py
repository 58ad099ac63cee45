"""meshlet.xds."""
