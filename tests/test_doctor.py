"""`relay doctor` against real DNS, real SMTP and real HTTP, all on loopback.

The deployment under test: domain example.test, MX 10 mx1.example.test (a fake primary on
127.0.0.2), MX 20 relay.test (us, "listening" on 127.0.0.5). The doctor reads the config and never
binds our listener, so nothing needs to run there; senders' port (delivery.mx_port) is the fake
primary's port, which the relay's listen address shares. Addresses in 192.0.2.0/24 (TEST-NET-1)
stand for "not this machine": they are only looked up and compared, never connected to.
MTA-STS policies come from a local HTTP server through the `mta_sts_url` the doctor is given.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import Config
from relay.delivery.mx import RouteError, Router
from relay.ops import doctor
from relay.ops.doctor import (
    INFO,
    OK,
    PROBLEM,
    WARNING,
    Finding,
    diagnose,
    name_matches,
    parse_policy,
)
from relay.store import Store
from tests.conftest import make_config, relay_command, relay_env, run_relay, write_config
from tests.dnsserver import DnsServer, dns_server
from tests.fakeprimary import FakePrimary, fake_primary, unused_port

__all__ = ["dns_server", "fake_primary"]

DOMAIN = "example.test"
ME = "relay.test"
OUR_ADDRESS = "127.0.0.5"
PRIMARY = "mx1.example.test"
PRIMARY_ADDRESS = "127.0.0.2"
REVERSE = "5.0.0.127.in-addr.arpa"  # OUR_ADDRESS's PTR name
NOT_HERE = "192.0.2.7"  # TEST-NET-1: never an address of this machine
# A certificate valid through the first quarter of 2030, and clocks to judge it by.
NOT_BEFORE = datetime(2030, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2030, 4, 1, tzinfo=UTC)
MID_VALIDITY = datetime(2030, 2, 1, tzinfo=UTC).timestamp()

StartPrimary = Callable[..., Awaitable[FakePrimary]]


# -- an MTA-STS web server --------------------------------------------------------------------


@dataclass
class PolicyServer:
    """Serves {path: (status, content type, body)}; records every path asked."""

    pages: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    port: int = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{{domain}}/.well-known/mta-sts.txt"

    def policy(self, text: str, domain: str = DOMAIN, content_type: str = "text/plain") -> None:
        self.pages[f"/{domain}/.well-known/mta-sts.txt"] = (200, content_type, text)


@pytest.fixture
def policy_server() -> Iterator[PolicyServer]:
    state = PolicyServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            status, content_type, body = state.pages.get(self.path, (404, "text/plain", "no\n"))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if status in (301, 302):
                self.send_header("Location", body)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


# -- the deployment ---------------------------------------------------------------------------


@dataclass
class Deployment:
    """A correct deployment; tests break one thing and ask the doctor."""

    tmp_path: Path
    dns: DnsServer
    primary: FakePrimary
    policies: PolicyServer
    overrides: dict[str, Any] = field(default_factory=dict)
    clock: float = MID_VALIDITY

    @property
    def port(self) -> int:
        return self.primary.port

    def config(self, **overrides: Any) -> Config:
        data: dict[str, Any] = {
            "hostname": ME,
            "postmaster": f"hostmaster@{DOMAIN}",
            "smtp": {"listen": [f"{OUR_ADDRESS}:{self.port}"]},
            "delivery": {"mx_port": self.port},
            "dns": {"nameservers": [self.dns.address]},
            "domain": [{"name": DOMAIN}],
            "metrics": {"listen": ""},
            **self.overrides,
        }
        data.update(overrides)
        return make_config(self.tmp_path, **data)

    async def findings(self, **overrides: Any) -> list[Finding]:
        return await diagnose(
            self.config(**overrides),
            clock=lambda: self.clock,
            mta_sts_url=self.policies.url(),
        )

    def certificate(
        self,
        *names: str,
        not_before: datetime = NOT_BEFORE,
        not_after: datetime = NOT_AFTER,
        key_of: trustme.LeafCert | None = None,
    ) -> None:
        """Issues a certificate for `names` and configures it (with another's key if asked)."""
        ca = trustme.CA()
        cert = ca.issue_cert(*(names or (ME,)), not_before=not_before, not_after=not_after)
        cert_path = self.tmp_path / "fullchain.pem"
        key_path = self.tmp_path / "privkey.pem"
        cert_path.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        (key_of or cert).private_key_pem.write_to_path(str(key_path))
        self.overrides["tls"] = {"cert": str(cert_path), "key": str(key_path)}


@pytest.fixture
async def deployment(
    tmp_path: Path,
    dns_server: DnsServer,
    fake_primary: StartPrimary,
    policy_server: PolicyServer,
) -> Deployment:
    primary = await fake_primary(address=PRIMARY_ADDRESS, hostname=PRIMARY)
    dns_server.set(DOMAIN, [("MX", f"10 {PRIMARY}."), ("MX", f"20 {ME}.")])
    dns_server.set(PRIMARY, [("A", PRIMARY_ADDRESS)])
    dns_server.set(ME, [("A", OUR_ADDRESS), ("TXT", '"v=spf1 a -all"')])
    dns_server.set(REVERSE, [("PTR", f"{ME}.")])
    deploy = Deployment(tmp_path, dns_server, primary, policy_server)
    deploy.certificate(ME)
    return deploy


def only(findings: list[Finding], check: str) -> list[tuple[str, str]]:
    return [(f.status, f.message) for f in findings if f.check == check]


def status_of(findings: list[Finding], check: str) -> list[str]:
    return [f.status for f in findings if f.check == check]


# -- the whole deployment ---------------------------------------------------------------------


async def test_a_correct_deployment_is_all_ok_and_exits_0(deployment: Deployment) -> None:
    deployment.dns.set(f"_mta-sts.{DOMAIN}", [("TXT", '"v=STSv1; id=20300101"')])
    deployment.policies.policy(
        f"version: STSv1\nmode: enforce\nmx: {PRIMARY}\nmx: {ME}\nmax_age: 86400\n"
    )

    findings = await deployment.findings()

    assert [(f.check, f.status) for f in findings] == [
        ("address", OK),
        ("rdns", OK),
        ("spf", OK),
        ("port25", INFO),
        ("tls", OK),
        ("queue", OK),
        ("mx", OK),
        ("primary", OK),
        ("mta-sts", OK),
    ], findings
    assert doctor.exit_code(findings) == 0
    # The primary was really asked: banner, EHLO as us, QUIT.
    assert deployment.primary.connections == 1
    assert deployment.primary.commands == [f"EHLO {ME}", "QUIT"]
    assert deployment.policies.requests == [f"/{DOMAIN}/.well-known/mta-sts.txt"]
    text = doctor.report_text(findings)
    assert text.endswith("8 ok, 1 to check by hand, 0 warnings, 0 problems")
    assert "fix:" not in text


async def test_every_problem_comes_with_a_fix_and_makes_the_exit_status_1(
    deployment: Deployment,
) -> None:
    deployment.dns.set(DOMAIN, [("MX", f"10 {PRIMARY}.")])  # we are not in the MX records
    deployment.overrides.pop("tls")

    findings = await deployment.findings()

    assert doctor.exit_code(findings) == 1
    assert all(f.fix for f in findings if f.status != OK)
    text = doctor.report_text(findings)
    assert f"problem  mx         {DOMAIN}: MX 10 {PRIMARY}: no MX record names {ME}" in text
    assert f"fix: publish `{DOMAIN}. IN MX 20 {ME}.`" in text
    assert text.endswith("6 ok, 1 to check by hand, 1 warning, 1 problem")


# -- MX records -------------------------------------------------------------------------------


async def test_mx_records_behind_a_primary_are_ok(deployment: Deployment) -> None:
    assert only(await deployment.findings(), "mx") == [
        (OK, f"MX 10 {PRIMARY}, MX 20 {ME}: we are behind {PRIMARY}")
    ]


async def test_a_domain_without_mx_records_is_a_problem(deployment: Deployment) -> None:
    deployment.dns.set(DOMAIN, [("A", PRIMARY_ADDRESS)])

    findings = await deployment.findings()

    [(status, message)] = only(findings, "mx")
    assert status == PROBLEM
    assert "no MX records" in message


async def test_a_domain_that_does_not_exist_is_a_problem(deployment: Deployment) -> None:
    findings = await deployment.findings(domain=[{"name": "gone.test"}])

    assert only(findings, "mx") == [(PROBLEM, "gone.test does not exist in the DNS")]


async def test_a_null_mx_is_a_problem(deployment: Deployment) -> None:
    deployment.dns.set(DOMAIN, [("MX", "0 .")])

    assert status_of(await deployment.findings(), "mx") == [PROBLEM]


async def test_us_at_the_best_preference_is_a_problem(deployment: Deployment) -> None:
    deployment.dns.set(DOMAIN, [("MX", f"10 {PRIMARY}."), ("MX", f"10 {ME}.")])

    [finding] = [f for f in await deployment.findings() if f.check == "mx"]

    assert finding.status == PROBLEM
    assert f"nothing is preferred over MX 10 {ME}" in finding.message
    assert f"`{DOMAIN}. IN MX 20 {ME}.`" in finding.fix


async def test_a_better_mx_that_resolves_to_our_listener_is_a_problem(
    deployment: Deployment,
) -> None:
    deployment.dns.set(
        DOMAIN, [("MX", "5 alias.example.test."), ("MX", f"10 {PRIMARY}."), ("MX", f"20 {ME}.")]
    )
    deployment.dns.set("alias.example.test", [("A", OUR_ADDRESS)])

    [(status, message)] = only(await deployment.findings(), "mx")

    assert status == PROBLEM
    assert message.startswith(
        f"MX 5 alias.example.test resolves to {OUR_ADDRESS}:{deployment.port}, where we listen"
    )


async def test_an_mx_naming_us_by_another_name_is_a_warning(deployment: Deployment) -> None:
    deployment.dns.set(DOMAIN, [("MX", f"10 {PRIMARY}."), ("MX", "20 backup.example.test.")])
    deployment.dns.set("backup.example.test", [("A", OUR_ADDRESS)])

    [finding] = [f for f in await deployment.findings() if f.check == "mx"]

    assert finding.status == WARNING
    assert "MX 20 backup.example.test resolves to" in finding.message
    assert finding.fix.startswith('set hostname = "backup.example.test"')


async def test_another_backup_at_our_preference_is_fine_but_the_primary_is_not(
    deployment: Deployment,
) -> None:
    records = [("MX", f"10 {PRIMARY}."), ("MX", f"20 {ME}."), ("MX", "20 mx3.example.test.")]
    deployment.dns.set(DOMAIN, records)
    # Loopback with nothing listening: the second run probes it as a configured primary.
    deployment.dns.set("mx3.example.test", [("A", "127.0.0.3")])
    [(status, message)] = only(await deployment.findings(), "mx")
    assert (status, message.split(": ", 1)[1]) == (
        OK,
        f"we are behind {PRIMARY}; shares preference 20 with mx3.example.test",
    )

    findings = await deployment.findings(
        domain=[{"name": DOMAIN, "primary": [f"mx3.example.test:{deployment.port}"]}]
    )

    [(status, message)] = only(findings, "mx")
    assert status == PROBLEM
    assert "the primary mx3.example.test has our preference (20)" in message


# -- our address ------------------------------------------------------------------------------


async def test_our_name_resolving_to_our_listener_is_ok(deployment: Deployment) -> None:
    [(status, message)] = only(await deployment.findings(), "address")
    assert status == OK
    assert (
        message == f"resolves to {OUR_ADDRESS}, where we listen ({OUR_ADDRESS}:{deployment.port})"
    )


async def test_a_wildcard_listen_covers_every_local_address(deployment: Deployment) -> None:
    findings = await deployment.findings(smtp={"listen": [f"0.0.0.0:{deployment.port}"]})

    assert status_of(findings, "address") == [OK]


async def test_a_local_address_we_do_not_listen_on_is_a_problem(deployment: Deployment) -> None:
    deployment.dns.set(ME, [("A", "127.0.0.6")])

    [finding] = [f for f in await deployment.findings() if f.check == "address"]

    assert finding.status == PROBLEM
    assert "127.0.0.6, an address of this machine, but smtp.listen" in finding.message
    assert finding.fix.startswith(f'add "127.0.0.6:{deployment.port}" to smtp.listen')


async def test_an_address_that_is_not_this_machine_is_a_warning_for_nat(
    deployment: Deployment,
) -> None:
    deployment.dns.set(ME, [("A", NOT_HERE)])

    [finding] = [f for f in await deployment.findings() if f.check == "address"]

    assert finding.status == WARNING
    assert f"{NOT_HERE}, which is not an address of this machine" in finding.message
    assert "NAT" in finding.fix


async def test_listening_on_another_port_than_senders_use_is_a_warning(
    deployment: Deployment,
) -> None:
    other = unused_port(OUR_ADDRESS)

    findings = await deployment.findings(smtp={"listen": [f"{OUR_ADDRESS}:{other}"]})

    [(status, message)] = only(findings, "address")
    assert status == WARNING
    assert f"but not on port {deployment.port} (delivery.mx_port)" in message


async def test_a_host_name_without_address_is_a_problem(deployment: Deployment) -> None:
    deployment.dns.set(ME, [("TXT", '"no address here"')])

    [(status, message)] = only(await deployment.findings(), "address")

    assert status == PROBLEM
    assert "no A or AAAA record" in message


async def test_a_dns_failure_is_a_problem_not_a_crash(deployment: Deployment) -> None:
    deployment.dns.servfail(ME)

    [(status, message)] = only(await deployment.findings(), "address")

    assert status == PROBLEM
    assert message.startswith("cannot resolve our host name: ")


# -- the primary ------------------------------------------------------------------------------


async def test_only_mx_hosts_preferred_over_us_are_probed(
    deployment: Deployment, fake_primary: StartPrimary
) -> None:
    worse = await fake_primary(address="127.0.0.4", port=deployment.port, hostname="mx3.test")
    deployment.dns.set(
        DOMAIN, [("MX", f"10 {PRIMARY}."), ("MX", f"20 {ME}."), ("MX", "30 mx3.test.")]
    )
    deployment.dns.set("mx3.test", [("A", "127.0.0.4")])

    findings = await deployment.findings()

    assert only(findings, "primary") == [
        (
            OK,
            "MX hosts preferred over us answer SMTP:"
            f" {PRIMARY} {PRIMARY_ADDRESS}:{deployment.port}",
        )
    ]
    assert worse.connections == 0


async def test_a_primary_that_does_not_answer_is_a_problem(deployment: Deployment) -> None:
    down = f"127.0.0.3:{unused_port('127.0.0.3')}"

    findings = await deployment.findings(domain=[{"name": DOMAIN, "primary": [down]}])

    [finding] = [f for f in findings if f.check == "primary"]
    assert finding.status == PROBLEM
    assert finding.message.startswith(f"primary do not answer: 127.0.0.3 {down}: 421 4.4.1")
    assert "keeps the mail until the primary answers" in finding.fix
    assert deployment.primary.connections == 0  # fixed primaries: the MX hosts are not asked


async def test_a_callout_domain_that_knows_nobody_while_its_primary_is_down_is_a_problem(
    deployment: Deployment,
) -> None:
    """Installed during an outage: every recipient would get 450 until mailboxes are imported."""
    down = f"127.0.0.3:{unused_port('127.0.0.3')}"
    callout = {"name": DOMAIN, "primary": [down], "verify": "callout"}

    [finding] = [f for f in await deployment.findings(domain=[callout]) if f.check == "recipients"]
    assert finding.status == PROBLEM
    assert finding.message.startswith("every recipient gets 450 4.1.1 right now")
    assert finding.fix.startswith("relay recipients import FILE")

    Store(deployment.config().queue.path).close()  # the server made it at its first start
    cli_config = write_config(deployment.tmp_path, "cli.toml", domain=[callout])
    result = await asyncio.to_thread(
        subprocess.run,
        relay_command("recipients", "import", "-", "--config", str(cli_config)),
        input=f"bob@{DOMAIN}\n".encode(),
        env=relay_env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [finding] = [f for f in await deployment.findings(domain=[callout]) if f.check == "recipients"]
    assert (finding.status, finding.message) == (
        OK,
        "1 mailbox known: accepted while the primary is down",
    )


async def test_a_callout_domain_that_knows_nobody_is_a_warning_while_its_primary_answers(
    deployment: Deployment,
) -> None:
    callout = {"name": DOMAIN, "primary": [f"{PRIMARY_ADDRESS}:{deployment.port}"]}
    findings = await deployment.findings(domain=[{**callout, "verify": "callout"}])
    assert status_of(findings, "recipients") == [WARNING]
    listed = await deployment.findings(
        domain=[{**callout, "verify": "callout", "recipients": ["bob"]}]
    )
    assert status_of(listed, "recipients") == []
    assert status_of(await deployment.findings(domain=[callout]), "recipients") == []


async def test_a_primary_refusing_sessions_is_a_problem(
    deployment: Deployment, fake_primary: StartPrimary
) -> None:
    busy = await fake_primary(address="127.0.0.3", greeting="554 5.3.2 not now")

    findings = await deployment.findings(
        domain=[{"name": DOMAIN, "primary": [f"127.0.0.3:{busy.port}"]}]
    )

    [(status, message)] = only(findings, "primary")
    assert status == PROBLEM
    assert "554 5.3.2 not now" in message


async def test_one_primary_address_down_is_a_warning(deployment: Deployment) -> None:
    deployment.dns.set(PRIMARY, [("A", PRIMARY_ADDRESS), ("A", "127.0.0.9")])

    [(status, message)] = only(await deployment.findings(), "primary")

    assert status == WARNING
    assert message.startswith(f"{PRIMARY} {PRIMARY_ADDRESS}:{deployment.port} answer; ")
    assert f"{PRIMARY} 127.0.0.9:{deployment.port}: 421 4.4.1" in message


async def test_a_primary_shared_by_two_domains_is_probed_once(deployment: Deployment) -> None:
    deployment.dns.set("example2.test", [("MX", f"10 {PRIMARY}."), ("MX", f"20 {ME}.")])

    findings = await deployment.findings(domain=[{"name": DOMAIN}, {"name": "example2.test"}])

    assert status_of(findings, "primary") == [OK, OK]
    assert deployment.primary.connections == 1


async def test_no_route_to_the_primary_is_a_problem(deployment: Deployment) -> None:
    deployment.dns.set(DOMAIN, [("MX", f"10 {ME}.")])

    [(status, message)] = only(await deployment.findings(), "primary")

    assert status == PROBLEM
    assert message.startswith("no MX hosts preferred over us to deliver to: no MX host preferred")


# -- TLS --------------------------------------------------------------------------------------


async def test_a_valid_certificate_for_our_name_is_ok(deployment: Deployment) -> None:
    [finding] = [f for f in await deployment.findings() if f.check == "tls"]

    assert (finding.status, finding.message) == (
        OK,
        "covers our host name; valid until 2030-04-01 00:00 UTC (59 days)",
    )
    assert finding.subject == str(deployment.tmp_path / "fullchain.pem")


async def test_no_certificate_is_a_warning(deployment: Deployment) -> None:
    deployment.overrides.pop("tls")

    [(status, message)] = only(await deployment.findings(), "tls")

    assert status == WARNING
    assert message.startswith("no certificate configured")


async def test_a_certificate_for_another_name_is_a_problem(deployment: Deployment) -> None:
    deployment.certificate("other.test", "mail.relay.test")

    [(status, message)] = only(await deployment.findings(), "tls")

    assert status == PROBLEM
    assert message == f"the certificate does not cover {ME}: it names other.test, mail.relay.test"
    # No "ok: covers our host name" beside it (issue 18): the doctor never contradicts itself.


async def test_an_expired_certificate_for_another_name_says_both(deployment: Deployment) -> None:
    deployment.certificate("other.test", not_after=datetime(2030, 1, 1, tzinfo=UTC))
    deployment.clock = datetime(2030, 6, 1, tzinfo=UTC).timestamp()
    findings = only(await deployment.findings(), "tls")
    assert [status for status, _ in findings] == [PROBLEM, PROBLEM]
    assert findings[1][1].startswith("the certificate expired on 2030-01-01")


async def test_a_self_signed_certificate_is_a_warning_that_names_who_refuses_it(
    deployment: Deployment,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ME)])
    now = datetime.fromtimestamp(deployment.clock, UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(ME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = deployment.tmp_path / "self.pem", deployment.tmp_path / "self.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    deployment.overrides["tls"] = {"cert": str(cert_path), "key": str(key_path)}

    [(status, message)] = only(await deployment.findings(), "tls")
    assert status == WARNING
    assert message.startswith("the certificate is self-signed: senders doing opportunistic TLS")
    assert "MTA-STS senders in enforce mode do not deliver to us" in message


async def test_a_wildcard_certificate_covers_one_label(deployment: Deployment) -> None:
    deployment.certificate("*.example.test")
    assert status_of(await deployment.findings(hostname="mx2.example.test"), "tls") == [OK]
    assert status_of(await deployment.findings(hostname="a.mx2.example.test"), "tls") == [PROBLEM]


async def test_a_certificate_expiring_within_14_days_is_a_warning(deployment: Deployment) -> None:
    deployment.clock = datetime(2030, 3, 22, tzinfo=UTC).timestamp()

    [finding] = [f for f in await deployment.findings() if f.check == "tls"]

    assert finding.status == WARNING
    assert finding.message == "the certificate expires on 2030-04-01 00:00 UTC, in 10 days"
    assert "certbot renew" in finding.fix


async def test_an_expired_certificate_is_a_problem(deployment: Deployment) -> None:
    deployment.clock = datetime(2030, 4, 2, tzinfo=UTC).timestamp()

    assert only(await deployment.findings(), "tls") == [
        (PROBLEM, "the certificate expired on 2030-04-01 00:00 UTC")
    ]


async def test_a_certificate_not_yet_valid_is_a_problem(deployment: Deployment) -> None:
    deployment.clock = datetime(2029, 12, 1, tzinfo=UTC).timestamp()

    assert status_of(await deployment.findings(), "tls") == [PROBLEM]


async def test_a_key_that_does_not_match_the_certificate_is_a_problem(
    deployment: Deployment,
) -> None:
    deployment.certificate(ME, key_of=trustme.CA().issue_cert(ME))

    [finding] = [f for f in await deployment.findings() if f.check == "tls"]

    assert finding.status == PROBLEM
    assert finding.message.startswith("cannot load the certificate and key: ")


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("relay.test", "relay.test", True),
        ("RELAY.test.", "relay.TEST", True),
        ("*.example.org", "mx2.example.org", True),
        ("*.example.org", "example.org", False),
        ("*.example.org", "a.mx2.example.org", False),
        ("*.org", "example.org", False),
        ("mx*.example.org", "mx2.example.org", False),
        ("*.*.example.org", "a.b.example.org", False),
        ("other.example.org", "mx2.example.org", False),
    ],
)
def test_names_match_exactly_or_by_one_leftmost_wildcard_label(
    pattern: str, host: str, matches: bool
) -> None:
    assert name_matches(pattern, host) is matches


