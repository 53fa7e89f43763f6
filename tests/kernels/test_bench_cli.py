"""`featurecache bench kernel --quick --json` through click, and `all` with a missing module."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from featurecache.cli import bench as bench_cli
from featurecache.cli import main


def test_bench_kernel_quick_json(tmp_path) -> None:
    out = tmp_path / "kernel.json"
    result = CliRunner().invoke(main, ["bench", "kernel", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert rows and {"what", "provider", "median", "spread", "unit", "device"} <= set(rows[0])
    assert "Cosine alignment loss" in result.output
    if not torch.cuda.is_available():
        assert "the Triton path needs a GPU" in result.output


def test_bench_all_reports_missing_benchmarks(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(bench_cli, "BENCHMARKS", ("kernel", "no_such_benchmark"))
    out = tmp_path / "all.json"
    result = CliRunner().invoke(main, ["bench", "all", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "no_such_benchmark: missing" in result.output
    assert "kernel: ok" in result.output
    rows = json.loads(out.read_text())
    assert rows and all(r["what"].startswith(("fwd+bwd", "device copy")) for r in rows)


def test_load_benchmark_missing() -> None:
    with pytest.raises(bench_cli.MissingBenchmark, match="no_such_benchmark does not exist"):
        bench_cli.load_benchmark("no_such_benchmark")
