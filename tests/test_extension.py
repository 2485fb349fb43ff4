"""Loading of sparsebert._C: build_info, tolerant fallback, SPARSEBERT_REQUIRE_EXT."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsebert.ops as sb_ops

BLOCK_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "sparsebert._C":
                raise ImportError("blocked for the test")
    sys.meta_path.insert(0, Block())
    """
)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", BLOCK_EXTENSION + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_build_info_reports_versions_and_kernels():
    assert sb_ops._C is not None
    info = sb_ops._C.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert "masked_attention" in info["kernels"]["CPU"]
    if info["cuda_version"] is None:
        assert info["cuda_arch_list"] is None
        assert "CUDA" not in info["kernels"]


def test_missing_extension_warns_once_and_references_run():
    result = run_python(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sparsebert
        msgs = [str(w.message) for w in caught if "native kernels unavailable" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pip install --no-build-isolation -e ." in msgs[0]
        q = torch.randn(1, 4, 2, 8)
        out = sparsebert.masked_attention(q, q, q, torch.tensor([1.0, 0.0]))
        assert out.shape == (1, 4, 2, 8) and torch.all(out[:, :, 1] == 0)
        assert sparsebert.ops.native_dispatch_keys("masked_attention") == []
        print("ok")
        """,
        SPARSEBERT_REQUIRE_EXT="0",
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_require_ext_turns_the_fallback_into_an_error():
    result = run_python("import sparsebert", SPARSEBERT_REQUIRE_EXT="1")
    assert result.returncode != 0
    assert "SPARSEBERT_REQUIRE_EXT=1" in result.stderr


@pytest.mark.parametrize("op", sb_ops.OP_NAMES)
def test_every_op_has_a_native_cpu_kernel(op):
    assert "CPU" in sb_ops.native_dispatch_keys(op)
