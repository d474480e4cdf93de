"""The ``vtvc`` command: convert legacy checkpoints, build task-vector banks and zoos, run experiments."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _key_value(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected TASK=PATH, got {text!r}")
    return name, path


def _convert(args: argparse.Namespace) -> None:
    from vtvc_pyro.checkpoints import convert_legacy_checkpoint

    convert_legacy_checkpoint(args.src, args.dst, trust_pickle=args.trust_pickle, overwrite=args.force)
    print(f"wrote {args.dst}")


def _bank_build(args: argparse.Namespace) -> None:
    from vtvc_pyro.task_vectors import TaskVectorBank

    if os.path.exists(args.out) and not args.force:
        raise SystemExit(f"error: {args.out} exists; pass --force to overwrite it")
    blocks = args.blocks if args.blocks in ("tensor", "layer") else args.blocks.split(",")
    bank = TaskVectorBank.from_checkpoints(
        args.pretrained, args.finetuned, blocks=blocks, dtype=args.dtype, trust_pickle=args.trust_pickle
    )
    bank.save(args.out)
    size = bank.vectors.shape[1]
    print(f"wrote {args.out}: {bank.num_tasks} tasks × {bank.num_blocks} blocks, {size} parameters each")


def _zoo_build(args: argparse.Namespace) -> None:
    from vtvc_pyro.zoo import build_zoo, summarize_zoo

    zoo = build_zoo(args.preset, cache_dir=args.cache_dir, force=args.force)
    print(f"zoo '{args.preset}' at {zoo.root}")
    print(summarize_zoo(zoo))


def _run(args: argparse.Namespace) -> None:
    from vtvc_pyro.experiment import run_experiment

    run_experiment(args.config, overrides=args.overrides, out=args.out, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a legacy pickled ImageEncoder checkpoint to safetensors")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling (runs code from the file: only for files you trust)")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.set_defaults(handler=_convert)

    p = sub.add_parser("bank", help="task-vector banks").add_subparsers(dest="bank_command", required=True)
    p = p.add_parser("build", help="build a task-vector bank from local checkpoints and save it")
    p.add_argument("--pretrained", required=True)
    p.add_argument("--finetuned", required=True, nargs="+", type=_key_value, metavar="TASK=PATH")
    p.add_argument("--out", required=True)
    p.add_argument("--blocks", default="tensor", help="tensor | layer | comma-separated name patterns")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-pickle", action="store_true")
    p.add_argument("--force", action="store_true")
    p.set_defaults(handler=_bank_build)

    p = sub.add_parser("zoo", help="the embedded benchmark").add_subparsers(dest="zoo_command", required=True)
    p = p.add_parser("build", help="build (or verify) the embedded model zoo and print its baseline table")
    p.add_argument("--preset", default="default", choices=["default", "micro"])
    p.add_argument("--cache-dir", default=None, help="defaults to $VTVC_CACHE_DIR or the user cache dir")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    p.set_defaults(handler=_zoo_build)

    p = sub.add_parser("run", help="run an experiment from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="--key.sub=value",
                   help="dotted config overrides, e.g. --svi.steps=200")
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="start over in an existing run directory")
    p.set_defaults(handler=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command != "run":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
