"""The report layer: synthetic search summaries -> aggregation, tables, figures, errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")  # a core dependency; absent on bare GPU machines
from PIL import Image  # noqa: E402

from sparsebert.cli import main  # noqa: E402
from sparsebert.errors import SparsebertError  # noqa: E402
from sparsebert.report import ReportError, collect, paper, report, table  # noqa: E402
from sparsebert.report.collect import Stat, load_summary  # noqa: E402
from sparsebert.report.summaries import find_summaries  # noqa: E402

L, H = 6, 12
SEEDS = (1, 2, 3)
HAS_STATS = importlib.util.find_spec("sparsebert.lottery.stats") is not None
needs_stats = pytest.mark.skipif(not HAS_STATS, reason="sparsebert.lottery.stats not present")

# Hand-picked scores: mean and sample std are easy to check by hand.
MRPC = {"full": [0.80, 0.82, 0.84], "s_good_P": [0.75, 0.78, 0.72],
        "s_good_R": [0.77, 0.77, 0.77], "m_good_R": [0.81, 0.83, 0.79]}


def _entry(score: float | None) -> dict | None:
    return None if score is None else {"score": score, "metrics": {"acc": score}}


def _masks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    head = (rng.random((L, H)) < 0.7).astype(int)
    head[:2, :4] = 1  # shared by every seed: at least 8 super-survivors
    mlp = np.array([1, 1, 1, 1, 0, 1]) if seed != 2 else np.array([1, 1, 0, 1, 1, 1])
    return head, mlp


def _structured(seed: int, i: int, scores: dict, full: float, task: str) -> dict:
    head, mlp = _masks(seed if task == "MRPC" else seed + 10)
    curve, heads, mlps = [], L * H, L
    for step, (phase, dh, dm, drop) in enumerate(  # drop: search-score loss vs the full model
        [(0, 0, 0, 0.0), (1, 7, 1, 0.03), (1, 7, 1, 0.12), (2, 4, 0, 0.06), (2, 4, 0, 0.11),
         (3, 0, 1, 0.15)]
    ):
        h, m = heads - dh, mlps - dm
        frac = (h / (L * H) + 2 * m / L) / 3
        search = full - drop - 0.005 * (seed % 4) * (step > 0)
        passed = search >= 0.9 * full
        curve.append({"phase": phase, "step": step, "heads_kept": h, "mlps_kept": m,
                      "fraction_kept": frac, "score": search - 0.01, "search_score": search,
                      "passed": passed})
        if passed:
            heads, mlps = h, m

    def sub(p, r, kept=int(head.sum())):
        return {"heads_kept": kept, "mlps_kept": int(mlp.sum()), "fraction_kept": 0.8,
                "pruned": _entry(p), "retrained": _entry(r)}

    good = sub(scores["s_good_P"][i], scores["s_good_R"][i])
    if seed == 3:
        del good["heads_kept"]  # optional: counted from the mask instead
    return {"curve": curve, "good_mask": {"head_mask": head.tolist(), "mlp_mask": mlp.tolist()},
            "subnetworks": {"good": good, "random": sub(0.6 + 0.01 * i, 0.7),
                            "bad": sub(0.5, None)}}


def _magnitude(i: int, scores: dict, full: float) -> dict:
    curve = [{"step": k, "fraction_kept": 0.9**k, "score": full - 0.01 * k * k,
              "search_score": full - 0.01 * k * k, "passed": full - 0.01 * k * k >= 0.9 * full}
             for k in range(6)]
    return {"curve": curve, "layer_kept_fraction": [0.5 + 0.05 * k for k in range(L)],
            "subnetworks": {"good": {"fraction_kept": 0.59 + 0.01 * i, "pruned": _entry(0.78),
                                     "retrained": _entry(scores["m_good_R"][i])},
                            "random": {"fraction_kept": 0.59, "pruned": _entry(0.4),
                                       "retrained": _entry(0.7)},
                            "bad": {"fraction_kept": 0.59, "pruned": None, "retrained": None}}}


def write_run(root: Path, task: str, seed: int, i: int, /, *, magnitude: bool = True,
              scores: dict = MRPC, **override) -> Path:
    """One search run directory root/<task>/seed_<seed>/summary.json; returns its directory."""
    full = scores["full"][i]
    methods = {"structured": _structured(seed, i, scores, full, task)}
    if magnitude:
        methods["magnitude"] = _magnitude(i, scores, full)
    data = {"version": 1, "kind": "sparsebert-search", "task": task, "seed": seed,
            "model": "default", "metric": "acc", "report_metric": "acc", "threshold": 0.9,
            "search_data": "dev", "importance_mode": "paper", "num_layers": L, "num_heads": H,
            "majority": 0.684, "full": {"score": full, "metrics": {"acc": full, "f1": 0.86}},
            "methods": methods}
    data.update(override)
    run = root / task / f"seed_{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "summary.json").write_text(json.dumps(data))
    return run


def write_super(root: Path, task: str) -> None:
    heads = np.all([_masks(s)[0] for s in SEEDS], axis=0).astype(int)
    mlps = np.all([_masks(s)[1] for s in SEEDS], axis=0).astype(int)
    data = {"version": 1, "kind": "sparsebert-super", "task": task, "seeds": list(SEEDS),
            "head_mask": heads.tolist(), "mlp_mask": mlps.tolist(),
            "subnetworks": {"good": {"heads_kept": int(heads.sum()), "mlps_kept": int(mlps.sum()),
                                     "fraction_kept": 0.3, "pruned": _entry(0.55),
                                     "retrained": _entry(0.70)},
                            "random": {"pruned": None, "retrained": _entry(0.68)},
                            "bad": {"pruned": None, "retrained": _entry(0.66)}}}
    (root / task / "super").mkdir(parents=True, exist_ok=True)
    (root / task / "super" / "summary.json").write_text(json.dumps(data))


def make_runs(root: Path) -> Path:
    """MRPC: 3 seeds, both methods, a super summary; RTE: 3 seeds, s-pruning only."""
    rte = {"full": [0.60, 0.62, 0.61], "s_good_P": [0.55, 0.56, 0.57],
           "s_good_R": [0.5, 0.52, 0.54], "m_good_R": [0, 0, 0]}
    for i, seed in enumerate(SEEDS):
        write_run(root, "MRPC", seed, i)
        write_run(root, "RTE", seed, i, magnitude=False, scores=rte, majority=0.527)
    write_super(root, "MRPC")
    return root


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return make_runs(tmp_path / "runs")


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) > 200, (path, img.size)


# ----------------------------------------------------------------------------- aggregation


def test_stat_mean_and_sample_std():
    s = Stat.of([0.75, 0.78, 0.72])
    assert s.n == 3 and s.mean == pytest.approx(0.75)
    assert s.std == pytest.approx(math.sqrt((0.03**2 + 0.03**2) / 2))  # ddof=1: 0.03
    one = Stat.of([0.5, None])
    assert one.n == 1 and one.std is None
    assert Stat.of([None]) is None


def test_collect_groups_by_task_and_aggregates(runs: Path):
    results = collect(runs)
    assert list(results) == ["MRPC", "RTE"]  # the paper's column order
    mrpc, rte = results["MRPC"], results["RTE"]
    assert mrpc.seeds == [1, 2, 3] and rte.n_seeds == 3
    full = mrpc.scores["full model"]
    assert (full.mean, full.std, full.n) == (pytest.approx(0.82), pytest.approx(0.02), 3)
    assert mrpc.scores["s good P"].std == pytest.approx(0.03)
    assert mrpc.scores["s good R"].std == pytest.approx(0.0)
    assert mrpc.scores["m good R"].mean == pytest.approx(0.81)
    assert mrpc.scores["m good R"].std == pytest.approx(0.02)
    assert "s bad R" not in mrpc.scores  # retrained: null in every seed
    assert mrpc.scores["s bad P"].n == 3
    assert not any(k.startswith("m ") for k in rte.scores)
    assert mrpc.scores["super good R"].mean == pytest.approx(0.70)
    assert mrpc.scores["super good R"].std is None
    assert "super good R" not in rte.scores
    # Masks stacked per task; sizes fall back to the mask count when heads_kept is missing.
    assert mrpc.head_masks.shape == (3, L, H) and mrpc.mlp_masks.shape == (3, L)
    assert mrpc.head_masks.dtype == bool
    counts = [int(_masks(s)[0].sum()) for s in SEEDS]
    assert mrpc.sizes[("s", "good", "heads_kept")].mean == pytest.approx(np.mean(counts))
    assert mrpc.sizes[("m", "good", "fraction_kept")].mean == pytest.approx(0.60)
    assert mrpc.sizes[("super", "good", "heads_kept")].mean == mrpc.super.head_mask.sum()


def test_collect_accepts_run_dir_file_and_task_aliases(runs: Path):
    one = collect(runs / "MRPC" / "seed_1")
    assert list(one) == ["MRPC"] and one["MRPC"].n_seeds == 1
    f = runs / "RTE" / "seed_2" / "summary.json"
    assert collect([f, f])["RTE"].n_seeds == 1  # the same file twice counts once
    alias = write_run(runs.parent / "alias", "sst2", 7, 0)
    assert list(collect(alias)) == ["SST-2"]


def test_missing_optional_parts_are_tolerated(tmp_path: Path):
    run = write_run(tmp_path, "toy", 1, 0, methods={}, majority=None)
    results = collect(run)
    assert list(results["toy"].scores) == ["full model"]
    assert results["toy"].head_masks is None
    out = report(run)
    assert "toy acc (ours)" in out["table"] and "(paper)" not in out["table"]
    assert [p.name for p in out["figures"]] == []
    # No num_layers / num_heads: taken from the good mask, or left unknown without one.
    sized = write_run(tmp_path / "b", "MRPC", 1, 0, num_layers=None, num_heads=None)
    assert collect(sized)["MRPC"].head_masks.shape == (1, L, H)
    bare = write_run(tmp_path / "c", "RTE", 1, 0, methods={}, num_layers=None, num_heads=None)
    assert "RTE" in report(bare)["table"]


# ----------------------------------------------------------------------------- paper data


def test_paper_table_transcription():
    assert len(paper.ROWS) == 18 and [r.key for r in paper.ROWS] == list(paper.RESULTS)
    assert all(list(row) == list(paper.TASKS) for row in paper.RESULTS.values())
    assert paper.paper_value("full model", "MRPC") == (0.839, 0.009)
    assert paper.paper_value("majority baseline", "WNLI") == (0.563, None)
    assert paper.paper_value("s good R", "sts-b") == (0.752, 0.228)
    assert paper.paper_value("super bad R", "QNLI") == (0.568, 0.027)
    assert paper.paper_value("m bad P", "CoLA") == (0.0, 0.0)
    assert paper.paper_value("full model", "toy") is None
    assert paper.SIZES["MNLI"].mean_heads == pytest.approx(95.0)
    assert paper.SIZES["CoLA"].super_heads == 34 and paper.SIZES["STS-B"].super_mlps == 1
    assert paper.SIZES["MNLI"].magnitude_fraction == pytest.approx(0.51, abs=0.01)  # ≈49% pruned


# ----------------------------------------------------------------------------- tables


def _row(md: str, label: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r}")


def test_results_table_layout_and_paper_values(runs: Path):
    md = table.results_table(collect(runs))
    header = _row(md, "Setting")
    assert header == ["Setting", "MRPC acc (ours)", "MRPC (paper)", "RTE acc (ours)",
                      "RTE (paper)"]
    labels = [ln.split("|")[1].strip() for ln in md.splitlines()[2:]]
    assert labels == [r.key for r in paper.ROWS]
    assert _row(md, "full model") == ["full model", "0.820 ± 0.020 (n=3)", "0.839 ± 0.009",
                                      "0.610 ± 0.010 (n=3)", "0.632 ± 0.031"]
    assert _row(md, "majority baseline") == ["majority baseline", "0.684", "0.684", "0.527",
                                             "0.527"]
    assert _row(md, "s good P")[1:3] == ["0.750 ± 0.030 (n=3)", "0.771 ± 0.012"]
    assert _row(md, "m good R")[1:5] == ["0.810 ± 0.020 (n=3)", "0.840 ± 0.010", "—",
                                         "0.614 ± 0.017"]
    assert _row(md, "s bad R")[1] == "—"
    # one value where the task has 3 seeds: its n is shown
    assert _row(md, "super good R")[1:3] == ["0.700 (n=1)", "0.711 ± 0.004"]


def test_sizes_and_stability_tables(runs: Path):
    results = collect(runs)
    sizes = table.sizes_table(results)
    mrpc = _row(sizes, "MRPC")
    assert mrpc[1] == "3" and "of 72" in mrpc[2] and "of 6" in mrpc[3]
    assert mrpc[5] == "0.60 ± 0.01"
    assert mrpc[7] == "89.4 of 144 (62%)" and mrpc[11] == "28 / 4"
    assert _row(sizes, "RTE")[5] == "—"
    stab = table.stability_table(results)
    if not HAS_STATS:
        assert stab.startswith("Stability statistics unavailable")
        return
    row = _row(stab, "MRPC")
    super_heads = int(np.all([_masks(s)[0] for s in SEEDS], axis=0).sum())  # by hand
    assert row[1] == "3" and row[3] == str(super_heads)
    assert row[2] == ", ".join(f"{s}: {int(_masks(s)[0].sum())}" for s in SEEDS)
    assert row[11:] == ["28 of 144", "0.22", "0.014"]
    from sparsebert.lottery.stats import krippendorff_alpha  # noqa: PLC0415

    mlp_masks = np.stack([_masks(s)[1] for s in SEEDS])
    assert row[9] == table._num(krippendorff_alpha(mlp_masks), 2)  # the paper's MLP statistic


def test_stability_wiring_with_a_stub_module(runs: Path, monkeypatch):
    """The table reads the stats module's summary (either Cochran layout) and nothing else."""
    calls = []

    def stability_summary(masks):
        calls.append(np.asarray(masks).shape)
        return {"n_seeds": len(masks), "survivors": [1, 2, 3], "super_survivors": 7,
                "mean_jaccard": 0.5, "fleiss_kappa": 0.25,
                "cochran_q": {"statistic": 3.0, "pvalue": 0.0123, "df": 2}}

    stub = types.ModuleType("sparsebert.lottery.stats")
    stub.stability_summary = stability_summary
    monkeypatch.setitem(__import__("sys").modules, "sparsebert.lottery.stats", stub)
    row = _row(table.stability_table(collect(runs)), "RTE")
    assert row[1:11] == ["3", "1: 1, 2: 2, 3: 3", "7", "0.50", "0.25", "0.012", "7", "0.25", "—",
                         "0.012"]  # α: not in this stub's summary
    assert (3, L, H) in calls and (3, L) in calls


