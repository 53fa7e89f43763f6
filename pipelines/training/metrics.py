"""What a run reports while it trains: RUN/metrics.jsonl (one JSON line per step), the progress
bar, and RUN/losses.png at the end.

A metrics row: step, loss, action_loss, align_loss (1 - cos, unweighted), lr, epoch, step_s (data
wait + compute), samples, samples_per_s, missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "losses.png"


class MetricsLog:
    """Appends one JSON line per step to RUN/metrics.jsonl (rank 0 only), flushed every row.

    Opening it drops the rows after `step` (left by a run that stopped after its last
    checkpoint), so a resumed run's file reads as one uninterrupted run.
    """

    def __init__(self, run: Path, step: int) -> None:
        self.path = run / METRICS_FILE
        truncate_metrics(self.path, step)
        self._file = self.path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows after `step` (left by a run that stopped after its last checkpoint)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress_bar(total: int, initial: int) -> Any:
    """A tqdm bar over the run's steps."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def plot_losses(metrics_path: Path, out: Path) -> None:
    """A PNG of the total, action and alignment losses per step (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(steps, [r["action_loss"] for r in rows], label="action")
    axes[0].plot(steps, [r["loss"] for r in rows], label="total", alpha=0.6)
    axes[1].plot(steps, [r["align_loss"] for r in rows], color="C2", label="align (1 - cos)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    if not any(math.isfinite(r["align_loss"]) and r["align_loss"] for r in rows):
        axes[1].set_title("no alignment (lambda 0)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
