"""The benchmark harness: a quick run prints and writes JSON but leaves RESULTS.md alone; a full
run replaces its own section there and keeps the others."""

from __future__ import annotations

import json

from featurecache.benchmarks import harness


def _rows() -> list[harness.Result]:
    return [harness.result("x", "p", [1.0, 2.0, 3.0], "ms", "CPU test", extra_figure=4.0)]


def test_publish_records_only_a_full_run(tmp_path, monkeypatch) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## other\n\nkept\n\n")
    monkeypatch.setattr(harness, "RESULTS_MD", results)
    table = harness.publish(_rows(), "T", tmp_path / "q.json", None, "a note")
    assert results.read_text() == "# Benchmark results\n\n## other\n\nkept\n\n"
    assert json.loads((tmp_path / "q.json").read_text())[0]["median"] == 2.0
    harness.publish(_rows(), "T", None, "mine", "a note")
    text = results.read_text()
    assert "## other\n\nkept" in text and "## mine\n\na note\n\n" + table in text
    harness.publish(_rows(), "T", None, "mine", "another note")  # replaced, not appended
    assert results.read_text().count("## mine") == 1 and "another note" in results.read_text()
