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
import re
import select
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparsebert import __version__
from sparsebert._command import debug_switch_on, one_line_warning
from sparsebert.errors import SparsebertError, Terminated
from sparsebert.flags import (
    add_dataclass_arguments,
    decimal_int,
    input_path,
    output_path,
    overrides,
)
from sparsebert.switches import check_switches

# --- finetune ------------------------------------------------------------------------------

def _add_task_and_out(parser: argparse.ArgumentParser, out_what: str, json_what: str) -> None:
    parser.add_argument("--task", required=True,
                        help="GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI")
    parser.add_argument("--out", required=True, type=output_path,
                        help=f"{out_what} (created if missing)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help=f"print {json_what} as JSON")


def _add_finetune(subparsers) -> None:
    from sparsebert.train import TrainConfig  # noqa: PLC0415

    parser = subparsers.add_parser(
        "finetune", help="fine-tune a model on a GLUE task (resumable)",
        description="Fine-tune on one GLUE task; writes config.json, metrics.jsonl, model/ and "
                    "results.json to --out. Rerunning the same command resumes an interrupted "
                    "run. --preset sets the learning rate when --lr is not given; the other "
                    "flags have the defaults shown.")
    _add_task_and_out(parser, "run directory", "results")
    add_dataclass_arguments(parser, TrainConfig, skip=("task",))


def _run_finetune(args: argparse.Namespace) -> int:
    from sparsebert.train import TrainConfig, finetune  # noqa: PLC0415

    config = TrainConfig(**overrides(args, TrainConfig))
    done_before = _finished_step(Path(args.out))
    result = finetune(config, args.out, progress=not args.quiet)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    elif result.status == "stopped":
        print(f"stopped at step {result.step} (--stop-after-steps); rerun without it, or with "
              "a larger value, to go on")
    else:
        if done_before is not None:
            print(f"{args.out}: already finished (step {done_before}): nothing to do; its "
                  f"results:")
        _print_metrics(result.to_json())
    return 0


def _finished_step(out: Path) -> int | None:
    """The step of the finished run in `out`, if one is there (a damaged results.json is
    finetune's to report; one whose model/ is gone is fine-tuned again)."""
    from sparsebert.train.rundir import RunResult, model_missing  # noqa: PLC0415

    try:
        done = RunResult.load(out)
    except SparsebertError:
        return None
    if done is None or not done.finished or model_missing(out) is not None:
        return None
    return done.step


# --- evaluate ------------------------------------------------------------------------------

def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="dev metrics of a fine-tuned run",
                                   description="Evaluate a finished run's model on its task's "
                                               "dev split(s) and print the metrics.")
    parser.add_argument("--run", required=True, type=input_path,
                        help="run directory written by finetune")
    parser.add_argument("--glue-dir", default=None,
                        help="GLUE folder (default: $GLUE_DIR, else the folder the run used)")
    parser.add_argument("--batch-size", type=decimal_int, default=None,
                        help="eval batch size (default: the run's --eval-batch-size)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available), cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--threads", type=decimal_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def _run_evaluate(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from sparsebert.train import evaluate  # noqa: PLC0415

    if args.threads is not None:
        if args.threads < 1:
            raise SparsebertError(f"--threads {args.threads}: expected an integer >= 1")
        torch.set_num_threads(args.threads)
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
    if results.get("train_time_s") is not None:
        print(f"train time {results['train_time_s']:.0f} s on {results.get('device_name')}"
              + (f" ({results['precision']})" if results.get("precision") else ""))


# --- search ------------------------------------------------------------------------------

def _add_search(subparsers) -> None:
    from sparsebert.lottery.config import SearchConfig  # noqa: PLC0415
    from sparsebert.train import TrainConfig  # noqa: PLC0415

    parser = subparsers.add_parser(
        "search", help="the lottery-ticket search: prune, build subnetworks, re-fine-tune",
        description="Fine-tune the full model, search s-pruning (heads + MLPs) and m-pruning "
                    "(weights) masks, build good/random/bad subnetworks, evaluate them pruned "
                    "and re-fine-tuned, and write summary.json, report.md and figures/ to "
                    "--out. Rerunning the same command resumes after the last finished stage.")
    _add_task_and_out(parser, "search directory", "summary.json")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds (e.g. 1337,42,86): one search per seed in "
                             "OUT/seed_<s>/, then the super-survivors in OUT/super/ "
                             "(instead of --seed)")
    parser.add_argument("--no-super", action="store_true",
                        help="with --seeds: skip the super-survivor stage")
    parser.add_argument("--redo", default=None, metavar="METHODS",
                        help="comma-separated methods (structured, magnitude) to compute again, "
                             "after an upgrade that changed them: their finished results (for "
                             "structured also the speed timings, and with --seeds the "
                             "super-survivors) move to "
                             "OUT/.superseded/ and are redone; the full model is kept. The same "
                             "--redo rerun after an interruption resumes the redo. Search "
                             "settings may change with it when only these methods use them "
                             "(e.g. --redo magnitude --magnitude-amount 0.2)")
    group = parser.add_argument_group("search")
    add_dataclass_arguments(group, SearchConfig)
    group = parser.add_argument_group("training (full model and re-fine-tuning)")
    add_dataclass_arguments(group, TrainConfig, skip=("task",))


def _run_search(args: argparse.Namespace) -> int:
    from sparsebert.lottery import SearchConfig, search  # noqa: PLC0415
    from sparsebert.train import TrainConfig  # noqa: PLC0415

    search_config = SearchConfig(**overrides(args, SearchConfig))
    train_config = TrainConfig(**overrides(args, TrainConfig))
    from sparsebert.lottery.config import SearchError  # noqa: PLC0415

    if args.no_super and args.seeds is None:
        raise SearchError("--no-super applies to --seeds only (one search per seed, then the "
                          "super-survivors)")
    if args.seeds is not None:
        from sparsebert.lottery.super_survivors import search_seeds  # noqa: PLC0415

        if "seed" in overrides(args, TrainConfig):
            raise SearchError("pass either --seed or --seeds, not both")
        seeds = _seed_list(args.seeds)
        if len(seeds) == 1 and not args.quiet:
            print(f"note: one seed: OUT/seed_{seeds[0]}/ only; the super-survivors and the "
                  "task's report.md over seeds need >= 2 seeds (a later run with more seeds "
                  "reuses this one)", file=sys.stderr)
        summary = search_seeds(args.task, args.out, seeds,
                               search_config=search_config, train_config=train_config,
                               progress=not args.quiet, super_survivors=not args.no_super,
                               redo=args.redo)
    else:
        summary = search(args.task, args.out, search_config=search_config,
                         train_config=train_config, progress=not args.quiet, redo=args.redo)
    if args.json:
        print(json.dumps(summary, indent=2))
    elif summary.get("status") == "stopped":
        print("stopped (--stop-after-steps); rerun without it, or with a larger value, to go on")
    elif summary.get("kind") == "sparsebert-super":
        _print_super(summary)
    else:
        _print_search(summary)
    return 0


def _seed_list(text: str) -> list[int]:
    from sparsebert.lottery.config import SearchError  # noqa: PLC0415
    from sparsebert.train.config import is_valid_seed, parse_seeds  # noqa: PLC0415

    seeds = parse_seeds(text)
    if seeds is None:
        raise SearchError(f"--seeds {text!r}: expected comma-separated integers (e.g. 1337,42,86)")
    if not seeds:
        raise SearchError(f"--seeds {text!r}: expected at least one integer seed")

    if not all(map(is_valid_seed, seeds)):
        raise SearchError(f"--seeds {text!r}: expected integers in [0, 2**64 - 1]")
    return seeds


def _print_super(summary: dict[str, Any]) -> None:
    print(f"{summary['task']} seeds {summary['seeds']}: super-survivors")
    for note in summary.get("notes", []):
        print(f"  note: {note}")
    for name, sub in summary["subnetworks"].items():
        def mean(entries):
            return "-" if not entries else f"{np.mean([e['score'] for e in entries]):.4f}"

        print(f"  super {name:<6} {sub['heads_kept']} heads, {sub['mlps_kept']} MLPs: pruned "
              f"{mean(sub['pruned'])}, retrained {mean(sub['retrained'])} (mean over seeds)")


def _print_search(summary: dict[str, Any]) -> None:
    from sparsebert.glue.tasks import is_regression_task  # noqa: PLC0415

    metric = summary["report_metric"]
    # (a regression task has no majority class: its baseline predicts one constant)
    baseline = "constant prediction" if is_regression_task(summary["task"]) else "majority class"
    print(f"{summary['task']} seed {summary['seed']}: full model dev {metric} "
          f"{summary['full']['score']:.4f} ({baseline} {summary['majority']:.4f})")
    for method, result in summary["methods"].items():
        for note in result.get("notes", []):
            print(f"  note ({method}): {note}")
        for name, sub in result["subnetworks"].items():
            size = (f"{sub['heads_kept']} heads, {sub['mlps_kept']} MLPs, "
                    if "heads_kept" in sub else "")
            pruned = "-" if sub["pruned"] is None else f"{sub['pruned']['score']:.4f}"
            retrained = "-" if sub["retrained"] is None else f"{sub['retrained']['score']:.4f}"
            print(f"  {method:<10} {name:<6} {size}{sub['fraction_kept']:.1%} kept: "
                  f"pruned {pruned}, retrained {retrained}")


# --- report ------------------------------------------------------------------------------

def _add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="the paper's table and figures from search directories",
        description="Aggregate search directories (tasks x seeds) into report.md (the paper's "
                    "table layout, mean +- std over seeds, the paper's numbers beside ours) "
                    "and figures/*.png; subnetwork timings saved by `sparsebert speed --run` "
                    "in the searches are shown next to their scores.")
    parser.add_argument("paths", nargs="+", type=input_path,
                        help="search directories or parents of them")
    parser.add_argument("--out", default=None, type=output_path,
                        help="output folder (default: the first path)")


