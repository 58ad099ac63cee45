"""meshlet.proxy.listeners: from an accepted socket to an application protocol.

- ``manager``: ``ListenerManager`` binds listeners, applies config updates in
  two phases (prepare / commit) and drains; per-config ``ListenerRuntime``.
- ``connection``: the per-connection path (TLS inspection, chain selection,
  transport socket start, close tracking).
- ``filter_chain``: Envoy's filter chain match order.
- ``tls_inspector``: sans-IO ClientHello parser (SNI, ALPN).
- ``transport_sockets``: ``make_factory`` (raw_buffer or a TLS engine).
- ``tls_openssl`` / ``ssl_transport``: the ``"openssl"`` TLS engine on stdlib ``ssl``.
"""
