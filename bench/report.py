"""What a benchmark run records beside its figures: the machine it ran on, and PNG plots of the
engine and padding results."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def machine() -> dict:
    """Date, CPU, cores, and the Python, torch and transformers versions of this run."""
    import torch
    import transformers

    return {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def plot(results: dict, out: Path) -> list[str]:
    """PNG plots of the engine and padding results written into ``out``; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    files = []
    if results.get("engine"):
        _plot_engine(results["engine"], out / "engine_throughput.png")
        files.append("engine_throughput.png")
    if results.get("padding"):
        _plot_padding(results["padding"], out / "padding.png")
        files.append("padding.png")
    return files


def _plot_engine(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for dtype in sorted({r["dtype"] for r in rows}):
        mine = [r for r in rows if r["dtype"] == dtype]
        ax.plot([r["batch"] for r in mine], [r["tok_s"] for r in mine], marker="o", label=dtype)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (1 = one request at a time)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Engine throughput, demo model, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_padding(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["arrival_pad"] * 100 for r in rows], 0.4, label="arrival order")
    ax.bar([x + 0.2 for x in xs], [r["genqueue_pad"] * 100 for r in rows], 0.4, label="genqueue")
    ax.set_xticks(list(xs), [f"{r['pending']} pending" for r in rows])
    ax.set_ylabel("pad % of prompt tokens")
    ax.set_title(f"Padding waste at batch {rows[0]['batch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