# -- MTA-STS ----------------------------------------------------------------------------------


def publish_sts(deployment: Deployment, policy: str, **kwargs: str) -> None:
    deployment.dns.set(f"_mta-sts.{DOMAIN}", [("TXT", '"v=STSv1; id=1"')])
    deployment.policies.policy(policy, **kwargs)


async def test_no_mta_sts_policy_fetches_nothing(deployment: Deployment) -> None:
    findings = await deployment.findings()

    assert only(findings, "mta-sts") == [(OK, "no MTA-STS policy published (nothing to check)")]
    assert deployment.policies.requests == []


async def test_an_enforced_policy_without_us_is_a_problem(deployment: Deployment) -> None:
    publish_sts(deployment, f"version: STSv1\r\nmode: enforce\r\nmx: {PRIMARY}\r\nmax_age: 60\r\n")

    [finding] = [f for f in await deployment.findings() if f.check == "mta-sts"]

    assert finding.status == PROBLEM
    assert finding.message == (
        f"policy mode enforce lists {PRIMARY} but not {ME}:"
        " senders enforcing it will not deliver to us"
    )
    assert finding.fix.startswith(f"add `mx: {ME}` to ")


async def test_a_testing_policy_without_us_is_a_warning(deployment: Deployment) -> None:
    publish_sts(deployment, f"version: STSv1\nmode: testing\nmx: {PRIMARY}\nmax_age: 60\n")

    assert status_of(await deployment.findings(), "mta-sts") == [WARNING]