# ----------------------------------------------------------------------------- report + figures


def test_report_writes_markdown_and_valid_pngs(runs: Path, tmp_path: Path):
    out = report([runs], out_dir=tmp_path / "out")
    assert out["tasks"] == ["MRPC", "RTE"]
    text = Path(out["report"]).read_text()
    assert out["report"] == tmp_path / "out" / "report.md"
    assert out["table"] in text and f"sparsebert report {runs} --out {tmp_path / 'out'}" in text
    assert "Data: 6 lottery-search runs" in text
    names = [p.name for p in out["figures"]]
    expected = ["surviving_heads.png", "subnetworks.png", "pruning_curves.png"]
    if HAS_STATS:
        expected += ["stability.png", "overlap.png"]
        assert "## Stability across seeds" in text
    assert names == expected
    for fig in out["figures"]:
        assert_png(fig)
        assert f"](figures/{fig.name})" in text
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_report_defaults_to_the_first_path(runs: Path):
    out = report(runs / "RTE")
    assert out["report"] == runs / "RTE" / "report.md" and out["tasks"] == ["RTE"]
    assert (runs / "RTE" / "figures" / "subnetworks.png").is_file()


def test_single_seed_has_no_std_and_no_stability(tmp_path: Path):
    run = write_run(tmp_path, "MRPC", 42, 0)
    out = report(run, out_dir=tmp_path / "out")
    assert _row(out["table"], "full model")[1:3] == ["0.800", "0.839 ± 0.009"]
    assert "±" not in _row(out["table"], "s good P")[1]
    text = Path(out["report"]).read_text()
    assert "Stability" not in text
    names = {p.name for p in out["figures"]}
    assert names == {"surviving_heads.png", "subnetworks.png", "pruning_curves.png"}
    for fig in out["figures"]:
        assert_png(fig)


