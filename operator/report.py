"""A search as a page to look at: one self-contained HTML file with PNG figures (matplotlib), read from the study.

Four figures, drawn from what the study stores and nothing else, so a running search can be reported
as well as a finished one:
- the incumbent's search-split score against samples spent (with the held-out scores of the final
  stage beside it, once they exist);
- every rung result, marked by the controller's decision (promote, prune, complete);
- the best plan: per layer group its method and the weight of each expert per tensor group (LFS), or
  the stack of layers with their sources and scales (DIS);
- the Pareto front, in pareto mode.
The PNGs are embedded as data URIs, so the page can be mailed or attached to a ticket as it is.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write PNGs only
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from optuna.trial import TrialState

from mergesearch_trial_runner.plan.ir import MergePlan

from .search.controller import SearchController, SearchStatus, accuracies, decision_key, result_key
from .search.objectives import held_out_scores, weighted_score
from .search.phases import Decision
from .spaces.baselines import is_baseline

DECISION_COLOURS = {
    Decision.PROMOTE: "tab:green",
    Decision.PRUNE: "tab:red",
    Decision.COMPLETE: "tab:blue",
    Decision.STOP: "tab:gray",
}


@dataclass(frozen=True)
class RungResult:
    trial: int
    rung: int
    samples: int  # samples per task the trial had seen at this rung (its budget)
    spent: int  # samples this run evaluated, over all tasks
    score: float  # weighted search-split accuracy over every sample up to this rung
    decision: str  # promote, prune, complete, stop, or "pending"
    at: float


def rung_results(controller: SearchController) -> list[RungResult]:
    """Every recorded rung result of the study, in the order the results arrived."""
    weights = controller.objective_weights
    found = []
    for trial in controller.study.get_trials(deepcopy=False):
        counts: dict[str, tuple[int, int]] = {}
        for rung in range(controller.schedule.rungs):
            result = trial.user_attrs.get(result_key(rung))
            if result is None:
                continue
            spent = 0
            for task, (correct, evaluated) in result["tasks"].items():
                c, e = counts.get(task, (0, 0))
                counts[task] = (c + correct, e + evaluated)
                spent += evaluated
            found.append(
                RungResult(
                    trial=trial.number,
                    rung=rung,
                    samples=controller.schedule.budgets[rung],
                    spent=spent,
                    score=weighted_score(accuracies(counts), weights),
                    decision=trial.user_attrs.get(decision_key(rung), "pending"),
                    at=float(result.get("at", 0.0)),
                )
            )
    return sorted(found, key=lambda r: (r.at, r.trial, r.rung))


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def incumbent_figure(results: list[RungResult], status: SearchStatus, weights: dict[str, float]) -> Figure:
    figure, axes = plt.subplots(figsize=(7, 4))
    spent, best, xs, ys = 0, float("-inf"), [], []
    for result in results:
        spent += result.spent
        if result.decision == Decision.COMPLETE and result.score > best:
            best = result.score
        if best > float("-inf"):
            xs.append(spent)
            ys.append(best)
    if xs:
        axes.step(xs, ys, where="post", label="incumbent, search split")
    held_out = held_out_scores(status.final, weights)
    found = {label: v for label, v in held_out.items() if not is_baseline(label)}
    seeds = {label: v for label, v in held_out.items() if is_baseline(label)}
    end = spent or 1
    for label, value in found.items():
        axes.plot([end], [value], "o", markersize=8, color="tab:orange", label=f"{label}, held-out")
    if seeds:
        label = max(seeds, key=seeds.__getitem__)
        axes.axhline(seeds[label], color="tab:gray", linestyle="--", label=f"best baseline ({label}), held-out")
    axes.set_xlabel("samples evaluated (all tasks)")
    axes.set_ylabel("weighted accuracy")
    axes.set_title("incumbent against samples spent")
    axes.legend(loc="best", fontsize=8)
    return figure


def rung_figure(results: list[RungResult], budgets: list[int]) -> Figure:
    figure, axes = plt.subplots(figsize=(7, 4))
    for decision in sorted({r.decision for r in results}):
        chosen = [r for r in results if r.decision == decision]
        axes.scatter(
            [r.samples for r in chosen],
            [r.score for r in chosen],
            s=14,
            alpha=0.7,
            color=DECISION_COLOURS.get(decision, "black"),
            label=f"{decision} ({len(chosen)})",
        )
    axes.set_xscale("log")
    axes.xaxis.set_minor_locator(NullLocator())  # only the rungs' own ticks
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.set_xlabel("rung: samples per task")
    axes.set_ylabel("weighted accuracy at the rung (search split)")
    axes.set_title("rung results and the decisions taken")
    axes.legend(fontsize=8)
    return figure


def _value(setting: list, tensor_group: str | None) -> float | bool | None:
    """The value a tensor group gets: the entry with its filter, else the catch-all entry."""
    for entry in setting:
        if entry.filter == tensor_group:
            return entry.value
    for entry in setting:
        if entry.filter in (None, "*"):
            return entry.value
    return None


def plan_figure(plan: MergePlan, experts: list[str]) -> Figure:
    """LFS: a weight per (tensor group, expert) and layer group, the method above each column. DIS: the stack."""
    if all(s.method == "passthrough" for s in plan.slices):
        return _stack_figure(plan, ["base", *experts])
    groups = sorted(
        {e.filter for s in plan.slices for src in s.sources for e in src.params.get("weight", []) if e.filter}
    )
    rows = [(group, expert) for group in [*groups, None] for expert in experts]
    columns = []
    for slice_ in plan.slices:
        by_model = {src.model: src for src in slice_.sources}
        column = []
        for group, expert in rows:
            source = by_model.get(expert)
            value = _value(source.params.get("weight", []), group) if source else None
            if slice_.method == "slerp" and source is not None:
                value = _value(slice_.params.get("t", []), group)
            column.append(float(value) if value is not None else float("nan"))
        columns.append(column)
    figure, axes = plt.subplots(figsize=(1.6 + 1.2 * len(columns), 0.9 + 0.32 * len(rows)))
    image = axes.imshow(list(zip(*columns, strict=True)), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    for x, column in enumerate(columns):
        for y, value in enumerate(column):
            if value == value:  # not NaN
                colour = "black" if value > 0.5 else "white"  # readable on viridis' yellow and its blue
                axes.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    axes.set_xticks(
        range(len(columns)),
        [f"layers {s.sources[0].layers[0]}-{s.sources[0].layers[1] - 1}\n{s.method}" for s in plan.slices],
        fontsize=8,
    )
    axes.set_yticks(range(len(rows)), [f"{group or 'rest'}: {expert}" for group, expert in rows], fontsize=8)
    figure.colorbar(image, ax=axes, label="weight (t for slerp)")
    axes.set_title("best plan: method and weights per layer group")
    return figure


def _stack_figure(plan: MergePlan, models: list[str]) -> Figure:
    colours = {model: plt.get_cmap("tab10")(index) for index, model in enumerate(models)}
    figure, axes = plt.subplots(figsize=(4, 0.6 + 0.25 * len(plan.slices)))
    for depth, slice_ in enumerate(plan.slices):
        source = slice_.sources[0]
        axes.barh(depth, 1, color=colours.get(source.model, "black"))
        scale = f" x{slice_.output_scale:.2f}" if slice_.output_scale != 1.0 else ""
        axes.text(0.5, depth, f"{source.model} layer {source.layers[0]}{scale}", ha="center", va="center", fontsize=7)
    axes.invert_yaxis()
    axes.set_xticks([])
    axes.set_ylabel("depth of the merged model")
    axes.set_title("best plan: the layer stack")
    return figure


def front_figure(controller: SearchController, status: SearchStatus) -> Figure:
    names = [t.name for t in controller.tasks]
    completed = controller.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    on_front = {entry["trial"] for entry in status.front}
    figure, axes = plt.subplots(figsize=(5, 5))
    x, y = names[0], names[1 % len(names)]
    for front in (False, True):
        chosen = [t for t in completed if (t.number in on_front) == front]
        axes.scatter(
            [t.values[0] for t in chosen],
            [t.values[names.index(y)] for t in chosen],
            color="tab:red" if front else "tab:gray",
            label="Pareto front" if front else "completed",
            s=18,
        )
    axes.set_xlabel(f"{x} accuracy")
    axes.set_ylabel(f"{y} accuracy")
    axes.set_title(f"Pareto front (hypervolume {status.hypervolume or 0.0:.4f})")
    axes.legend(fontsize=8)
    return figure


def render(controller: SearchController, name: str) -> str:
    """The report page for the search behind `controller` (read only: it drives nothing)."""
    status = controller.status()
    weights = dict(controller.objective_weights)
    results = rung_results(controller)
    figures = [
        ("Incumbent", incumbent_figure(results, status, weights)),
        ("Rungs", rung_figure(results, list(controller.schedule.budgets))),
    ]
    finalists = {label: found for label, found in controller.final.finalists().items() if found[0] is not None}
    if finalists:
        label, (trial, plan) = next(iter(finalists.items()))
        figures.append((f"Best plan ({label}, trial {trial})", plan_figure(plan, list(controller.facts.experts))))
    if controller.pareto and status.front:
        figures.append(("Pareto front", front_figure(controller, status)))
    weighted = held_out_scores(status.final, weights)
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td>"
        + "".join(f"<td>{scores.get(t, 0.0):.3f}</td>" for t in weights)
        + f"<td><b>{weighted[label]:.3f}</b></td></tr>"
        for label, scores in sorted(status.final.items(), key=lambda item: (is_baseline(item[0]), item[0]))
    )
    table = (
        f"<table><tr><th>merge</th>{''.join(f'<th>{html.escape(t)}</th>' for t in weights)}<th>weighted</th></tr>"
        f"{rows}</table>"
        if rows
        else "<p>No held-out results yet.</p>"
    )
    counts = ", ".join(f"{count} {state}" for state, count in status.trials.items())
    body = "".join(
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{_png(fig)}">'
        for title, fig in figures
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>MergeSearch {html.escape(name)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:0 .8em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>"
        f"<h1>MergeSearch {html.escape(name)}</h1>"
        f"<p>Phase <b>{html.escape(status.phase)}</b>: {html.escape(status.message)}. Trials: {counts}. "
        f"{status.samples_used} samples evaluated, {status.device_seconds:.0f} device-seconds.</p>"
        f"<h2>Held-out test split: accuracy</h2>{table}{body}</body></html>"
    )


def write_report(controller: SearchController, name: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(render(controller, name))
    tmp.replace(path)
    return path