async def test_a_wildcard_mx_pattern_covers_us(deployment: Deployment) -> None:
    publish_sts(deployment, "version: STSv1\nmode: enforce\nmx: *.example.test\nmax_age: 60\n")
    deployment.certificate("mx2.example.test")

    findings = await deployment.findings(hostname="mx2.example.test")

    assert only(findings, "mta-sts") == [(OK, "policy mode enforce lists us (*.example.test)")]


async def test_an_enforced_policy_listing_us_without_tls_is_a_problem(
    deployment: Deployment,
) -> None:
    publish_sts(deployment, f"version: STSv1\nmode: enforce\nmx: {ME}\nmax_age: 60\n")
    deployment.overrides.pop("tls")

    [(status, message)] = only(await deployment.findings(), "mta-sts")

    assert status == PROBLEM
    assert "we offer no STARTTLS" in message


async def test_a_policy_that_cannot_be_fetched_is_a_warning(deployment: Deployment) -> None:
    deployment.dns.set(f"_mta-sts.{DOMAIN}", [("TXT", '"v=STSv1; id=1"')])

    [(status, message)] = only(await deployment.findings(), "mta-sts")

    assert status == WARNING
    assert message.endswith("failed: HTTP 404 Not Found")


async def test_a_redirected_policy_is_not_followed(deployment: Deployment) -> None:
    deployment.dns.set(f"_mta-sts.{DOMAIN}", [("TXT", '"v=STSv1; id=1"')])
    elsewhere = f"http://127.0.0.1:{deployment.policies.port}/elsewhere"
    deployment.policies.pages[f"/{DOMAIN}/.well-known/mta-sts.txt"] = (302, "text/plain", elsewhere)
    deployment.policies.pages["/elsewhere"] = (200, "text/plain", "version: STSv1\nmode: none\n")

    [(status, message)] = only(await deployment.findings(), "mta-sts")

    assert status == WARNING
    assert message.endswith("failed: HTTP 302 Found")
    assert deployment.policies.requests == [f"/{DOMAIN}/.well-known/mta-sts.txt"]


