"""Results: the machine they were measured on, the Markdown table, and docs/performance.md.

Each benchmark run stores its rows in bench/results.json under its own name, with the date, the
machine and the commands it ran; docs/performance.md is regenerated from that file, so running
one benchmark again updates its section and keeps the others as they were last measured.
Nothing reaches the document that a run did not measure, except rows explicitly marked as
computed (Postfix's default retry schedule, which would take over an hour to measure).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
DOC = ROOT / "docs" / "performance.md"
ORDER = ("accept", "drain", "recovery", "footprint", "auth")
TITLES = {
    "accept": "1. Accept throughput, primary down",
    "drain": "2. Drain throughput once the primary returns",
    "recovery": "3. Recovery latency after an outage",
    "footprint": "4. Footprint with a large queue",
    "auth": "5. Accept throughput with the checks at the door",
}


@dataclass
class Row:
    """One line of the table. Ratio is relay / Postfix; `better` says which way is good."""

    measure: str
    unit: str
    relay: float | None
    postfix: float | None
    better: str = "higher"  # or "lower"
    target: str = ""
    met: bool | None = None
    detail: str = ""  # spread of the trials, or how a figure was obtained

    @property
    def ratio(self) -> float | None:
        if self.relay is None or self.postfix is None or self.postfix == 0:
            return None
        return self.relay / self.postfix


@dataclass
class Section:
    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    date: str = ""
    machine: dict[str, str] = field(default_factory=dict)


NOISY = 0.20  # a spread (max - min over the median) above this marks the result noisy


def median_spread(values: list[float]) -> tuple[float, str]:
    """The median of the trials and their range, e.g. (861.0, "3 trials: 842–870, 3 %");
    "noisy" when the trials disagree by more than NOISY: a ratio from them is not a finding."""
    middle = statistics.median(values)
    if len(values) == 1:
        return middle, "1 trial"
    low, high = min(values), max(values)
    spread = (high - low) / middle if middle else 0.0
    text = f"{len(values)} trials: {_number(low)}–{_number(high)}, spread {spread:.0%}"
    return middle, text + (" — noisy" if spread > NOISY else "")


# -- the machine ------------------------------------------------------------------------------


def machine(workdir: Path) -> dict[str, str]:
    """What the figures depend on: cores, memory, CPU, the disk's fsync latency, versions."""
    info = {
        "cpus": str(os.cpu_count()),
        "memory": f"{_meminfo_kib('MemTotal') / 1024**2:.1f} GiB",
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": _run(["/usr/sbin/postconf", "-d", "-h", "mail_version"]),
        "relay": _relay_version(),
        "filesystem": _filesystem(workdir),
        "fsync": _fsync_latency(workdir),
    }
    return info


def _meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _relay_version() -> str:
    commit = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "relay"])
    return commit + (" + uncommitted changes in relay/" if dirty else "")


def _filesystem(path: Path) -> str:
    """The filesystem holding the queues: fsync on tmpfs is free and would flatter both."""
    best, fstype, source = "", "unknown", ""
    target = str(path.resolve())
    with open("/proc/self/mounts") as handle:
        for line in handle:
            device, mount, kind = line.split()[:3]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > len(best):
                best, fstype, source = mount, kind, device
    return f"{fstype} on {source} ({best})"


def _fsync_latency(directory: Path, rounds: int = 100) -> str:
    """Median time of a 4 KiB write + fsync in the work directory: the floor of one commit."""
    path = directory / "fsync-probe"
    samples = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            samples.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return f"{statistics.median(samples) * 1000:.2f} ms median (4 KiB write + fsync)"


# -- rendering --------------------------------------------------------------------------------


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(value: float | None) -> str:
    return "—" if value is None else _number(value)


def _ratio(row: Row) -> str:
    ratio = row.ratio
    return "—" if ratio is None else f"{ratio:.2f}×"


def _met(row: Row) -> str:
    if row.met is None:
        return ""
    return "yes" if row.met else "**no**"


def table(sections: list[Section]) -> str:
    lines = [
        "| Benchmark | Measure | relay | Postfix | relay/Postfix | Target | Met | Detail |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for section in sections:
        for row in section.rows:
            better = "↑" if row.better == "higher" else "↓"
            lines.append(
                f"| {TITLES[section.name].split('. ', 1)[0]} | {row.measure} ({row.unit}, "
                f"{better} better) | {_cell(row.relay)} | {_cell(row.postfix)} | {_ratio(row)}"
                f" | {row.target} | {_met(row)} | {row.detail} |"
            )
    return "\n".join(lines)


# -- results file and document ----------------------------------------------------------------


def save(sections: list[Section]) -> dict[str, Section]:
    """Merges this run's sections into bench/results.json; returns every stored section."""
    stored = load()
    for section in sections:
        stored[section.name] = section
    data = {name: asdict(stored[name]) for name in ORDER if name in stored}
    RESULTS.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return stored


def load() -> dict[str, Section]:
    try:
        raw: dict[str, Any] = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        return {}
    sections = {}
    for name, value in raw.items():
        rows = [Row(**row) for row in value.pop("rows", [])]
        sections[name] = Section(rows=rows, **value)
    return sections


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def document(stored: dict[str, Section], preamble: str) -> str:
    """docs/performance.md: the latest table, then per benchmark its method and commands."""
    sections = [stored[name] for name in ORDER if name in stored]
    machines = {json.dumps(s.machine, sort_keys=True) for s in sections}
    out = [
        "# Performance",
        "",
        "Generated by `make bench` (bench/run.py) from bench/results.json; do not edit by hand.",
        "Every figure below was measured by that script on the machine described, except rows",
        "marked *computed*. Re-run one benchmark with `.venv/bin/python bench/run.py NAME`.",
        "",
        preamble.strip(),
        "",
        "## Latest results",
        "",
        table(sections),
        "",
        "Ratio is relay ÷ Postfix. ↑/↓: whether a higher or a lower figure is better.",
        "",
    ]
    missing = [name for name in ORDER if name not in stored]
    if missing:
        out += [
            f"Not measured yet: {', '.join(TITLES[name] for name in missing)}"
            f" (`.venv/bin/python bench/run.py {' '.join(missing)}`).",
            "",
        ]
    if len(machines) == 1 and sections:
        out += ["## Machine", "", *_machine_lines(sections[0].machine), ""]
    for section in sections:
        out += [f"## {TITLES[section.name]}", "", f"Measured {section.date}.", ""]
        if len(machines) > 1:
            out += [*_machine_lines(section.machine), ""]
        out += [f"- {note}" for note in section.notes]
        if section.settings:
            out += ["", "Settings that differ from the shipped defaults in this benchmark:", ""]
            out += [f"- `{k}`: {v}" for k, v in section.settings.items()]
        out += ["", "Commands (ports are chosen per run):", "", "```"]
        out += section.commands
        out += ["```", ""]
    return "\n".join(out).rstrip() + "\n"


def _machine_lines(info: dict[str, str]) -> list[str]:
    return [f"- {key}: {value}" for key, value in info.items()]


def write_document(stored: dict[str, Section], preamble: str) -> None:
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(document(stored, preamble))