# ----------------------------------------------------------------------------- errors


def test_error_when_no_summary_found(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match=f"no summary.json found under '{empty}'"):
        report(empty)
    with pytest.raises(ReportError, match="does not exist"):
        collect(tmp_path / "missing")
    assert issubclass(ReportError, SparsebertError)
    # Among other inputs, a path with no summary (a fine-tuning run, a typo) is named too.
    run = write_run(tmp_path / "runs", "MRPC", SEEDS[0], 0)
    with pytest.raises(ReportError, match=f"no summary.json found under '{empty}' \\(one of"):
        collect([run, empty])


@pytest.mark.parametrize(
    ("override", "message"),
    [({"version": 2}, "unsupported summary version 2"),
     ({"kind": "sparsebert-train"}, "field 'kind' is 'sparsebert-train'"),
     ({"full": {"metrics": {}}}, "missing required field 'full.score'"),
     ({"seed": None}, "missing required field 'seed'"),
     ({"num_heads": "12"}, "field 'num_heads' should be int")],
)
def test_bad_summary_names_file_and_field(tmp_path: Path, override: dict, message: str):
    run = write_run(tmp_path, "MRPC", 1, 0, **override)
    with pytest.raises(ReportError, match=message) as err:
        collect(run)
    assert str(run / "summary.json") in str(err.value)


def _edit_field(path: Path, dotted: str, value) -> None:
    data = json.loads(path.read_text())
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    path.write_text(json.dumps(data))


_DELETE = object()
GOOD_HEADS = "methods.structured.good_mask.head_mask"


@pytest.mark.parametrize(
    ("edits", "message"),
    [([(GOOD_HEADS, [[1, 0], [1]]), ("num_layers", _DELETE)],
      f"field '{GOOD_HEADS}' is not a rectangular numeric array"),
     ([("methods.magnitude.layer_kept_fraction", [0.5, [0.4]])],
      "field 'methods.magnitude.layer_kept_fraction' is not a rectangular numeric array"),
     ([(GOOD_HEADS, [[2] * H] * L)], f"field '{GOOD_HEADS}' should hold only 0 and 1, found 2"),
     ([(GOOD_HEADS, [[None] * H] * L)], f"field '{GOOD_HEADS}' holds values that are not finite")],
)
def test_malformed_run_arrays_name_the_field(tmp_path: Path, edits, message):
    run = write_run(tmp_path, "MRPC", 1, 0)
    for dotted, value in edits:
        _edit_field(run / "summary.json", dotted, value)
    with pytest.raises(ReportError, match=re.escape(message)) as err:
        load_summary(run / "summary.json")
    assert str(run / "summary.json") in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("head_mask", [[1, 0], [1]], "field 'head_mask' is not a rectangular numeric array"),
     ("head_mask", [["a", "b"]], "field 'head_mask' is not a rectangular numeric array"),
     ("head_mask", [[1, 0.5]], "field 'head_mask' should hold only 0 and 1, found 0.5"),
     ("mlp_mask", [1, [0]], "field 'mlp_mask' is not a rectangular numeric array"),
     ("seeds", ["a"], "field 'seeds' should be a list of integers")],
)
def test_malformed_super_summary_names_the_field(tmp_path: Path, field, value, message):
    write_super(tmp_path, "MRPC")
    path = tmp_path / "MRPC" / "super" / "summary.json"
    _edit_field(path, field, value)
    with pytest.raises(ReportError, match=re.escape(message)) as err:
        load_summary(path)
    assert str(path) in str(err.value)


def test_bad_masks_duplicates_and_mixed_settings(tmp_path: Path):
    run = write_run(tmp_path / "a", "MRPC", 1, 0)
    data = json.loads((run / "summary.json").read_text())
    data["methods"]["structured"]["good_mask"]["head_mask"] = [[1] * H] * (L - 1)
    (run / "summary.json").write_text(json.dumps(data))
    with pytest.raises(ReportError, match="good_mask.head_mask' has shape"):
        load_summary(run / "summary.json")
    a, b = write_run(tmp_path / "b", "MRPC", 1, 0), write_run(tmp_path / "c", "MRPC", 1, 1)
    with pytest.raises(ReportError, match="two summaries for task MRPC seed 1"):
        collect([a, b])
    c = write_run(tmp_path / "d", "MRPC", 2, 1, threshold=0.8)
    with pytest.raises(ReportError, match="field 'threshold' is 0.9 in .* but 0.8"):
        collect([a, c])
    write_super(tmp_path / "f", "RTE")
    with pytest.raises(ReportError, match="super-survivor summary for task RTE but no search"):
        collect(tmp_path / "f")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "summary.json").write_text("{not json")
    with pytest.raises(ReportError, match="cannot read summary"):
        collect(tmp_path / "e")


def test_data_line_says_what_each_task_was_fine_tuned_on(tmp_path: Path):
    """The report says per task whether the fine-tunes saw the full training set or a capped
    subset (from each summary's config.train), and refuses seeds that differ in it."""
    def train(cap):
        return {"config": {"train": {"task": "x", "max_train_examples": cap}}}

    def full(examples, size=None):
        return {"full": {"score": 0.5, "metrics": {"acc": 0.5}, "train_examples": examples,
                         "train_set_examples": size}}

    for i, seed in enumerate(SEEDS):
        write_run(tmp_path / "runs", "MRPC", seed, i, **train(None))
        write_run(tmp_path / "runs", "RTE", seed, i, **train(1000), **full(1000, 2490))
        # A cap above the training set's size (WNLI: 635 examples) trains on all of it, as
        # does a cap equal to it (STS-B: 5749).
        write_run(tmp_path / "runs", "WNLI", seed, i, **train(1000), **full(635, 635))
        write_run(tmp_path / "runs", "STS-B", seed, i, **train(5749), **full(5749, 5749))
        write_run(tmp_path / "runs", "CoLA", seed, i)  # no train config: nothing said
    md = report(tmp_path / "runs")["report"].read_text()
    assert ("Fine-tuned on: MRPC, STS-B, WNLI: the full training set; RTE: 1000 training "
            "examples per fine-tune (a seeded subset).") in md
    a = write_run(tmp_path / "a", "MRPC", 1, 0, **train(500))
    b = write_run(tmp_path / "b", "MRPC", 2, 1, **train(1000))
    with pytest.raises(ReportError, match="field 'max_train_examples' is 500 in .* but 1000"):
        collect([a, b])


