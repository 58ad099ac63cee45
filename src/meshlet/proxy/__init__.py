"""meshlet's data plane: the sidecar / gateway proxy."""
