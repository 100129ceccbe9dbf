"""Inbound STARTTLS (RFC 3207) with certificates made by trustme, over real sockets.

Offered only when `[tls] cert` and `key` are set; TLS 1.2 at least; the Received header says
ESMTPS with the version and cipher; a SIGHUP makes new connections use a renewed certificate
(and re-reads the recipients files), with the real `relay serve` in a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from conftest import (
    DOMAIN,
    HOSTNAME,
    Conversation,
    RelayProcess,
    conversation,
    make_config,
    open_store,
    smtp_address,
    wait_for,
    write_config,
)
from hostile import deliver, eventually, slots_free

from relay.service import Relay
from relay.tls import server_context as tls_context

RelayFactory = Callable[..., Awaitable[Relay]]
_TLS_NOTE = re.compile(r"\(using (TLSv1\.[23]) with cipher [A-Za-z0-9_-]+ \((\d+)/\2 bits\)\)")


def write_certificate(ca: trustme.CA, directory: Path) -> dict[str, str]:
    """A certificate for the relay's hostname, chain and key as PEM files: the [tls] section."""
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert(HOSTNAME)
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return {"cert": str(cert), "key": str(key)}


def client_context(ca: trustme.CA, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if maximum is not None:
        with warnings.catch_warnings():  # old versions are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = maximum
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client at least try old versions
    return context


async def starttls(talk: Conversation, context: ssl.SSLContext) -> None:
    reply = await talk.command("STARTTLS")
    assert reply.code == 220, reply
    await talk.writer.start_tls(context, server_hostname=HOSTNAME)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_starttls_is_offered_only_with_a_certificate(
    relay_factory: RelayFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    plain = await relay_factory()
    async with conversation(smtp_address(plain)) as talk:
        assert "250-STARTTLS" not in (await talk.ehlo()).lines
        assert (await talk.command("STARTTLS")).code == 454  # RFC 3207 4: TLS not available
    await plain.stop()
    secure = await relay_factory(tls=write_certificate(ca, tmp_path / "tls"))
    async with conversation(smtp_address(secure)) as talk:
        assert "250-STARTTLS" in (await talk.ehlo()).lines


async def test_mail_over_starttls_gets_esmtps_with_the_tls_version_and_cipher_in_received(
    relay_factory: RelayFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    server = await relay_factory(tls=write_certificate(ca, tmp_path / "tls"))
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await starttls(talk, client_context(ca))
        ehlo = await talk.ehlo()
        assert "250-STARTTLS" not in ehlo.lines  # RFC 3207 4.2: not offered twice
        queue_id = (await deliver(talk)).rpartition(" ")[2]
    with open_store(server.config.queue.path) as store:
        body = store.body(queue_id)
    assert body is not None
    header = body.split(b"\r\n\r\n", 1)[0].decode()
    assert f"by {HOSTNAME} (relay) with ESMTPS id {queue_id}" in header
    match = _TLS_NOTE.search(header)
    assert match, header
    assert int(match.group(2)) >= 128
    await eventually(lambda: slots_free(server) and server.handler.idle.is_set(), "slot back")


async def test_starttls_keeps_the_session_counters_and_gives_the_slot_back_at_the_end(
    relay_factory: RelayFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    """aiosmtpd makes a new session object at STARTTLS; the connection must stay one."""
    server = await relay_factory(
        smtp={"max_messages_per_session": 1, "max_connections_per_ip": 1},
        tls=write_certificate(ca, tmp_path / "tls"),
    )
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await deliver(talk)
        await starttls(talk, client_context(ca))
        await talk.ehlo()
        assert len(server.handler.sessions) == 1 and server.limits.connections == 1
        reply = await talk.command("MAIL FROM:<sender@client.test>")
        assert reply.code == 421  # STARTTLS did not reset the count
    await eventually(lambda: slots_free(server), "the slot back")
    await asyncio.wait_for(server.handler.idle.wait(), 5)  # shutdown would not wait in vain


async def test_tls_older_than_1_2_is_refused_and_1_2_works(
    relay_factory: RelayFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    tls = write_certificate(ca, tmp_path / "tls")
    context = tls_context(make_config(tmp_path, tls=tls))
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
    server = await relay_factory(tls=tls)
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await starttls(talk, client_context(ca, maximum=ssl.TLSVersion.TLSv1_2))
        ssl_object = talk.writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.2"
        await talk.ehlo()
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await starttls(talk, client_context(ca, maximum=ssl.TLSVersion.TLSv1_1))
    await eventually(lambda: slots_free(server), "every slot back")


# -- SIGHUP, with the real command ------------------------------------------------------------


def _read_reply(stream: socket.SocketIO | object) -> bytes:
    lines = []
    while True:
        line = stream.readline()  # type: ignore[attr-defined]
        assert line, "connection closed"
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


def presented_certificate(address: tuple[str, int], ca: trustme.CA) -> bytes:
    """DER of the certificate the relay shows after STARTTLS, verified against `ca`."""
    with socket.create_connection(address, timeout=10) as sock:
        stream = sock.makefile("rb")
        assert _read_reply(stream).startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        _read_reply(stream)
        sock.sendall(b"STARTTLS\r\n")
        assert _read_reply(stream).startswith(b"220")
        with client_context(ca).wrap_socket(sock, server_hostname=HOSTNAME) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def rcpt_code(address: tuple[str, int], recipient: str) -> int:
    with socket.create_connection(address, timeout=10) as sock:
        stream = sock.makefile("rb")
        _read_reply(stream)
        for command in (b"EHLO client.test", b"MAIL FROM:<sender@client.test>"):
            sock.sendall(command + b"\r\n")
            _read_reply(stream)
        sock.sendall(f"RCPT TO:<{recipient}>\r\n".encode())
        return int(_read_reply(stream)[:3])


def test_sighup_loads_a_renewed_certificate_and_rereads_the_recipients_file(
    tmp_path: Path, relay_process: Callable[[Path], RelayProcess]
) -> None:
    first_ca, renewed_ca = trustme.CA(), trustme.CA()
    tls = write_certificate(first_ca, tmp_path / "tls")
    recipients = tmp_path / "recipients"
    recipients.write_text("alice\n")
    config = write_config(
        tmp_path,
        tls=tls,
        metrics={"listen": ""},
        domain=[{"name": DOMAIN, "primary": ["127.0.0.1:1"], "recipients_file": str(recipients)}],
    )
    server = relay_process(config)
    assert server.address is not None and server.process is not None
    before = presented_certificate(server.address, first_ca)
    assert rcpt_code(server.address, f"alice@{DOMAIN}") == 250
    assert rcpt_code(server.address, f"bobby@{DOMAIN}") == 550

    # Renewal in place (certbot's deploy hook), and a change of the recipients file that a
    # stat cannot see (same inode, size and mtime): only the SIGHUP can bring either in.
    write_certificate(renewed_ca, tmp_path / "tls")
    stat = recipients.stat()
    with recipients.open("r+") as handle:
        handle.write("bobby\n")
    os.utime(recipients, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert rcpt_code(server.address, f"bobby@{DOMAIN}") == 550
    with pytest.raises(ssl.SSLCertVerificationError):
        presented_certificate(server.address, renewed_ca)  # still the old one

    server.process.send_signal(signal.SIGHUP)
    address = server.address
    after = wait_for(lambda: _renewed(address, renewed_ca), "the renewed certificate")
    assert after != before
    assert rcpt_code(address, f"bobby@{DOMAIN}") == 250
    assert rcpt_code(address, f"alice@{DOMAIN}") == 550
    assert "configuration reloaded" in server.log()
    assert server.stop() == 0


def _renewed(address: tuple[str, int], ca: trustme.CA) -> bytes | None:
    try:
        return presented_certificate(address, ca)
    except ssl.SSLCertVerificationError:
        return None


async def test_starttls_inside_tls_is_a_bad_sequence(
    relay_factory: RelayFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    """RFC 3207 4.2: once TLS is up, STARTTLS is answered 503, and the session goes on."""
    server = await relay_factory(tls=write_certificate(ca, tmp_path / "tls"))
    async with conversation(smtp_address(server)) as talk:
        await talk.ehlo()
        await starttls(talk, client_context(ca))
        await talk.ehlo()
        again = await talk.command("STARTTLS")
        assert again.text == "503 5.5.1 Error: TLS already active"
        assert (await deliver(talk)).startswith("250 2.0.0 Ok: queued as ")
