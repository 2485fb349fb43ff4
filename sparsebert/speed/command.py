"""`sparsebert speed`: dense vs masked vs physically pruned, measured side by side.

    sparsebert speed --model minilm --prune-heads 0.5 --prune-ffn 0.5 --batch 16 --seq 128 \\
        --device cpu --threads 2 --json out.json

One table: stock HF eager, stock HF + CUDA graph (GPU), sparsebert dense, sparsebert masked (fast
path), the patched full model and the physically pruned one on their own padded forward; per row
the median and p20/p80 milliseconds per batch over interleaved repeats after warm-up
(device-side timing on GPU), examples/s, effective TFLOP/s (the FLOPs the row's kept heads and
neurons need on the real tokens, over its time) and the speed-ups: vs dense (the fast-path full
model) and, for pruned rows, vs the patched full model on the same forward, each the median of
per-round ratios. Before timing, every sparsebert row's logits are compared with the masked
model's (max |diff|).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sparsebert.atomic import atomic_write_json
from sparsebert.flags import decimal_int, input_path, output_path
from sparsebert.runtime import device_label, git_sha, versions
from sparsebert.speed.timing import paired_ratio, summary, time_interleaved
from sparsebert.speed.variants import (
    Variant,
    fast_variants,
    patched_full_variant,
    pruned_variant,
    stock_variants,
)
from sparsebert.speed.workload import (
    DTYPES,
    MaskSet,
    SpeedError,
    batch_lengths,
    is_search_dir,
    load_speed_model,
    make_batch,
    masks_from_file,
    masks_from_run,
    model_shape,
    random_masks,
    run_glue_dir,
    run_model,
    run_task,
)
from sparsebert.train.config import is_valid_seed
from sparsebert.train.evaluate import choose_data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `sparsebert speed`."""
    parser.add_argument("--model", default=None, type=input_path,
                        help="bert-base (BERT-base shapes, random weights), minilm (the default "
                             "model), or a local model directory (default: the --run's model, "
                             "else minilm)")
    masks = parser.add_argument_group("masks (one source)")
    masks.add_argument("--head-mask", default=None, type=input_path,
                       help="masks file: JSON with head_mask (L, H) [+ mlp_mask, neuron_mask], "
                            "or a (L, H) tensor (.pt / .npy)")
    masks.add_argument("--prune-heads", type=float, default=None,
                       help="fraction of heads pruned in every layer (random, seeded)")
    masks.add_argument("--prune-ffn", type=float, default=None,
                       help="fraction of FFN neurons pruned in every layer (random, seeded)")
    masks.add_argument("--run", default=None, type=input_path,
                       help="run directory: a search (every subnetwork in structured/masks/; "
                            "the results are also written to DIR/speed/<setting>.json, where "
                            "`sparsebert report` shows them next to the scores) or a fine-tune "
                            "run of a masked model (masks.json)")
    parser.add_argument("--batch", type=decimal_int, default=32, help="batch size B (default: 32)")
    parser.add_argument("--seq", type=decimal_int, default=128,
                        help="padded sequence length S (default: 128)")
    parser.add_argument("--lengths", default="full",
                        help="full, uniform (in [S/4, S]) or glue:TASK (the task's dev lengths; "
                             "default: full)")
    parser.add_argument("--glue-dir", default=None,
                        help="GLUE folder for --lengths glue:TASK (default: $GLUE_DIR, else "
                        "the folder the --run recorded, else the hub)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when visible)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="weights and activations (default: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--threads", type=decimal_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=decimal_int, default=None,
                        help="timed calls per row (default: 30 on cuda, 10 on cpu)")
    parser.add_argument("--warmup", type=decimal_int, default=3,
                        help="untimed calls per row first (default: 3)")
    parser.add_argument("--seed", type=decimal_int, default=0,
                        help="seed of weights, masks, lengths (default: 0)")
    parser.add_argument("--json", default=None, type=output_path,
                        help="also write the results to this JSON file")
    parser.add_argument("--no-save", action="store_true",
                        help="with --run on a search directory: do not write DIR/speed/")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# --- checks ---------------------------------------------------------------------------------
def resolve_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise SpeedError(f"--device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SpeedError(f"--device {text!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpeedError(f"--device {text}: no CUDA device is visible (torch "
                             f"{torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpeedError(f"--device {text}: only {torch.cuda.device_count()} CUDA devices")
    return device


def check_dtype(flag_value: str, dtype: torch.dtype, device: torch.device) -> None:
    """The dtype must run a linear layer and SDPA on the device (probed on tiny tensors)."""
    try:
        x = torch.ones(2, 4, 8, device=device, dtype=dtype)
        F.linear(x, torch.ones(8, 8, device=device, dtype=dtype))
        F.scaled_dot_product_attention(x[None], x[None], x[None])
    except (RuntimeError, TypeError) as error:
        raise SpeedError(f"--dtype {flag_value} is not supported on {device.type} by this torch "
                         f"build ({str(error).splitlines()[0]})") from None


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--batch", args.batch), ("--seq", args.seq)):
        if value < 1:
            raise SpeedError(f"{flag} {value}: expected a positive integer")
    if args.repeats is not None and args.repeats < 1:
        raise SpeedError(f"--repeats {args.repeats}: expected a positive integer")
    if args.warmup < 0:
        raise SpeedError(f"--warmup {args.warmup}: expected >= 0")
    if not is_valid_seed(args.seed):
        raise SpeedError(f"--seed {args.seed}: expected an integer in [0, 2**64 - 1]")
    if args.threads is not None and args.threads < 1:
        raise SpeedError(f"--threads {args.threads}: expected a positive integer")
    for flag, value in (("--prune-heads", args.prune_heads), ("--prune-ffn", args.prune_ffn)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise SpeedError(f"{flag} {value}: expected a fraction in [0, 1]")
    if args.lengths not in ("full", "uniform") and not (
            args.lengths.startswith("glue:") and args.lengths[len("glue:"):]):
        raise SpeedError(f"--lengths {args.lengths!r}: expected full, uniform or glue:TASK "
                         f"(e.g. glue:SST-2)")
    if args.lengths.startswith("glue:"):  # the task's own name: glue:sst2 is glue:SST-2 (one
        from sparsebert.glue.tasks import GlueError, get_task  # noqa: PLC0415 (setting, file)
        try:
            args.lengths = "glue:" + get_task(args.lengths[len("glue:"):]).name
        except GlueError as error:
            raise SpeedError(f"--lengths {args.lengths!r}: {error}") from None
    if args.json is not None:
        check_output_file("--json", Path(args.json))
    run_is_search = args.run is not None and is_search_dir(args.run)
    if run_is_search and not args.no_save:
        # where the result will go (its name depends on the timing's setting): checked now,
        # not after minutes of timing
        try:
            check_output_file("--run", Path(args.run) / "speed" / "result.json")
        except SpeedError as error:
            raise SpeedError(f"{error}; pass --no-save to time it without saving") from None
    sources = [flag for flag, value in (("--head-mask", args.head_mask), ("--run", args.run))
               if value is not None]
    if args.prune_heads is not None or args.prune_ffn is not None:
        sources.append("--prune-heads/--prune-ffn")
    if len(sources) > 1:
        raise SpeedError(f"{' and '.join(sources)}: pass one source of masks")
    unused = []
    if args.glue_dir is not None and not args.lengths.startswith("glue:"):
        unused.append(f"--glue-dir is read for --lengths glue:TASK only (--lengths "
                      f"{args.lengths})")
    if args.no_save and not run_is_search:
        unused.append("--no-save applies to a search directory's --run only (nothing is "
                      "written there otherwise)")
    for text in unused:
        warnings.warn(f"{text}: ignored", stacklevel=2)
    _warn_other_task_lengths(args)


def _warn_other_task_lengths(args: argparse.Namespace) -> None:
    """--lengths glue:TASK of another task than the --run's: allowed (timing one task's
    subnetworks at another's lengths), but the result is saved with the run and reported beside
    its task's scores, so say so."""
    if args.run is None or not args.lengths.startswith("glue:"):
        return
    from sparsebert.glue.tasks import GlueError, get_task  # noqa: PLC0415

    trained = run_task(args.run)
    try:
        wanted, own = get_task(args.lengths[len("glue:"):]).name, get_task(trained or "").name
    except GlueError:
        return  # an unknown name is refused where the lengths are read; no task recorded: quiet
    if wanted != own:
        warnings.warn(f"--lengths {args.lengths}: the run in --run {args.run} is a {own} run; "
                      f"its timings at {wanted}'s lengths are saved with it and reported beside "
                      f"{own}'s scores (use --lengths glue:{own} for its own)", stacklevel=3)


def check_output_file(flag: str, path: Path) -> None:
    """Before any timing: `path` can be written (not a directory; its nearest existing parent
    is a writable directory)."""
    if path.is_dir():
        raise SpeedError(f"{flag} {path}: is a directory (expected a file name)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SpeedError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpeedError(f"{flag} {path}: {parent} is not writable")


def write_result(flag: str, path: Path, result: dict[str, Any]) -> None:
    """atomic_write_json with errors that name the flag."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)
    except OSError as error:  # (a WriteError names the path itself: its reason alone here)
        reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
        raise SpeedError(f"{flag} {path}: cannot write it ({reason})") from None


def mask_sets(args: argparse.Namespace, shape: dict[str, int]) -> list[MaskSet]:
    if args.head_mask is not None:
        return [masks_from_file(args.head_mask, shape)]
    if args.run is not None:
        return masks_from_run(args.run, shape)
    return [random_masks(shape, args.prune_heads or 0.0, args.prune_ffn or 0.0, args.seed)]


# --- FLOPs ----------------------------------------------------------------------------------
def useful_flops(shape: dict[str, int], masks: MaskSet | None, lengths: np.ndarray) -> float:
    """FLOPs the kept heads and neurons need on the real tokens: linear layers plus attention
    (QK^T and PV) per layer; embeddings and the classifier are left out."""
    hidden, head_dim = shape["hidden"], shape["hidden"] // shape["heads"]
    tokens, squares = float(lengths.sum()), float((lengths.astype(np.float64) ** 2).sum())
    total = 0.0
    for layer in range(shape["layers"]):
        if masks is None:
            heads, ffn = shape["heads"], shape["intermediate"]
        else:
            heads = int((masks.head_mask[layer] != 0).sum())
            ffn = 0 if float(masks.mlp_mask[layer]) == 0 else int(
                (masks.neuron_mask[layer] != 0).sum())
        kd = heads * head_dim
        total += tokens * 2 * (4 * hidden * kd + 2 * hidden * ffn) + 4 * kd * squares
    return total


# --- the run --------------------------------------------------------------------------------
# A row whose p80 / p20 exceeds this was timed on a busy machine: say so next to the table.
NOISY_SPREAD = 1.25
# A row's logits may differ from its reference model's (the stock model for the full rows, the
# patched model with the same masks for the others) by rounding only: at most this times
# max |reference logit|. The scale is the logits' own, with no floor at 1: a freshly
# initialised classifier gives logits of a few hundredths, and a floor would let a model of
# another function pass (the default model's logits move by 0.03 when half its heads and FFN
# neurons are masked). Measured on the CPU (default model, B=4, S=64): fp32 rows differ by
# about 1e-7 of the logits' scale, bf16 by 1e-2, fp16 by 1e-3.
OUTPUT_RTOL = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2.5e-1}
OUTPUT_SCALE_FLOOR = 1e-3  # (logits all but 0: a tolerance that is not 0)


def output_tolerance(dtype_name: str, reference: torch.Tensor) -> float:
    """The largest max |logit difference| a row may have against `reference` (its logits)."""
    return OUTPUT_RTOL[dtype_name] * max(OUTPUT_SCALE_FLOOR, float(reference.abs().max()))


def _mismatch_notes(rows: list[dict[str, Any]], padded: bool) -> list[str]:
    """A note for each row whose logits differ from its reference beyond rounding."""
    return [f"{_row_name(r, say_padded=padded)}: its logits differ from its reference's (the "
            f"stock model's, or the patched model's with the same masks) by "
            f"{r['max_abs_diff']:.1e} (tolerance "
            f"{r['tolerance']:.1e}): it does not compute the same function, so its timing is "
            f"not comparable" for r in rows
            if r["outputs_match"] is False]


def _rows(variants: list[Variant], samples: dict[str, list[float]], shape, lengths, batch,
          diffs: dict[str, float], tolerances: dict[str, float]) -> list[dict[str, Any]]:
    """One row per variant: time statistics, the raw samples (sample r of every row comes from
    round r of the timer) and speed-ups as medians of per-round ratios (paired_ratio): every
    row against the fast-path full model (`dense`, unpadded); pruned rows also against the
    patched full model on the same padded forward (`patched`) and the stock forward."""
    def key_of(variant: str, unpad: bool) -> str | None:
        return next((v.key for v in variants if v.variant == variant and v.unpad == unpad
                     and not v.subnetwork), None)

    dense, patched, stock = key_of("dense", True), key_of("patched", False), key_of(
        "hf_eager", False)
    rows = []
    for v in variants:
        stats = summary(samples[v.key])
        heads_kept, ffn_kept = (1.0, 1.0) if v.masks is None else v.masks.kept()
        seconds = stats["median_ms"] / 1e3
        row = {
            "variant": v.variant, "subnetwork": v.subnetwork or None, "unpad": v.unpad,
            "heads_kept": heads_kept, "ffn_kept": ffn_kept, **stats,
            "examples_per_s": batch / seconds,
            "effective_tflops": useful_flops(shape, v.masks, lengths) / seconds / 1e12,
            "speedup_vs_dense": None, "max_abs_diff": diffs.get(v.key),
            "tolerance": tolerances.get(v.key),
            "outputs_match": (None if v.key not in diffs
                              else bool(diffs[v.key] <= tolerances[v.key])),
            "notes": v.notes,
            "samples_ms": [round(ms, 4) for ms in samples[v.key]],
        }
        if dense is not None:
            paired = paired_ratio(samples[dense], samples[v.key])
            row["speedup_vs_dense"] = paired["median"]
            row["speedup_vs_dense_p20_p80"] = [paired["p20"], paired["p80"]]
        for name, baseline in (("patched", patched), ("stock", stock)):
            if v.variant == "pruned" and baseline is not None:
                paired = paired_ratio(samples[baseline], samples[v.key])
                row[f"speedup_vs_{name}"] = paired["median"]
                row[f"speedup_vs_{name}_p20_p80"] = [paired["p20"], paired["p80"]]
        rows.append(row)
    return rows


def _noise_notes(rows: list[dict[str, Any]], padded: bool = True) -> list[str]:
    """A note when some rows' per-call times spread widely (a busy machine). padded: whether
    the batch has padding (rows that run it padded are named so)."""
    spread = {_row_name(r, say_padded=padded): r["p80_ms"] / r["p20_ms"] for r in rows
              if r["p20_ms"] > 0}
    noisy = {name: s for name, s in spread.items() if s > NOISY_SPREAD}
    if not noisy:
        return []
    worst = max(noisy, key=noisy.get)
    return [f"noisy timings: {len(noisy)} of {len(rows)} rows have p80/p20 > {NOISY_SPREAD} "
            f"(worst {worst}: {noisy[worst]:.2f}); the machine was busy. The speed-ups are "
            "medians of per-round ratios, which cancel slow drift, but rerun on a quiet "
            "machine (or with more --repeats) for tighter numbers"]


def _row_name(row: dict[str, Any], say_padded: bool = True) -> str:
    """"masked (good)", with ", padded" for padded rows unless say_padded is False."""
    name = row["variant"] + (f" ({row['subnetwork']})" if row["subnetwork"] else "")
    return name + ("" if row["unpad"] or not say_padded else ", padded")


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Build every variant, check their outputs, time them interleaved; the JSON result.
    --threads applies for the duration of the call only."""
    threads = torch.get_num_threads()
    try:
        return _run_speed(args)
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(error):
            raise
        raise SpeedError(f"out of memory for --batch {args.batch} x --seq {args.seq} with "
                         f"--model {args.model} on {args.device or 'the default device'} "
                         f"({type(error).__name__}); lower --batch or --seq") from error
    finally:
        torch.set_num_threads(threads)


def _out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure: MemoryError (numpy's too), CUDA's OutOfMemoryError, or
    the CPU allocator's RuntimeError."""
    cuda_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # (torch < 2.5)
    return (isinstance(error, (MemoryError, cuda_oom))
            or "can't allocate memory" in str(error))


def _run_speed(args: argparse.Namespace) -> dict[str, Any]:
    check_args(args)
    device = resolve_device(args.device)
    dtype_name = args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    check_dtype(dtype_name, dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats = args.repeats or (30 if device.type == "cuda" else 10)
    # Step 1: model, masks, batch.
    if args.model is None:
        args.model = run_model(args.run) if args.run is not None else "minilm"
    model, tokenizer = load_speed_model(args.model, seed=args.seed)
    shape = model_shape(model)
    if shape["max_length"] is not None and args.seq > shape["max_length"]:
        raise SpeedError(f"--seq {args.seq}: longer than the model's position limit "
                         f"({shape['max_length']} tokens)")
    sets = mask_sets(args, shape)
    glue_dir, glue_origin = _glue_source(args)
    lengths = batch_lengths(args.lengths, args.batch, args.seq, tokenizer, glue_dir,
                            args.seed, origin=glue_origin)
    model = model.to(device=device, dtype=dtype)
    batch = make_batch(lengths, args.seq, model.config.vocab_size, device, args.seed)
    padded = "attention_mask" in batch
    # Step 2: variants (and their outputs vs the masked model's).
    variants = stock_variants(model, batch, device)
    dense, _ = fast_variants("dense", model, None, batch, padded)
    variants += dense + [patched_full_variant(model, batch)]
    diffs: dict[str, float] = {}
    tolerances: dict[str, float] = {}
    notes: list[str] = []
    if args.head_mask is None and args.run is None and not (args.prune_heads or args.prune_ffn):
        notes.append("no masks given (--head-mask, --run or --prune-heads/--prune-ffn): the "
                     "masked and pruned rows keep every head and FFN neuron")

    def check_outputs(rows: list[Variant], reference: torch.Tensor) -> None:
        tolerance = output_tolerance(dtype_name, reference)
        for v in rows:
            diffs[v.key] = float((v.fn().float() - reference).abs().max())
            tolerances[v.key] = tolerance

    for masks in sets:
        name = masks.name if len(sets) > 1 or args.run is not None else ""
        notes += [f"{masks.name}: {note}" for note in masks.notes]
        masked, patched = fast_variants("masked", model, masks, batch, padded, name)
        variants += masked + [pruned_variant(patched, masks, batch, name)]
        with torch.no_grad():
            check_outputs(variants[-len(masked) - 1:], patched(**batch).logits.float())
    with torch.no_grad():  # the full rows against the stock model (a patched copy would
        reference = model(**batch).logits.float()  # check the patched row against itself)
    check_outputs(dense + [next(v for v in variants if v.variant == "patched")], reference)
    # Step 3: time them side by side.
    samples = time_interleaved({v.key: v.fn for v in variants}, repeats, args.warmup, device,
                               progress=not args.quiet)
    for v in variants:
        notes += v.notes
    rows = _rows(variants, samples, shape, lengths, args.batch, diffs, tolerances)
    notes += _mismatch_notes(rows, padded) + _noise_notes(rows, padded)
    return {
        "device": device_label(device),
        "versions": versions(), "git_sha": git_sha(), "dtype": dtype_name,
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
        "threads": torch.get_num_threads(),
        "attention": getattr(model.config, "_attn_implementation", None),
        "native_kernels": _native_kernels(),
        "lengths": {"mean": float(lengths.mean()), "min": int(lengths.min()),
                    "max": int(lengths.max())},
        "padded": padded,  # the batch has padding (an attention mask)
        "masks": [{"name": m.name, "source": m.source, "heads_kept": m.kept()[0],
                   "ffn_kept": m.kept()[1]} for m in sets],
        "rows": rows,
        "notes": notes,
        # when (UTC): a report keeps the latest of two files timing one setting
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _glue_source(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(GLUE folder, origin) for --lengths glue:TASK: --glue-dir, else $GLUE_DIR, else the
    folder a --run recorded, else the hub (as `evaluate` chooses)."""
    recorded, config = (run_glue_dir(args.run) if args.run is not None and
                        args.lengths.startswith("glue:") else (None, None))
    glue_dir, _, origin = choose_data(recorded, args.glue_dir, config)
    return glue_dir, origin


def _native_kernels() -> list[str]:
    """Dispatch keys with a native masked_attention kernel (the masked and pruned models' op)."""
    from sparsebert import ops  # noqa: PLC0415

    return ops.native_dispatch_keys("masked_attention")


def format_table(result: dict[str, Any]) -> str:
    """The markdown table of a run_speed result."""
    header = ["variant", "unpad", "heads kept", "FFN kept", "median ms", "p20-p80 ms",
              "examples/s", "eff. TFLOP/s", "speed-up vs dense", "speed-up vs patched full",
              "max abs diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def ratio(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}x"

    for row in result["rows"]:
        name = _row_name(row, say_padded=False)  # the table has an unpad column
        diff = "" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
        lines.append("| " + " | ".join([
            name, "yes" if row["unpad"] else "no", f"{row['heads_kept']:.0%}",
            f"{row['ffn_kept']:.0%}", f"{row['median_ms']:.2f}",
            f"{row['p20_ms']:.2f}-{row['p80_ms']:.2f}", f"{row['examples_per_s']:.0f}",
            f"{row['effective_tflops']:.3f}", ratio(row["speedup_vs_dense"]),
            ratio(row.get("speedup_vs_patched")), diff]) + " |")
    return "\n".join(lines)


def describe(result: dict[str, Any]) -> str:
    """One line: model, shapes, device, dtype, lengths."""
    a = result["args"]
    lengths = result["lengths"]
    return (f"{a['model']} B={a['batch']} S={a['seq']} lengths {a['lengths']} (mean "
            f"{lengths['mean']:.1f}, {lengths['min']}-{lengths['max']}), {result['dtype']}, "
            f"{result['device']}, torch {result['versions']['torch']}, stock attention "
            f"{result['attention']}, sparsebert attention kernels: "
            f"{', '.join(result['native_kernels']) or 'reference only'}")


def main(args: argparse.Namespace) -> int:
    """`sparsebert speed`: print the table, write --json."""
    result = run_speed(args)
    print(describe(result))
    print(format_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    outputs = [("--json", Path(args.json))] if args.json else []
    if args.run is not None and not args.no_save and is_search_dir(args.run):
        name = setting_slug(result, own_model=run_model(args.run))
        outputs.append(("--run", Path(args.run) / "speed" / f"{name}.json"))
    for flag, path in outputs:
        write_result(flag, path, result)
        print(f"wrote {path}")
    wrong = [_row_name(r, say_padded=result["padded"]) for r in result["rows"]
             if r.get("outputs_match") is False]
    if wrong:
        print(f"sparsebert: error: {', '.join(wrong)}: logits differ from the reference "
              f"beyond rounding (see the notes)", file=sys.stderr)
        return 1
    return 0


def setting_slug(result: dict[str, Any], own_model: str | None = None) -> str:
    """File name stem of a result's setting: device (on the CPU with its thread count), dtype,
    batch, length, lengths, e.g. cpu-t1-fp32-b16-s128-glue-mrpc or
    nvidia-h200-fp16-b32-s128-full; then a --seed other than 0, and a --model other than
    `own_model` (the --run's own). Timings at other thread counts, seeds or models keep their
    own files."""
    a = result["args"]
    device = result["device"]
    if str(a["device"]).startswith("cpu"):
        threads = result.get("threads") or a.get("threads")
        device = f"cpu-t{threads}" if threads else "cpu"
    parts = [device, result["dtype"], f"b{a['batch']}", f"s{a['seq']}", str(a["lengths"])]
    if a.get("seed", 0) != 0:  # (weights of a new head, random masks and lengths follow it)
        parts.append(f"seed{a['seed']}")
    if own_model is not None and a.get("model") not in (None, own_model):  # not the run's
        parts.append("model-" + Path(str(a["model"]).rstrip("/")).name)
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="sparsebert speed")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))

