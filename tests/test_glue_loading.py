"""GLUE loading: every staged real file (via GLUE_DIR), plus error cases on small files.

The real-data tests need GLUE_DIR pointing at a GLUE download (e.g. ../shared/data/glue);
they are skipped with that reason otherwise. Official row counts: SOURCES.md / the GLUE card.
"""

import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sparsebert.glue.loading import (
    GlueError,
    SplitNotFoundError,
    load_split,
    read_jsonl,
    read_tsv,
    resolve_glue_dir,
)
from sparsebert.glue.tasks import get_task

GLUE_DIR = os.environ.get("GLUE_DIR", "")
needs_glue = pytest.mark.skipif(
    not GLUE_DIR or not Path(GLUE_DIR).is_dir(),
    reason="GLUE_DIR is not set (point it at a GLUE download, e.g. ../shared/data/glue)")

# (task, split): (official row count, label counts by label string or (min, max) for STS-B)
OFFICIAL = {
    ("CoLA", "train"): (8551, None), ("CoLA", "dev"): (1043, {"0": 322, "1": 721}),
    ("SST-2", "train"): (67349, None), ("SST-2", "dev"): (872, {"0": 428, "1": 444}),
    ("MRPC", "train"): (3668, None), ("MRPC", "dev"): (408, {"0": 129, "1": 279}),
    ("STS-B", "train"): (5749, (0.0, 5.0)), ("STS-B", "dev"): (1500, (0.0, 5.0)),
    ("QNLI", "dev"): (5463, {"entailment": 2702, "not_entailment": 2761}),
    ("RTE", "train"): (2490, None),
    ("RTE", "dev"): (277, {"entailment": 146, "not_entailment": 131}),
    ("WNLI", "train"): (635, None), ("WNLI", "dev"): (71, {"0": 40, "1": 31}),
    ("MNLI", "dev_matched"): (9815, {"entailment": 3479, "neutral": 3123,
                                     "contradiction": 3213}),
}


@needs_glue
@pytest.mark.parametrize("task_name, split", list(OFFICIAL))
def test_real_files_counts_and_labels(task_name, split):
    task = get_task(task_name)
    data = load_split(task, split, GLUE_DIR)
    count, labels = OFFICIAL[(task_name, split)]
    assert len(data) == count
    assert len(data.texts) == len(task.text_fields)
    assert all(len(column) == count for column in data.texts)
    assert all(isinstance(t, str) for column in data.texts for t in column)
    if task.is_regression:
        assert data.labels.dtype == np.float32
        assert (float(data.labels.min()), float(data.labels.max())) == labels
    else:
        assert data.labels.dtype == np.int64
        assert set(np.unique(data.labels)) <= set(range(task.num_labels))
        if labels is not None:
            assert Counter(task.labels[i] for i in data.labels) == labels


@needs_glue
def test_tsv_parse_equals_plain_tab_split():
    """QUOTE_NONE: quotes are literal, so every row equals the line split on tabs."""
    for task_name, folder, split, text_cols, label_col in [
        ("RTE", "RTE", "train", (1, 2), 3), ("MRPC", "MRPC", "dev", (3, 4), 0),
        ("QNLI", "QNLI", "dev", (1, 2), 3), ("STS-B", "STS-B", "train", (7, 8), 9),
    ]:
        task = get_task(task_name)
        data = load_split(task, split, GLUE_DIR)
        lines = Path(GLUE_DIR, folder, f"{split}.tsv").read_text("utf-8-sig").splitlines()[1:]
        rows = [line.split("\t") for line in lines]
        assert len(rows) == len(data)
        for column, index in zip(data.texts, text_cols):
            assert column == [row[index] for row in rows]


