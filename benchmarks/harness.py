"""The shared benchmark harness: timing, device naming, one result schema, table, JSON, RESULTS.md.

Every benchmark script builds a list of `Result` rows and hands them to `report()`. A row is one
measured figure: what was measured, by which provider (implementation), its median and spread over
repeated runs, the device it ran on and the git revision of the code. Ratios between providers are
computed from rows measured in the same run, never across runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(kw_only=True, slots=True)
class Result:
    """One measured figure.

    what: the claim measured, e.g. "fwd+bwd N=16384 D=4096 bf16/int8".
    provider: the implementation, e.g. "triton", "torch-eager", "torch-compile".
    median: the median of `samples`, in `unit`.
    spread: (p20, p80) of the samples, in `unit`.
    unit: "ms", "frames/s", "MB/s", "x", ...
    device: what ran it (GPU name, or CPU model and core count).
    revision: the git revision of the code measured ("unknown" outside a checkout).
    extra: further named figures of the same run (GB/s, % of copy bandwidth, peak MiB, ratios).
    """

    what: str
    provider: str
    median: float
    spread: tuple[float, float]
    unit: str
    device: str
    revision: str
    extra: dict[str, Any] = field(default_factory=dict)


def device_name(device: str = "cpu") -> str:
    """A human name for the device: the CUDA device's name, or the CPU model and core count."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"CPU {model} ({os.cpu_count()} cores)"


def build_device_name() -> str:
    """What a local build runs on: "<GPU> + <CPU>" where CUDA is available (the teacher and
    codec on the GPU, decoding and writing on the host), else the CPU's name."""
    import torch

    cpu = device_name("cpu")
    return f"{device_name('cuda')} + {cpu}" if torch.cuda.is_available() else cpu


def load_note() -> str:
    """How busy the machine was: its 1-minute load average now, against its core count (a
    benchmark on a shared machine says so in its note; ratios within one run stay meaningful)."""
    import os

    return f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end"


def git_revision() -> str:
    """The short git revision of this checkout, with '+dirty' for uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 10,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` calls; `sync` (e.g.
    torch.cuda.synchronize) runs before each clock read so asynchronous work is counted."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - start)
    return samples


def summarize(samples: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """(median, (p20, p80)) of the samples."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0], (ordered[0], ordered[0])
    q = statistics.quantiles(ordered, n=5, method="inclusive")
    return statistics.median(ordered), (q[0], q[3])


def result(
    what: str, provider: str, samples: Sequence[float], unit: str, device: str, **extra: Any
) -> Result:
    """A `Result` from raw samples (already converted to `unit`)."""
    med, spread = summarize(samples)
    return Result(
        what=what,
        provider=provider,
        median=med,
        spread=spread,
        unit=unit,
        device=device,
        revision=git_revision(),
        extra=extra,
    )


def format_table(rows: Sequence[Result], title: str) -> str:
    """A Markdown table of the rows: what, provider, median [p20, p80] unit, extras, device."""
    extra_keys: list[str] = []
    for r in rows:
        extra_keys += [k for k in r.extra if k not in extra_keys]
    head = ["what", "provider", "median", "p20..p80", "unit", *extra_keys, "device"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        extras = [_fmt(r.extra.get(k, "")) for k in extra_keys]
        cells = [r.what, r.provider, _fmt(r.median), f"{_fmt(r.spread[0])}..{_fmt(r.spread[1])}"]
        lines.append("| " + " | ".join([*cells, r.unit, *extras, r.device]) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report(rows: Sequence[Result], title: str, json_path: str | Path | None = None) -> str:
    """Print the table, write JSON (when asked) and return the table's Markdown."""
    table = format_table(rows, title)
    print(table)
    if json_path is not None:
        Path(json_path).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return table


def publish(
    rows: Sequence[Result],
    title: str,
    json_path: str | Path | None,
    section: str | None,
    note: str = "",
) -> str:
    """`report` the rows; with a `section` (a full run; None with --quick) also `record` the
    table and `note` under `## section` in benchmarks/RESULTS.md. Returns the table."""
    table = report(rows, title, json_path)
    if section is not None:
        record(section, table, note)
    return table


def record(section: str, table: str, note: str = "") -> None:
    """Replace (or append) `## section` in benchmarks/RESULTS.md with the table and a note."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    start_marker = f"## {section}\n"
    body = (
        f"{start_marker}\n{note.strip()}\n\n{table}\n\n" if note else f"{start_marker}\n{table}\n\n"
    )
    if start_marker in text:
        before, rest = text.split(start_marker, 1)
        after = rest.split("\n## ", 1)
        tail = "## " + after[1] if len(after) == 2 else ""
        text = before + body + tail
    else:
        text = text.rstrip("\n") + "\n\n" + body
    RESULTS_MD.write_text(text)


def main(run: Callable[..., list[Result]], doc: str | None) -> None:
    """The command line every benchmark script shares: `python -m featurecache.benchmarks.NAME
    [--json FILE] [--quick]` calls its `run(json_path=..., quick=...)`."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--json", dest="json_path", help="Write the results as JSON here.")
    parser.add_argument(
        "--quick", action="store_true", help="Tiny sizes (tests, CI); RESULTS.md is not updated."
    )
    args = parser.parse_args()
    run(json_path=args.json_path, quick=args.quick)
