"""Shared fixtures: ports on loopback, certificates, and cleanup of child processes."""
