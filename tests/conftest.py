"""Shared test helpers: devices, native-kernel assertions."""

from __future__ import annotations

import pytest
import torch

import sparsebert.ops as sb_ops

CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
    ),
]


def dispatch_key(device: str) -> str:
    return "CUDA" if device.startswith("cuda") else "CPU"


def assert_native(op_name: str, device: str) -> None:
    """A native-kernel test first proves the kernel is registered, so it never compares the
    reference with itself."""
    key = dispatch_key(device)
    assert sb_ops._C is not None, "sparsebert._C is not loaded: build the extension"
    assert key in sb_ops.native_dispatch_keys(op_name), f"no native {key} kernel for {op_name}"
    assert op_name in sb_ops._C.build_info()["kernels"].get(key, []), f"{op_name} not in build_info"
