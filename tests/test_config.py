"""The configuration contract: key names, units, and one clear line per problem.

Loading is tested through `relay.config.load` on real files; `relay check-config` and `relay serve`
are tested as the real command, since their exit codes and messages are what operators script.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.config import ConfigError
from tests.conftest import DOMAIN, run_relay, toml_text, write_config


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_every_documented_key_loads_with_its_units(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
hostname = "mx2.example.org."
[smtp]
listen = ["127.0.0.1:2525", "[::1]:2525"]
max_message_size = "50M"
max_recipients = 100
max_hops = 30
[queue]
path = "{tmp_path}/spool/queue.db"
lifetime = "5d"
[metrics]
listen = "127.0.0.1:9325"
[dns]
nameservers = ["127.0.0.1:5353", "::1"]
[[domain]]
name = "Example.ORG"
primary = ["mx1.example.org:25", "mx1b.example.org"]
[[domain]]
name = "example.net"
""",
    )
    cfg = config.load(path)
    assert cfg.source == str(path)
    assert cfg.hostname == "mx2.example.org"
    assert cfg.smtp.listen == (("127.0.0.1", 2525), ("::1", 2525))
    assert cfg.smtp.max_message_size == 50 * 1024 * 1024
    assert cfg.smtp.max_recipients == 100
    assert cfg.smtp.max_hops == 30
    assert cfg.queue.path == f"{tmp_path}/spool/queue.db"
    assert cfg.queue.lifetime == 5 * 86400
    assert cfg.metrics.listen == ("127.0.0.1", 9325)
    assert cfg.dns.nameservers == ("127.0.0.1:5353", "::1")
    assert [d.name for d in cfg.domains] == ["example.org", "example.net"]
    assert cfg.domains[0].primary == ("mx1.example.org:25", "mx1b.example.org")
    assert cfg.domains[1].primary == ()


def test_defaults_fill_every_key_left_out(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            f'postmaster = "pm@a.test"\n[queue]\npath = "{tmp_path}/q.db"\n'
            '[[domain]]\nname = "a.test"\n',
        )
    )
    assert cfg.smtp.listen == (("0.0.0.0", 25), ("::", 25))
    assert cfg.smtp.max_message_size == 50 * 1024**2
    assert cfg.smtp.max_recipients == 100
    assert cfg.smtp.max_hops == 50
    assert cfg.queue.lifetime == 5 * 86400
    assert cfg.metrics.listen == ("127.0.0.1", 9325)
    assert cfg.dns.nameservers == ()
    assert cfg.hostname  # the machine's FQDN


@pytest.mark.parametrize(
    ("listen", "required"),
    [
        (["127.0.0.1:2525"], False),
        (["[::1]:2525", "localhost:2525"], False),
        (["127.0.0.1:2525", "192.0.2.7:25"], True),
        (["0.0.0.0:25"], True),
    ],
)
def test_postmaster_is_required_once_other_hosts_can_send(
    tmp_path: Path, listen: list[str], required: bool
) -> None:
    """RFC 5321 4.5.1: a server that takes mail from the internet must have a postmaster."""
    path = write_config(tmp_path, smtp={"listen": listen})
    if not required:
        assert config.load(path).postmaster is None
        return
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: postmaster: required when smtp.listen takes mail from")
    assert "postmaster@relay.test and abuse@relay.test" in problem
    good = write_config(tmp_path, smtp={"listen": listen}, postmaster="Hostmaster@Example.ORG")
    assert config.load(good).postmaster == "Hostmaster@example.org"


@pytest.mark.parametrize("value", ["postmaster", "a b@example.org", "<pm@example.org>", "pm@x", 3])
def test_a_postmaster_that_is_not_an_address_is_refused(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write_config(tmp_path, postmaster=value))
    assert caught.value.problems[0].startswith(f"{tmp_path}/relay.toml: postmaster: expected a")


