"""TLS contexts, inbound and outbound: one home, read by the server, the courier and the doctor.

Inbound (STARTTLS offered to senders, RFC 3207): our certificate and key, TLS 1.2 or later.
Outbound: verified against the system's or a given CA file for `tls = "verify"`, otherwise
encryption against passive eavesdropping only (RFC 7435), since MX certificates are too often
self-signed or misnamed for checking them to be the default.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: relay.config reads TLS_MODES from here
    from relay.config import Config

# A domain's `tls` setting, outbound: none, STARTTLS when offered, STARTTLS or no delivery,
# STARTTLS with a verified certificate (docs/operations.md, README's configuration table).
TLS_MODES = ("none", "opportunistic", "require", "verify")


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The inbound STARTTLS context, or None when no certificate is configured."""
    if not cfg.tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    return context


def client_context(verify: bool, cafile: str | None) -> ssl.SSLContext:
    """Built per session (in a thread, it may read files) so a renewed CA file is picked up."""
    if verify:
        return ssl.create_default_context(cafile=cafile)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
