"""The lottery-ticket study of Prasanna et al. 2020 (PAPER.md): s-pruning and m-pruning
searches, good / random / bad subnetworks, re-fine-tuning, stability statistics.

    from sparsebert.lottery import search
    summary = search("MRPC", "runs/mrpc", method="both", seed=42)   # resumable
    from sparsebert.lottery import report
    report(["runs/mrpc"])                                          # table + figures

Modules: config (SearchConfig), structured (the head/MLP schedule), magnitude (global
magnitude masks), subnetworks (random / bad), scoring (data, metrics, baseline), search
(the stages and run directory), summary (summary.json), stats (stability across seeds).
"""

from sparsebert.lottery.config import SearchConfig, SearchError
from sparsebert.lottery.search import Search, search


def report(paths, out_dir=None) -> dict:
    """sparsebert.report.report: report.md and figures/ from search directories."""
    from sparsebert.report import report as write_report  # noqa: PLC0415

    return write_report(paths, out_dir)


__all__ = ["Search", "SearchConfig", "SearchError", "report", "search"]
