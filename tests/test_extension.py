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


def run_python(code: str, block: bool = True, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter, with sparsebert._C made unimportable when `block`."""
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-W", "always", "-c",
         (BLOCK_EXTENSION if block else "") + textwrap.dedent(code)],
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
    import atexit, importlib.abc, importlib.machinery, os, sys, tempfile
    library = tempfile.NamedTemporaryFile(suffix=".so", delete=False)
    atexit.register(os.unlink, library.name)
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


def test_a_cuda_build_finds_the_headers_of_torchs_nvidia_wheels(tmp_path, monkeypatch):
    """A CUDA torch from PyPI with a minimal toolkit (no cusparse.h, which torch's CUDA headers
    include): setup.py appends the nvidia wheels' include folders to CPATH, after what CPATH
    held, once (the build failed with "cusparse.h: No such file or directory")."""
    import importlib.util  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("_sparsebert_setup", root / "setup.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # (main() runs only as a script)
    wheels = tmp_path / "site"
    for library in ("cu13", "cudnn"):
        (wheels / "nvidia" / library / "include").mkdir(parents=True)
    (wheels / "nvidia" / "cu13" / "include" / "cusparse.h").write_text("")
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(wheels))
    monkeypatch.delitem(sys.modules, "nvidia", raising=False)  # found afresh on the new path
    expected = [str(wheels / "nvidia" / library / "include") for library in ("cu13", "cudnn")]
    # a folder inside one of them on CPATH already (CUDA 13's include/cccl) is another folder
    held = ["/opt/mine", expected[0] + "/cccl"]
    monkeypatch.setenv("CPATH", os.pathsep.join(held))
    assert [f for f in build._wheel_cuda_include_dirs() if f.startswith(str(wheels))] == expected
    for _ in range(2):  # a second build adds nothing
        build._add_wheel_cuda_headers(str(toolkit))
        folders = os.environ["CPATH"].split(os.pathsep)  # (+ a CUDA torch's own wheels')
        assert folders[:2] == held and [f for f in folders if f.startswith(str(wheels))] == \
            [held[1], *expected]


@pytest.mark.parametrize("arch_list, sm90a", [
    ("9.0a", True), ("8.0;9.0a", True), ("8.0 9.0a+PTX", True), ("9.0a+PTX", True),
    ("9.0", False), ("8.0;9.0+PTX", False), ("", False), (None, False), ("10.0a", False),
])
def test_arch_list_sm90a(arch_list, sm90a):
    """The build (SPARSEBERT_HAS_SM90A) and wgmma_forward_available read an arch list alike."""
    from sparsebert.switches import arch_list_has_sm90a

    assert arch_list_has_sm90a(arch_list) is sm90a


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


BACKWARD_OPS = """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    import sparsebert

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:  # views (detach) launch nothing
                self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(2, 5, 3, 8, requires_grad=True) for _ in range(3))
    for gate_grad in (False, True):
        gate = torch.tensor([1.0, 0.0, 0.5], requires_grad=gate_grad)
        out = sparsebert.masked_attention(q, k, v, gate)
        leaves, dout = [q, k, v, gate] if gate_grad else [q, k, v], torch.ones_like(out)
        with Ops() as ops:
            torch.autograd.grad(out, leaves, dout)
        print(gate_grad, ",".join(ops.names))
"""


def test_native_backward_runs_the_kernel_and_nothing_it_does_not_need():
    """The C++ autograd of masked_attention: its backward makes no zeros for lse's gradient
    (lse has none) and reduces d_head_gate over the batch only when the gate needs one."""
    result = run_python(BACKWARD_OPS, block=False, SPARSEBERT_REQUIRE_EXT="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "masked_attention_backward",
                                     "True", "masked_attention_backward,sum"]


def test_python_autograd_gives_the_reference_gradients():
    """The Python registration (builds without the extension; undefined gradients not
    materialised, d_head_gate reduced only when needed) gives the reference's gradients, with
    and without a gate that needs one, and with lse used too (it has no gradient)."""
    result = run_python(
        """
        import torch
        import sparsebert
        from sparsebert.reference import masked_attention_ref
        gen = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, 5, 3, 8, generator=gen, dtype=torch.float64,
                               requires_grad=True) for _ in range(3))
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[1, 3:] = False
        for gate_grad in (False, True):
            gate = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64, requires_grad=gate_grad)
            leaves = [q, k, v, gate] if gate_grad else [q, k, v]
            out, lse = sparsebert.masked_attention(q, k, v, gate, mask, return_lse=True)
            assert not lse.requires_grad
            dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            got = torch.autograd.grad((out * dout).sum() + lse.sum(), leaves)
            want_out, _ = masked_attention_ref(q, k, v, gate, mask, 8 ** -0.5)
            want = torch.autograd.grad((want_out * dout).sum(), leaves)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w)
        print("ok")
        """,
        SPARSEBERT_REQUIRE_EXT="0",
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
