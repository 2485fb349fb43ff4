"""The sweep's grid expanded into units with dependencies.

Per task x seed (in OUT/<task>/seed_<s>/, a `sparsebert search` directory):
    full                          fine-tune the full model (shared by both methods)
    search/<method>               the method's search + every subnetwork's masks
    pruned/<method>/<subnet>      the subnetwork on the fine-tuned model
    retrained/<method>/<subnet>   the subnetwork re-fine-tuned from the pre-trained model
    summary                       summary.json (+ report.md, figures/)
Per task, once every seed's structured search is done (in OUT/<task>/super/):
    super-masks, super-pruned/<seed>/<subnet>, super-retrained/<seed>/<subnet>,
    super-summary (super/summary.json)
Per task with >= 2 seeds, once its summaries are written:
    task-report                   OUT/<task>/report.md and figures/
Then `report`: OUT/report.md and figures/ over every summary (beside the task reports: it
needs only the summary files).

These are the stages of sparsebert.lottery.search.Search and SuperStage, each run alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

# Relative cost of a unit kind, in fine-tunes of the full model: priorities and the first ETA
# (measured on the CPU, RTE and CoLA: a search took 0.1-0.6 of its full fine-tune; a
# super-survivor re-fine-tune, of a small subnetwork, 0.3-0.6 of a subnetwork's).
WEIGHTS = {"full": 1.0, "search": 0.5, "pruned": 0.03, "retrained": 1.0, "summary": 0.05,
           "super-masks": 0.01, "super-pruned": 0.03, "super-retrained": 0.5,
           "super-summary": 0.01, "task-report": 0.1, "report": 0.1}


@dataclass
class Unit:
    """One schedulable piece of work; `id` names it everywhere (markers, logs, messages)."""

    id: str
    kind: str
    task: str | None = None
    seed: int | None = None
    method: str | None = None
    subnet: str | None = None
    deps: list[str] = field(default_factory=list)

    @property
    def weight(self) -> float:
        return WEIGHTS[self.kind]

    @property
    def warm_key(self) -> tuple[str | None, int | None]:
        """Units with the same key share a worker's loaded model and data."""
        return (self.task, self.seed)

    def spec(self) -> dict:
        return {"id": self.id, "kind": self.kind, "task": self.task, "seed": self.seed,
                "method": self.method, "subnet": self.subnet}


@dataclass(frozen=True)
class Grid:
    """What the sweep computes (the part of the options a sweep directory is tied to)."""

    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    subnets: tuple[str, ...]
    retrain: bool
    super_survivors: bool

    @property
    def has_super(self) -> bool:
        return self.super_survivors and "structured" in self.methods and len(self.seeds) >= 2


def expand(grid: Grid) -> list[Unit]:
    """Every unit of `grid`, each after its dependencies (a topological order)."""
    units: list[Unit] = []
    for task in grid.tasks:
        summaries = []
        for seed in grid.seeds:
            base = f"{task}/{seed}"
            full = Unit(f"full/{base}", "full", task, seed)
            units.append(full)
            seed_units = [full.id]
            for method in grid.methods:
                found = Unit(f"search/{base}/{method}", "search", task, seed, method,
                             deps=[full.id])
                units.append(found)
                seed_units.append(found.id)
                for subnet in grid.subnets:
                    kinds = ("pruned", "retrained") if grid.retrain else ("pruned",)
                    for kind in kinds:
                        unit = Unit(f"{kind}/{base}/{method}/{subnet}", kind, task, seed,
                                    method, subnet, deps=[found.id])
                        units.append(unit)
                        seed_units.append(unit.id)
            summary = Unit(f"summary/{base}", "summary", task, seed, deps=seed_units)
            units.append(summary)
            summaries.append(summary.id)
        if grid.has_super:
            masks = Unit(f"super-masks/{task}", "super-masks", task,
                         deps=[f"search/{task}/{s}/structured" for s in grid.seeds])
            units.append(masks)
            controls = []
            for seed in grid.seeds:
                for subnet in grid.subnets:
                    kinds = (("super-pruned", "super-retrained") if grid.retrain
                             else ("super-pruned",))
                    for kind in kinds:
                        unit = Unit(f"{kind}/{task}/{seed}/{subnet}", kind, task, seed,
                                    subnet=subnet, deps=[masks.id])
                        units.append(unit)
                        controls.append(unit.id)
            final = Unit(f"super-summary/{task}", "super-summary", task,
                         deps=[masks.id, *controls])
            units.append(final)
            summaries.append(final.id)
        if len(grid.seeds) >= 2:
            units.append(Unit(f"task-report/{task}", "task-report", task, deps=list(summaries)))
    units.append(Unit("report", "report",
                      deps=[u.id for u in units if u.kind in ("summary", "super-summary")]))
    return units


def upward_rank(units: Iterable[Unit]) -> dict[str, float]:
    """Each unit's weight plus the heaviest chain of units that wait on it (critical path):
    running the highest first keeps the workers busy to the end."""
    units = list(units)
    children: dict[str, list[str]] = {u.id: [] for u in units}
    for unit in units:
        for dep in unit.deps:
            children.setdefault(dep, []).append(unit.id)
    weight = {u.id: u.weight for u in units}
    rank: dict[str, float] = {}
    for unit in reversed(units):  # expand() lists dependencies first
        rank[unit.id] = weight[unit.id] + max((rank[c] for c in children[unit.id]), default=0)
    return rank


def check_order(units: list[Unit]) -> None:
    """Raise ValueError unless every dependency exists and comes before its unit."""
    seen: set[str] = set()
    for unit in units:
        missing = [d for d in unit.deps if d not in seen]
        if missing:
            raise ValueError(f"{unit.id}: dependencies {missing} are not listed before it")
        seen.add(unit.id)