def _run_report(args: argparse.Namespace) -> int:
    from sparsebert.report import report  # noqa: PLC0415

    result = report(args.paths, args.out)
    print(f"wrote {result['report']} and {len(result['figures'])} figures "
          f"({', '.join(result['tasks'])})")
    if result["unfinished"]:
        count = len(result["unfinished"])
        print(f"note: left out {count} search{'es' if count > 1 else ''} without a summary.json "
              f"yet (named in the report): {', '.join(map(str, result['unfinished'][:3]))}"
              + (" ..." if count > 3 else ""), file=sys.stderr)
    return 0


# --- speed ---------------------------------------------------------------------------------

def _add_speed(subparsers) -> None:
    from sparsebert.speed.command import __doc__ as doc  # noqa: PLC0415
    from sparsebert.speed.command import add_arguments  # noqa: PLC0415

    add_arguments(subparsers.add_parser(
        "speed", help="time dense vs masked vs physically pruned inference side by side",
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter))


def _run_speed(args: argparse.Namespace) -> int:
    from sparsebert.speed.command import main  # noqa: PLC0415

    return main(args)


# --- sweep (sparsebert.sweep.command) -------------------------------------------------------

def _add_sweep(subparsers) -> None:
    from sparsebert.sweep.command import add_sweep  # noqa: PLC0415

    add_sweep(subparsers)


