"""`genq bench` runs end to end and writes what BENCHMARKS.md is made from (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from worker.bench import bench_padding

pytestmark = pytest.mark.slow


def test_padding_plan_beats_arrival_order_on_the_shipped_prompts(cache_dir):
    rows = bench_padding(cache_dir, 16, [64, 256])
    for row in rows:
        assert 0 <= row["genqueue_pad"] < row["arrival_pad"] <= 1
    assert rows[1]["genqueue_pad"] < rows[0]["genqueue_pad"]  # a larger pending pool pads less


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
