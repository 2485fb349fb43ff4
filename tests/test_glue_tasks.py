"""The GLUE task registry: names, aliases, label sets, metrics (PAPER.md §0)."""

import pytest

from sparsebert.glue.tasks import TASKS, GlueError, get_task, task_names


def test_all_nine_tasks_registered():
    assert task_names() == ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE",
                            "WNLI"]


@pytest.mark.parametrize("alias, name", [
    ("sst2", "SST-2"), ("SST-2", "SST-2"), ("sst_2", "SST-2"), ("cola", "CoLA"),
    ("STSB", "STS-B"), ("sts-b", "STS-B"), ("mnli", "MNLI"), ("Rte", "RTE"), ("qqp", "QQP"),
])
def test_get_task_case_insensitive_with_aliases(alias, name):
    assert get_task(alias).name == name
    assert get_task(get_task(alias)) is get_task(alias)


def test_unknown_task_lists_tasks():
    with pytest.raises(GlueError) as info:
        get_task("imdb")
    message = str(info.value)
    assert "imdb" in message
    for name in TASKS:
        assert name in message


def test_threshold_metrics_follow_the_paper():
    expected = {"CoLA": "mcc", "STS-B": "corr"}
    for name, task in TASKS.items():
        assert task.threshold_metric == expected.get(name, "acc")
        assert task.threshold_metric in task.metrics
    assert set(get_task("MRPC").metrics) == {"acc", "f1"}
    assert set(get_task("QQP").metrics) == {"acc", "f1"}
    assert set(get_task("STS-B").metrics) == {"pearson", "spearman", "corr"}


def test_labels_and_regression():
    stsb = get_task("STS-B")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.labels == ()
    assert get_task("MNLI").labels == ("entailment", "neutral", "contradiction")
    assert get_task("RTE").labels == ("entailment", "not_entailment")
    for name in ("CoLA", "SST-2", "MRPC", "QQP", "WNLI"):
        assert get_task(name).labels == ("0", "1")
        assert not get_task(name).is_regression
    for task in TASKS.values():
        assert len(task.text_fields) in (1, 2)
        assert len(task.tsv.text_columns) == len(task.text_fields)


def test_splits():
    mnli = get_task("MNLI")
    assert mnli.splits == ("train", "dev_matched", "dev_mismatched")
    assert mnli.resolve_split("dev") == "dev_matched"
    assert mnli.resolve_split("validation_mismatched") == "dev_mismatched"
    assert get_task("RTE").resolve_split("validation") == "dev"
    with pytest.raises(GlueError, match="unknown split"):
        get_task("RTE").resolve_split("test_matched")
