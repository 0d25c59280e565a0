"""One row of the table ``make bench`` prints: a figure beside its baseline and goal.

Every benchmark module exposes ``figures(quick: bool) -> list[Figure]``;
``python -m bench`` runs them one after another and prints one Markdown table
(bench/README.md keeps the latest). A figure is measured side by side with
its baseline in the same run, because this machine is noisy: the ratio is
what to read, the absolute numbers only say how busy the machine was.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEADER", "Figure", "verdict"]


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure, as one row of bench/README.md's table."""

    measure: str
    """What was measured, e.g. "batched ingest (500/batch), server CPU per record"."""
    value: str
    """connmeta's figure, with its unit."""
    baseline: str
    """What it is compared with, measured in the same run ("" when the goal is absolute)."""
    ratio: str
    """value / baseline, or "" when there is no baseline."""
    goal: str
    """The goal and whether this run met it: "≥ 0.98: met", "≤ 10 ms: missed by 3.1 ms"."""
    command: str
    """The command that reproduces this figure alone."""

    def row(self) -> str:
        cells = (
            self.measure,
            self.value,
            self.baseline,
            self.ratio,
            self.goal,
            f"`{self.command}`",
        )
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


HEADER = "| measure | connmeta | baseline | ratio | goal | command |\n|---|---|---|---|---|---|"


def verdict(value: float, goal: float, *, higher_is_better: bool, unit: str = "") -> str:
    """ "≥ goal: met" or "≥ goal: missed by x" (the shortfall in the figure's own unit)."""
    sign = "≥" if higher_is_better else "≤"
    met = value >= goal if higher_is_better else value <= goal
    if met:
        return f"{sign} {goal:g}{unit}: met"
    return f"{sign} {goal:g}{unit}: **missed** by {abs(goal - value):.3g}{unit}"
