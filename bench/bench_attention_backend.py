"""attn_implementation="sparsebert" vs the same model on transformers' "sdpa": forward time of
the attention function alone (what the backend replaces) and of the whole model (the q/k/v and
output projections still run for every head: removing those is sparsebert.prune's job).

Models (random weights, built from configs; nothing downloaded):
  distilbert   DistilBERT shapes (6 layers, 12 heads, hidden 768), padded batch: the op path
  llama        a Llama decoder (4 layers, 12 query heads, 4 key/value heads, hidden 768),
               causal: SDPA over the active heads only
Variants: sdpa (stock, every head), sparsebert with H, H/2, H/4 heads kept per layer (the same
heads in every layer; set through sparsebert.set_masks). Each row: median time per call over
interleaved rounds (each round times every variant), the ratio to sdpa as the median of
per-round ratios and their range over rounds.

Script:  python bench/bench_attention_backend.py [--device cpu|cuda] [--dtype ...] [--batch 8] [--rounds 5]
         prints a table and writes bench/results/attention_backend-<device>.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import sparsebert  # noqa: E402

MODELS = ("distilbert", "llama")


def kv_heads(heads: int) -> int:
    """Llama's key/value heads (grouped-query attention): the largest divisor of `heads` that
    is at most heads // 3 (4 for 12 heads), 1 for fewer than 3 heads."""
    return max(d for d in range(1, max(1, heads // 3) + 1) if heads % d == 0)


def make_config(name: str, heads: int):
    if name == "distilbert":
        return transformers.DistilBertConfig(
            dim=64 * heads, n_heads=heads, n_layers=6, hidden_dim=256 * heads,
            attn_implementation="sdpa",
        )
    return transformers.LlamaConfig(
        hidden_size=64 * heads, num_attention_heads=heads, num_key_value_heads=kv_heads(heads),
        num_hidden_layers=4, intermediate_size=256 * heads, vocab_size=32000,
        attn_implementation="sdpa",
    )


def make_batch(name: str, batch: int, seq: int, device: str) -> dict:
    """Encoders get a padded batch (lengths uniform in [S/4, S]); decoders a full causal batch."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (batch, seq), generator=gen)
    out = {"input_ids": ids.to(device)}
    if name == "distilbert":
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=gen)
        lengths[0] = seq
        out["attention_mask"] = (torch.arange(seq)[None, :] < lengths[:, None]).long().to(device)
    return out


def attention_call(name: str, model, batch: dict, implementation: str):
    """The model's attention function on random q, k, v of its shapes, with the mask the model
    builds for that implementation: a zero-argument callable."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from sparsebert.hf.attention_backend import sparsebert_mask

    module = sparsebert.hf.attention_modules(model)[0]
    config = model.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    kv_heads = kv_heads or heads
    ids = batch["input_ids"]
    (b, s), dim = ids.shape, config.hidden_size // heads
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, heads, s, dim, generator=gen).to(param)
    k, v = (torch.randn(b, kv_heads, s, dim, generator=gen).to(param) for _ in range(2))
    mask = None
    if "attention_mask" in batch:
        builder = sparsebert_mask if implementation == "sparsebert" else sdpa_mask
        mask = builder(batch_size=b, q_length=s, kv_length=s,
                       mask_function=bidirectional_mask_function,
                       attention_mask=batch["attention_mask"].bool(),
                       allow_is_bidirectional_skip=True, device=ids.device)
    fn = ALL_ATTENTION_FUNCTIONS[implementation]
    return lambda: fn(module, q, k, v, mask, scaling=dim**-0.5)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=common.positive_int, default=None,
                        help="default: 32 on CUDA, 8 on CPU")
    parser.add_argument("--seq", type=common.positive_int, default=128)
    parser.add_argument("--heads", type=common.positive_int, default=12)
    parser.add_argument("--threads", type=common.positive_int, default=2, help="CPU threads")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rounds", type=common.positive_int, default=5,
                        help="interleaved rounds over the variants (medians kept)")
    parser.add_argument("--min-run-time", type=float, default=1.0,
                        help="seconds of calls per timing")
    args = parser.parse_args(argv)
    common.use_device(args.device)
    cuda = args.device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    batch_size = args.batch or (32 if cuda else 8)
    kept_counts = [args.heads, args.heads // 2, args.heads // 4]

    rows, records, backends = [], [], {}
    for name in args.models:
        torch.manual_seed(0)
        stock = transformers.AutoModel.from_config(make_config(name, args.heads))
        stock = stock.to(args.device, dtype).eval()
        gated = sparsebert.use_sparse_attention(copy.deepcopy(stock))
        layers = len(sparsebert.hf.attention_modules(gated))
        batch = make_batch(name, batch_size, args.seq, args.device)
        variants = {("sdpa", args.heads): stock}
        backends[name] = common.sdpa_backend(lambda: stock(**batch), cuda)
        variants.update({("sparsebert", k): gated for k in kept_counts})

        def set_kept(key):  # the sparsebert variants share one model: masks set per timing
            _, variant, kept = key
            if variant == "sparsebert":
                mask = torch.zeros(layers, args.heads)
                mask[:, :kept] = 1.0
                sparsebert.set_masks(gated, head_mask=mask)

        calls = {}
        for level in ("attention", "model"):
            for (variant, kept), model in variants.items():
                calls[(level, variant, kept)] = (
                    attention_call(name, model, batch, variant) if level == "attention"
                    else lambda m=model: m(**batch))
        with torch.no_grad():
            samples = common.time_interleaved(calls, args.rounds, args.min_run_time,
                                              before=set_kept)
        for level, variant, kept in calls:
            key = (level, variant, kept)
            ratios = common.round_ratios(samples, key, (level, "sdpa", args.heads))
            rec = dict(model=name, level=level, variant=variant, heads_kept=kept,
                       heads=args.heads, batch=batch_size, seq=args.seq,
                       dtype=str(dtype).replace("torch.", ""), sdpa_backend=backends[name],
                       ms=statistics.median(samples[key]) * 1e3,
                       vs_sdpa=statistics.median(ratios), vs_sdpa_min=min(ratios),
                       vs_sdpa_max=max(ratios), rounds=args.rounds,
                       samples_s=samples[key])  # per round, paired with sdpa's by position
            records.append(rec)
    records.sort(key=lambda r: (r["model"], r["level"] != "attention"))
    for rec in records:
        rows.append([rec["model"], rec["level"], rec["variant"],
                     f"{rec['heads_kept']}/{args.heads}", f"{rec['ms']:.2f}",
                     f"{rec['vs_sdpa']:.2f}x",
                     f"{rec['vs_sdpa_min']:.2f}x-{rec['vs_sdpa_max']:.2f}x"])

    header = ["model", "timed", "attention", "heads kept", "forward (ms, median)",
              "vs sdpa (median of rounds)", "range over rounds"]
    what = (f"attention_backend: attention call and model forward, B={batch_size}, S={args.seq}, "
            f"{str(dtype).replace('torch.', '')}, wall time per call, {args.rounds} interleaved "
            f"rounds; SDPA ran " + ", ".join(f"{m}: {b}" for m, b in backends.items()))
    common.report("attention_backend", args, argv, what, header, rows, records)


if __name__ == "__main__":
    main()
