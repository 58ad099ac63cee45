"""The isolated key server (``server``, ``store``), its wire protocol and the proxy's client."""