async def test_a_policy_served_as_html_is_a_warning(deployment: Deployment) -> None:
    publish_sts(deployment, f"version: STSv1\nmode: enforce\nmx: {ME}\n", content_type="text/html")

    statuses = status_of(await deployment.findings(), "mta-sts")

    assert statuses == [WARNING, OK]


def test_policies_are_parsed_as_rfc_8461_key_value_lines() -> None:
    policy = parse_policy("version: STSv1\r\nmode: enforce\r\nmx: a.test\r\nmx: *.b.test\r\n")
    assert (policy.version, policy.mode, policy.mx) == ("STSv1", "enforce", ("a.test", "*.b.test"))


# -- the records as published (relay.mx) --------------------------------------------------------


async def test_the_router_reports_records_as_published(dns_server: DnsServer) -> None:
    dns_server.set(DOMAIN, [("MX", "20 B.test."), ("MX", "10 a.test."), ("TXT", '"x" "y"')])
    dns_server.set("a.test", [("A", "127.0.0.9"), ("AAAA", "::1")])
    dns_server.set("null.test", [("MX", "0 .")])
    dns_server.servfail("broken.test")
    router = Router(hostname=ME, listen=[("0.0.0.0", 25)], nameservers=[dns_server.address])

    assert await router.mx_records(DOMAIN) == [(10, "a.test"), (20, "b.test")]
    assert await router.mx_records("null.test") == [(0, ".")]
    assert await router.addresses("a.test") == ["127.0.0.9", "::1"]
    assert await router.addresses("missing.test") == []
    assert await router.txt_records(DOMAIN) == ["xy"]
    assert await router.txt_records("missing.test") == []
    with pytest.raises(RouteError):
        await router.addresses("broken.test")
    with pytest.raises(RouteError) as caught:
        await router.mx_records("missing.test")
    assert caught.value.kind == "nxdomain"
    assert router.is_our_name("RELAY.test.")
    assert router.listens_on("127.0.0.9", 25) and not router.listens_on("127.0.0.9", 26)


