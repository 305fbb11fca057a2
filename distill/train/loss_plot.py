"""``train_loss.png``: the loss and its parts against the step, drawn from ``train_log.jsonl`` after a run."""

from __future__ import annotations

import json
from pathlib import Path

from storage.fs import atomic_path

__all__ = ["LOSS_PLOT", "write_loss_plot"]

LOSS_PLOT = "train_loss.png"


def loss_series(log: Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{name: (steps, values)}`` of every ``loss*`` key in the log (a step logged twice, e.g. after a resume,
    keeps its last record)."""
    by_step: dict[int, dict[str, float]] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest of the log still plots
        parts = {k: float(v) for k, v in record.items() if k.startswith("loss") and isinstance(v, int | float)}
        if parts and isinstance(record.get("step"), int):
            by_step[record["step"]] = parts
    series: dict[str, tuple[list[int], list[float]]] = {}
    for step in sorted(by_step):
        for name, value in by_step[step].items():
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
    return series


def write_loss_plot(log: Path, png: Path) -> str | None:
    """Draw ``png`` from ``log``; returns a note instead when there is nothing to draw or no matplotlib."""
    series = loss_series(log) if log.exists() else {}
    if not series:
        return f"{png.name} not written: {log.name} holds no logged loss"
    try:
        import matplotlib
    except ImportError:
        return f"{png.name} not written: matplotlib is not installed (pip install 'ddx[plot]')"
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    total = series.pop("loss", None)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if total is not None:
        ax.plot(*total, color="black", lw=1.8, label="loss")
    for name, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, lw=1.1, label=name.removeprefix("loss_"))
    ax.set(xlabel="step", ylabel="loss (parts unweighted)", title=f"ddx train: {log.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return None
