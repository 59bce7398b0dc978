"""The `mergesearch` command.

Subcommands import what they need when they run, so `mergesearch merge` works in an environment with
only the runner's dependencies and `mergesearch status` in one with only the operator's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    from mergesearch_trial_runner.testbed.models import build_world

    world = build_world(args.cache_dir)
    link = Path(args.link)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(world.root.resolve(), target_is_directory=True)
    print(f"tiny-model world at {link} (models/{{base,{','.join(world.experts)}}}, tasks/*.{{search,test}}.jsonl)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesearch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser(
        "merge", help="merge models from a plan (JSON/YAML) or a mergekit YAML recipe (drop-in for mergekit-yaml)"
    )
    merge.add_argument("config", help="a MergeSearch plan or a mergekit YAML file")
    merge.add_argument("out_dir", help="where to write the merged model")
    merge.add_argument("--device", default="cpu", help="device for the arithmetic (cpu, cuda, cuda:1, ...)")
    merge.add_argument("--shard-size-gb", type=float, default=2.0, help="largest output shard, in GiB")
    merge.set_defaults(handler=_merge)

    testbed = commands.add_parser(
        "testbed", help="build (or find cached) the tiny-model world: a base, three experts and their tasks"
    )
    testbed.add_argument("link", help="where to link the world (e.g. .cache/tiny-world)")
    testbed.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mergesearch"))
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