def _run_sweep(args: argparse.Namespace) -> int:
    from sparsebert.sweep.command import run_sweep  # noqa: PLC0415

    return run_sweep(args)


# --- info ----------------------------------------------------------------------------------

def _add_info(subparsers) -> None:
    subparsers.add_parser("info", help="versions, devices and native kernels",
                          description="Print the versions of sparsebert, torch and "
                                      "transformers, the visible devices, and which ops have "
                                      "native CPU/CUDA kernels in this build.")


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
    "search": (_add_search, _run_search),
    "report": (_add_report, _run_report),
    "speed": (_add_speed, _run_speed),
    "sweep": (_add_sweep, _run_sweep),
    "info": (_add_info, _run_info),
}
RESUMABLE = ("finetune", "search", "sweep")  # an interrupted run goes on from where it was


def _fail(message: str) -> int:
    print(f"sparsebert: error: {message}", file=sys.stderr)
    return 2


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`sparsebert ... | head`): poll
    reports an error condition on its write end."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file behind stdout
        return False


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """--debug (parsed into `args`) or SPARSEBERT_DEBUG on: show tracebacks of user errors."""
    return bool(getattr(args, "debug", False)) or debug_switch_on()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsebert",
        description="Lottery-ticket pruning of BERT-family models (Prasanna et al. 2020): "
                    "fine-tune, search head/MLP and weight masks, re-fine-tune the "
                    "subnetworks, report, and time them. `sparsebert COMMAND --help` for "
                    "each command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks of errors (also SPARSEBERT_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add, _run in SUBCOMMANDS.values():
        add(subparsers)
    # Whole flag names only: `sweep --seed 3` must not pass for --seeds, nor --task for --tasks.
    parser.allow_abbrev = False
    for command_parser in subparsers.choices.values():
        command_parser.allow_abbrev = False
    parser.command_parsers = subparsers.choices  # type: ignore[attr-defined]
    return parser


