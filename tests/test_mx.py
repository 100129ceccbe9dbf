"""relay.mx against a real authoritative DNS server on loopback (UDP, TCP on truncation).

We are backup.example.test, "listening" on 127.0.0.2:2525 (the router only compares addresses,
so nothing needs to be bound there). MX hosts live at other 127.0.0.x addresses, or at
192.0.2.x (TEST-NET-1) where a test needs an address that is not this machine's: no packet is
ever sent to those, they are only looked up and compared.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import pytest

from relay.delivery.mx import Hop, RouteError, Router
from tests.dnsserver import DnsServer, dns_server, unused_udp_port

__all__ = ["dns_server"]

ME = "backup.example.test"
MX_PORT = 2525
OUR_LISTENER = ("127.0.0.2", MX_PORT)
DOMAIN = "example.test"


def make_router(
    server: DnsServer,
    *,
    seed: int = 0,
    hostname: str = ME,
    listen: Sequence[tuple[str, int]] = (OUR_LISTENER,),
    timeout: float = 2.0,
) -> Router:
    return Router(
        hostname=hostname,
        listen=listen,
        nameservers=[server.address],
        mx_port=MX_PORT,
        timeout=timeout,
        rng=random.Random(seed),
    )


def mx(*records: tuple[int, str]) -> list[tuple[str, str]]:
    return [("MX", f"{preference} {host}.") for preference, host in records]


def a(*addresses: str) -> list[tuple[str, str]]:
    return [("AAAA" if ":" in address else "A", address) for address in addresses]


def summary(hops: list[Hop]) -> list[tuple[str, str, int]]:
    return [(hop.host, hop.address, hop.preference) for hop in hops]


async def route_error(router: Router, domain: str = DOMAIN) -> RouteError:
    with pytest.raises(RouteError) as caught:
        await router.hops(domain)
    return caught.value


# -- ordering ---------------------------------------------------------------------------------


async def test_hops_come_best_preference_first_with_every_address_of_each_host(
    dns_server: DnsServer,
) -> None:
    dns_server.set(DOMAIN, mx((20, "mx2.example.test"), (10, "mx1.example.test")))
    dns_server.set("mx1.example.test", a("127.0.0.11", "127.0.0.13"))
    dns_server.set("mx2.example.test", a("127.0.0.12"))

    hops = await make_router(dns_server).hops(DOMAIN)

    # Within one host the order is the DNS server's (dnspython's rotates, as round robin does).
    assert sorted(summary(hops[:2])) == [
        ("mx1.example.test", "127.0.0.11", 10),
        ("mx1.example.test", "127.0.0.13", 10),
    ]
    assert summary(hops[2:]) == [("mx2.example.test", "127.0.0.12", 20)]
    assert {hop.port for hop in hops} == {MX_PORT}


async def test_hosts_of_equal_preference_come_in_the_order_the_injected_rng_picks(
    dns_server: DnsServer,
) -> None:
    dns_server.set(
        DOMAIN, mx((10, "mx-a.example.test"), (10, "mx-b.example.test"), (20, "mx-c.example.test"))
    )
    dns_server.set("mx-a.example.test", a("127.0.0.11"))
    dns_server.set("mx-b.example.test", a("127.0.0.12"))
    dns_server.set("mx-c.example.test", a("127.0.0.13"))

    orders = set()
    for seed in range(16):
        hosts = [hop.host for hop in await make_router(dns_server, seed=seed).hops(DOMAIN)]
        assert hosts[2] == "mx-c.example.test"  # shuffling never crosses preference levels
        orders.add(tuple(hosts[:2]))
        again = [hop.host for hop in await make_router(dns_server, seed=seed).hops(DOMAIN)]
        assert again == hosts  # one seed, one order: the randomness is the injected rng's

    assert orders == {
        ("mx-a.example.test", "mx-b.example.test"),
        ("mx-b.example.test", "mx-a.example.test"),
    }


async def test_a_host_with_both_ipv4_and_ipv6_gives_every_address_ipv4_first(
    dns_server: DnsServer,
) -> None:
    dns_server.set(DOMAIN, mx((10, "mx1.example.test")))
    dns_server.set("mx1.example.test", a("::1", "127.0.0.11"))

    hops = await make_router(dns_server).hops(DOMAIN)

    assert [hop.address for hop in hops] == ["127.0.0.11", "::1"]
    assert sorted(dns_server.asked("mx1.example.test")) == ["A", "AAAA"]


async def test_an_address_shared_by_two_mx_hosts_is_tried_once(dns_server: DnsServer) -> None:
    dns_server.set(DOMAIN, mx((10, "mx1.example.test"), (20, "mx2.example.test")))
    dns_server.set("mx1.example.test", a("127.0.0.11"))
    dns_server.set("mx2.example.test", a("127.0.0.11", "127.0.0.12"))

    hops = await make_router(dns_server).hops(DOMAIN)

    assert summary(hops) == [
        ("mx1.example.test", "127.0.0.11", 10),
        ("mx2.example.test", "127.0.0.12", 20),
    ]


async def test_an_mx_host_behind_a_cname_is_followed(dns_server: DnsServer) -> None:
    dns_server.set(DOMAIN, mx((10, "mx1.example.test")))
    dns_server.set("mx1.example.test", [("CNAME", "real.example.test.")])
    dns_server.set("real.example.test", a("127.0.0.11"))

    hops = await make_router(dns_server).hops(DOMAIN)

    assert summary(hops) == [("mx1.example.test", "127.0.0.11", 10)]


async def test_a_host_with_more_addresses_than_fit_in_udp_is_read_over_tcp(
    dns_server: DnsServer,
) -> None:
    many = [f"127.0.1.{n}" for n in range(1, 201)]
    dns_server.set(DOMAIN, mx((10, "big.example.test")))
    dns_server.set("big.example.test", a(*many))

    hops = await make_router(dns_server).hops(DOMAIN)

    assert sorted(hop.address for hop in hops) == sorted(many)


# -- never ourselves (RFC 5321 5.1) -----------------------------------------------------------


@pytest.mark.parametrize("hostname", [ME, "Backup.Example.TEST", "backup.example.test."])
async def test_when_we_are_the_best_mx_by_name_no_mx_is_preferred(
    dns_server: DnsServer, hostname: str
) -> None:
    dns_server.set(DOMAIN, mx((10, "BACKUP.example.test"), (20, "mx2.example.test")))
    dns_server.set("backup.example.test", a("127.0.0.99"))
    dns_server.set("mx2.example.test", a("127.0.0.12"))

    error = await route_error(make_router(dns_server, hostname=hostname))

    assert error.kind == "no_preferred_mx"
    assert error.permanent is False
    assert str(error).startswith(f"no MX host preferred over {hostname.rstrip('.')}")
    assert dns_server.asked("mx2.example.test") == []


async def test_when_we_are_the_best_mx_by_address_and_port_no_mx_is_preferred(
    dns_server: DnsServer,
) -> None:
    dns_server.set(DOMAIN, mx((10, "alias.example.test"), (20, "mx2.example.test")))
    dns_server.set("alias.example.test", a("127.0.0.2"))  # our listener, under another name
    dns_server.set("mx2.example.test", a("127.0.0.12"))

    error = await route_error(make_router(dns_server))

    assert error.kind == "no_preferred_mx"
    assert error.permanent is False
    assert str(error).startswith(f"no MX host preferred over {ME}")
    assert "alias.example.test" in str(error)


async def test_our_address_on_another_port_is_someone_else(dns_server: DnsServer) -> None:
    dns_server.set(DOMAIN, mx((10, "mx1.example.test")))
    dns_server.set("mx1.example.test", a("127.0.0.2"))

    hops = await make_router(dns_server, listen=[("127.0.0.2", MX_PORT + 1)]).hops(DOMAIN)

    assert summary(hops) == [("mx1.example.test", "127.0.0.2", 10)]


async def test_we_are_never_returned_even_when_only_one_of_our_addresses_is_listed(
    dns_server: DnsServer,
) -> None:
    dns_server.set(DOMAIN, mx((10, "mx1.example.test"), (20, "multi.example.test")))
    dns_server.set("mx1.example.test", a("127.0.0.11"))
    dns_server.set("multi.example.test", a("127.0.0.50", "127.0.0.2"))

    hops = await make_router(dns_server).hops(DOMAIN)

    assert summary(hops) == [("mx1.example.test", "127.0.0.11", 10)]


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
async def test_a_wildcard_listener_makes_every_local_address_ours(
    dns_server: DnsServer, wildcard: str
) -> None:
    dns_server.set(
        DOMAIN,
        mx((10, "remote.example.test"), (20, "loop.example.test"), (30, "mx3.example.test")),
    )
    dns_server.set("remote.example.test", a("192.0.2.1"))  # not this machine's
    dns_server.set("loop.example.test", a("127.0.0.77"))  # loopback: this machine
    dns_server.set("mx3.example.test", a("192.0.2.3"))

    hops = await make_router(dns_server, listen=[(wildcard, MX_PORT)]).hops(DOMAIN)

    assert summary(hops) == [("remote.example.test", "192.0.2.1", 10)]


async def test_everything_at_and_after_our_preference_is_dropped(dns_server: DnsServer) -> None:
    dns_server.set(
        DOMAIN,
        mx(
            (10, "mx1.example.test"),
            (20, ME),
            (20, "peer.example.test"),
            (30, "mx3.example.test"),
        ),
    )
    dns_server.set("mx1.example.test", a("127.0.0.11"))
    dns_server.set("peer.example.test", a("127.0.0.12"))
    dns_server.set("mx3.example.test", a("127.0.0.13"))

    for seed in range(4):  # wherever the shuffle puts us within our level
        hops = await make_router(dns_server, seed=seed).hops(DOMAIN)
        assert summary(hops) == [("mx1.example.test", "127.0.0.11", 10)]
    assert dns_server.asked("peer.example.test") == []
    assert dns_server.asked("mx3.example.test") == []


async def test_a_third_host_at_30_is_never_used_when_we_are_20_by_address(
    dns_server: DnsServer,
) -> None:
    dns_server.set(
        DOMAIN, mx((10, "mx1.example.test"), (20, "mx2.example.test"), (30, "mx3.example.test"))
    )
    dns_server.set("mx1.example.test", a("127.0.0.11"))
    dns_server.set("mx2.example.test", a("127.0.0.2"))  # us
    dns_server.set("mx3.example.test", a("127.0.0.13"))

    hops = await make_router(dns_server).hops(DOMAIN)

    assert summary(hops) == [("mx1.example.test", "127.0.0.11", 10)]
    assert dns_server.asked("mx3.example.test") == []


async def test_when_the_hosts_preferred_over_us_have_no_address_it_is_no_address(
    dns_server: DnsServer,
) -> None:
    dns_server.set(DOMAIN, mx((10, "ghost.example.test"), (20, ME)))

    error = await route_error(make_router(dns_server))

    assert (error.kind, error.permanent) == ("no_address", False)


# -- what the DNS says about the domain -------------------------------------------------------


async def test_a_domain_without_mx_records_is_its_own_mx_at_preference_0(
    dns_server: DnsServer,
) -> None:
    dns_server.set(DOMAIN, [("TXT", '"v=spf1 -all"'), *a("127.0.0.20", "::1")])

    hops = await make_router(dns_server).hops(DOMAIN)

    assert summary(hops) == [(DOMAIN, "127.0.0.20", 0), (DOMAIN, "::1", 0)]
    assert dns_server.asked(DOMAIN)[0] == "MX"


async def test_a_domain_without_mx_or_address_has_no_address(dns_server: DnsServer) -> None:
    dns_server.set(DOMAIN, [("TXT", '"no mail here"')])

    error = await route_error(make_router(dns_server))

    assert (error.kind, error.permanent) == ("no_address", False)


async def test_an_implicit_mx_that_is_us_is_not_used(dns_server: DnsServer) -> None:
    dns_server.set(DOMAIN, a("127.0.0.2"))

    error = await route_error(make_router(dns_server))

    assert error.kind == "no_preferred_mx"


async def test_a_null_mx_is_a_permanent_failure(dns_server: DnsServer) -> None:
    dns_server.set(DOMAIN, [("MX", "0 .")])

    error = await route_error(make_router(dns_server))

    assert (error.kind, error.permanent) == ("null_mx", True)
    assert "null MX" in str(error)


async def test_a_domain_that_does_not_exist_is_a_permanent_failure(
    dns_server: DnsServer,
) -> None:
    dns_server.set("other.test", a("127.0.0.20"))

    error = await route_error(make_router(dns_server), "nowhere.test")

    assert (error.kind, error.permanent) == ("nxdomain", True)
    assert "nowhere.test" in str(error)


async def test_an_empty_non_terminal_is_not_nxdomain(dns_server: DnsServer) -> None:
    dns_server.set("mx1.sub.example.test", a("127.0.0.11"))

    error = await route_error(make_router(dns_server), "sub.example.test")

    assert (error.kind, error.permanent) == ("no_address", False)


async def test_servfail_is_a_temporary_failure(dns_server: DnsServer) -> None:
    dns_server.servfail(DOMAIN)

    error = await route_error(make_router(dns_server))

    assert (error.kind, error.permanent) == ("dns_temporary", False)


async def test_a_name_server_that_does_not_answer_is_a_temporary_failure(
    dns_server: DnsServer,
) -> None:
    dns_server.drop(DOMAIN)

    error = await route_error(make_router(dns_server, timeout=0.3))

    assert (error.kind, error.permanent) == ("dns_temporary", False)
    assert "timed out" in str(error)


async def test_no_name_server_listening_is_a_temporary_failure() -> None:
    router = Router(
        hostname=ME,
        listen=[OUR_LISTENER],
        nameservers=[f"127.0.0.1:{unused_udp_port()}"],
        timeout=0.3,
    )

    error = await route_error(router)

    assert (error.kind, error.permanent) == ("dns_temporary", False)


# -- hosts that do not resolve ----------------------------------------------------------------


async def test_an_mx_host_that_does_not_resolve_is_skipped(dns_server: DnsServer) -> None:
    dns_server.set(
        DOMAIN,
        mx((10, "ghost.example.test"), (20, "noaddr.example.test"), (30, "mx3.example.test")),
    )
    dns_server.set("noaddr.example.test", [("TXT", '"no address"')])
    dns_server.set("mx3.example.test", a("127.0.0.13"))

    hops = await make_router(dns_server).hops(DOMAIN)

    assert summary(hops) == [("mx3.example.test", "127.0.0.13", 30)]


async def test_an_mx_host_whose_lookup_fails_is_skipped_while_another_works(
    dns_server: DnsServer,
) -> None:
    dns_server.set(DOMAIN, mx((10, "broken.example.test"), (20, "mx2.example.test")))
    dns_server.servfail("broken.example.test")
    dns_server.set("mx2.example.test", a("127.0.0.12"))

    hops = await make_router(dns_server).hops(DOMAIN)

    assert summary(hops) == [("mx2.example.test", "127.0.0.12", 20)]


async def test_when_no_mx_host_resolves_for_a_dns_failure_it_is_dns_temporary(
    dns_server: DnsServer,
) -> None:
    dns_server.set(DOMAIN, mx((10, "broken.example.test"), (20, "ghost.example.test")))
    dns_server.servfail("broken.example.test")

    error = await route_error(make_router(dns_server))

    assert (error.kind, error.permanent) == ("dns_temporary", False)
    assert "broken.example.test" in str(error)


async def test_when_no_mx_host_has_an_address_it_is_no_address(dns_server: DnsServer) -> None:
    dns_server.set(DOMAIN, mx((10, "ghost1.example.test"), (20, "ghost2.example.test")))

    error = await route_error(make_router(dns_server))

    assert (error.kind, error.permanent) == ("no_address", False)
    assert str(error) == f"no MX host of {DOMAIN} has an address"


# -- fixed primaries --------------------------------------------------------------------------


async def test_fixed_primaries_are_used_in_order_without_an_mx_lookup(
    dns_server: DnsServer,
) -> None:
    dns_server.set(DOMAIN, mx((10, "mx1.example.test")))  # must not matter
    dns_server.set("first.example.test", a("127.0.0.31", "::1"))

    hops = await make_router(dns_server).hops(
        DOMAIN, ["first.example.test:2600", "127.0.0.32", "[::1]:2601"]
    )

    assert hops == [
        Hop("first.example.test", "127.0.0.31", 2600, 0),
        Hop("first.example.test", "::1", 2600, 0),
        Hop("127.0.0.32", "127.0.0.32", MX_PORT, 1),
        Hop("::1", "::1", 2601, 2),
    ]
    assert dns_server.asked(DOMAIN) == []
    assert dns_server.asked("127.0.0.32") == []


async def test_a_fixed_primary_equal_to_our_own_listener_is_refused(
    dns_server: DnsServer,
) -> None:
    router = make_router(dns_server)

    hops = await router.hops(DOMAIN, [f"127.0.0.2:{MX_PORT}", "127.0.0.2:2600", ME])

    # Only the exact (address, port) we listen on is refused; a primary named like us is trusted.
    assert [(hop.host, hop.address, hop.port) for hop in hops] == [("127.0.0.2", "127.0.0.2", 2600)]
    with pytest.raises(RouteError) as caught:
        await router.hops(DOMAIN, [f"127.0.0.2:{MX_PORT}"])
    assert (caught.value.kind, caught.value.permanent) == ("no_address", False)


async def test_an_unresolvable_fixed_primary_is_skipped(dns_server: DnsServer) -> None:
    dns_server.set("second.example.test", a("127.0.0.32"))

    hops = await make_router(dns_server).hops(
        DOMAIN, ["ghost.example.test", "second.example.test:2600"]
    )

    assert hops == [Hop("second.example.test", "127.0.0.32", 2600, 1)]


async def test_when_no_fixed_primary_resolves_it_is_a_temporary_failure(
    dns_server: DnsServer,
) -> None:
    error_ghost = await route_error_primary(make_router(dns_server), ["ghost.example.test"])
    dns_server.servfail("broken.example.test")
    error_broken = await route_error_primary(make_router(dns_server), ["broken.example.test"])

    assert (error_ghost.kind, error_ghost.permanent) == ("no_address", False)
    assert (error_broken.kind, error_broken.permanent) == ("dns_temporary", False)


async def route_error_primary(router: Router, primary: list[str]) -> RouteError:
    with pytest.raises(RouteError) as caught:
        await router.hops(DOMAIN, primary)
    return caught.value


async def test_the_sender_checks_answers_are_kept_until_they_expire(
    dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """records() answers again from what it kept (found, and "no such name"), until the
    answer's own expiry: then the DNS is asked again and a changed record is seen."""
    dns_server.set("sender.test.", [("TXT", '"v=spf1 -all"')])
    router = make_router(dns_server)
    for _ in range(3):
        assert [rd.to_text() for rd in await router.records("sender.test", "TXT")] == [
            '"v=spf1 -all"'
        ]
        assert await router.records("_dmarc.sender.test", "TXT") == []
    assert len(dns_server.queries) == 2
    dns_server.set("sender.test.", [("TXT", '"v=spf1 +all"')])
    assert router._caching is not None and router._caching.cache is not None
    router._caching.cache.flush()  # dnspython's own cache, which keeps them as long
    later = time.time() + 86400
    monkeypatch.setattr("relay.delivery.mx.time.time", lambda: later)
    found = await router.records("Sender.Test", "TXT")
    assert [rd.to_text() for rd in found] == ['"v=spf1 +all"']
    assert len(dns_server.queries) == 3
