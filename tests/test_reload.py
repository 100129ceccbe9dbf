"""SIGHUP is explicit: every configuration key either applies on reload or says it needs a restart.

One case per key of the contract (deploy/relay.toml): the running server is reloaded with only
that key changed, and either uses the new value (the configuration every part reads, and the
router for the keys that shape routing) or keeps the running one and logs that a restart is
needed. A key added without a row here fails `test_every_documented_key_has_a_row`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay import config as config_module
from relay.service import Relay
from relay.smtp import arc as arc_keys
from tests.conftest import DOMAIN, config_mapping, toml_text
from tests.test_deploy import DOCUMENTED_KEYS

# key → a value other than the test config's own
CHANGES: dict[str, Any] = {
    "hostname": "other.test",
    "postmaster": "pm@example.test",
    "smtp.listen": ["127.0.0.2:0"],
    "smtp.max_message_size": "1M",
    "smtp.max_recipients": 7,
    "smtp.max_hops": 9,
    "smtp.etrn_clients": ["127.0.0.9"],
    "smtp.max_connections": 9,
    "smtp.max_connections_per_ip": 3,
    "smtp.max_messages_per_session": 4,
    "smtp.max_unknown_recipients": 5,
    "smtp.rate_per_ip": 6,
    "smtp.command_timeout": "2m",
    "smtp.data_timeout": "3m",
    "smtp.min_data_rate": 1000,
    "smtp.max_junk_commands": 7,
    "smtp.stress_timeout": "20s",
    "smtp.max_line_length": 1000,
    "smtp.max_inflight_bytes": "1M",
    "smtp.workers": 2,
    "tls.cert": "CERT",
    "tls.key": "KEY",
    "queue.path": "QUEUE2",
    "queue.lifetime": "1d",
    "queue.on_expiry": "hold",
    "queue.min_free_space": "2M",
    "delivery.concurrency": 3,
    "delivery.per_host_concurrency": 2,
    "delivery.probe_interval": "9s",
    "delivery.mx_port": 2526,
    "delivery.timeout": "1m",
    "delivery.cafile": "CERT",
    "retry.min": "2m",
    "retry.max": "20m",
    "retry.warn_after": "1h",
    "metrics.listen": "127.0.0.2:0",
    "status.listen": "127.0.0.2:0",
    "status.public": True,
    "spam.rspamd": "http://127.0.0.1:11333",
    "spam.rspamd_failure": "tempfail",
    "spam.rspamd_timeout": "3s",
    "spam.auth": False,
    "spam.auth_timeout": "3s",
    "arc.key": "ARCKEY",
    "arc.selector": "s2027",
    "arc.domain": "relay.example",
    "dns.nameservers": ["127.0.0.1:5353"],
    "log.format": "json",
    "domain.name": "example.org",
    "domain.primary": ["127.0.0.1:2"],
    "domain.tls": "require",
    "domain.recipients": ["bob"],
    "domain.recipients_file": "RECIPIENTS",
    "domain.verify": "callout",
    "domain.verify_positive_ttl": "2d",
    "domain.verify_negative_ttl": "2h",
    "domain.verify_unknown_while_down": "accept",
    "domain.accept": "when_primary_down",
    "domain.rescue": True,
    "domain.rescue_after": "1h",
    "domain.rescue_keep": "5d",
    "domain.spf_fail": "reject",
    "domain.dmarc_reject": "tag",
    "domain.bounce_unauthenticated": "send",
    "rescue.path": "RESCUE",
    "spam.dnsbl": ["zen.test*3"],
    "spam.dnsbl_threshold": 5,
    "spam.dnsbl_action": "banner",
    "spam.dnsbl_timeout": "2s",
    "spam.greet_delay": "1s",
}


def test_every_documented_key_has_a_row() -> None:
    assert set(CHANGES) == DOCUMENTED_KEYS


def _value(cfg: config_module.Config, key: str) -> Any:
    if key.startswith("domain."):
        return getattr(cfg.domains[0], key.split(".", 1)[1])
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name) if name else getattr(cfg, section)


def _changed(data: dict[str, Any], key: str, tmp_path: Path) -> dict[str, Any]:
    value = CHANGES[key]
    placeholders = {
        "CERT": str(tmp_path / "cert.pem"),
        "KEY": str(tmp_path / "key.pem"),
        "QUEUE2": str(tmp_path / "other" / "queue.db"),
        "RECIPIENTS": str(tmp_path / "recipients.txt"),
        "RESCUE": str(tmp_path / "other" / "rescue"),
        "ARCKEY": str(tmp_path / "arc.key"),
    }
    value = placeholders.get(value, value) if isinstance(value, str) else value
    if key.startswith("domain."):
        data["domain"] = [{**data["domain"][0], key.split(".", 1)[1]: value}]
    elif key.startswith("tls."):
        data["tls"] = {"cert": placeholders["CERT"], "key": placeholders["KEY"]}
    elif key.startswith("arc."):  # a seal needs its key, selector and domain together
        data["arc"] = {"key": placeholders["ARCKEY"], "selector": "s1", "domain": "relay.test"}
        data["arc"][key.split(".", 1)[1]] = value
    elif key == "status.listen":  # a listener of its own is for a public page only
        data["status"] = {"listen": value, "public": True}
    elif "." in key:
        section, _, name = key.partition(".")
        data[section] = {**data.get(section, {}), name: value}
    else:
        data[key] = value
    return data


@pytest.mark.parametrize("key", sorted(CHANGES))
async def test_a_reload_applies_the_key_or_says_it_needs_a_restart(
    tmp_path: Path, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    cert = trustme.CA().issue_cert("relay.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "recipients.txt").write_text("bob\n")
    arc_keys.generate_key(str(tmp_path / "arc.key"))
    (tmp_path / "other").mkdir()
    data = config_mapping(tmp_path, domain=[{"name": DOMAIN, "primary": ["127.0.0.1:1"]}])
    path = tmp_path / "relay.toml"
    path.write_text(toml_text(data))
    server = Relay(config_module.load(path))
    await server.start()
    try:
        before = _value(server.config, key)
        path.write_text(toml_text(_changed(data, key, tmp_path)))
        with caplog.at_level(logging.INFO, logger="relay"):
            server.reload(str(path))
        wanted = _value(config_module.load(path), key)
        assert wanted != before, "the case must change the key"
        assert "configuration reloaded" in caplog.text
        if key in config_module.NEEDS_RESTART:
            assert f"reload: {key} changed: restart relay to apply" in caplog.text
            assert _value(server.config, key) == before  # what the server still runs on
        else:
            assert "restart relay" not in caplog.text
            assert _value(server.config, key) == wanted
        assert server.scheduler is not None
        router = server.scheduler.router
        assert (router.hostname, router.mx_port) == (
            server.config.hostname,
            server.config.delivery.mx_port,
        )
    finally:
        await server.stop(grace=1)


def test_the_docs_table_says_what_the_code_does() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text("utf-8")
    rows = {}
    for line in doc.splitlines():
        if line.startswith("| `") and line.endswith(("needs a restart |", "applies on SIGHUP |")):
            shown, when = (cell.strip() for cell in line.strip("|").split("|"))
            key = shown.strip("`").replace("[[domain]] ", "domain.")
            rows[key] = when == "needs a restart"
    assert set(rows) == DOCUMENTED_KEYS
    assert {key for key, restart in rows.items() if restart} == set(config_module.NEEDS_RESTART)
