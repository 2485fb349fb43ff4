"""On/off environment switches (SPARSEBERT_REQUIRE_EXT, SPARSEBERT_DEBUG, ...), and what a
CUDA arch list builds.

Standard library only: setup.py runs this file by path, before anything is built, so the build
and the package read a switch (and an arch list) the same way.
"""

from __future__ import annotations

import os

SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False, "": False}


# Every on/off switch the package reads: the command line checks them all before it starts,
# so a bad value is an error up front, not after a run has begun writing its folder.
SWITCHES = ("SPARSEBERT_DEBUG", "SPARSEBERT_REQUIRE_EXT", "SPARSEBERT_FULL_LAST_LAYER",
            "SPARSEBERT_GRAPH_FIXED_GATES")


def env_switch(name: str) -> bool:
    """An on/off environment switch: 1/true/yes/on or 0/false/no/off (any case, spaces ignored;
    unset is off); ValueError naming the variable for anything else."""
    value = os.environ.get(name, "").strip().lower()
    if value not in SWITCH_VALUES:
        raise ValueError(f"{name}={os.environ[name]!r}: expected 1/true/yes/on or "
                         f"0/false/no/off")
    return SWITCH_VALUES[value]


def check_switches() -> None:
    """ValueError naming the first of SWITCHES set to a value env_switch refuses, or a
    SPARSEBERT_ATTENTION_KERNEL that is none of its choices."""
    for name in SWITCHES:
        env_switch(name)
    check_attention_kernel()


# The CUDA host code reads SPARSEBERT_ATTENTION_KERNEL at each call (unset, default or mma: the
# mma.sync kernels where they apply; wgmma: the forward with Hopper's wgmma where the build has
# sm_90a code and the GPU is compute capability 9.0, else as mma (opt-in: not yet run on a GPU);
# wmma: the WMMA and SIMT kernels, the defaults before them; simt: the SIMT kernels). A typo
# would silently run the defaults: refused when sparsebert.ops is imported.
ATTENTION_KERNEL_CHOICES = ("default", "mma", "wgmma", "wmma", "simt")


def check_attention_kernel() -> None:
    """ValueError naming SPARSEBERT_ATTENTION_KERNEL when it is set to none of its choices."""
    choice = os.environ.get("SPARSEBERT_ATTENTION_KERNEL", "default") or "default"
    if choice not in ATTENTION_KERNEL_CHOICES:
        raise ValueError(f"SPARSEBERT_ATTENTION_KERNEL={choice!r}: expected one of "
                         f"{', '.join(ATTENTION_KERNEL_CHOICES)} (or unset)")


def arch_list_has_sm90a(arch_list: str | None) -> bool:
    """Whether a TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "8.0 9.0a+PTX", ...) builds sm_90a code (the
    wgmma forward)."""
    return "9.0a" in (arch_list or "").replace(";", " ").replace("+PTX", "").split()