@needs_glue
def test_known_rows():
    cola = load_split("cola", "dev", GLUE_DIR)  # no header: the first line is data
    assert cola.texts[0][0] == "The sailors rode the breeze clear of the rocks."
    assert cola.labels[0] == 1
    assert cola.texts[0][-1] == "John talked to Bill about himself."  # no final newline
    mrpc = load_split("MRPC", "dev", GLUE_DIR)  # byte-order mark before the header
    assert mrpc.labels[0] == 1
    assert mrpc.texts[1][0].startswith('" The foodservice pie business does not fit')
    mrpc_train = load_split("MRPC", "train", GLUE_DIR)
    assert any('an " extremely heartrending " time' in t for t in mrpc_train.texts[0])
    rte = load_split("RTE", "train", GLUE_DIR)  # mojibake rows kept as they are
    assert "PrzekrÃ³j" in rte.texts[0][1333]
    stsb = load_split("STS-B", "train", GLUE_DIR)
    assert "Stalloneâ€™s" in stsb.texts[1][4106]
    assert stsb.texts == (stsb.texts[0], stsb.texts[1]) and stsb.labels[0] == 5.0
    qnli = load_split("QNLI", "dev", GLUE_DIR)  # stray leading quote kept
    assert sum(s.startswith('" ') for s in qnli.texts[1]) == 13
    sst = load_split("sst2", "dev", GLUE_DIR)
    assert sst.texts[0][0] == "it 's a charming and often affecting journey . "
    mnli = load_split("MNLI", "dev", GLUE_DIR)  # JSONL stand-in for dev_matched
    assert mnli.split == "dev_matched" and mnli.source.endswith("dev_matched.jsonl")
    assert mnli.texts[0][0] == "The new rights are nice enough"
    assert get_task("MNLI").labels[mnli.labels[0]] == "neutral"


@needs_glue
def test_missing_split_names_path_and_glue_dir():
    with pytest.raises(GlueError) as info:
        load_split("QQP", "train", GLUE_DIR)
    message = str(info.value)
    assert str(Path(GLUE_DIR) / "QQP" / "train.tsv") in message
    assert "GLUE_DIR" in message and "--glue-dir" in message


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_env_var_and_argument(tmp_path, monkeypatch):
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n"
           "0\tA \"quoted\" word.\tB.\tentailment\n1\tC.\tD.\tnot_entailment\n")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    data = load_split("rte", "validation")
    assert data.texts[0] == ['A "quoted" word.', "C."] and data.labels.tolist() == [0, 1]
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "nowhere"))
    assert len(load_split("RTE", "dev", glue_dir=tmp_path)) == 2  # the argument wins


def test_wrong_columns(tmp_path):
    path = _write(tmp_path / "RTE" / "dev.tsv", "index\tpremise\tsentence2\tlabel\n0\ta\tb\t0\n")
    with pytest.raises(GlueError, match=r"wrong columns.*sentence1"):
        read_tsv(path, "RTE", "dev")
    short = _write(tmp_path / "x.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\n")
    with pytest.raises(GlueError, match=r"x.tsv:2: row has 3 fields, the header has 4"):
        read_tsv(short, "RTE")


@pytest.mark.parametrize("task, text", [
    ("CoLA", "gj04\t1\t\tThe sailors rode\tthe breeze clear of the rocks.\n"),
    ("MRPC", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
             "1\t1\t2\tFirst half\tsecond half of one.\tSentence two.\n"),
    ("MNLI", "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label\n"
             "0\t1\t1e\tfiction\tPremise part A\tpremise part B\tHypothesis.\tentailment\n"),
])
def test_a_row_with_more_fields_than_the_header_is_refused(tmp_path, task, text):
    """A tab inside a text shifts the columns: the text would be cut and, where the label is
    read by position, the wrong field taken; refused, naming the line."""
    path = _write(tmp_path / "x.tsv", text)
    expected = ("CoLA files have no header and 4 columns" if task == "CoLA"  # (it has none)
                else r"the header has \d+")
    with pytest.raises(GlueError, match=rf"x.tsv:\d: row has \d+ fields, {expected} .*"
                                        r"\(a tab inside a field\?\)"):
        read_tsv(path, task)


def test_qqp_skips_malformed_rows_with_a_warning(tmp_path):
    """QQP: rows with a field count other than the header's are skipped, as GLUE's reference
    QQP reader did (it dropped rows it could not index), with a warning naming them."""
    path = _write(tmp_path / "QQP" / "dev.tsv",
                  "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                  "0\t1\t2\tHow?\tWhy?\t0\n"
                  "1\t3\t4\tA question cut short\n"
                  "2\t5\t6\tWhat?\tWhat is it?\t1\n")
    with pytest.warns(UserWarning, match=r"skipped 1 row\(s\) .* header's 6 \(lines 3\)"):
        data = read_tsv(path, "QQP", "dev")
    assert [list(t) for t in data.texts] == [["How?", "What?"], ["Why?", "What is it?"]]
    assert data.labels.tolist() == [0, 1]


