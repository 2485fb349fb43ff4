"""The speed targets of pruned models, measured with `sparsebert speed`'s own code.

Cases (each a `sparsebert speed` run: its rows are timed interleaved, every round calling each
row once in a fresh seeded random order, in one process, so the ratios below come from the same
minutes of the same machine):
  full      lengths full: stock HF eager, sparsebert dense, masked (--prune-heads/--prune-ffn),
            pruned  -> targets "dense <= 1.0x stock HF eager", "masked <= 0.6x dense"
  uniform   lengths uniform in [S/4, S]: the same rows with and without unpadding
            -> target "unpadded >= 1.3x faster than padded" (dense and masked)
  compile   (--compile) lengths full: the fast path eager vs torch.compile (and its compile
            time), which decides the CPU default
GPU cases (bench/gpu_speed.sh) use the same script with --device cuda.

Script:  python bench/bench_speed.py [--device cpu] [--model minilm] [--batch 16] [--seq 128]
             [--threads 2,1] [--prune 0.5] [--repeats 10] [--cases full,uniform] [--compile]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sparsebert import runtime  # noqa: E402
from sparsebert.errors import SparsebertError  # noqa: E402
from sparsebert.speed.command import (  # noqa: E402
    add_arguments,
    check_args,
    format_table,
    run_speed,
)
from sparsebert.speed.workload import DTYPES  # noqa: E402


def targets(device_type: str, prune: float) -> list[tuple[str, str, str, str, float]]:
    """(what, case, numerator row, denominator row, bound on the time ratio) of the issue's
    targets for this device; the masked bound depends on the pruned fraction."""
    if device_type == "cuda":
        masked_bound = {0.5: 0.6, 0.75: 0.35}.get(prune)
        out = [("dense / stock HF eager (full)", "full", "dense", "hf_eager", 0.5),
               ("dense unpadded / padded (uniform)", "uniform", "dense", "dense padded", 1 / 1.4)]
    else:
        masked_bound = 0.6 if prune == 0.5 else None
        out = [("dense / stock HF eager (full)", "full", "dense", "hf_eager", 1.0),
               ("dense unpadded / padded (uniform)", "uniform", "dense", "dense padded", 1 / 1.3),
               ("masked unpadded / padded (uniform)", "uniform", "masked", "masked padded",
                1 / 1.3)]
    if masked_bound is not None:
        out.insert(1, ("masked / dense (full)", "full", "masked", "dense", masked_bound))
    return out


def speed_args(args, lengths: str, threads: int | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
            "--lengths", lengths, "--device", args.device, "--prune-heads", str(args.prune),
            "--prune-ffn", str(args.prune), "--repeats", str(args.repeats), "--quiet"]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if threads:
        argv += ["--threads", str(threads)]
    return parser.parse_args(argv)


def row_key(row: dict) -> str:
    padded_only = ("hf_eager", "hf_graph", "patched", "pruned")  # rows that never unpad
    return row["variant"] + ("" if row["unpad"] or row["variant"] in padded_only else " padded")


def compile_case(args) -> dict:
    """The fast path (dense, lengths full) eager vs torch.compile, and on CUDA vs its CUDA
    graphs (graph replay does not go through torch.compile): compile time and medians."""
    import sparsebert  # noqa: PLC0415
    from sparsebert.speed import accelerate  # noqa: PLC0415
    from sparsebert.speed.timing import summary, time_interleaved  # noqa: PLC0415
    from sparsebert.speed.workload import load_speed_model, make_batch  # noqa: PLC0415

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    model, _ = load_speed_model(args.model)
    model = sparsebert.patch(model.to(device=device, dtype=dtype))
    batch = make_batch(torch.full((args.batch,), args.seq).numpy(), args.seq,
                       model.config.vocab_size, device)
    rows = {"eager": accelerate(model, graphs=False),
            "compile": accelerate(model, graphs=False, compile=True)}
    if device.type == "cuda":
        rows["graphs"] = accelerate(model, graphs=True)
    t0 = time.perf_counter()
    rows["compile"](**batch)
    compile_s = time.perf_counter() - t0
    samples = time_interleaved({name: (lambda fast=fast: fast(**batch))
                                for name, fast in rows.items()}, args.repeats, 2, device,
                               progress=False)
    return {"compile_s": compile_s, **{k: summary(v) for k, v in samples.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", default="2",
                        help="CPU thread counts, comma-separated: every case runs at each")
    parser.add_argument("--prune", type=float, default=0.5)
    parser.add_argument("--repeats", type=common.positive_int, default=10)
    parser.add_argument("--cases", default="full,uniform")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--name", default="speed", help="result files' stem")
    args = parser.parse_args(argv)
    if not 0.0 <= args.prune <= 1.0:
        parser.error(f"--prune {args.prune}: expected a fraction in [0, 1]")
    common.use_device(args.device)
    try:
        thread_counts = ([int(t) for t in args.threads.split(",")] if args.device == "cpu"
                         else [0])
    except ValueError:
        parser.error(f"--threads {args.threads!r}: expected comma-separated integers")
    if any(t < 1 for t in thread_counts if args.device == "cpu"):
        parser.error(f"--threads {args.threads!r}: expected positive integers")
    cases = [case for case in args.cases.split(",") if case]  # (--cases '' with --compile: none)
    if not cases and not args.compile:
        parser.error(f"--cases {args.cases!r}: no case to time (name one, or add --compile to "
                     "time the compiled dense model alone); the results file would be "
                     "overwritten with an empty table")
    for case in cases:  # every case checked before any is timed
        try:
            check_args(speed_args(args, case, thread_counts[0]))
        except SparsebertError as error:  # (a case is a --lengths of sparsebert speed)
            message = str(error)
            parser.error(f"--cases {args.cases!r}: {case!r}: {message.split(': ', 1)[1]}"
                         if message.startswith("--lengths ") else message)
    results, sections, checks, target_rows = {}, [], [], []
    mismatched: list[str] = []  # rows whose logits differ from the reference
    device_type = args.device.split(":")[0]
    for threads in thread_counts:
        where = f", {threads} thread{'s' if threads > 1 else ''}" if threads else ""
        for case in cases:
            t0 = time.perf_counter()
            try:
                result = run_speed(speed_args(args, case, threads))
            except SparsebertError as error:  # e.g. --seq past the model's limit, a model
                parser.error(str(error))  # directory without a tokenizer: one line
            result["wall_s"] = time.perf_counter() - t0
            results[f"{case}{where}"] = result
            table = format_table(result)
            notes = "".join(f"\nnote: {note}" for note in result["notes"])
            sections.append(f"### lengths {case}{where}\n\n{table}\n{notes}\n")
            print(f"lengths {case}{where} ({result['wall_s']:.0f} s)\n{table}\n{notes}",
                  flush=True)
            mismatched += [f"{row_key(r)} ({case}{where})" for r in result["rows"]
                           if r.get("outputs_match") is False]
        # Targets: time ratios between rows of the same run.
        for what, case, num, den, bound in targets(device_type, args.prune):
            if f"{case}{where}" not in results:
                continue
            rows = {row_key(r): r for r in results[f"{case}{where}"]["rows"]
                    if not r["subnetwork"]}
            if num not in rows or den not in rows:
                continue
            ratio = rows[num]["median_ms"] / rows[den]["median_ms"]
            # a row whose logits differ from the reference computes something else: no verdict
            same = all(rows[k].get("outputs_match") is not False for k in (num, den))
            met = same and ratio <= bound
            checks.append({"what": what, "threads": threads or None, "ratio": ratio,
                           "target": bound, "met": met, "outputs_match": same})
            target_rows.append([what + where, f"{ratio:.2f}x", f"<= {bound:.2f}x",
                                ("yes" if met else "no") if same else "no (logits differ)"])
    extra = ""
    if args.compile:
        if thread_counts[0]:
            torch.set_num_threads(thread_counts[0])
        try:
            results["compile"] = comp = compile_case(args)
        except SparsebertError as error:  # (--cases '' --compile: the model's first load)
            parser.error(str(error))
        ratio = comp["compile"]["median_ms"] / comp["eager"]["median_ms"]
        where = f"{torch.get_num_threads()} threads" if device_type == "cpu" else args.device
        extra = (f"\n### torch.compile vs eager (fast path, dense, lengths full, {where})\n\n"
                 f"compile time {comp['compile_s']:.0f} s; median {comp['compile']['median_ms']:.2f}"
                 f" ms compiled vs {comp['eager']['median_ms']:.2f} ms eager ({ratio:.2f}x)")
        if "graphs" in comp:
            extra += (f" vs {comp['graphs']['median_ms']:.2f} ms with CUDA graphs "
                      f"({comp['graphs']['median_ms'] / comp['compile']['median_ms']:.2f}x "
                      "compiled)")
        extra += ", interleaved\n"
        print(extra)
    env = common.environment(args.device)
    if device_type == "cpu":  # the timed thread counts (each result has its own), not the default
        env["device"] = runtime.device_name(torch.device(args.device))
        env["threads"] = thread_counts if len(thread_counts) > 1 else thread_counts[0]
    env["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    first = next((r for r in results.values() if "dtype" in r),
                 {"dtype": args.dtype or ("fp16" if device_type == "cuda" else "fp32")})
    subject = (f"{args.prune:.0%} heads + {args.prune:.0%} FFN neurons masked (random, same "
               "count per layer)" if results.keys() - {"compile"} else
               "the dense fast path only (torch.compile vs eager)")
    title = (f"`sparsebert speed` targets: {args.model}, B={args.batch}, S={args.seq}, "
             f"{first['dtype']}, {subject}; on {env['device'].split(' (')[0]}; torch {env['torch']}, "
             f"transformers {env['transformers']}, sparsebert {env['git_sha']}\n\n"
             f"Command: python bench/bench_speed.py {shlex.join(argv or sys.argv[1:])}\n\n"
             "Rows of one table were timed interleaved (each round calls every row once, in a "
             "fresh seeded random order) in one "
             f"process, {args.repeats} calls each after warm-up; the machine is shared with other "
             "processes, so absolute times are noisy and only the ratios within a table mean "
             "much. Ratios are of median times (lower = faster). Load average (1, 5, 15 min) at "
             f"the end: {env['load_average_end']} on {os.cpu_count()} cores.\n")
    table = common.markdown_table(["target", "measured", "target", "met"], target_rows)
    text = title + "\n" + table + "\n\n" + "\n".join(sections) + extra
    payload = {"env": env, "args": vars(args), "targets": checks, "results": results}
    path = common.write_results(args.name, args.device, payload, text)
    print(table)
    print(f"\nwrote {path}")
    if mismatched:
        print(f"bench_speed: {', '.join(mismatched)}: logits differ from the reference beyond "
              "rounding (see the notes); no target counts as met for them", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
