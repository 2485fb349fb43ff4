"""The `sparsebert` command: a thin argparse layer over the Python API.

Each subcommand is a pair of functions: `_add_<name>(subparsers)` declares its flags and
`_run_<name>(args)` does the work and returns the exit status. To add a subcommand, write
the pair and list it in SUBCOMMANDS. Errors users can fix (bad task, missing files, bad
config) print one line `sparsebert: error: ...` and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from sparsebert.glue.tasks import GlueError
from sparsebert.models import ModelLoadError

# Errors raised on bad user input; shown as one line, without a stack trace.
USER_ERRORS: tuple[type[Exception], ...] = (GlueError, ModelLoadError, FileNotFoundError)


# --- dataclass <-> flags -------------------------------------------------------------------

def _field_type(cls: type, name: str) -> type:
    """The non-None type of a dataclass field (`int | None` -> int)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type,
                            skip: Sequence[str] = (), rename: dict[str, str] | None = None,
                            ) -> None:
    """One `--field-name` flag per dataclass field, with default SUPPRESS (so only flags the
    user gave become overrides); bools get --x/--no-x."""
    rename = rename or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + rename.get(f.name, f.name).replace("_", "-")
        kind = _field_type(cls, f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text)


def dataclass_to_argv(obj: Any, skip: Sequence[str] = ()) -> list[str]:
    """Flags that rebuild `obj` through add_dataclass_arguments (fields at default omitted)."""
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv.extend([flag, str(value)])
    return argv


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The dataclass fields the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


# --- finetune ------------------------------------------------------------------------------

def _add_finetune(subparsers) -> None:
    from sparsebert.train import TrainConfig  # noqa: PLC0415

    parser = subparsers.add_parser(
        "finetune", help="fine-tune a model on a GLUE task (resumable)",
        description="Fine-tune on one GLUE task; writes config.json, metrics.jsonl, model/ and "
                    "results.json to --out. Rerunning the same command resumes an interrupted "
                    "run. Flags left out come from the preset (--preset).")
    parser.add_argument("--task", required=True,
                        help="GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI")
    parser.add_argument("--out", required=True, help="run directory (created if missing)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    add_dataclass_arguments(parser, TrainConfig, skip=("task",))


def _run_finetune(args: argparse.Namespace) -> int:
    from sparsebert.train import TrainConfig, TrainError, finetune  # noqa: PLC0415

    try:
        config = TrainConfig(**overrides(args, TrainConfig))
        results = finetune(config, args.out, progress=not args.quiet)
    except TrainError as error:
        return _fail(str(error))
    if args.json:
        print(json.dumps(results, indent=2))
    elif results.get("status") == "stopped":
        print(f"stopped after step {results['step']}; rerun the same command to resume")
    else:
        _print_metrics(results)
    return 0


# --- evaluate ------------------------------------------------------------------------------

def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="dev metrics of a fine-tuned run",
                                   description="Evaluate a finished run's model on its task's "
                                               "dev split(s) and print the metrics.")
    parser.add_argument("--run", required=True, help="run directory written by finetune")
    parser.add_argument("--glue-dir", default=None, help="GLUE folder (default: $GLUE_DIR)")
    parser.add_argument("--batch-size", type=int, default=None, help="eval batch size")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def _run_evaluate(args: argparse.Namespace) -> int:
    from sparsebert.train import TrainError, evaluate  # noqa: PLC0415

    try:
        results = evaluate(args.run, glue_dir=args.glue_dir, batch_size=args.batch_size,
                           device=args.device)
    except TrainError as error:
        return _fail(str(error))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_metrics(results)
    return 0


def _print_metrics(results: dict[str, Any]) -> None:
    for split, metrics in results["metrics"].items():
        values = "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        print(f"{results['task']} {split}: {values}")
    if "train_time_s" in results:
        print(f"train time {results['train_time_s']:.0f} s on {results.get('device_name')}")


# --- info ----------------------------------------------------------------------------------
# (lead: extend freely; devices, versions and native kernels per op)

def _add_info(subparsers) -> None:
    subparsers.add_parser("info", help="versions, devices and native kernels")


def _run_info(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from sparsebert import ops  # noqa: PLC0415
    from sparsebert.runtime import cpu_name, versions  # noqa: PLC0415

    for name, version in versions().items():
        print(f"{name:<14}{version}")
    print(f"{'cpu':<14}{cpu_name()} ({torch.get_num_threads()} threads)")
    for i in range(torch.cuda.device_count()):
        print(f"{f'cuda:{i}':<14}{torch.cuda.get_device_name(i)}")
    extension = getattr(ops, "_C", None)
    print(f"{'extension':<14}{'loaded' if extension is not None else 'not loaded'}")
    if extension is not None and hasattr(extension, "build_info"):
        print(f"{'build':<14}{extension.build_info()}")
    for op_name in getattr(ops, "OP_NAMES", ()):
        keys = ops.native_dispatch_keys(op_name)
        print(f"  {op_name:<28}native: {', '.join(keys) if keys else 'none (reference)'}")
    return 0


# --- main ----------------------------------------------------------------------------------

SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {
    "finetune": (_add_finetune, _run_finetune),
    "evaluate": (_add_evaluate, _run_evaluate),
    "info": (_add_info, _run_info),
}


def _fail(message: str) -> int:
    print(f"sparsebert: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsebert", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add, _run in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sparsebert` console script and `python -m sparsebert`."""
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command][1](args)
    except USER_ERRORS as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