def test_jsonl_that_is_not_utf8_is_a_named_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes('{"sentence": "caf\u00e9", "label": 1}\n'.encode("latin-1"))
    with pytest.raises(GlueError, match=r"train.jsonl: not valid UTF-8"):
        read_jsonl(path, "SST-2")


def test_labels_outside_label_set(tmp_path):
    path = _write(tmp_path / "a.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(GlueError, match=r"a.tsv:2: label 'maybe' is not in the label set"):
        read_tsv(path, "RTE")
    stsb = _write(tmp_path / "s.tsv", "sentence1\tsentence2\tscore\na\tb\t7.5\n")
    with pytest.raises(GlueError, match=r"outside \[0.0, 5.0\]"):
        read_tsv(stsb, "STS-B")
    cola = _write(tmp_path / "c.tsv", "src\t2\t\tA sentence.\n")
    with pytest.raises(GlueError, match="not in the label set of CoLA"):
        read_tsv(cola, "CoLA")


def test_empty_dataset(tmp_path):
    header_only = _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\n")
    with pytest.raises(GlueError, match="empty dataset"):
        read_tsv(header_only, "SST-2")
    empty = _write(tmp_path / "e.tsv", "")
    with pytest.raises(GlueError, match="empty"):
        read_tsv(empty, "SST-2")


def test_cola_with_and_without_header(tmp_path):
    plain = _write(tmp_path / "a.tsv", "gj04\t1\t\tGood one.\ngj04\t0\t*\tBad one one.\n")
    data = read_tsv(plain, "CoLA")
    assert data.texts[0] == ["Good one.", "Bad one one."] and data.labels.tolist() == [1, 0]
    headed = _write(tmp_path / "b.tsv", "source\tlabel\toriginal_label\tsentence\n"
                    "gj04\t1\t\tGood one.\n")
    assert read_tsv(headed, "CoLA").texts[0] == ["Good one."]


def test_jsonl_hub_and_tsv_field_names(tmp_path):
    lines = [{"premise": "p1", "hypothesis": "h1", "label": "contradiction"},
             {"sentence1": "p2", "sentence2": "h2", "gold_label": "entailment"},
             {"premise": "p3", "hypothesis": "h3", "label": 1}]
    _write(tmp_path / "MNLI" / "dev_mismatched.jsonl",
                  "".join(json.dumps(x) + "\n" for x in lines))
    data = load_split("MNLI", "dev_mismatched", tmp_path)
    assert data.texts == (["p1", "p2", "p3"], ["h1", "h2", "h3"])
    assert data.labels.tolist() == [2, 0, 1]
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"premise": "p", "label": 0}) + "\n")
    with pytest.raises(GlueError, match="wrong columns"):
        read_jsonl(bad, "MNLI")
    out_of_range = _write(tmp_path / "r.jsonl", json.dumps(
        {"premise": "p", "hypothesis": "h", "label": 3}) + "\n")
    with pytest.raises(GlueError, match="not in the label set"):
        read_jsonl(out_of_range, "MNLI")
    null_text = _write(tmp_path / "n.jsonl", json.dumps(
        {"premise": "p", "hypothesis": None, "label": 0}) + "\n")
    with pytest.raises(GlueError, match=r"n.jsonl:1: field 'hypothesis' is null, expected a "
                                        r"string"):
        read_jsonl(null_text, "MNLI")
    not_an_object = _write(tmp_path / "s.jsonl", json.dumps("premise and hypothesis") + "\n")
    with pytest.raises(GlueError, match=r"s.jsonl:1: expected a JSON object per line, found str"):
        read_jsonl(not_an_object, "MNLI")


def test_no_glue_dir_and_no_datasets_gives_clear_error(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(GlueError) as info:
        load_split("RTE", "train")
    assert "GLUE_DIR" in str(info.value) and "pip install datasets" in str(info.value)


def test_subset():
    from sparsebert.glue.loading import GlueData  # noqa: PLC0415

    data = GlueData(get_task("SST-2"), "train", (["a", "b", "c"],), np.array([0, 1, 0]), "x")
    sub = data.subset([2, 0])
    assert sub.texts == (["c", "a"],) and sub.labels.tolist() == [0, 0] and len(sub) == 2


def test_hub_fallback_with_a_fake_datasets_module(monkeypatch):
    """Without GLUE_DIR, splits come from `datasets.load_dataset("nyu-mll/glue", ...)`."""
    import types  # noqa: PLC0415

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0]}

    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_split("MNLI", "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert data.texts == (["p1", "p2"], ["h1", "h2"]) and data.labels.tolist() == [2, 0]
    assert data.source == "hub:nyu-mll/glue/mnli/validation_mismatched"

    def unlabeled(name, config, split):
        return {"premise": ["p"], "hypothesis": ["h"], "label": [-1]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unlabeled))
    with pytest.raises(GlueError, match="not in the label set"):
        load_split("MNLI", "dev")

    def missing_text(name, config, split):
        return {"premise": ["p", None], "hypothesis": ["h", "h2"], "label": [0, 1]}

    monkeypatch.setitem(sys.modules, "datasets",
                        types.SimpleNamespace(load_dataset=missing_text))
    with pytest.raises(GlueError, match=r"validation_matched row 1: premise is None, expected "
                                        r"a string"):  # not the text "None"
        load_split("MNLI", "dev")


