"""The demo path at tiny sizes: every step runs, and the report's numbers come from the runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from featurecache.pipelines.demo.experiment import DemoConfig, format_table, run_demo, tiny
from featurecache.pipelines.training.evaluate import evaluate_run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("demo")
    report = run_demo(replace(tiny(DemoConfig()), out=str(out)), log=lambda _: None)
    return out, report


def test_demo_writes_report_plot_and_table(demo_run: tuple[Path, object]) -> None:
    out, report = demo_run
    text = (out / "report.md").read_text()
    assert format_table(report) in text
    assert (out / "losses.png").stat().st_size > 1000
    assert set(report.errors) == {"plain", "aligned"}
    assert set(report.errors["plain"]) == {
        "train (held-out episodes)",
        "ood-vision",
        "ood-semantic",
        "ood-execution",
    }
    assert report.cache["codec"] == "int8" and report.cache["blocks_done"] >= 1
    assert 0.0 <= report.probe["aligned"][0] <= 1.0
    assert -1.0 <= report.align_cosine["aligned"][0] <= 1.0
    assert set(report.baseline) == set(report.errors["plain"])
    assert all(b > 0 for b in report.baseline.values())


def test_demo_numbers_come_from_the_runs(demo_run: tuple[Path, object]) -> None:
    """Re-evaluate the saved runs independently: the report must hold exactly those numbers."""
    out, report = demo_run
    for name in ("plain", "aligned"):
        fresh = evaluate_run(out / "runs" / f"{name}-seed0", [str(out / "data" / "ood-vision")])
        assert report.errors[name]["ood-vision"] == [pytest.approx(fresh["action_l1"], rel=1e-5)]
        assert f"{fresh['action_l1']:.4f}" in (out / "report.md").read_text()
    # The two runs differ (lambda 0 vs 0.2 on the same seed and data): not one copied number.
    assert report.errors["plain"]["ood-vision"] != report.errors["aligned"]["ood-vision"]