def test_data_line_names_the_default_model_and_regression_baseline_is_explained(tmp_path):
    """The data line says what --model default is; a regression task's 'majority baseline'
    (a constant prediction, correlation scored 0) is explained beside the paper's value."""
    for i, seed in enumerate(SEEDS):
        write_run(tmp_path / "runs", "STS-B", seed, i, metric="pearson",
                  report_metric="pearson", majority=0.0,
                  full={"score": 0.8, "metrics": {"pearson": 0.8, "spearmanr": 0.79}})
    md = report(tmp_path / "runs")["report"].read_text()
    assert "model default (sentence-transformers/all-MiniLM-L6-v2: 6 layers x 12 heads" in md
    assert ("STS-B is a regression task: its 'majority baseline' is a constant prediction (the "
            "mean training score), whose correlation with the labels is undefined and scored 0 "
            "(the paper lists 0.024") in md


def test_good_mask_point_on_the_pruning_curve():
    """The star of pruning_curves.png: m-pruning's good_step (the authors' loop never saves
    the last step's mask: here step 2 of 3, though step 3 passed), s-pruning's last passing
    point at the good mask's fraction kept."""
    from types import SimpleNamespace  # noqa: PLC0415

    from sparsebert.report.figures import _good_point  # noqa: PLC0415

    curve = [{"step": s, "fraction_kept": f, "search_score": 0.8 - s / 10, "passed": True}
             for s, f in enumerate((1.0, 0.9, 0.81, 0.73))]
    run = SimpleNamespace(good_steps={"magnitude": 2},
                          subnetworks={"structured": {"good": {"fraction_kept": 0.9}}})
    assert _good_point(run, "magnitude", curve)["step"] == 2
    assert _good_point(run, "structured", curve)["step"] == 1
    run = SimpleNamespace(good_steps={}, subnetworks={})  # the summary does not say
    assert _good_point(run, "magnitude", curve) is None
    assert _good_point(run, "structured", curve) is None


def test_seeds_recording_one_model_relative_and_absolute_are_one_setting(tmp_path: Path):
    """A study extended after runs began recording absolute model paths: the older seeds say
    models/tiny, the newer /abs/models/tiny. They are one setting; another folder is not."""
    a = write_run(tmp_path / "a", "MRPC", 1, 0, model="models/tiny")
    b = write_run(tmp_path / "b", "MRPC", 2, 1, model="/data/study/models/tiny")
    assert collect([a, b])["MRPC"].n_seeds == 2
    c = write_run(tmp_path / "c", "MRPC", 3, 2, model="/data/study/models/other")
    with pytest.raises(ReportError, match="field 'model'"):
        collect([a, c])


def test_notes_name_seeds_whose_threshold_a_constant_predictor_passes(tmp_path: Path):
    """0.9 x the full model's score at or below the majority class: the report says so, per
    task, with the seeds; tasks with a meaningful threshold get no such note."""
    weak = {"full": [0.74, 0.80, 0.75], "s_good_P": [0.7, 0.7, 0.7],
            "s_good_R": [0.7, 0.7, 0.7], "m_good_R": [0.7, 0.7, 0.7]}
    root = make_runs(tmp_path / "runs")
    for i, seed in enumerate(SEEDS):
        write_run(root, "MRPC", seed, i, scores=weak)  # 0.9 x 0.74 = 0.666, 0.9 x 0.75 = 0.675 (< 0.684)
    results = collect(root)
    assert table.threshold_at_majority(results["MRPC"]) == [1, 3]
    assert table.threshold_at_majority(results["RTE"]) == []
    notes = table.results_notes(results)
    assert "MRPC: in 2 of 3 seeds (seeds 1, 3) the search threshold (0.9 x" in notes
    assert "RTE: in" not in notes


def test_threshold_on_a_train_subset_is_compared_with_that_subsets_majority(tmp_path: Path):
    """--search-data train: the threshold is on a train subset, so the constant predictor is
    scored there (search_majority); a summary without it is not compared with dev's majority;
    the pruning curves are labelled with the set they were computed on."""
    from sparsebert.report.figures import search_set  # noqa: PLC0415

    root = tmp_path / "runs"
    write_run(root, "MRPC", 1, 0, search_data="train", search_majority=0.80)  # 0.72 <= 0.80
    write_run(root, "MRPC", 2, 1, search_data="train", search_majority=0.60)
    write_run(root, "MRPC", 3, 2, search_data="train", majority=0.99)  # no search_majority
    results = collect(root)
    assert table.threshold_at_majority(results["MRPC"]) == [1]
    assert search_set(results["MRPC"].runs) == "train-subset"
    write_run(root, "RTE", 1, 0)
    assert search_set(collect(root)["RTE"].runs) == "dev"
    both = collect(root)
    assert search_set([run for res in both.values() for run in res.runs]) == "search-set"


# ----------------------------------------------------------------------------- speed


def _speed_result(names: list[str], dense_ms: float, masked_ms: list[float],
                  pruned_ms: list[float]) -> dict:
    """A `sparsebert speed --run` result: hf_eager, dense (unpadded), then masked (unpadded and
    padded) and pruned rows per subnetwork name."""
    def row(variant, subnet, ms, unpad=True, kept=(1.0, 1.0)):
        return {"variant": variant, "subnetwork": subnet, "unpad": unpad, "heads_kept": kept[0],
                "ffn_kept": kept[1], "median_ms": ms}
    rows = [row("hf_eager", None, 2 * dense_ms, unpad=False), row("dense", None, dense_ms)]
    for name, masked, pruned in zip(names, masked_ms, pruned_ms, strict=True):
        rows += [row("masked", name, masked, kept=(0.5, 0.25)),
                 row("masked", name, 100.0, unpad=False, kept=(0.5, 0.25)),
                 row("pruned", name, pruned, unpad=False, kept=(0.5, 0.25))]
    return {"device": "Test CPU (1 thread)", "dtype": "fp32", "versions": {"torch": "2.x"},
            "args": {"run": "runs/x", "batch": 16, "seq": 128, "lengths": "full",
                     "device": "cpu", "model": "minilm", "threads": 1, "repeats": 10,
                     "warmup": 3, "seed": 7, "glue_dir": None},
            "lengths": {"mean": 128.0, "min": 128, "max": 128}, "rows": rows}