def test_domains_match_case_insensitively_and_never_by_subdomain(tmp_path: Path) -> None:
    cfg = config.load(write_config(tmp_path))
    assert cfg.domain("EXAMPLE.test") is not None
    assert cfg.domain("sub.example.test") is None
    assert cfg.domain("test") is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("4h", 14400),
        ("5d", 432000),
        ("1w", 604800),
        ("90", 90),
        (45, 45),
    ],
)
def test_durations_accept_the_documented_units(text: str | int, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512K", 512 * 1024),
        ("50M", 50 * 1024**2),
        ("1G", 1024**3),
        ("10MB", 10 * 1024**2),
        (1000, 1000),
    ],
)
def test_sizes_accept_the_documented_units(text: str | int, size: int) -> None:
    assert config.parse_size(text) == size


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("", "hostnme", "typo.example", "hostnme: unknown key"),
        ("smtp", "max_recipient", 10, "smtp.max_recipient: unknown key"),
        ("queue", "lifetime", "5 days", "queue.lifetime: bad duration '5 days'"),
        ("queue", "lifetime", -1, "queue.lifetime: must not be negative"),
        ("smtp", "max_message_size", "50Q", "smtp.max_message_size: bad size '50Q'"),
        ("smtp", "max_message_size", True, "smtp.max_message_size: expected a size"),
        ("smtp", "max_recipients", 0, "smtp.max_recipients: must be at least 1, got 0"),
        ("smtp", "max_hops", "50", "smtp.max_hops: expected a whole number, got '50'"),
        ("smtp", "listen", ["127.0.0.1"], "smtp.listen: bad address '127.0.0.1'"),
        ("smtp", "listen", [], "smtp.listen: needs at least one host:port"),
        ("metrics", "listen", "localhost:http", "metrics.listen: bad port in 'localhost:http'"),
        ("dns", "nameservers", ["dns.example:53"], "dns.nameservers: 'dns.example' does not"),
        ("tls", "cert", "/nonexistent/cert.pem", "tls.key: cert and key must be set together"),
    ],
)
def test_each_kind_of_mistake_is_one_line_naming_the_file_and_key(
    tmp_path: Path, section: str, key: str, value: object, expected: str
) -> None:
    data: dict[str, Any] = {"queue": {"path": str(tmp_path / "q.db")}, "domain": [{"name": DOMAIN}]}
    if section:
        data.setdefault(section, {})[key] = value
    else:
        data[key] = value
    path = write(tmp_path, toml_text(data))
    problems = problems_of(path)
    assert any(p.startswith(f"{path}: {expected}") for p in problems), problems


def test_a_config_without_a_domain_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f'postmaster = "pm@a.test"\n[queue]\npath = "{tmp_path}/q.db"\n')
    assert problems_of(path) == [
        f"{path}: domain: no [[domain]] configured: the relay would accept nothing"
    ]


def test_a_domain_needs_a_valid_name_and_may_not_be_listed_twice(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'postmaster = "pm@a.test"\n[queue]\npath = "{tmp_path}/q.db"\n'
        '[[domain]]\nprimary = ["mx.a.test"]\n'
        '[[domain]]\nname = "bad name!"\n'
        '[[domain]]\nname = "b.test"\n[[domain]]\nname = "B.test"\n'
        '[[domain]]\nname = "c.test"\nprimry = ["x"]\n',
    )
    assert problems_of(path) == [
        f"{path}: domain[0].name: missing: every [[domain]] needs a name",
        f"{path}: domain[1].name: bad domain name 'bad name!'",
        f"{path}: domain[3].name: b.test is listed twice",
        f"{path}: domain[4].primry: unknown key",
    ]


def test_a_queue_directory_that_cannot_exist_is_refused_before_start(tmp_path: Path) -> None:
    # Tests run as root, for whom every directory is writable: a regular file in the way makes
    # the directory impossible for anyone.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    below = write_config(tmp_path, "below.toml", queue={"path": f"{blocker}/queue.db"})
    deeper = write_config(tmp_path, "deeper.toml", queue={"path": f"{blocker}/spool/queue.db"})
    assert problems_of(below) == [
        f"{below}: queue.path: directory {blocker} cannot be created: {blocker} is not a directory"
    ]
    assert problems_of(deeper) == [
        f"{deeper}: queue.path: directory {blocker}/spool cannot be created:"
        f" {blocker} is not a directory"
    ]


def test_a_queue_path_naming_a_directory_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, queue={"path": str(tmp_path)})
    assert problems_of(path) == [
        f"{path}: queue.path: {tmp_path} is a directory, not a database file"
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "hostnme = 'x'\npostmaster = 'pm@a.test'\n"
        "[smtp]\nmax_message_size = 'huge'\n[queue]\nlifetime = 'forever'\n"
        f'path = "{tmp_path}/q.db"\n',
    )
    problems = problems_of(path)
    assert [p.split(": ")[1] for p in problems] == [
        "smtp.max_message_size",
        "queue.lifetime",
        "domain",
        "hostnme",
    ]


