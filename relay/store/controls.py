"""Run-time steering of a domain (relay domain reroute / pause / resume), audited like every
operator command: the row and its audit entry are written in one transaction."""

from __future__ import annotations

from relay.store.operations import Operations
from relay.store.rows import Actor, DomainControl


class Controls(Operations):
    def domain_controls(self) -> dict[str, DomainControl]:
        """Every domain an operator paused or rerouted; the others deliver as configured."""
        rows = self.conn.execute(
            "SELECT domain, paused, paused_at, reroute, reroute_tls, rerouted_at, rescue"
            " FROM domain_controls"
            " WHERE paused = 1 OR reroute IS NOT NULL OR rescue IS NOT NULL"
        ).fetchall()
        return {
            r[0]: DomainControl(r[0], r[2] if r[1] else None, r[3], r[4], r[5], r[6]) for r in rows
        }

    def set_rescue(self, domain: str, mode: str | None, actor: Actor) -> bool:
        """Rescue mailboxes for `domain` "on" or "off" by hand, or None: automatic again."""

        def write(store: Controls) -> bool:
            current = store.domain_controls().get(domain) or DomainControl(domain)
            if current.rescue == mode:
                return False
            store._ensure_row(domain)
            store.conn.execute(
                "UPDATE domain_controls SET rescue = ? WHERE domain = ?", (mode, domain)
            )
            store.audit(f"rescue {mode or 'auto'}", [domain], actor)
            return True

        return self.transaction(write)

    def set_paused(self, domain: str, paused: bool, actor: Actor) -> bool:
        """Pauses or resumes delivery to `domain`; False when it already was so."""

        def write(store: Controls) -> bool:
            current = store.domain_controls().get(domain) or DomainControl(domain)
            if current.paused == paused:
                return False
            store._ensure_row(domain)
            store.conn.execute(
                "UPDATE domain_controls SET paused = ?, paused_at = ? WHERE domain = ?",
                (int(paused), store.clock() if paused else None, domain),
            )
            store.audit("pause" if paused else "resume", [domain], actor)
            return True

        return self.transaction(write)

    def set_reroute(self, domain: str, target: str | None, tls: str | None, actor: Actor) -> bool:
        """Sends `domain`'s mail, queued and new, to `target` ("host[:port]"), or back to its
        primary (None); False when nothing changes."""

        def write(store: Controls) -> bool:
            current = store.domain_controls().get(domain) or DomainControl(domain)
            if (current.reroute, current.reroute_tls) == (target, tls if target else None):
                return False
            store._ensure_row(domain)
            store.conn.execute(
                "UPDATE domain_controls SET reroute = ?, reroute_tls = ?, rerouted_at = ?"
                " WHERE domain = ?",
                (target, tls if target else None, store.clock() if target else None, domain),
            )
            action = "unroute"
            if target:
                action = f"reroute to {target}" + (f" tls={tls}" if tls else "")
            store.audit(action, [domain], actor)
            return True

        return self.transaction(write)

    def _ensure_row(self, domain: str) -> None:
        self._in_transaction()
        self.conn.execute(
            "INSERT OR IGNORE INTO domain_controls (domain, paused) VALUES (?, 0)", (domain,)
        )
