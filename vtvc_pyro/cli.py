"""The ``vtvc`` command: convert legacy checkpoints, build task-vector banks and zoos, check and run
experiments, redraw and show a run's results."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_FORMAT = argparse.RawDescriptionHelpFormatter


def _key_value(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected TASK=PATH, got {text!r}")
    return name, path


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal, and never with ``--quiet`` (piped output stays clean)."""
    return not args.quiet and sys.stderr.isatty()


def _convert(args: argparse.Namespace) -> None:
    from vtvc_pyro.checkpoints import convert_checkpoint

    print(convert_checkpoint(args.src, args.dst, trust_pickle=args.trust_pickle, overwrite=args.force,
                             class_names=args.class_names, data_root=args.data_root, base=args.base))


def _bank_build(args: argparse.Namespace) -> None:
    from vtvc_pyro.task_vectors import TaskVectorBank, task_mapping

    try:
        finetuned = task_mapping(args.finetuned)
    except ValueError as err:
        raise ValueError(f"--finetuned: {err}") from None
    if os.path.exists(args.out) and not args.force:
        raise SystemExit(f"error: {args.out} exists; pass --force to overwrite it")
    blocks = args.blocks if args.blocks in ("tensor", "layer") else args.blocks.split(",")
    bank = TaskVectorBank.from_checkpoints(
        args.pretrained, finetuned, blocks=blocks, dtype=args.dtype, trust_pickle=args.trust_pickle,
        rank=args.rank, energy=args.energy,
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
    from vtvc_pyro import distributed
    from vtvc_pyro.experiment import run_experiment

    overrides = [*args.overrides, *([f"--device={args.device}"] if args.device else [])]
    run_experiment(args.config, overrides=overrides, out=args.out, force=args.force,
                   progress=_progress(args), quiet=args.quiet, report_to=args.report_to)
    distributed.shutdown()  # under torchrun: every rank leaves the process group together


def _config_show(args: argparse.Namespace) -> None:
    from vtvc_pyro.experiment.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")


def _config_check(args: argparse.Namespace) -> None:
    from vtvc_pyro.experiment.benchmark import check_inputs
    from vtvc_pyro.experiment.config import load_config

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg)
    print(f"{args.config}: valid ({len(cfg.methods)} methods: {', '.join(cfg.methods)})")


def _plot(args: argparse.Namespace) -> None:
    from vtvc_pyro.experiment.figures import draw_figures

    for path in draw_figures(args.run):
        print(path)