# -- the relay as a sender: reverse DNS and SPF ------------------------------------------------


@pytest.mark.parametrize(
    ("records", "status", "start"),
    [
        ([], PROBLEM, "no PTR record: receivers"),
        ([("PTR", "nowhere.test.")], PROBLEM, "PTR nowhere.test does not resolve back"),
        ([("PTR", "vps-127-0-0-5.example.test.")], WARNING, "PTR vps-127-0-0-5.example.test"),
        ([("PTR", f"{ME}.")], OK, f"PTR {ME} resolves back to {OUR_ADDRESS}"),
    ],
)
async def test_reverse_dns_must_confirm_forward_and_should_name_us(
    deployment: Deployment, records: list[tuple[str, str]], status: str, start: str
) -> None:
    deployment.dns.set(REVERSE, records)
    deployment.dns.set("vps-127-0-0-5.example.test", [("A", OUR_ADDRESS)])
    [(found, message)] = only(await deployment.findings(), "rdns")
    assert (found, message[: len(start)]) == (status, start)


@pytest.mark.parametrize(
    ("spf", "status", "part"),
    [
        (None, WARNING, "no SPF record for our HELO name"),
        ('"v=spf1 ip4:192.0.2.0/24 -all"', PROBLEM, f"({OUR_ADDRESS}: fail)"),
        ('"v=spf1 ~all"', PROBLEM, f"({OUR_ADDRESS}: softfail)"),
        ('"v=spf1 ip4:127.0.0.0/8 -all"', OK, "permits 127.0.0.5"),
        ('"v=spf1 include:_spf.example.test -all"', OK, "permits 127.0.0.5"),
        ('"v=spf1 redirect=_spf.example.test"', OK, "permits 127.0.0.5"),
        ('"v=spf1 mx:primary-only.test -all"', PROBLEM, "fail"),  # its MX is not us
        ('"v=spf1 mx:example.test -all"', OK, "permits"),  # we are MX 20 of example.test
        ('"v=spf1 exists:%{i}.spf.test -all"', WARNING, "which the doctor does not evaluate"),
        ('"v=spf1 include:missing.test -all"', PROBLEM, "include:missing.test has no SPF"),
    ],
)
async def test_the_spf_of_our_helo_name_must_permit_our_address(
    deployment: Deployment, spf: str | None, status: str, part: str
) -> None:
    """Our DSNs have MAIL FROM:<>, so receivers check the SPF of our HELO name (RFC 7208 2.3)."""
    deployment.dns.set(ME, [("A", OUR_ADDRESS)] + ([("TXT", spf)] if spf else []))
    deployment.dns.set("_spf.example.test", [("TXT", '"v=spf1 ip4:127.0.0.5 -all"')])
    deployment.dns.set("primary-only.test", [("MX", f"10 {PRIMARY}.")])
    [(found, message)] = only(await deployment.findings(), "spf")
    assert found == status and part in message, message