def test_speed_section_and_figure_from_speed_files(runs: Path, tmp_path: Path):
    # MRPC seed 1: its own run directory's speed/ (plain subnetwork names).
    (runs / "MRPC" / "seed_1" / "speed").mkdir()
    (runs / "MRPC" / "seed_1" / "speed" / "cpu.json").write_text(json.dumps(
        _speed_result(["good", "random", "bad"], 40.0, [20.0, 10.0, 40.0], [25.0, 20.0, 50.0])))
    # MRPC seeds 2 and 3: the multi-seed parent's speed/ ("seed_<s>/<subnet>").
    # That one written by an older version, whose device line said "(1 threads)": read as the
    # same setting.
    (runs / "MRPC" / "speed").mkdir()
    older = _speed_result(["seed_2/good", "seed_3/good"], 60.0, [20.0, 30.0], [30.0, 30.0])
    older["device"] = "Test CPU (1 threads)"
    (runs / "MRPC" / "speed" / "cpu.json").write_text(json.dumps(older))
    out = report([runs], out_dir=tmp_path / "out")
    text = Path(out["report"]).read_text()
    section = text.split("## Speed of the subnetworks")[1].split("## ")[0]
    assert "Test CPU (1 thread), fp32, batch 16, padded length 128" in section
    assert "1 threads" not in text
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]:
            [c.strip() for c in line.strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| MRPC")}
    full = rows[("MRPC", "full model")]
    assert full[2:6] == ["3", "100%", "100%", "0.820 ± 0.020"]  # MRPC full: 0.80, 0.82, 0.84
    # One full-model time per file: dense 40 and 60 ms, stock HF twice that (these files have
    # no patched full-model row: the stock forward stands in, marked †).
    assert full[7:11] == ["50.0 ± 14.1", "1.00x", "100.0 ± 28.3 †", "1.00x"]
    good = rows[("MRPC", "good")]
    assert good[2:5] == ["3", "50% ± 0%", "25% ± 0%"]
    assert good[5] == "0.750 ± 0.030" and good[6] == "0.770 ± 0.000"  # s good P / R
    # masked vs dense: 40/20, 60/20, 60/30 = 2, 3, 2; pruned vs stock: 80/25, 120/30, 120/30
    # (files without per-round samples: ratios of medians; pruned against the stock forward,
    # marked †)
    assert good[8] == "2.33x ± 0.58x" and good[10] == "3.73x ± 0.46x †"
    assert "† against the full model's stock Hugging Face forward" in section
    assert good[9] == "28.3 ± 2.9"  # pruned ms: 25, 30, 30
    assert rows[("MRPC", "random")][2] == "1" and rows[("MRPC", "random")][8] == "4.00x"
    assert not any(task == "RTE" for task, _ in rows)  # RTE was not timed
    # The command repeats every flag that shaped the measurement (seed: lengths and tokens).
    assert ("`sparsebert speed --run runs/x --batch 16 --seq 128 --lengths full --device cpu "
            "--dtype fp32 --threads 1 --repeats 10 --warmup 3 --seed 7 --model minilm`") in section
    fig = tmp_path / "out" / "figures" / "speed_vs_score.png"
    assert fig in out["figures"] and f"](figures/{fig.name})" in text
    assert_png(fig)
    # A seed timed but without a retrained score (its re-fine-tune failed): the score cell says
    # over how many seeds it is, beside the row's 3 timed seeds.
    path = runs / "MRPC" / "seed_2" / "summary.json"
    summary = json.loads(path.read_text())
    summary["methods"]["structured"]["subnetworks"]["good"]["retrained"] = None
    path.write_text(json.dumps(summary))
    text = Path(report([runs], out_dir=tmp_path / "out")["report"]).read_text()
    good = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| MRPC | good |")][0]
    assert good[2] == "3" and good[5] == "0.750 ± 0.030" and good[6].endswith("(n=2)")


def test_no_speed_section_without_speed_files_and_bad_file_is_named(runs: Path, tmp_path: Path):
    out = report([runs], out_dir=tmp_path / "out")
    assert "Speed of the subnetworks" not in Path(out["report"]).read_text()
    assert not (tmp_path / "out" / "figures" / "speed_vs_score.png").exists()
    bad = runs / "RTE" / "seed_2" / "speed" / "broken.json"
    bad.parent.mkdir()
    bad.write_text('{"rows": ')
    with pytest.raises(ReportError, match=r"broken.json: not a readable speed result"):
        report([runs], out_dir=tmp_path / "out")
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ReportError, match=r"broken.json: not a `sparsebert speed` result"):
        report([runs], out_dir=tmp_path / "out")