def test_blank_lines_are_skipped_and_a_boolean_score_is_refused(tmp_path):
    """Empty and whitespace-only lines are no rows; JSON true is no STS-B score."""
    path = _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1\n \n\t\nbad\t0\n\n")
    data = read_tsv(path, "SST-2")
    assert data.texts == (["good", "bad"],) and data.labels.tolist() == [1, 0]
    scores = _write(tmp_path / "STS-B" / "train.jsonl",
                    '{"sentence1": "a", "sentence2": "b", "label": true}\n')
    with pytest.raises(GlueError, match=r"train.jsonl:1: label True is not a number"):
        read_jsonl(scores, "STS-B")


def test_a_wrong_glue_folder_is_named(tmp_path, monkeypatch):
    """A folder that does not exist, a file, or the task's own folder given as the GLUE
    folder: the error says which; a GLUE_DIR of blanks counts as unset."""
    _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngood\t1\n")
    for folder, expected in ((tmp_path / "nowhere", "nowhere does not exist"),
                             (tmp_path / "SST-2" / "dev.tsv", "dev.tsv is not a folder"),
                             (tmp_path / "SST-2", "looks like the SST-2 folder itself: give "
                                                  f"its parent ({tmp_path})")):
        with pytest.raises(SplitNotFoundError) as info:
            load_split("SST-2", "dev", folder)
        assert expected in str(info.value)
    monkeypatch.setenv("GLUE_DIR", "  ")
    assert resolve_glue_dir(None) is None
    assert resolve_glue_dir(f" {tmp_path} ") == tmp_path


def test_optional_dev_split_missing_is_skipped_broken_is_an_error(tmp_path, tiny_model_dir):
    """MNLI's dev_mismatched may be absent (skipped with a warning); present but broken, it is
    an error rather than a silently smaller evaluation."""
    from sparsebert.glue import SplitNotFoundError  # noqa: PLC0415
    from sparsebert.hf.loading import load_tokenizer  # noqa: PLC0415
    from sparsebert.train import TrainConfig  # noqa: PLC0415
    from sparsebert.train.evaluate import load_dev_splits  # noqa: PLC0415

    row = {"premise": "p", "hypothesis": "h", "label": "entailment"}
    _write(tmp_path / "MNLI" / "dev_matched.jsonl", json.dumps(row) + "\n")
    config = TrainConfig(task="MNLI", glue_dir=str(tmp_path))
    tokenizer = load_tokenizer(tiny_model_dir)
    assert list(load_dev_splits(config, tokenizer)) == ["dev_matched"]
    with pytest.raises(SplitNotFoundError):
        load_split("MNLI", "dev_mismatched", tmp_path)
    _write(tmp_path / "MNLI" / "dev_mismatched.jsonl", json.dumps({"premise": "p"}) + "\n")
    with pytest.raises(GlueError, match="wrong columns"):
        load_dev_splits(config, tokenizer)


def test_a_field_over_the_csv_size_limit_is_named(tmp_path):
    """csv refuses a field longer than its limit (128 KiB here, 16 MiB by default: a file
    exported wrong, without tabs or line ends) with a bare csv.Error: the file and line are
    named as for every other malformed row."""
    import csv  # noqa: PLC0415

    limit = csv.field_size_limit(1 << 17)
    try:
        path = _write(tmp_path / "x.tsv", "sentence\tlabel\nok\t1\n" + "a " * (1 << 17) + "\t1\n")
        with pytest.raises(GlueError, match=r"x.tsv:3: field larger than field limit"):
            read_tsv(path, "SST-2")
    finally:
        csv.field_size_limit(limit)
