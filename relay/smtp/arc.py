"""The ARC seal (RFC 8617): what the relay found, signed, so the primary can trust it.

Relaying breaks the sender's SPF at the primary (it sees the relay's address) and its own DMARC
check with it. An ARC set (ARC-Authentication-Results, ARC-Message-Signature, ARC-Seal) signed
with a key the primary can look up carries our Authentication-Results to it intact: a primary
that trusts our sealing domain (Microsoft 365's "trusted ARC sealers", Google's ARC support,
rspamd's or OpenARC's ARC checks) then judges the message by what we saw at the door.

dkimpy signs (its ARC code is maintained with its DKIM code); it reads our Authentication-
Results (authserv-id = our hostname, relay.smtp.auth) from the message and continues the chain
the message came with (cv= from our `arc=` result). Sealing is a signature, no DNS: it runs in
a worker thread, and a seal that fails never costs the message: it is stored unsealed, logged
and counted.

dkimpy computes the RSA signature itself, in pure Python: about 17 ms of CPU per seal with the
GIL held (measured: with a seal on every message the relay accepted 57 messages a second from
20 senders), and a modular exponentiation whose time depends on the key. That one function is
replaced here with OpenSSL's, through cryptography: the same RFC 8017 RSASSA-PKCS1-v1_5
signature of the same digest, in constant time, in well under a millisecond. The tests check
every seal with dkimpy's own verifier, and rspamd's.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from relay.config import Config
from relay.ops import metrics
from relay.ops.logs import fields

log = logging.getLogger("relay.arc")
_DKIM_LOG = logging.Logger("relay.arc.dkimpy", level=logging.CRITICAL)  # we log what matters
KEY_BITS = 2048  # RFC 8301: at least 1024, 2048 recommended


_SIGNING_KEYS: dict[int, rsa.RSAPrivateKey] = {}  # by modulus: one or two keys in a process
_DIGESTS: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}


def _openssl_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's `RSASSA_PKCS1_v1_5_sign(hash, private_key)`, by OpenSSL: `digest` is the
    finished hash object, `private_key` the numbers dkimpy parsed from the PEM."""
    key = _SIGNING_KEYS.get(private_key["modulus"])
    if key is None:
        public = rsa.RSAPublicNumbers(private_key["publicExponent"], private_key["modulus"])
        key = rsa.RSAPrivateNumbers(
            p=private_key["prime1"],
            q=private_key["prime2"],
            d=private_key["privateExponent"],
            dmp1=private_key["exponent1"],
            dmq1=private_key["exponent2"],
            iqmp=private_key["coefficient"],
            public_numbers=public,
        ).private_key()
        _SIGNING_KEYS[private_key["modulus"]] = key
    algorithm = _DIGESTS[digest.name.lower()]
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


# dkim.DomainSigner.gen_header looks this name up in dkimpy's module at each signature.
dkim.RSASSA_PKCS1_v1_5_sign = _openssl_sign


# A selector or signing domain: labels of letters, digits and hyphens, dots between them.
NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


class ArcKeyError(Exception):
    """The configured key cannot be used: unreadable, or not an RSA private key."""


def load_key(path: str) -> bytes:
    """The PEM private key at `path`, checked to be RSA: what dkimpy signs with."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ArcKeyError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ArcKeyError(f"{path} is not a PEM private key without a passphrase: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ArcKeyError(f"{path} is not an RSA key (ARC signs with rsa-sha256)")
    return data


def public_record(key_pem: bytes) -> str:
    """The DNS TXT value that publishes the key: `v=DKIM1; k=rsa; p=…` (RFC 6376 3.6.1)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode('ascii')}"


def new_key() -> bytes:
    """A new RSA private key, PEM (PKCS#1, what dkimpy documents)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def generate_key(path: str, *, force: bool = False) -> bytes:
    """A new RSA key written to `path`, mode 0600 from the start; refuses to overwrite one
    unless `force` (a key in use is published in the DNS: replacing it breaks every seal)."""
    pem = new_key()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    descriptor = os.open(path, flags, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    os.chmod(path, 0o600)  # also when --force replaced a file that had another mode
    return pem


def txt_strings(value: str) -> str:
    """A TXT value as a zone file writes it: quoted strings of at most 255 octets each (RFC
    1035 3.3.14); a key record is longer than one string may be."""
    return " ".join(f'"{value[i : i + 250]}"' for i in range(0, len(value), 250))


def txt_record(selector: str, domain: str, key_pem: bytes) -> str:
    """The zone-file line to publish the key."""
    return f"{selector}._domainkey.{domain}. IN TXT ( {txt_strings(public_record(key_pem))} )"


@dataclass(frozen=True)
class Sealer:
    """Seals with one key, selector and domain (the `[arc]` config), as our authserv-id."""

    key: bytes
    selector: str
    domain: str
    authserv_id: str

    def seal_now(self, content: bytes) -> bytes:
        """The ARC set's header lines for `content` (which carries our A-R), in a thread."""
        lines = dkim.arc_sign(
            content,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self.key,
            self.authserv_id.encode("ascii"),
            # dkimpy's default header list: what RFC 6376 5.4.1 says to sign, present ones only.
            logger=_DKIM_LOG,
        )
        return b"".join(bytes(line) for line in lines)

    async def seal(self, content: bytes, queue_id: str) -> bytes:
        """`content` with the ARC set on top; unchanged (and logged) when sealing fails."""
        try:
            header = await asyncio.to_thread(self.seal_now, content)
        except Exception as exc:  # dkimpy on a message it cannot parse, or a broken key
            metrics.arc_seals.labels("failed").inc()
            log.warning(
                "%s: not sealed (ARC): %s",
                queue_id,
                exc,
                extra=fields(queue_id=queue_id, event="arc", reason=str(exc)),
            )
            return content
        metrics.arc_seals.labels("sealed").inc()
        return header + content


def load_sealer(cfg: Config, current: Sealer | None) -> Sealer | None:
    """The sealer the `[arc]` config asks for, read at start and on SIGHUP (by every process
    that runs SMTP sessions): a key that went bad keeps `current`, and says so."""
    arc = cfg.arc
    if not arc.key:
        return None
    try:
        key = load_key(arc.key)
    except ArcKeyError as exc:
        log.error("ARC key not loaded, keeping the old one: %s", exc)
        return current
    return Sealer(key, arc.selector, arc.domain, cfg.hostname)