def test_speed_uses_per_round_ratios_and_counts_each_seed_once(runs: Path, tmp_path: Path,
                                                               monkeypatch):
    """Files with per-round samples: speed-ups are the medians of per-round ratios (not the
    ratio of medians), the pruned one against the patched full model; a seed timed both on its
    own and through its parent counts once; noisy files are named."""
    dense = [40.0, 80.0, 40.0, 80.0, 40.0]  # a busy machine: the load doubles every other round
    masked = [20.0, 40.0, 20.0, 40.0, 20.0]  # 2x in every round
    patched, pruned = [100.0] * 5, [50.0, 50.0, 25.0, 50.0, 50.0]

    def row(variant, subnet, ms, unpad, **extra):
        return {"variant": variant, "subnetwork": subnet, "unpad": unpad, "heads_kept": 0.5,
                "ffn_kept": 1.0, "median_ms": sorted(ms)[2], "p20_ms": min(ms),
                "p80_ms": max(ms), "samples_ms": ms, **extra}

    result = _speed_result([], 40.0, [], [])
    result["rows"] = [row("hf_eager", None, [200.0] * 5, False), row("dense", None, dense, True),
                      row("patched", None, patched, False),
                      row("masked", "good", masked, True, speedup_vs_dense=2.0),
                      row("pruned", "good", pruned, False, speedup_vs_patched=2.0)]
    result["notes"] = ["noisy timings: 2 of 5 rows have p80/p20 > 1.25"]
    for folder in (runs / "MRPC" / "seed_1" / "speed", runs / "MRPC" / "speed"):
        folder.mkdir()
    (runs / "MRPC" / "seed_1" / "speed" / "cpu.json").write_text(json.dumps(result))
    parent = json.loads(json.dumps(result))
    for r in parent["rows"]:
        if r["subnetwork"]:
            r["subnetwork"] = "seed_1/good"
    (runs / "MRPC" / "speed" / "cpu.json").write_text(json.dumps(parent))
    for file in (runs / "MRPC" / "speed" / "cpu.json", runs / "MRPC" / "seed_1" / "speed" /
                 "cpu.json"):
        os.utime(file, (1e9, 1e9))  # timed at once: the run's own file counts
    monkeypatch.chdir(tmp_path)  # the files are named as the inputs are given (relative)
    text = Path(report([Path("runs")], out_dir="out")["report"]).read_text()
    monkeypatch.chdir(runs)  # the same bytes from any working directory
    assert Path(report([Path("../runs")], out_dir="../out")["report"]).read_text() == (
        text.replace("sparsebert report runs --out out", "sparsebert report ../runs --out ../out"
                     ).replace("`runs/", "`../runs/"))
    section = text.split("## Speed of the subnetworks")[1].split("## ")[0]
    assert "Noisy timings (a busy machine; see the file's notes): `runs/MRPC/seed_1/speed/" \
           "cpu.json`." in section and str(tmp_path) not in section
    assert ("Timed more than once (the latest file counts; on a tie the run's own): "
            "`runs/MRPC/seed_1/speed/cpu.json` counts, `runs/MRPC/speed/cpu.json` left out."
            ) in section
    good = next([c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
                if line.startswith("| MRPC | good"))
    assert good[2] == "1"  # seed 1 once, though two files time it
    assert good[8] == "2.00x" and good[10] == "2.00x"  # medians of the medians: 40/20, 100/50
    full = next([c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
                if line.startswith("| MRPC | full model"))
    assert full[9] == "100.0"  # the patched full model, which the pruned row is timed against
    assert "†" not in section and "Noisy timings" in section


def test_timings_of_a_model_with_other_logits_are_left_out(runs: Path, tmp_path: Path):
    """A speed file whose masked row gave other logits than its reference (it timed another
    function): that subnetwork's times are not in the table or the figure, and the report
    names the file; the file's other subnetworks count."""
    folder = runs / "MRPC" / "seed_1" / "speed"
    folder.mkdir()
    result = _speed_result(["good", "bad"], 40.0, [20.0, 10.0], [25.0, 12.0])
    for row in result["rows"]:
        row["outputs_match"] = not (row["variant"] == "masked" and row["subnetwork"] == "bad")
    (folder / "cpu.json").write_text(json.dumps(result))
    text = Path(report([runs], out_dir=tmp_path / "out")["report"]).read_text()
    table = [line for line in text.splitlines() if line.startswith("| MRPC |")]
    assert any(line.startswith("| MRPC | good") for line in table)
    assert not any(line.startswith("| MRPC | bad") for line in table)
    assert (f"Left out: timings of a model whose logits differ from its reference beyond "
            f"rounding (another function, so no speed-up; see the file's notes): "
            f"`{(folder / 'cpu.json').as_posix()}` (bad).") in text


def test_a_setting_timed_again_counts_by_its_latest_file(runs: Path, tmp_path: Path):
    """Two files timing one setting (one from before file names carried the thread count):
    the one written later counts, by its recorded time, else its modification time; the
    report names the file left out."""
    folder = runs / "MRPC" / "seed_1" / "speed"
    folder.mkdir()
    old, new = folder / "cpu-fp32-b16-s128-full.json", folder / "cpu-t1-fp32-b16-s128-full.json"
    old.write_text(json.dumps(_speed_result(["good"], 40.0, [40.0], [40.0])))  # 1.00x
    new.write_text(json.dumps(_speed_result(["good"], 40.0, [20.0], [20.0])))  # 2.00x

    def good_speedup() -> str:
        text = Path(report([runs], out_dir=tmp_path / "out")["report"]).read_text()
        good = next([c.strip() for c in line.strip("|").split("|")]
                    for line in text.splitlines() if line.startswith("| MRPC | good"))
        assert good[2] == "1"  # one seed, counted once
        return good[8], text

    os.utime(old, (1e9, 1e9))
    os.utime(new, (2e9, 2e9))
    speedup, text = good_speedup()
    assert speedup == "2.00x"
    assert f"`{new.as_posix()}` counts, `{old.as_posix()}` left out" in text
    os.utime(old, (3e9, 3e9))  # touched later: by modification time the old one is newer
    assert good_speedup()[0] == "1.00x"
    data = json.loads(new.read_text())
    data["written_at"] = "2026-12-06T07:00:00Z"  # a recorded time beats files without one
    new.write_text(json.dumps(data))
    os.utime(new, (1e9, 1e9))
    assert good_speedup()[0] == "2.00x"


def test_seeds_of_different_settings_are_not_averaged(tmp_path: Path):
    """Seeds whose recorded train or search settings differ (a 1000-example cap against the
    full training set, another lr, another masking amount) are refused, not averaged; run-time
    settings (threads, the data folder) and the methods a seed ran may differ."""
    def config(seed, **train):
        return {"train": {"seed": seed, "lr": 1e-4, "max_train_examples": None, "threads": 1,
                          "glue_dir": f"/data/{seed}", **train},
                "search": {"method": "both" if seed == 1 else "structured", "threshold": 0.9,
                           "masking_amount": 0.1}}

    write_run(tmp_path / "a", "MRPC", 1, 0, config=config(1))
    write_run(tmp_path / "a", "MRPC", 2, 1, config=config(2, threads=4))
    assert "MRPC" in collect(tmp_path / "a")
    # (grad_accum is recorded only away from its default, 1: seed 1's has none)
    for name, value in (("max_train_examples", 1000), ("lr", 2e-5), ("grad_accum", 2)):
        root = tmp_path / name
        write_run(root, "MRPC", 1, 0, config=config(1))
        write_run(root, "MRPC", 2, 1, config=config(2, **{name: value}))
        with pytest.raises(ReportError, match=f"field 'config.train.{name}' is .* but "
                           f"{value!r} in .*seed_2"):
            collect(root)
    root = tmp_path / "search"
    write_run(root, "MRPC", 1, 0, config=config(1))
    other = config(2)
    other["search"]["masking_amount"] = 0.05
    write_run(root, "MRPC", 2, 1, config=other)
    with pytest.raises(ReportError, match="field 'config.search.masking_amount'"):
        collect(root)


def test_super_survivors_must_come_from_the_runs_beside_them(tmp_path: Path):
    runs = make_runs(tmp_path / "runs")
    assert collect(runs)["MRPC"].super is not None
    shutil.rmtree(runs / "MRPC" / "seed_3")
    with pytest.raises(ReportError, match=r"super-survivors of seeds \[1, 2, 3\], but the MRPC "
                       r"runs among the inputs are seeds \[1, 2\]"):
        collect(runs)
    shutil.copytree(runs / "MRPC" / "seed_2", runs / "MRPC" / "seed_3")
    summary = runs / "MRPC" / "seed_3" / "summary.json"
    summary.write_text(summary.read_text().replace('"seed": 2', '"seed": 3'))
    write_run(runs, "MRPC", 4, 1)  # a seed added after the super-survivors
    with pytest.raises(ReportError, match=r"seeds \[1, 2, 3, 4\]; pass the runs of exactly "
                       r"those seeds \(their seed_<s> folders and super/\), or recompute the "
                       r"super-survivors over every seed \(`sparsebert search` with --seeds "
                       r"listing 4 too\)"):
        collect(runs)
    runs = make_runs(tmp_path / "other")
    path = runs / "MRPC" / "super" / "summary.json"
    data = json.loads(path.read_text())
    data["head_mask"][5] = [1] * H  # heads no run kept in every seed
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match="'head_mask' is not the heads kept in every good mask"):
        collect(runs)


def test_a_good_mask_without_its_mlp_mask_or_a_nan_majority_is_named(tmp_path: Path):
    runs = make_runs(tmp_path / "runs")
    path = runs / "RTE" / "seed_2" / "summary.json"
    original = path.read_text()
    data = json.loads(original)
    del data["methods"]["structured"]["good_mask"]["mlp_mask"]
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=r"missing required field "
                                          r"'methods.structured.good_mask.mlp_mask'"):
        collect(runs)
    data = json.loads(original)
    data["majority"] = math.nan  # would switch the weak-threshold note off without a word
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=r"field 'majority' should be a finite number, got nan"):
        collect(runs)


def test_a_rerun_into_the_same_folder_leaves_no_stale_figures(tmp_path: Path):
    runs = make_runs(tmp_path / "runs")
    out = tmp_path / "out"
    first = {p.name for p in report(runs, out_dir=out)["figures"]}
    assert "stability.png" in first
    again = {p.name for p in report(runs / "RTE" / "seed_1", out_dir=out)["figures"]}
    assert "stability.png" not in again  # one seed: no stability figure
    assert {p.name for p in (out / "figures").iterdir()} == again


@pytest.mark.parametrize(("value", "shown"), [(float("nan"), "nan"), ("0.7", "'0.7'"),
                                              (True, "True")])
def test_scores_and_sizes_must_be_finite_numbers(tmp_path: Path, value, shown):
    for field, where in (("score", "retrained"), ("heads_kept", None)):
        run = write_run(tmp_path / f"{field}-{shown}", "MRPC", 1, 0)
        data = json.loads((run / "summary.json").read_text())
        good = data["methods"]["structured"]["subnetworks"]["good"]
        if where is None:
            good[field] = value
            name = f"methods.structured.subnetworks.good.{field}"
        else:
            good[where] = {"score": value, "metrics": {}}
            name = f"methods.structured.subnetworks.good.{where}.{field}"
        (run / "summary.json").write_text(json.dumps(data))
        with pytest.raises(ReportError, match=re.escape(f"field '{name}' should be a finite "
                                                        f"number, got {shown}")):
            load_summary(run / "summary.json")


