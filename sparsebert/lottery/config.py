"""The ticket search's configuration (what `sparsebert search` adds to the training flags)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sparsebert.checks import is_integer, is_number
from sparsebert.errors import ConfigError
from sparsebert.flags import dataclass_from_json, help_field
from sparsebert.lottery.subnetworks import SUBNETWORKS
from sparsebert.pruning.importance import MODES, PRECISIONS

METHODS = ("structured", "magnitude")
SEARCH_DATA = ("dev", "train")
# Fields that choose how much work is done, not what it computes: they may change between
# runs on one directory (e.g. add --subnets bad later, or retrain after --no-retrain).
SCOPE_FIELDS = frozenset({"method", "subnets", "retrain"})


def _flag(name: str) -> str:
    """The command-line flag of a field: importance_batch_size -> --importance-batch-size."""
    return "--" + name.replace("_", "-")


class SearchError(ConfigError):
    """A bad search option or an inconsistent search directory."""


@dataclass
class SearchConfig:
    """How the lottery-ticket search runs (PAPER.md §1-3); the defaults are the paper's."""

    method: str = help_field("structured (heads + MLPs), magnitude (weights) or both", "both")
    threshold: float = help_field("keep pruning while the search score >= threshold x the "
                                  "full model's", 0.9)
    subnets: str = help_field("subnetworks to build and evaluate: any of good,random,bad",
                              "good,random,bad")
    retrain: bool = help_field("re-fine-tune each subnetwork from the pre-trained weights",
                               True)
    search_data: str = help_field("data for importance and the stopping test: dev (the "
                                  "paper) or train (a seeded train subset of dev size)", "dev")
    importance_mode: str = help_field(f"importance criterion: one of {', '.join(MODES)} "
                                      f"(s-pruning with michel needs --recompute-after-revert)",
                                      "paper")
    importance_batch_size: int = help_field("batch size of the importance pass (paper: 64)",
                                            64)
    importance_precision: str = help_field("precision of the importance pass: auto (bf16 "
                                           "autocast on CUDA, fp32 elsewhere), fp32 or bf16",
                                           "auto")
    masking_amount: float = help_field("s-pruning: fraction of all heads masked per phase-1 "
                                       "step", 0.1)
    magnitude_amount: float = help_field("m-pruning: fraction of the remaining eligible "
                                         "weights pruned per step", 0.1)
    magnitude_max_steps: int = help_field("m-pruning: loop iterations (the saved mask has at "
                                          "most this minus one steps, as the authors' loop)",
                                          10)
    recompute_after_revert: bool = help_field("s-pruning: recompute importance after a "
                                              "revert (the authors' code does not)", False)

    def methods(self) -> list[str]:
        return list(METHODS) if self.method == "both" else [self.method]

    def subnet_list(self) -> list[str]:
        """--subnets in the order given, each once."""
        return list(dict.fromkeys(s.strip() for s in self.subnets.split(",") if s.strip()))

    def validate(self) -> SearchConfig:
        """Checks every field; returns self. Raises SearchError naming the flag."""
        for name in ("method", "subnets", "search_data", "importance_mode",
                     "importance_precision"):
            if not isinstance(getattr(self, name), str):
                raise SearchError(f"{_flag(name)} {getattr(self, name)!r}: expected a string")
        for name in ("retrain", "recompute_after_revert"):
            if not isinstance(getattr(self, name), bool):
                raise SearchError(f"{_flag(name)} {getattr(self, name)!r}: expected True or "
                                  f"False")
        for name in ("threshold", "masking_amount", "magnitude_amount"):
            value = getattr(self, name)
            if not is_number(value):
                raise SearchError(f"{_flag(name)} {value!r}: expected a number")
        if self.method not in (*METHODS, "both"):
            raise SearchError(f"--method {self.method!r}: expected structured, magnitude or "
                              f"both")
        unknown = [s for s in self.subnet_list() if s not in SUBNETWORKS]
        if unknown or not self.subnet_list():
            raise SearchError(f"--subnets {self.subnets!r}: expected a comma-separated subset "
                              f"of {','.join(SUBNETWORKS)}"
                              + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        if not 0 < self.threshold <= 1:
            raise SearchError(f"--threshold {self.threshold}: expected a value in (0, 1]")
        if self.search_data not in SEARCH_DATA:
            raise SearchError(f"--search-data {self.search_data!r}: expected dev or train")
        if self.importance_mode not in MODES:
            raise SearchError(f"--importance-mode {self.importance_mode!r}: expected one of "
                              f"{', '.join(MODES)}")
        if (self.importance_mode == "michel" and self.method != "magnitude"
                and not self.recompute_after_revert):
            raise SearchError(
                "--importance-mode michel needs --recompute-after-revert for s-pruning: michel "
                "scores a masked head 0, and the first step of phases 2 and 3 ranks the heads "
                "under the previous phase's failed mask (the authors' code), so it would take "
                "that step's heads in index order, not by importance")
        if self.importance_precision not in PRECISIONS:
            raise SearchError(f"--importance-precision {self.importance_precision!r}: expected "
                              f"one of {', '.join(PRECISIONS)}")
        for name in ("masking_amount", "magnitude_amount"):
            if not 0 < getattr(self, name) < 1:
                raise SearchError(f"--{name.replace('_', '-')} {getattr(self, name)}: "
                                  f"expected a value in (0, 1)")
        for name in ("importance_batch_size", "magnitude_max_steps"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise SearchError(f"{_flag(name)} {value!r}: expected an integer >= 1")
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchConfig:
        return dataclass_from_json(cls, data, SearchError)

    def identity(self) -> dict[str, Any]:
        """The fields that define what the search computes."""
        return {k: v for k, v in self.to_json().items() if k not in SCOPE_FIELDS}