def test_an_unreadable_or_malformed_file_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert problems_of(missing) == [f"{missing}: cannot read: No such file or directory"]
    broken = write(tmp_path, "[smtp\n")
    (problem,) = problems_of(broken)
    assert problem.startswith(f"{broken}: not valid TOML: ")


# -- the commands ---------------------------------------------------------------------------


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = run_relay("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"{path}: ok (hostname relay.test; 1 domain: {DOMAIN})\n"
    assert result.stderr == b""


def many_domains(tmp_path: Path, count: int, name: str = "relay.toml") -> Path:
    """A config listing `count` customer domains, as a backup-MX provider's would."""
    domains = [
        {"name": f"d{i}.example.test", "primary": [f"mx.d{i}.example.test"]} for i in range(count)
    ]
    return write_config(tmp_path, name, domain=domains)


def test_check_config_summarizes_thousands_of_domains_and_lists_them_with_verbose(
    tmp_path: Path,
) -> None:
    path = many_domains(tmp_path, 10_000)
    result = run_relay("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == (
        f"{path}: ok (hostname relay.test; 10,000 domains: d0.example.test, d1.example.test,"
        " d2.example.test, d3.example.test, d4.example.test, … (see --verbose))\n"
    )
    verbose = run_relay("check-config", "--verbose", "--config", str(path))
    assert verbose.returncode == 0, verbose.stderr
    listed = verbose.stdout.decode().split("10,000 domains: ", 1)[1].rstrip(")\n").split(", ")
    assert listed == [f"d{i}.example.test" for i in range(10_000)]


def test_ten_thousand_domains_load_in_linear_time(tmp_path: Path) -> None:
    """Loading 10,000 domains costs about 10,000 times the per-domain work, not its square.

    A ratio, not a wall-clock limit, so a slow or busy machine does not fail it: linear loading
    measures about 1,500 single-domain loads here; comparing each domain with every earlier one
    (the bug of issue 18) measured about 12,000.
    """
    one = many_domains(tmp_path, 1, "one.toml")
    many = many_domains(tmp_path, 10_000, "many.toml")

    def fastest(path: Path, runs: int) -> float:
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            config.load(path)
            best = min(best, time.perf_counter() - start)
        return best

    budget = 5_000 * fastest(one, 50)
    assert len(config.load(many).domains) == 10_000
    assert fastest(many, 3) < budget


def test_a_domain_listed_twice_is_named_among_thousands(tmp_path: Path) -> None:
    domains = [{"name": f"d{i}.example.test"} for i in range(3000)] + [{"name": "d7.example.test"}]
    path = write_config(tmp_path, domain=domains)
    assert problems_of(path) == [f"{path}: domain[3000].name: d7.example.test is listed twice"]


BROKEN = """
hostname = "relay.test"
[smtp]
listen = ["127.0.0.1:0"]
max_message_size = "50Q"
[queue]
path = "{path}"
lifetime = "5x"
retention = "1d"
"""


def broken_config(tmp_path: Path) -> tuple[Path, list[str]]:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = write(tmp_path, BROKEN.format(path=f"{blocker}/queue.db"))
    expected = [
        f"{path}: smtp.max_message_size: bad size '50Q': expected a number with K, M, G or T",
        f"{path}: queue.lifetime: bad duration '5x': expected a number with s, m, h, d or w",
        f"{path}: domain: no [[domain]] configured: the relay would accept nothing",
        f"{path}: queue.retention: unknown key",
        f"{path}: queue.path: directory {blocker} cannot be created: {blocker} is not a directory",
    ]
    return path, expected


def test_check_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path, expected = broken_config(tmp_path)
    result = run_relay("check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == expected


def test_serve_refuses_an_invalid_config_with_the_same_message(tmp_path: Path) -> None:
    path, expected = broken_config(tmp_path)
    result = run_relay("serve", "--config", str(path), timeout=30)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == expected
    assert not (tmp_path / "file").is_dir()


def test_relay_config_names_the_file_when_no_option_is_given(tmp_path: Path) -> None:
    good = write_config(tmp_path)
    result = run_relay("check-config", env={"RELAY_CONFIG": str(good)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"{good}: ok")

    bad, expected = broken_config(tmp_path)
    result = run_relay("check-config", env={"RELAY_CONFIG": str(bad)})
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == expected


def test_the_config_option_wins_over_relay_config(tmp_path: Path) -> None:
    good = write_config(tmp_path, "good.toml")
    bad, _ = broken_config(tmp_path)
    result = run_relay("check-config", "--config", str(good), env={"RELAY_CONFIG": str(bad)})
    assert result.returncode == 0, result.stderr


def test_check_config_without_any_file_says_which_file_it_tried(tmp_path: Path) -> None:
    result = run_relay("check-config", env={"RELAY_CONFIG": str(tmp_path / "absent.toml")})
    assert result.returncode == 2
    assert (
        result.stderr.decode()
        == f"{tmp_path}/absent.toml: cannot read: No such file or directory\n"
    )


# -- hostname: written raw into the banner, EHLO and Received, so it must be a host name ------


def with_hostname(tmp_path: Path, toml_value: str) -> Path:
    """A valid config whose `hostname` line is `toml_value`, TOML escapes and all."""
    return write(
        tmp_path,
        f'hostname = {toml_value}\npostmaster = "pm@a.test"\n'
        f'[queue]\npath = "{tmp_path}/q.db"\n[[domain]]\nname = "{DOMAIN}"\n',
    )


@pytest.mark.parametrize(
    ("toml_value", "expected"),
    [
        (
            r'"x\r\n250 injected"',
            r"hostname: bad host name 'x\r\n250 injected': '\n', '\r', ' ' not allowed: letters,"
            " digits, hyphens and dots only (or [address])",
        ),
        (
            '"mx2 example.org"',
            "hostname: bad host name 'mx2 example.org': ' ' not allowed: letters, digits, hyphens"
            " and dots only (or [address])",
        ),
        ('"mx2..example.org"', "hostname: bad host name 'mx2..example.org': empty label"),
        ('"-mx2.example.org"', "hostname: bad host name '-mx2.example.org': label '-mx2' starts"),
        (f'"{"a" * 64}.org"', f"hostname: bad host name '{'a' * 64}.org': label {'a' * 20}…"),
        (f'"{"a." * 127}org"', f"hostname: bad host name '{'a.' * 127}org': longer than 253"),
        ('"[192.0.2.300]"', "hostname: bad host name '[192.0.2.300]': not an address literal"),
        ('"[IPv6:192.0.2.1]"', "hostname: bad host name '[IPv6:192.0.2.1]': not an address"),
        ('"192.0.2.1"', "hostname: bad host name '192.0.2.1': an IP address is written as an"),
        ('"m\u00fcller.example"', "hostname: bad host name 'm\u00fcller.example': '\u00fc' not"),
        ("25", "hostname: expected a string, got 25"),
    ],
)
def test_a_hostname_that_is_not_a_host_name_is_refused_naming_what_is_wrong(
    tmp_path: Path, toml_value: str, expected: str
) -> None:
    path = with_hostname(tmp_path, toml_value)
    problems = problems_of(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: {expected}"), problems
    assert "\r" not in problems[0] and "\n" not in problems[0]


@pytest.mark.parametrize(
    ("toml_value", "hostname"),
    [
        ('"mx2.example.org."', "mx2.example.org"),
        ('"MX-2.Example.ORG"', "MX-2.Example.ORG"),
        ('"localhost"', "localhost"),
        (
            f'"{"a" * 63}.{"b" * 63}.{"c" * 63}.{"d" * 61}"',
            f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 61}",
        ),
        ('"[192.0.2.1]"', "[192.0.2.1]"),
        ('"[IPv6:2001:db8::1]"', "[IPv6:2001:db8::1]"),
        ('"xn--mller-kva.example"', "xn--mller-kva.example"),
    ],
)
def test_host_names_and_address_literals_are_accepted(
    tmp_path: Path, toml_value: str, hostname: str
) -> None:
    assert config.load(with_hostname(tmp_path, toml_value)).hostname == hostname


def test_check_config_exits_2_on_a_hostname_that_would_inject_a_reply(tmp_path: Path) -> None:
    path = with_hostname(tmp_path, r'"x\r\n250 injected"')
    result = run_relay("check-config", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr.decode() == (
        rf"{path}: hostname: bad host name 'x\r\n250 injected': '\n', '\r', ' ' not allowed:"
        " letters, digits, hyphens and dots only (or [address])\n"
    )
