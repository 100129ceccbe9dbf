"""A tiny authoritative DNS server on 127.0.0.1, UDP and TCP on one free port, for real-DNS tests.

Tests give it records as text, the way a zone file would hold them, and point the code under test
at `server.address`. It answers from those records only (no recursion, no delegation), and
remembers every question in `queries`, so a test can assert what was asked and what was not.

    {"example.test.": [("MX", "10 mx1.example.test.")], "mx1.example.test.": [("A", "127.0.0.10")]}

Answers follow what resolvers rely on (RFC 1034 4.3.2, RFC 8020): a name with records, or with
descendants that have records (an empty non-terminal), answers NOERROR, with an empty answer
section (NODATA) when it has no record of the asked type; any other name is NXDOMAIN. A CNAME is
followed within the server's own records. `servfail(name)` and `drop(name)` make a name fail
the two ways a real server does: SERVFAIL, or no answer at all (the client times out).

Threads, not asyncio: the server must keep answering while a test blocks its own event loop in a
resolver call, and a socketserver in a daemon thread is the smallest thing that does.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

TTL = 60
UDP_PAYLOAD = 512  # RFC 1035 4.2.1, for queries without EDNS (RFC 6891 6.2.5)

Records = dict[str, list[tuple[str, str]]]


class DnsServer:
    """Answers A, AAAA, MX, CNAME, … from `records`; start() it, or use it as a context manager."""

    def __init__(self, records: Records | None = None) -> None:
        self.queries: list[tuple[str, str]] = []
        self._zone: dict[dns.name.Name, list[dns.rdata.Rdata]] = {}
        self._servfail: set[dns.name.Name] = set()
        self._drop: set[dns.name.Name] = set()
        self._lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.port = 0
        self.host = "127.0.0.1"
        for name, rrs in (records or {}).items():
            self.set(name, rrs)

    # -- what the tests change ------------------------------------------------------------

    def set(self, name: str, records: Iterable[tuple[str, str]]) -> None:
        """Replaces the records of `name`; an empty list removes the name (it becomes NXDOMAIN).

        Records are parsed here, so a typo fails the test at the line that made it.
        """
        parsed = [
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)
            for rdtype, text in records
        ]
        with self._lock:
            if parsed:
                self._zone[_name(name)] = parsed
            else:
                self._zone.pop(_name(name), None)

    def servfail(self, name: str) -> None:
        """Every question about `name` gets SERVFAIL (a broken or unreachable authority)."""
        with self._lock:
            self._servfail.add(_name(name))

    def drop(self, name: str) -> None:
        """Questions about `name` go unanswered, so the client times out."""
        with self._lock:
            self._drop.add(_name(name))

    def asked(self, name: str) -> list[str]:
        """The types asked for `name`, in order."""
        wanted = _name(name).to_text()
        return [rdtype for qname, rdtype in list(self.queries) if qname == wanted]

    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT", the form `dns.nameservers` takes."""
        return f"{self.host}:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> DnsServer:
        """On a free port of 127.0.0.1, or where asked (the benchmark's Postfix, whose resolver
        knows only port 53, is given 127.0.0.53:53)."""
        self.host = host
        udp, tcp = _bind_pair(host, port)
        self.port = udp.server_address[1]
        for server in (udp, tcp):
            server.dns = self
            thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> DnsServer:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- answering ------------------------------------------------------------------------

    def answer(self, wire: bytes, max_size: int | None) -> bytes | None:
        """The response to one query in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not worth a FORMERR in a test server
        if not query.question:
            return None
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self._lock:
            self.queries.append((qname.to_text(), dns.rdatatype.to_text(qtype)))
            if qname in self._drop:
                return None
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            if qname in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            else:
                self._resolve(response, qname, qtype)
        if max_size is None:
            return response.to_wire()
        size = max(UDP_PAYLOAD, query.payload if query.edns >= 0 else UDP_PAYLOAD)
        try:
            return response.to_wire(max_size=size)
        except dns.exception.TooBig:
            # RFC 1035 4.2.1: too big for UDP → TC set, and the client retries over TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    def _resolve(self, response: dns.message.Message, qname: dns.name.Name, qtype: int) -> None:
        name = qname
        for _ in range(8):  # a CNAME chain longer than this is a loop in the test's records
            records = self._zone.get(name)
            if records is None:
                if not any(known.is_subdomain(name) for known in self._zone):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return
            matching = [rd for rd in records if rd.rdtype == qtype]
            cnames = [rd for rd in records if rd.rdtype == dns.rdatatype.CNAME]
            if matching or not cnames:
                if matching:
                    response.answer.append(_rrset(name, matching))
                return
            response.answer.append(_rrset(name, cnames))
            name = cnames[0].target  # type: ignore[attr-defined]


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def _rrset(name: dns.name.Name, rdatas: list[dns.rdata.Rdata]) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(name, TTL, rdatas)


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply = cast(_UdpServer, self.server).dns.answer(data, max_size=UDP_PAYLOAD)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        # RFC 7766 6.2.1: a client may send several queries on one connection.
        while True:
            header = self.rfile.read(2)
            if len(header) < 2:
                return
            wire = self.rfile.read(int.from_bytes(header, "big"))
            reply = cast(_TcpServer, self.server).dns.answer(wire, max_size=None)
            if reply is None:
                return
            self.wfile.write(len(reply).to_bytes(2, "big") + reply)
            self.wfile.flush()


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = False
    dns: DnsServer


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    dns: DnsServer


def _bind_pair(host: str = "127.0.0.1", port: int = 0) -> tuple[_UdpServer, _TcpServer]:
    """A UDP and a TCP server on the same free port (the resolver falls back to TCP on TC)."""
    for _ in range(20):
        udp = _UdpServer((host, port), _UdpHandler)
        try:
            tcp = _TcpServer((host, udp.server_address[1]), _TcpHandler)
        except OSError:
            udp.server_close()  # the TCP port was taken: try another
            continue
        return udp, tcp
    raise RuntimeError("no free port for both UDP and TCP on 127.0.0.1")


def unused_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nobody listens on right now (for "no server" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A started DnsServer with no records; the test `set()`s what it needs."""
    with DnsServer() as server:
        yield server