def test_find_summaries_follows_linked_seed_folders(tmp_path):
    """A seed searched on its own and linked into a multi-seed run (results/lottery/README.md:
    `ln -sfn ../mrpc runs/mrpc-seeds/seed_42`) is found; each real folder counts once, a link
    back up does not loop, and hidden folders stay skipped."""
    single, seeds = tmp_path / "mrpc", tmp_path / "mrpc-seeds"
    for folder in (single, seeds / "seed_86", seeds / "super", seeds / ".sweep" / "old"):
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text("{}")
    (seeds / "seed_42").symlink_to("../mrpc")
    (seeds / "seed_86" / "up").symlink_to("..")
    (seeds / "again").symlink_to("seed_86")
    expected = sorted(p.resolve() for p in (single / "summary.json", seeds / "seed_86" /
                                           "summary.json", seeds / "super" / "summary.json"))
    assert find_summaries([seeds]) == expected
    assert find_summaries([seeds, single]) == expected


def test_timings_of_a_linked_seed_are_found_through_the_link(runs, tmp_path):
    """A seed folder that is a link (searched on its own elsewhere) keeps the path it was found
    under: the multi-seed parent's speed/ rows "seed_<s>/<subnet>" reach it."""
    from sparsebert.report.speed import collect_speed  # noqa: PLC0415
    from sparsebert.report.summaries import find_summary_locations  # noqa: PLC0415

    seed = SEEDS[1]
    elsewhere = tmp_path / "elsewhere"
    (runs / "MRPC" / f"seed_{seed}").rename(elsewhere)
    (runs / "MRPC" / f"seed_{seed}").symlink_to(elsewhere)
    (runs / "MRPC" / "speed").mkdir()
    (runs / "MRPC" / "speed" / "cpu.json").write_text(json.dumps(
        _speed_result([f"seed_{seed}/good"], 40.0, [20.0], [25.0])))
    located = find_summary_locations([runs / "MRPC"])
    assert located[(elsewhere / "summary.json").resolve()] == [
        runs / "MRPC" / f"seed_{seed}" / "summary.json"]
    entries = collect_speed(collect([runs / "MRPC"]))
    assert [(e.seed, e.subnet) for e in entries] == [(seed, "good")]
    assert entries[0].masked_speedup == pytest.approx(2.0)


REPO = Path(__file__).resolve().parent.parent
REPORT_COMMANDS = {
    readme.parent.name: " ".join(match.group(1).replace("\\\n", " ").split())
    for readme in sorted((REPO / "results").glob("*/README.md"))
    for match in [re.search(r"^(sparsebert report [^`]*?--out \S+)\s*$",
                            readme.read_text(encoding="utf-8"), re.M | re.S)]
    if match
}


@pytest.mark.skipif(importlib.util.find_spec("statsmodels") is None,
                    reason="the reports' stability statistics need statsmodels")
@pytest.mark.parametrize("folder", sorted(REPORT_COMMANDS))
def test_committed_reports_regenerate_from_their_commands(folder, tmp_path, monkeypatch):
    """Each committed results/<folder>/report.md is what the command in its README writes now
    (the figures are checked by eye: their pixels depend on the matplotlib version)."""
    from sparsebert.cli import main

    argv = REPORT_COMMANDS[folder].split()[1:]
    committed = argv[argv.index("--out") + 1]
    assert committed == f"results/{folder}"
    argv[argv.index("--out") + 1] = str(tmp_path)
    monkeypatch.chdir(REPO)
    assert main(argv) == 0
    regenerated = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert regenerated.replace(str(tmp_path), committed) == \
        (REPO / committed / "report.md").read_text(encoding="utf-8")


def test_bottom_legend_fits_a_one_panel_figure():
    """Four long entries below one narrow panel wrap into fewer columns instead of running
    past the figure's edges; a wide figure keeps them side by side."""
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    from sparsebert.report.canvas import bottom_legend  # noqa: PLC0415

    handles = [Patch(label=label) for label in ("pruned (no retraining)",
                                                "retrained from pre-trained", "full model",
                                                "majority class")]
    heights = []
    for width in (4.0, 12.0):
        fig = Figure(figsize=(width, 3.5), layout="constrained")
        fig.subplots()
        legend = bottom_legend(fig, 4, 8, handles)
        fig.draw_without_rendering()
        box = legend.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (width, box)
        assert fig.legends == [legend]
        heights.append(box.height)
    assert heights[0] > 1.5 * heights[1]  # narrow: two rows or more; wide: one row


@pytest.mark.parametrize("study", ["lottery", "sweep"])
def test_readme_results_tables_are_the_committed_reports(study):
    """README.md's results tables are pasted from the committed reports
    (python results/readme_table.py STUDY): they must not drift apart."""
    text = (REPO / "results" / study / "report.md").read_text(encoding="utf-8")
    start = text.index("| Setting |")
    table = text[start:text.index("\n\n", start)]
    assert table in (REPO / "README.md").read_text(encoding="utf-8")


def test_weak_threshold_note_uses_the_searched_metric(tmp_path):
    """STS-B searches on corr and reports Pearson: full Pearson 0.60, corr 0.50, a constant
    predictor scores 0.47 on the search set; 0.9 x 0.50 = 0.45 <= 0.47 is flagged (0.9 x 0.60
    would not be)."""
    run = tmp_path / "STS-B" / "seed_1"
    run.mkdir(parents=True)
    run.joinpath("summary.json").write_text(json.dumps({
        "version": 1, "kind": "sparsebert-search", "task": "STS-B", "seed": 1,
        "metric": "corr", "report_metric": "pearson", "threshold": 0.9,
        "search_data": "train", "search_majority": 0.47,
        "full": {"score": 0.60, "metrics": {"pearson": 0.60, "corr": 0.50}}}))
    assert table.threshold_at_majority(collect(tmp_path)["STS-B"]) == [1]
    notes = table.results_notes(collect(tmp_path))
    assert ("STS-B: the search thresholds corr = (Pearson + Spearman) / 2, the table shows "
            "pearson: a subnetwork that keeps 0.9 x the full model's corr can score below 0.9 x "
            "its pearson.") in notes


def test_data_line_names_the_commits_that_wrote_the_summaries(tmp_path: Path):
    """Each summary records the commit of the code that wrote it: the report lists them with
    the tasks (or a task's seeds) each wrote, and says nothing when none is recorded."""
    a, b, c = "0a668b218ea37205afc68a311113318172f9c5db", "9b3c28a1f39e", "65b305def22b-dirty"
    for i, seed in enumerate(SEEDS):
        write_run(tmp_path / "one", "MRPC", seed, i, git_sha=a)
        write_run(tmp_path / "many", "MRPC", seed, i, git_sha=a)
        write_run(tmp_path / "many", "RTE", seed, i, git_sha=b if seed != SEEDS[-1] else c)
        write_run(tmp_path / "many", "CoLA", seed, i)
        write_run(tmp_path / "none", "MRPC", seed, i)
    assert "Code: every summary written at commit 0a668b2. " in \
        report(tmp_path / "one")["report"].read_text()
    seeds = ", ".join(map(str, SEEDS[:-1]))
    assert (f"Code: summaries written at commits 0a668b2 (MRPC); 9b3c28a (RTE seeds {seeds}); "
            f"65b305d-dirty (RTE seed {SEEDS[-1]}); not recorded (CoLA) (results of different "
            "commits are comparable only where") in report(tmp_path / "many")["report"].read_text()
    assert "Code:" not in report(tmp_path / "none")["report"].read_text()


