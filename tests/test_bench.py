"""`genq bench` runs end to end and writes what BENCHMARKS.md is made from (no timing asserts);
the harness lives in the `bench` package, outside the runtime."""

from __future__ import annotations

import json
import re
import sys

import pytest

from bench.throughput import bench_padding
from tests.conftest import ROOT


@pytest.mark.slow
def test_padding_plan_beats_arrival_order_on_the_shipped_prompts(cache_dir):
    rows = bench_padding(cache_dir, 16, [64, 256])
    for row in rows:
        assert 0 <= row["genqueue_pad"] < row["arrival_pad"] <= 1
    assert rows[1]["genqueue_pad"] < rows[0]["genqueue_pad"]  # a larger pending pool pads less


@pytest.mark.slow
@pytest.mark.process
def test_bench_cli_writes_results_and_plots(tmp_path, cache_dir):
    from typer.testing import CliRunner

    from worker.cli import app

    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "--quick", "--parts", "padding,control,structured",
                                   "--out", str(out)],
                             env={"GENQ_CACHE_DIR": str(cache_dir)})
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data["control"]["requests"] == 200 and data["control"]["submit_per_s"] > 0
    assert (out / "padding.png").stat().st_size > 1000
    structured = data["structured"]
    assert [r["constrained"] for r in structured["runs"]] == [0.0, 0.5, 1.0, 0.5, 1.0] * 2
    assert structured["runs"][0]["mask_share"] == 0 < structured["runs"][2]["mask_share"]
    assert structured["compile_ms"]["uncached_median"] > 0


def test_the_runtime_package_holds_no_benchmark_code():
    """No benchmark module in ``worker/``; only ``genq bench`` imports the harness, lazily."""
    command = ROOT / "worker" / "cli" / "bench.py"  # the ``genq bench`` command itself
    sources = {p: p.read_text() for p in (ROOT / "worker").rglob("*.py")}
    assert not [p for p in sources if p.stem.startswith("bench") and p != command]
    importers = [p for p, text in sources.items()
                 if re.search(r"^\s*(from bench[. ]|import bench\b)", text, re.MULTILINE)]
    assert importers == [command]
    cli = sources[command]
    assert "    try:\n        from bench.runner import run_all" in cli  # inside a function


def test_genq_bench_without_the_bench_package_says_so_in_one_line(tmp_path, monkeypatch):
    """Where ``bench`` cannot be imported, ``genq bench`` prints one error line, exit 2."""
    from typer.testing import CliRunner

    from worker.cli import app

    monkeypatch.setitem(sys.modules, "bench.runner", None)  # what a missing package raises
    res = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "genq bench needs the `bench` package" in lines[0], res.output
    assert not (tmp_path / "out").exists()
