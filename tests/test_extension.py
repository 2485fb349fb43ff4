"""Loading of sparsebert._C: build_info, tolerant fallback, SPARSEBERT_REQUIRE_EXT."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


# ---- the op-schema fingerprint, switches, and a library built from other schemas -----------
def test_the_built_library_carries_the_sources_op_schemas():
    from sparsebert import schema  # noqa: PLC0415

    expected = schema.source_fingerprint(sb_ops.__file__)
    assert sb_ops._C.build_info()["op_schemas"] == expected
    assert schema.built_fingerprint(sb_ops._C.__file__) == expected
    defined = {s.split("(")[0] for s in schema.schemas_in(open(sb_ops.__file__).read())}
    assert set(sb_ops.OP_NAMES) <= defined
    assert schema.fingerprint(["a(Tensor x) -> Tensor"]) != schema.fingerprint(
        ["a(Tensor x, int n) -> Tensor"])


STALE_LIBRARY = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys, tempfile
    library = tempfile.NamedTemporaryFile(suffix=".so", delete=False)
    library.write(b"\\x7fELF..." + b"sparsebert-op-schemas:" + b"0123456789abcdef" + b"...")
    library.close()
    class Stale(importlib.abc.MetaPathFinder):  # a _C built from other schemas
        def find_spec(self, name, path, target=None):
            if name == "sparsebert._C":
                return importlib.machinery.ModuleSpec(name, None, origin=library.name)
    sys.meta_path.insert(0, Stale())
    """
)


@pytest.mark.parametrize("require", ["0", "1"])
def test_a_library_built_from_other_schemas_is_refused_before_loading(require):
    """Loading it would let torch abort the process while the kernels register; it is refused
    first, with a warning (references run) or, with SPARSEBERT_REQUIRE_EXT on, an ImportError."""
    code = STALE_LIBRARY + textwrap.dedent(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sparsebert
        msgs = [str(w.message) for w in caught if "native kernels unavailable" in str(w.message)]
        assert len(msgs) == 1 and "built for other op schemas (0123456789abcdef)" in msgs[0], msgs
        assert sparsebert.ops.native_dispatch_keys("masked_attention") == []
        q = torch.randn(1, 4, 2, 8)
        assert sparsebert.masked_attention(q, q, q, torch.tensor([1.0, 0.0])).shape == q.shape
        print("ok")
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "SPARSEBERT_REQUIRE_EXT": require})
    if require == "0":
        assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    else:
        assert result.returncode == 1, result.stderr
        assert "SPARSEBERT_REQUIRE_EXT=1" in result.stderr
        assert "built for other op schemas (0123456789abcdef)" in result.stderr


def test_an_unbuilt_extension_is_named_as_such(monkeypatch):
    import importlib.util  # noqa: PLC0415

    from sparsebert import _extension  # noqa: PLC0415

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("SPARSEBERT_REQUIRE_EXT", "0")
    with pytest.warns(RuntimeWarning, match=r"\(sparsebert._C is not built\)"):
        assert _extension.load_extension() is None
    monkeypatch.setenv("SPARSEBERT_REQUIRE_EXT", "yes")
    with pytest.raises(ImportError, match="SPARSEBERT_REQUIRE_EXT=yes: sparsebert._C is not built"):
        _extension.load_extension()


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("Yes", True),
                                           ("on", True), ("0", False), ("false", False),
                                           ("no", False), ("OFF", False), ("", False)])
def test_env_switch_values(monkeypatch, value, on):
    from sparsebert.switches import env_switch  # noqa: PLC0415

    monkeypatch.setenv("SPARSEBERT_REQUIRE_EXT", value)
    assert env_switch("SPARSEBERT_REQUIRE_EXT") is on


def test_env_switch_refuses_other_values(monkeypatch):
    from sparsebert.switches import env_switch  # noqa: PLC0415

    monkeypatch.setenv("SPARSEBERT_REQUIRE_EXT", "required")
    with pytest.raises(ValueError, match="SPARSEBERT_REQUIRE_EXT='required': expected 1/true"):
        env_switch("SPARSEBERT_REQUIRE_EXT")
    from sparsebert._extension import load_extension  # noqa: PLC0415

    with pytest.raises(ValueError, match="SPARSEBERT_REQUIRE_EXT='required'"):
        load_extension()  # refused even where _C would load
    monkeypatch.delenv("SPARSEBERT_REQUIRE_EXT")
    assert env_switch("SPARSEBERT_REQUIRE_EXT") is False


def test_the_build_reads_switches_as_the_package_does():
    """setup.py reads sparsebert/switches.py (no second table): a bad value stops the build
    with the package's message, before anything is compiled."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SPARSEBERT_DEBUG": "Maybe"}
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "SPARSEBERT_DEBUG='Maybe': expected 1/true/yes/on or 0/false/no/off" in result.stderr


def test_an_unknown_attention_kernel_switch_is_refused():
    result = subprocess.run([sys.executable, "-c", "import sparsebert"], capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "SPARSEBERT_ATTENTION_KERNEL": "MMA"})
    assert result.returncode == 1
    assert "SPARSEBERT_ATTENTION_KERNEL='MMA': expected one of default, mma, wgmma, wmma, simt" in result.stderr


def test_reference_path_rejects_a_fully_padded_row_on_the_cpu():
    """As the CPU kernel does, whatever check_padding_rows says (there it costs no sync)."""
    result = run_python(
        """
        import warnings; warnings.simplefilter("ignore")
        import torch, sparsebert
        q = torch.randn(2, 3, 2, 8)
        mask = torch.tensor([[True, True, False], [False, False, False]])
        try:
            sparsebert.ops.masked_attention(q, q, q, torch.ones(2), mask,
                                            check_padding_rows=False)
        except ValueError as error:
            print("refused:", error)
        """,
        SPARSEBERT_REQUIRE_EXT="0",
    )
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "real token" in result.stdout