def test_overlap_compares_only_tasks_of_one_model(tmp_path: Path, monkeypatch):
    """Head (l, h) of one model is not head (l, h) of another of the same shape: the overlap
    figure counts only tasks run on one model (the most numerous), and draws nothing when no
    two tasks share one."""
    from sparsebert.report import figures  # noqa: PLC0415

    for i, seed in enumerate(SEEDS):
        write_run(tmp_path / "two", "MRPC", seed, i)
        write_run(tmp_path / "two", "RTE", seed, i, model="/models/other")
        write_run(tmp_path / "three", "MRPC", seed, i)
        write_run(tmp_path / "three", "CoLA", seed, i)
        write_run(tmp_path / "three", "RTE", seed, i, model="/models/other")
    pytest.importorskip("statsmodels")
    assert figures.overlap(collect(tmp_path / "two"), tmp_path / "two.png") is None
    compared = []
    stats, _ = figures.stats_module()
    real = stats.overlap_matrix
    monkeypatch.setattr(stats, "overlap_matrix", lambda masks: compared.append(set(masks))
                        or real(masks))
    assert_png(figures.overlap(collect(tmp_path / "three"), tmp_path / "three.png"))
    assert compared == [{"MRPC", "CoLA"}]


def test_a_one_panel_subnetworks_figure_has_room_for_its_title(tmp_path: Path):
    """One task, one method, several seeds: the figure is at least 6.4 in wide and the title
    (two lines) fits inside it."""
    from sparsebert.report import figures  # noqa: PLC0415

    for i, seed in enumerate(SEEDS):
        write_run(tmp_path / "runs", "RTE", seed, i, magnitude=False)
    captured = []
    monkeypatch = pytest.MonkeyPatch()
    real = figures.save_png
    monkeypatch.setattr(figures, "save_png", lambda fig, path: captured.append(fig)
                        or real(fig, path))
    try:
        assert_png(figures.subnetworks(collect(tmp_path / "runs"), tmp_path / "s.png"))
    finally:
        monkeypatch.undo()
    fig, = captured
    assert fig.get_figwidth() >= 6.4
    fig.draw_without_rendering()
    box = fig._suptitle.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width, box


def test_a_model_recorded_relative_and_absolute_across_tasks_is_one_model(tmp_path: Path,
                                                                           monkeypatch):
    """RTE's first seed recorded /home/me/models/tiny, the other tasks models/tiny: one model
    (as within a task), so the data line names it once and the overlap figure compares all
    three tasks (it left RTE out, 'run on another model')."""
    from sparsebert.report import _data_line, figures  # noqa: PLC0415

    for i, seed in enumerate(SEEDS):
        for task in ("MRPC", "CoLA", "RTE"):
            absolute = task == "RTE" and i == 0
            write_run(tmp_path, task, seed, i,
                      model="/home/me/models/tiny" if absolute else "models/tiny")
    results = collect(tmp_path)
    assert "model /home/me/models/tiny, search on" in _data_line(results)
    pytest.importorskip("statsmodels")
    compared = []
    stats, _ = figures.stats_module()
    real = stats.overlap_matrix
    monkeypatch.setattr(stats, "overlap_matrix", lambda masks: compared.append(set(masks))
                        or real(masks))
    assert_png(figures.overlap(results, tmp_path / "overlap.png"))
    assert compared == [{"MRPC", "CoLA", "RTE"}]


def test_searches_without_a_summary_yet_are_named(runs: Path, tmp_path: Path, capsys):
    """A seed whose search has not finished (config.json, full/, no summary.json) dropped out
    of the report without a word; it is named in report.md and on stderr, and when no search
    has finished the error names them."""
    unfinished = runs / "MRPC" / "seed_99"
    (unfinished / "full").mkdir(parents=True)
    (unfinished / "config.json").write_text(json.dumps(
        {"search": {"method": "both"}, "train": {"task": "MRPC", "seed": 99}}))
    (runs / "MRPC" / "seed_99" / "full" / "config.json").write_text('{"task": "MRPC"}')
    assert main(["report", str(runs), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert (f"Left out: 1 search without a summary.json yet (still running, or cut short: "
            f"finish it by rerunning the search or sweep that started it, then this report): "
            f"{unfinished} (MRPC seed 99).") in text
    assert f"left out 1 search without a summary.json yet (named in the report): {unfinished}" \
        in capsys.readouterr().err
    alone = tmp_path / "alone"
    shutil.copytree(unfinished, alone / "seed_99")
    with pytest.raises(ReportError, match=r"no summary.json found under .*\. Left out: 1 "
                                          r"search .*seed_99 \(MRPC seed 99\)"):
        report([alone], tmp_path / "out2")


def test_a_damaged_summary_reached_through_a_link_names_the_link(tmp_path: Path, monkeypatch):
    """A dangling summary.json link was named by its target alone, which the user may never
    have seen."""
    run = write_run(tmp_path / "runs", "MRPC", 1, 0)
    (run / "summary.json").unlink()
    (run / "summary.json").symlink_to(tmp_path / "old_disk" / "summary.json")
    with pytest.raises(ReportError, match=rf"^{re.escape(str(run / 'summary.json'))} \(-> "
                                          rf"{re.escape(str(tmp_path / 'old_disk'))}"):
        collect(tmp_path / "runs")
    (run / "summary.json").unlink()
    (run / "summary.json").write_text("{")  # no link: the path alone, also given relative
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReportError, match=r"runs/MRPC/seed_1/summary.json: cannot read") as bad:
        collect("runs")
    assert "->" not in str(bad.value)


def test_every_seed_gets_its_own_curve_colour_whatever_the_number_of_seeds():
    from matplotlib.colors import to_rgba

    from sparsebert.report.figures import SEED_COLORS, seed_palette
    for n in (1, 5, len(SEED_COLORS), len(SEED_COLORS) + 1, 40):
        palette = seed_palette(list(range(100, 100 + n)))
        assert sorted(palette) == list(range(100, 100 + n))
        assert len({to_rgba(c) for c in palette.values()}) == n
    assert seed_palette([7, 3])[7] == SEED_COLORS[0]  # the first seeds keep the fixed colours


def test_the_papers_wnli_cochran_q_reads_rejected_not_undefined():
    from sparsebert.report import paper, table
    assert paper.COCHRAN_Q_PVALUE_HEADS["WNLI"] is None  # PAPER.md §5.1: rejected, no p given
    assert table._paper_pvalue(None) == "rejected (p not given)"
    assert table._paper_pvalue(0.014) == "0.014"


def test_a_regression_tasks_baseline_line_is_not_called_a_majority_class(tmp_path, monkeypatch):
    """STS-B has no majority class: the speed figure's legend called its constant-prediction
    line "majority class" where the subnetworks figure said what it is."""
    from sparsebert.report import figures, speed_figure  # noqa: PLC0415

    labels: dict[str, list[str]] = {}

    def legend_of(figure: str):
        real = figures.bottom_legend

        def capture(fig, ncols, fontsize, handles=None):
            labels[figure] = [h.get_label() for h in handles or []]
            return real(fig, ncols, fontsize, handles)
        return capture

    monkeypatch.setattr(figures, "bottom_legend", legend_of("subnetworks"))
    monkeypatch.setattr(speed_figure, "bottom_legend", legend_of("speed"))
    runs = tmp_path / "runs"
    for i, seed in enumerate(SEEDS):
        write_run(runs, "STS-B", seed, i, metric="pearson", report_metric="pearson",
                  majority=0.0, full={"score": 0.8, "metrics": {"pearson": 0.8}})
    (runs / "STS-B" / "seed_1" / "speed").mkdir()
    (runs / "STS-B" / "seed_1" / "speed" / "cpu.json").write_text(json.dumps(
        _speed_result(["good", "random", "bad"], 40.0, [20.0, 10.0, 40.0], [25.0, 20.0, 50.0])))
    out = report([runs], out_dir=tmp_path / "out")
    assert tmp_path / "out" / "figures" / "speed_vs_score.png" in out["figures"]
    expected = "majority class (regression: a constant prediction)"
    assert expected in labels["speed"] and expected in labels["subnetworks"]
    assert "majority class" not in labels["speed"]
