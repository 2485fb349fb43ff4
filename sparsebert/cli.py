"""The `sparsebert` command: a thin argparse layer over the Python API.

Each subcommand is a pair of functions: `_add_<name>(subparsers)` declares its flags and
`_run_<name>(args)` does the work and returns the exit status. To add a subcommand, write
the pair and list it in SUBCOMMANDS. Errors users can fix (bad task, missing files, bad
config) print one line `sparsebert: error: ...` and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from sparsebert.errors import SparsebertError
from sparsebert.flags import add_dataclass_arguments, overrides

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
    from sparsebert.train import TrainConfig, finetune  # noqa: PLC0415

    config = TrainConfig(**overrides(args, TrainConfig))
    result = finetune(config, args.out, progress=not args.quiet)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif result.status == "stopped":
        print(f"stopped after step {result.step}; rerun the same command to resume")
    else:
        _print_metrics(result.to_json())
    return 0


# --- evaluate ------------------------------------------------------------------------------

def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="dev metrics of a fine-tuned run",
                                   description="Evaluate a finished run's model on its task's "
                                               "dev split(s) and print the metrics.")
    parser.add_argument("--run", required=True, help="run directory written by finetune")
    parser.add_argument("--glue-dir", default=None,
                        help="GLUE folder (default: $GLUE_DIR, else the folder the run used)")
    parser.add_argument("--batch-size", type=int, default=None, help="eval batch size")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def _run_evaluate(args: argparse.Namespace) -> int:
    from sparsebert.train import evaluate  # noqa: PLC0415

    results = evaluate(args.run, glue_dir=args.glue_dir, batch_size=args.batch_size,
                       device=args.device, verbose=not args.json)
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


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """--debug or SPARSEBERT_DEBUG=1: show tracebacks of user errors."""
    flag = bool(getattr(args, "debug", False))
    return flag or os.environ.get("SPARSEBERT_DEBUG", "").strip() not in ("", "0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsebert", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks of errors (also SPARSEBERT_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add, _run in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sparsebert` console script and `python -m sparsebert`."""
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command][1](args)
    except (SparsebertError, FileNotFoundError) as error:
        if debug_enabled(args):
            traceback.print_exc()
        return _fail(str(error))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
