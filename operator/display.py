"""How a search looks (rich): live progress while it runs, a summary table at the end.

In a terminal the progress is a live panel; elsewhere (CI logs, `kubectl logs`, a pipe) a live panel shows
nothing until the end, so each change of the trial counts or the best is one plain line instead.
"""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from .search.controller import SearchStatus
from .search.objectives import held_out_scores
from .spaces.baselines import is_baseline


def progress(name: str, status: SearchStatus, elapsed: float) -> Panel:
    trials = status.trials
    lines = Table.grid(padding=(0, 2))
    lines.add_column(style="bold")
    lines.add_column()
    lines.add_row("phase", f"{status.phase}  {status.message}")
    lines.add_row(
        "trials",
        "  ".join(
            f"{state} {trials.get(state, 0)}" for state in ("running", "completed", "pruned", "failed", "skipped")
        ),
    )
    lines.add_row(
        "rungs",
        "  ".join(
            f"{budget} samples: {done} done, {running} running"
            for budget, done, running in zip(status.budgets, status.rungs, status.running_per_rung, strict=True)
        ),
    )
    best = status.best
    lines.add_row(
        "best",
        "-"
        if best is None
        else f"trial {best.trial}: {best.value:.3f}  " + "  ".join(f"{k} {v:.3f}" for k, v in best.objectives.items()),
    )
    if status.hypervolume is not None:
        lines.add_row("front", f"{len(status.front)} trials, hypervolume {status.hypervolume:.4f}")
    lines.add_row("used", f"{status.samples_used} samples, {status.device_seconds:.0f} device-seconds, {elapsed:.0f}s")
    return Panel(lines, title=f"MergeSearch {name}", expand=False)


def progress_line(status: SearchStatus, elapsed: float) -> str:
    """The progress as one line of plain text (for output that is not a terminal)."""
    trials = status.trials
    counts = " ".join(
        f"{state}={trials.get(state, 0)}" for state in ("running", "completed", "pruned", "failed", "skipped")
    )
    best = "-" if status.best is None else f"{status.best.value:.3f} (trial {status.best.trial})"
    return f"[{elapsed:5.0f}s] {status.phase}  trials: {counts}  best: {best}  samples: {status.samples_used}" + (
        f"  {status.message}" if status.message else ""
    )


def summary(status: SearchStatus, objectives: list[str], weights: dict[str, float]) -> Group:
    """The held-out table (searched merges first, then the baselines) and the margin over the best baseline."""
    table = Table(title="held-out test split: accuracy")
    table.add_column("merge")
    for name in objectives:
        table.add_column(name, justify="right")
    table.add_column("weighted", justify="right", style="bold")
    weighted = held_out_scores(status.final, weights)
    for label in sorted(status.final, key=lambda label: (is_baseline(label), label)):
        scores = status.final[label]
        table.add_row(label, *(f"{scores.get(o, 0.0):.3f}" for o in objectives), f"{weighted[label]:.3f}")
    parts: list = [table]
    found = {label: score for label, score in weighted.items() if not is_baseline(label)}
    seeds = {label: score for label, score in weighted.items() if is_baseline(label)}
    if found and seeds:
        best_found = max(found, key=found.__getitem__)
        best_seed = max(seeds, key=seeds.__getitem__)
        margin = found[best_found] - seeds[best_seed]
        verdict = "above" if margin > 0 else "not above"
        parts.append(
            f"{best_found} is {verdict} the best baseline ({best_seed}, {seeds[best_seed]:.3f}): "
            f"{margin:+.3f} weighted held-out accuracy"
        )
    return Group(*parts)
