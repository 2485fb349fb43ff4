"""The `sparsebert sweep` subcommand's flags and entry (cli.py registers the pair)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from sparsebert.flags import add_dataclass_arguments, input_path, output_path, overrides


def add_sweep(subparsers) -> None:
    from sparsebert.lottery.config import SearchConfig  # noqa: PLC0415
    from sparsebert.sweep.config import SweepConfig  # noqa: PLC0415
    from sparsebert.train import TrainConfig  # noqa: PLC0415

    parser = subparsers.add_parser(
        "sweep", help="the lottery-ticket study over tasks x seeds x methods (resumable, "
                      "parallel, local or Ray)",
        description="Run the search's stages for every task x seed x method as units on a "
                    "process pool (--backend local) or a Ray cluster (--backend ray), writing "
                    "OUT/<task>/seed_<s>/ (as `sparsebert search`), OUT/<task>/super/ and "
                    "OUT/report.md. Rerunning the same command resumes; adding tasks or seeds "
                    "extends the sweep.")
    parser.add_argument("--out", default=None, type=output_path,
                        help="sweep directory (created if missing; or `out` in --config)")
    parser.add_argument("--config", default=None, type=input_path,
                        help="TOML file with any of these options (flags override it)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    parser.add_argument("--redo", default=None, metavar="METHODS",
                        help="comma-separated methods (structured, magnitude) to compute again "
                             "in this sweep, after an upgrade that changed them: their "
                             "searches, subnetworks and retraining (for structured also the "
                             "super-survivors and the speed timings) are moved to "
                             "OUT/.sweep/superseded/ and redone; the full models and the other "
                             "method are kept. Search settings that only these methods use "
                             "may change with it (--redo magnitude --magnitude-amount 0.2). "
                             "Rerunning with the same --redo after an interruption resumes "
                             "the redo")
    add_dataclass_arguments(parser.add_argument_group("sweep"), SweepConfig)
    add_dataclass_arguments(parser.add_argument_group("search"), SearchConfig,
                            skip=("method",))
    add_dataclass_arguments(parser.add_argument_group("training (--threads: per worker)"),
                            TrainConfig, skip=("task", "seed", "device", "stop_after_steps"))
    parser._option_string_actions["--threads"].help = (
        "torch CPU threads per worker (default: the cores / --workers; 1 per unit on a Ray "
        "cluster of CPUs)")


def run_sweep(args: argparse.Namespace) -> int:
    from sparsebert.lottery.config import SearchConfig  # noqa: PLC0415
    from sparsebert.sweep import SweepConfig, sweep  # noqa: PLC0415
    from sparsebert.sweep.config import SweepError, read_config_file  # noqa: PLC0415
    from sparsebert.train import TrainConfig  # noqa: PLC0415

    configs = []
    from_file = read_config_file(args.config) if args.config else {}
    file_out = from_file.pop("out", None)
    out = args.out or file_out
    if out is None:
        raise SweepError("--out: the sweep directory is required (or `out = ...` in --config)")
    out = str(Path(out).expanduser())  # `out = "~/..."` in a config file is not shell-expanded
    for cls in (SweepConfig, SearchConfig, TrainConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in from_file.items() if k in names}
        values.update(overrides(args, cls))
        values.pop("method", None), values.pop("task", None), values.pop("seed", None)
        configs.append(cls(**values))
    # stdout carries the outcome alone (--json is parsed by scripts): whatever the sweep or a
    # library under it prints there (Ray's notes on a worker that died) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        outcome = sweep(out, *configs, progress=not args.quiet, redo=args.redo)
    if args.json:
        print(json.dumps(dataclasses.asdict(outcome), indent=2))
    elif not (outcome.done or outcome.failed or outcome.blocked):
        print(f"nothing to do: all {len(outcome.skipped)} units of this sweep were already "
              f"done; {_report_line(out)}")
    else:
        print(f"{len(outcome.done)} units done, {len(outcome.skipped)} already done, "
              f"{len(outcome.failed)} failed, {len(outcome.blocked)} blocked by failures, "
              f"{len(outcome.retried)} retried, in {outcome.wall_s:.0f} s")
        for unit_id, info in outcome.failed.items():
            print(f"  failed {unit_id} ({info['attempts']} attempts): {info['error']}")
        if outcome.failed:
            print(f"rerun the same command to retry them; details in "
                  f"{out}/.sweep/failed/")
        else:
            print(_report_line(out))
    return 1 if outcome.failed else 0


def _report_line(out) -> str:
    report = Path(out) / "report.md"
    if report.is_file():
        return f"report: {report}"
    return (f"no report written ({report}: see the warning above; with matplotlib installed, "
            f"rerun the same command to write it)")
