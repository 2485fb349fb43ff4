"""Pruning sweeps: the lottery-ticket study over tasks x seeds x methods as one resumable
command that runs the search's stages as units on a local process pool or a Ray cluster.

    from sparsebert.sweep import SweepConfig, sweep

    if __name__ == "__main__":  # workers are spawned processes: each imports this script
        outcome = sweep("runs/sweep", SweepConfig(tasks="RTE,MRPC", seeds="1337,42"))

Modules: config (SweepConfig, --config TOML), grid (units and dependencies), state (the sweep
directory: grid identity, markers, lock), units (running one unit in a worker), local and
ray_backend (where units run), scheduler (the driver's loop), driver (`sweep`).
"""

from sparsebert.sweep.config import SweepConfig, SweepError
from sparsebert.sweep.driver import sweep
from sparsebert.sweep.grid import Grid, Unit, expand

__all__ = ["Grid", "SweepConfig", "SweepError", "Unit", "expand", "sweep"]
