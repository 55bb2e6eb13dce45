"""The report's figures, as PNG and SVG: ASR against refusal fraction, and safety trade-offs.

Drawn with matplotlib's object API (``Figure`` on the Agg canvas), so no GUI backend or global
pyplot state is involved. Every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from rejalign_tasks.contracts import atomic_path
from rejalign_tasks.report.stats import pareto_front

FORMATS = ("png", "svg")


@dataclass(frozen=True)
class Point:
    label: str
    x: float | None  # None: no position on the x axis (e.g. a base model without an adapter)
    y: float


def _save(fig: Figure, stem: Path) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        target = stem.with_suffix(f".{fmt}")
        metadata = {"Date": None} if fmt == "svg" else None  # reproducible SVG
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight", metadata=metadata)
        paths.append(target)
    return paths


def asr_vs_refusal_fraction(series: dict[str, Sequence[Point]], stem: Path) -> list[Path]:
    """One line per safety metric over the adapters' refusal fractions.

    Models with no refusal fraction (the base model) are drawn as dashed horizontal references,
    so no model of the report is left out of the figure.
    """
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    colours = [f"C{i}" for i in range(10)]
    for i, (name, points) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        placed = sorted((p for p in points if p.x is not None), key=lambda p: p.x)
        if placed:
            ax.plot([p.x for p in placed], [p.y for p in placed], "o-", color=colour, label=name)
            for p in placed:
                ax.annotate(
                    p.label,
                    (p.x, p.y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=colour,
                )
        for j, p in enumerate(q for q in points if q.x is None):
            ax.axhline(
                p.y,
                color=colour,
                linestyle=("--", ":", "-.")[j % 3],
                linewidth=1,
                label=f"{name}: {p.label} (no refusal fraction)",
            )
    ax.set_xlabel("refusal fraction of the training data")
    ax.set_ylabel("attack success rate (%)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below the axes
    ax.set_title("ASR against refusal fraction")
    return _save(fig, stem)


@dataclass(frozen=True)
class Panel:
    x_name: str
    x_higher_is_better: bool
    points: Sequence[Point]


def safety_tradeoffs(y_name: str, panels: Sequence[Panel], stem: Path) -> list[Path]:
    """Safety (ASR, lower is better) against each utility / over-refusal metric.

    Models on the Pareto front (none other is both safer and better on the x metric) are filled
    and joined by the front's step line; dominated models are hollow.
    """
    fig = Figure(figsize=(5.2 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        pts = [p for p in panel.points if p.x is not None]
        front = pareto_front([(p.x, p.y) for p in pts], (panel.x_higher_is_better, False))
        for p, on in zip(pts, front, strict=True):
            ax.scatter([p.x], [p.y], s=36, color="C0", facecolors="C0" if on else "none", zorder=3)
            ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        best = sorted((p for p, on in zip(pts, front, strict=True) if on), key=lambda p: p.x)
        if len(best) > 1:
            # The outline of the region the front dominates: it turns at each front point.
            where = "pre" if panel.x_higher_is_better else "post"
            ax.step(
                [p.x for p in best],
                [p.y for p in best],
                where=where,
                color="C1",
                label="Pareto front",
            )
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel(
            panel.x_name
            + (" (higher is better)" if panel.x_higher_is_better else " (lower is better)")
        )
        ax.set_ylabel(y_name + " (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle("Safety against utility and over-refusal (filled: Pareto-optimal)")
    return _save(fig, stem)
