"""TLS alerts (RFC 8446 section 6): wire codes and the error that carries one.

Every protocol failure inside the engine is a ``TlsAlertError``; the
connection turns it into a fatal alert on the wire. ``local`` tells whether
we detected the problem (True) or the peer told us about it (False).
"""

from __future__ import annotations

from enum import IntEnum


class AlertLevel(IntEnum):
    WARNING = 1
    FATAL = 2


class AlertDescription(IntEnum):
    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    inappropriate_fallback = 86
    user_canceled = 90
    missing_extension = 109
    unsupported_extension = 110
    unrecognized_name = 112
    bad_certificate_status_response = 113
    unknown_psk_identity = 115
    certificate_required = 116
    no_application_protocol = 120


class TlsAlertError(Exception):
    """A TLS protocol failure with the alert that reports it."""

    def __init__(self, description: AlertDescription, message: str, *, local: bool = True) -> None:
        self.description = description
        self.message = message
        self.local = local
        super().__init__(f"{description.name}: {message}")


def decode_error(message: str) -> TlsAlertError:
    return TlsAlertError(AlertDescription.decode_error, message)


def illegal_parameter(message: str) -> TlsAlertError:
    return TlsAlertError(AlertDescription.illegal_parameter, message)


def unexpected_message(message: str) -> TlsAlertError:
    return TlsAlertError(AlertDescription.unexpected_message, message)