_SIGTERM_RECEIVED: list[bool] = []  # set by the handler: some libraries (Ray) re-raise a plain
# KeyboardInterrupt in place of ours


def _close_progress_bars() -> None:
    """Close the progress bars an error or interrupt left open (each ends its line)."""
    from tqdm import tqdm  # noqa: PLC0415 (the class every tqdm flavour registers with)

    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 (a bar half torn down: nothing more to show)
            pass


def _raise_terminated(signum, frame) -> None:
    _SIGTERM_RECEIVED.append(True)
    raise Terminated


def _rerun_hint(args: argparse.Namespace) -> str:
    """What to do after an interrupted run: resume it, or start it where its --out is still
    missing or empty (nothing was written yet)."""
    out = getattr(args, "out", None)
    if out is not None:
        out = Path(out).expanduser()
        if not out.is_dir() or not any(out.iterdir()):
            return "; nothing was written yet: rerun the same command to start it"
    return "; rerun the same command to resume"


def _negative_values_attached(argv: Sequence[str]) -> list[str]:
    """["--seeds", "-1,2"] -> ["--seeds=-1,2"]: argparse takes a value starting with "-" that
    is not a plain negative number ("-1,2", "-1e-5") for an option and says "--seeds: expected
    one argument"; attached, the value reaches the flag's own check, which says what is
    expected. Nothing after "--" (all positional) is touched."""
    argv = list(argv)
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if token == "--":
            return out + argv[index:]
        if (token.startswith("--") and "=" not in token and len(token) > 2
                and re.fullmatch(r"-\.?\d[\w.,+\- ]*", following)):
            out.append(f"{token}={following}")
            index += 2
        else:
            out.append(token)
            index += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sparsebert` console script and `python -m sparsebert`."""
    argv = _negative_values_attached(sys.argv[1:] if argv is None else argv)
    try:  # (building the parser imports the commands' modules: a second of a Ctrl-C's window)
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        if "--debug" in argv or debug_switch_on():
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    if unknown:  # the command's usage and name, not the top level's
        parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        check_switches()
    except ValueError as error:
        return _fail(str(error))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    _SIGTERM_RECEIVED.clear()
    previous_format = warnings.formatwarning
    if not debug_enabled(args):  # one line per warning, without the source line
        warnings.formatwarning = one_line_warning
    try:
        status = SUBCOMMANDS[args.command][1](args)
        sys.stdout.flush()  # buffered output reaches a closed pipe here, not at exit
        return status
    except (SparsebertError, OSError) as error:  # user-fixable: a bad value, a path, a
        # permission, a read-only or full file system
        if isinstance(error, BrokenPipeError) and _stdout_reader_gone():
            # the reader of the output stopped (`| head`): end quietly, as `cat` does, and keep
            # Python's exit-time flush of stdout from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        _close_progress_bars()  # (else the line lands at the end of a bar's, redrawn later)
        if debug_enabled(args):
            traceback.print_exc()
        return _fail(str(error))
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated) or bool(_SIGTERM_RECEIVED)
        then = _rerun_hint(args) if args.command in RESUMABLE else ""
        _close_progress_bars()  # (else the line lands at the end of a bar's, redrawn later)
        print(f"{'terminated' if terminated else 'interrupted'}{then}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        warnings.formatwarning = previous_format
        if in_main_thread and previous is not None:  # None: a handler set outside Python
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