async def test_two_spf_records_are_a_permerror(deployment: Deployment) -> None:
    two = [("A", OUR_ADDRESS), ("TXT", '"v=spf1 a -all"'), ("TXT", '"v=spf1 -all"')]
    deployment.dns.set(ME, two)
    [(found, message)] = only(await deployment.findings(), "spf")
    assert found == PROBLEM and "2 SPF records" in message


# -- the command ------------------------------------------------------------------------------


async def test_the_command_prints_findings_with_fixes_and_exits_1_on_a_problem(
    deployment: Deployment,
) -> None:
    deployment.dns.set(DOMAIN, [("MX", f"10 {ME}.")])
    deployment.overrides.pop("tls")
    config = write_config(deployment.tmp_path, **config_data(deployment))

    result = await asyncio.to_thread(run_relay, "doctor", "--config", str(config))

    out = result.stdout.decode()
    assert result.returncode == 1, result.stderr
    assert f"problem  mx         {DOMAIN}: MX 10 {ME}: nothing is preferred" in out
    assert "\n                    fix: give the primary a lower number" in out
    assert out.rstrip().endswith("5 ok, 1 to check by hand, 1 warning, 2 problems")
    assert "\n                    how: from a machine on another network: swaks --server" in out


async def test_the_command_prints_json_and_exits_0_when_all_is_well(
    deployment: Deployment,
) -> None:
    config = write_config(deployment.tmp_path, **config_data(deployment))

    result = await asyncio.to_thread(run_relay, "doctor", "--json", "--config", str(config))

    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert (report["ok"], report["info"], report["warning"], report["problem"]) == (8, 1, 0, 0)
    assert report["findings"][0] == {
        "status": "ok",
        "check": "address",
        "subject": ME,
        "message": f"resolves to {OUR_ADDRESS}, where we listen ({OUR_ADDRESS}:{deployment.port})",
        "fix": "",
    }
    assert deployment.primary.connections == 1


def config_data(deployment: Deployment) -> dict[str, Any]:
    """The deployment's config as write_config overrides (the certificate is valid today)."""
    if "tls" in deployment.overrides:
        now = datetime.now(UTC)
        deployment.certificate(
            ME, not_before=now - timedelta(days=30), not_after=now + timedelta(days=365)
        )
    config = deployment.config()
    data: dict[str, Any] = {
        "hostname": ME,
        "smtp": {"listen": [f"{OUR_ADDRESS}:{deployment.port}"]},
        "delivery": {"mx_port": deployment.port},
        "dns": {"nameservers": [deployment.dns.address]},
        "domain": [{"name": DOMAIN}],
        "metrics": {"listen": ""},
    }
    if config.tls.enabled:
        data["tls"] = {"cert": config.tls.cert, "key": config.tls.key}
    return data