def _show(args: argparse.Namespace) -> None:
    import json

    from vtvc_pyro.experiment import negation
    from vtvc_pyro.experiment.report import to_markdown

    path = os.path.join(args.run, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; is {args.run} a finished vtvc run?")
    with open(path) as handle:
        metrics = json.load(handle)
    title = metrics.get("title", metrics["name"])
    if "negation" in metrics:
        print(negation.to_markdown(metrics["negation"]["targets"], title))
    else:
        print(to_markdown(metrics["methods"], metrics["tasks"], title))


def _report(args: argparse.Namespace) -> None:
    import json

    from vtvc_pyro.experiment.report import to_csv, to_markdown

    path = os.path.join(args.path, "metrics.json") if os.path.isdir(args.path) else args.path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; give a finished run directory or its metrics.json")
    with open(path) as handle:
        metrics = json.load(handle)
    rows, tasks = metrics["methods"], metrics["tasks"]
    table = to_markdown(rows, tasks, metrics.get("title", "")) if args.markdown else to_csv(rows, tasks)
    print(table, end="")


def _diagnose(args: argparse.Namespace) -> None:
    from vtvc_pyro.experiment.diagnose import diagnose, to_markdown

    print(to_markdown(diagnose(args.run, seed=args.seed, mc_samples=args.mc_samples)), end="")


def _add(sub: argparse._SubParsersAction, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                          formatter_class=_FORMAT)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML experiment config (see experiments/configs/)")
    p.add_argument("overrides", nargs="*", metavar="--key.sub=value",
                   help="dotted config overrides, applied in order, e.g. --svi.steps=200")


def build_parser() -> argparse.ArgumentParser:
    from vtvc_pyro import __version__

    parser = argparse.ArgumentParser(
        prog="vtvc", description=__doc__, formatter_class=_FORMAT,
        epilog="examples:\n  vtvc run experiments/configs/quickstart.yaml\n"
               "  vtvc config show experiments/configs/smoke.yaml --svi.steps=20\n"
               "  vtvc show runs/quickstart")
    parser.add_argument("--version", action="version", version=f"vtvc_pyro {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars and no log lines on the console (run.log still gets them)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(sub, "convert", "convert a checkpoint (the papers' pickles and heads, OpenAI TorchScript, "
             "Hugging Face CLIP directories) to safetensors",
             "vtvc convert --trust-pickle checkpoints/MNIST/finetuned.pt mnist.safetensors")
    p.add_argument("src", help="the checkpoint: .pt / .bin file, TorchScript archive or HF CLIP directory")
    p.add_argument("dst", help="the safetensors file to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling the papers' files (allowlisted classes; only files you trust)")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--class-names", help="file with a head's class names, one per line (default: the dataset "
                   "head_<Dataset>.pt names)")
    p.add_argument("--data-root", help="where Cars, DTD or SUN397 lie, for a head's class names")
    p.add_argument("--base", help="checkpoint supplying tensors SRC lacks (the proj of a CLIPVisionModel)")
    p.set_defaults(handler=_convert)

    bank = sub.add_parser("bank", help="task-vector banks").add_subparsers(dest="bank_command", required=True,
                                                                          metavar="COMMAND")
    p = _add(bank, "build", "build a task-vector bank from local checkpoints and save it",
             "vtvc bank build --pretrained zs.safetensors --finetuned mnist=mnist.safetensors "
             "svhn=svhn.safetensors --out bank.safetensors")
    p.add_argument("--pretrained", required=True, help="the pre-trained image encoder checkpoint")
    p.add_argument("--finetuned", required=True, nargs="+", type=_key_value, metavar="TASK=PATH",
                   help="one fine-tuned checkpoint per task (each task once)")
    p.add_argument("--out", required=True, help="the bank file to write")
    p.add_argument("--blocks", default="tensor", help="tensor | layer | comma-separated name patterns")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="storage precision of the task vectors")
    low = p.add_mutually_exclusive_group()
    low.add_argument("--rank", type=int, help="low-rank task vectors: singular triplets kept per 2-D block")
    low.add_argument("--energy", type=float, help="low-rank task vectors: energy share kept")
    p.add_argument("--trust-pickle", action="store_true", help="allow legacy pickled checkpoints")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(handler=_bank_build)

    zoo = sub.add_parser("zoo", help="the embedded benchmark").add_subparsers(
        dest="zoo_command", required=True, metavar="COMMAND")
    p = _add(zoo, "build", "build (or verify) the embedded model zoo and print its baseline table",
             "vtvc zoo build --preset micro")
    p.add_argument("--preset", default="default", choices=["default", "micro"], help="which zoo")
    p.add_argument("--cache-dir", default=None, help="defaults to $VTVC_CACHE_DIR or the user cache dir")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    p.set_defaults(handler=_zoo_build)

    p = _add(sub, "run", "run (or resume) an experiment from a YAML config",
             "vtvc run experiments/configs/quickstart.yaml --svi.steps=600 --out runs/longer")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="delete a previous run in --out and start over")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (the config's `device`; a run "
                   "may resume on another device)")
    p.add_argument("--report-to", action="append", default=[], choices=["tensorboard"],
                   help="live step logging of every fit (tensorboard: RUN/tensorboard/, view with "
                   "`tensorboard --logdir RUN/tensorboard`)")
    p.set_defaults(handler=_run)

    config = sub.add_parser("config", help="inspect experiment configs").add_subparsers(
        dest="config_command", required=True, metavar="COMMAND")
    p = _add(config, "show", "print the resolved config (extends, overrides and every default applied)",
             "vtvc config show experiments/configs/smoke.yaml --prior.pi=0.2")
    _add_config_args(p)
    p.set_defaults(handler=_config_show)
    p = _add(config, "check", "validate a config (and that its input files exist) without running anything",
             "vtvc config check experiments/configs/vit_b32_task_addition.yaml")
    _add_config_args(p)
    p.set_defaults(handler=_config_check)

    p = _add(sub, "plot", "redraw a run directory's figures into its plots/", "vtvc plot runs/quickstart")
    p.add_argument("run", help="a run directory")
    p.set_defaults(handler=_plot)

    p = _add(sub, "show", "print a run directory's comparison table", "vtvc show runs/quickstart")
    p.add_argument("run", help="a run directory")
    p.set_defaults(handler=_show)

    p = _add(sub, "report", "print a run's comparison table (mean ± sd over seeds) from its metrics.json, as "
             "CSV or Markdown", "vtvc report experiments/results/quickstart.json --markdown")
    p.add_argument("path", help="a run directory or a metrics.json (e.g. a committed run summary)")
    p.add_argument("--markdown", action="store_true", help="Markdown (title, table, legend) instead of CSV")
    p.set_defaults(handler=_report)

    p = _add(sub, "diagnose", "accuracy and NLL of a task-addition run's learned methods on their fit data "
             "and on test, under every evaluation rule (gated, all gates on, Monte Carlo)",
             "vtvc diagnose runs/quickstart --seed 1")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--seed", type=int, default=None, help="which fit seed of the run (default: its first)")
    p.add_argument("--mc-samples", type=int, default=8, help="draws of the Monte Carlo rule (0: skip it)")
    p.set_defaults(handler=_diagnose)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
