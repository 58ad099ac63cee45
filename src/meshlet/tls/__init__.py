"""meshlet.tls: a TLS 1.3 engine (RFC 8446) in which signing is a pause.

Layout (sans-IO except ``aio``):

- ``codec``: handshake messages and extensions, strict and bounded;
- ``keyschedule``: HKDF-Expand-Label, secrets, Finished, binders, tickets' PSK;
- ``record``: record framing and AEAD protection, limits, padding;
- ``crypto``: suites, groups and signature schemes on ``cryptography``;
- ``state`` / ``client`` / ``server``: handshake machines dispatched on
  (state, message type);
- ``connection``: ``TlsConnection``, the object callers drive;
- ``config``, ``events``, ``alerts``, ``tickets``, ``keys_local``;
- ``verify``: X.509 + SPIFFE peer verification;
- ``aio``: the asyncio transport socket (``tls_engine`` "meshlet").
"""
