"""`mergesearch-trial run SPEC.json`: what a trial pod (or a local trial process) runs.

fetch the models (through the node's cache) -> merge the plan -> evaluate the asked sample ranges ->
report. With the `hf` backend the merged model never touches the disk (it is merged into memory and
loaded from there); vLLM loads from a directory, so the merge is written to the scratch directory
first. A run of a fork server evaluates (with either backend) in the server's engine host, which
computes the merge itself, straight into an engine it keeps, from experts it keeps resident
(`evaluate.engine_host`).
The report is a `TrialResult`: on stdout, in the spec's result file and in /dev/termination-log when it
exists; the exit code says whether a retry can help (see `spec`).

A trial process exits as soon as it has reported, without tearing the evaluator down or finalizing
the interpreter (`os._exit`): the exit frees the memory anyway, and a vLLM engine's orderly shutdown
(its engine core, a full garbage collection of what it built) took 1.3-1.6 s of every trial.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

from .cores import cpu_quota_cores
from .errors import classify
from .plan.export import NotExpressible, mergekit_recipe
from .spec import (
    EXIT_INFRASTRUCTURE_ERROR,
    EXIT_OK,
    EXIT_USER_ERROR,
    Counts,
    TrialResult,
    TrialSpec,
)
from .store import ModelStore
from .tasks import Sample, TaskSpec, parse_samples, sample_range, split_samples


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_samples(store: ModelStore, task: TaskSpec, spec: TrialSpec) -> list[Sample]:
    data = parse_samples(store.read_text(task.data), kind=task.kind, source=task.data)
    test = None
    if task.test_data is not None:
        test = parse_samples(store.read_text(task.test_data), kind=task.kind, source=task.test_data)
    splits = split_samples(task, data, test)
    if spec.split == "test":
        return splits["test"]
    start, end = spec.ranges.get(task.name, (0, len(splits["search"])))
    return sample_range(splits["search"], start, end, task=task.name)


PRELOAD = ("torch", "transformers", "mergesearch_trial_runner.merge.engine", "mergesearch_trial_runner.store")


@contextlib.contextmanager
def warmed_up(backends: Iterable[str]) -> Iterator[None]:
    """Import everything a trial of `backends` imports, and keep that heap frozen out of the garbage
    collector's reach while inside: a trial process (a pod's, or the local fork server before it forks)
    pays the imports before its clock starts, and vLLM's engine start, which runs several full
    collections, does not scan the ~100k objects of torch, transformers and vLLM each time (1.4 s on
    2 cores). Unfrozen on the way out: objects still frozen when the interpreter exits are never freed,
    and nanobind (Triton's bindings) then reports each of its types as leaked."""
    import gc
    import importlib

    from .evaluate.registry import get_backend

    for module in PRELOAD:
        importlib.import_module(module)
    for backend in backends:
        get_backend(backend).load().preload()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_trial(spec: TrialSpec, keep_open: contextlib.ExitStack | None = None) -> TrialResult:
    """Run one trial in this process. The evaluator is closed before this returns, unless `keep_open` is
    given: then it is left to that stack (a trial process reports first and never closes it)."""
    from .evaluate.base import InMemoryModel
    from .evaluate.engine_host import HostAddress, HostedEvaluator, PlannedMerge
    from .evaluate.registry import open_evaluator, validate_settings
    from .merge.engine import merge_to_directory, merge_to_state_dict

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    settings = validate_settings(spec.backend, spec.engine_args)
    if (threads := spec.cpu_threads or cpu_quota_cores()) is not None:
        import torch

        torch.set_num_threads(threads)
    store = ModelStore(spec.cache_dir)
    used = {m for s in spec.plan.slices for m in s.models()} | {spec.plan.config_model}
    model_dirs = {name: store.fetch_model(uri) for name, uri in spec.plan.models.items() if name in used}
    samples = {task.name: load_samples(store, task, spec) for task in spec.tasks}
    mark = lap("fetch", started)

    device = _device(spec.device)
    merged_dir = Path(spec.scratch_dir) / "merged"
    # A run of a fork server evaluates in the server's engine host (see `evaluate.engine_host`), which
    # computes the merge itself, into its engine, unless the merge must be written for the upload.
    host = HostAddress.from_environment() if settings.keep_engine else None
    model: Path | InMemoryModel | PlannedMerge
    if host is not None and settings.merge_in_place and not spec.output_uri:
        model = PlannedMerge(spec.plan, model_dirs, device, merged_dir)
    elif spec.backend == "hf" and spec.output_uri is None and host is None:
        model = InMemoryModel(*merge_to_state_dict(spec.plan, model_dirs=model_dirs, device=device))
    else:
        merge_to_directory(spec.plan, merged_dir, model_dirs=model_dirs, device=device)
        model = merged_dir
    if not isinstance(model, PlannedMerge):  # else the merge is timed as part of the load
        mark = lap("merge", mark)

    counts: dict[str, Counts] = {}
    generated = 0
    with contextlib.ExitStack() as closes_here:
        if host is None:
            assert not isinstance(model, PlannedMerge)
            evaluator = (keep_open or closes_here).enter_context(
                open_evaluator(spec.backend, model=model, settings=settings)
            )
        else:  # closed here, before the report: closing frees the host for the next trial
            assert not isinstance(model, InMemoryModel)
            hosted = HostedEvaluator(address=host, backend=spec.backend, model=model, settings=settings)
            evaluator = closes_here.enter_context(hosted)
        mark = lap("load", mark)
        for task in spec.tasks:
            result = evaluator.evaluate(task=task, samples=samples[task.name], read=store.read_text)
            counts[task.name] = Counts(correct=result.correct, evaluated=result.evaluated)
            generated += result.generated_tokens
        mark = lap("evaluate", mark)

    if spec.output_uri is not None:
        scores = {
            name: {"correct": c.correct, "evaluated": c.evaluated, "split": spec.split} for name, c in counts.items()
        }
        extra = {
            "mergesearch_plan.json": spec.plan.to_json().encode(),
            "scores.json": json.dumps(scores, indent=1).encode(),
        }
        try:
            recipe = mergekit_recipe(spec.plan)
        except NotExpressible:  # e.g. DARE, whose random drop mergekit draws differently: the plan alone goes
            pass
        else:
            extra[recipe.file_name] = recipe.text.encode()  # mergekit.yaml, or mergekit-multi.yaml
        store.upload_model(merged_dir, spec.output_uri, extra_files=extra)
        mark = lap("upload", mark)
    timings["total"] = round(time.perf_counter() - started, 3)
    return TrialResult(
        name=spec.name,
        ok=True,
        tasks=counts,
        ranges={t.name: spec.ranges[t.name] for t in spec.tasks if t.name in spec.ranges},
        timings=timings,
        generated_tokens=generated,
    )


def report(result: TrialResult, spec: TrialSpec | None) -> None:
    text = result.compact_json()
    print(text, flush=True)
    if spec is not None and spec.result_file:
        path = Path(spec.result_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    # In a pod, where the kubelet reads the termination message (the pod spec sets both to one path).
    termination_log = os.environ.get("MERGESEARCH_TERMINATION_LOG")
    if termination_log and Path(termination_log).is_file():
        with contextlib.suppress(OSError):
            Path(termination_log).write_text(text)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run the command and exit the process with its code (see the module's doc); never returns."""
    parser = argparse.ArgumentParser(prog="mergesearch-trial", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one trial spec")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("spec", nargs="?", help="the trial spec (a JSON file)")
    source.add_argument("--spec-env", help="read the trial spec (JSON) from this environment variable (trial pods)")
    args = parser.parse_args(argv)

    spec: TrialSpec | None = None
    label = args.spec_env or Path(args.spec).stem
    # Holds the evaluator until the process exits; never closed. Dropping it would not do either: the
    # last reference going runs vLLM's finalizers, which shut the engine down all the same.
    evaluator = contextlib.ExitStack()
    try:
        text = os.environ[args.spec_env] if args.spec_env else Path(args.spec).read_text()
        spec = TrialSpec.model_validate_json(text)
        with warmed_up([spec.backend]):
            result = run_trial(spec, keep_open=evaluator)
    except Exception as exc:  # every failure is reported, classified, never lost
        kind, message = classify(exc)
        traceback.print_exc(file=sys.stderr)
        name = spec.name if spec else label
        result = TrialResult(name=name, ok=False, error_kind=kind, message=message)  # type: ignore[arg-type]
        report(result, spec)
        exit_now(EXIT_USER_ERROR if kind == "user" else EXIT_INFRASTRUCTURE_ERROR)
    report(result, spec)
    exit_now(EXIT_OK)


def exit_now(code: int) -> NoReturn:
    """Flush the output and leave: no finalizers, no interpreter shutdown (see the module's doc)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # vLLM's engine starts worker processes: the entry point must be guarded
    main()
