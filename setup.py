"""Build of the `sparsebert._C` extension.

C++ CPU kernels are always built. CUDA kernels are added when SPARSEBERT_BUILD_CUDA resolves on:
  auto (default)  torch is a CUDA build (torch.version.cuda) and a CUDA toolkit (nvcc) is found
  0               never
  1               required; the build fails with the reason if it is impossible
A visible GPU never decides whether CUDA is built. With CUDA on and TORCH_CUDA_ARCH_LIST unset
and no GPU visible, the arch list defaults to "8.0;9.0" (A100, H100/H200).
SPARSEBERT_DEBUG=1 builds with -O0 -g. SPARSEBERT_PTXAS_VERBOSE=1 adds -Xptxas -v (register/spill report).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"


def _log(msg: str) -> None:
    print(f"[sparsebert build] {msg}", file=sys.stderr)


def _env_flag(name: str, default: str) -> str:
    value = os.environ.get(name, default).strip().lower()
    return value


def _package_file(name: str):
    """sparsebert/<name>.py run by path (standard library only): the package itself is not
    imported, as its dependencies may not be installed yet."""
    path = os.path.join(ROOT, "sparsebert", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_sparsebert_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _switch(name: str) -> bool:
    """An on/off environment switch, read as the package reads it (sparsebert/switches.py)."""
    try:
        return _package_file("switches").env_switch(name)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def _is_toolkit(folder: str | None) -> bool:
    return bool(folder) and all(
        os.path.exists(os.path.join(folder, *part))
        for part in (("bin", "nvcc"), ("include", "cuda_runtime_api.h"))
    )


def _cuda_toolkit_root(detected: str | None) -> str | None:
    """The CUDA toolkit folder: torch's guess (CUDA_HOME, or the parent of the `nvcc` on PATH,
    which is wrong when that nvcc is a wrapper script), else the usual install locations."""
    for folder in (detected, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if _is_toolkit(folder):
            return folder
    return None


def _wheel_cuda_include_dirs() -> list[str]:
    """The include folders of the nvidia-* wheels installed with a CUDA torch from PyPI
    (nvidia/cu13/include for CUDA 13, nvidia/<library>/include for CUDA 12): torch's CUDA
    headers include cusparse.h, cublas_v2.h, ... which a minimal CUDA toolkit lacks."""
    try:
        import nvidia  # (a namespace package: the wheels' shared top folder)
    except ImportError:
        return []
    return [folder for base in nvidia.__path__
            for folder in sorted(glob.glob(os.path.join(base, "*", "include")))]


def _add_wheel_cuda_headers(cuda_home: str) -> None:
    """Put the nvidia wheels' include folders on CPATH, after every -I folder (the toolkit's
    headers come first): a toolkit without cusparse.h then builds as a full one does."""
    held = {os.path.normpath(f) for f in os.environ.get("CPATH", "").split(os.pathsep) if f}
    folders = [f for f in _wheel_cuda_include_dirs() if os.path.normpath(f) not in held]
    if not folders:
        return
    if not os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        _log(f"the toolkit at {cuda_home} has no cusparse.h: using the CUDA headers of torch's "
             f"nvidia wheels ({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''})")
    os.environ["CPATH"] = os.pathsep.join(filter(None, [os.environ.get("CPATH"), *folders]))


def _cuda_decision() -> tuple[bool, str]:
    """Return (build_cuda, reason)."""
    import torch
    from torch.utils import cpp_extension

    mode = _env_flag("SPARSEBERT_BUILD_CUDA", "auto")
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"SPARSEBERT_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    if mode == "0":
        return False, "SPARSEBERT_BUILD_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = _cuda_toolkit_root(cpp_extension.CUDA_HOME)
    if cuda_home is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    else:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home
    if problems:
        if mode == "1":
            raise SystemExit("SPARSEBERT_BUILD_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
        return False, "auto: " + "; ".join(problems)
    _add_wheel_cuda_headers(cuda_home)
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {cuda_home}"


def _schema_fingerprint() -> str:
    """The fingerprint of sparsebert/ops.py's op schemas (sparsebert/schema.py), embedded in
    the library."""
    return _package_file("schema").source_fingerprint(os.path.join(ROOT, "sparsebert", "ops.py"))


def _extension():
    import torch
    from torch.utils import cpp_extension

    debug = _switch("SPARSEBERT_DEBUG")
    build_cuda, reason = _cuda_decision()
    _log(f"CUDA kernels: {'on' if build_cuda else 'off'} ({reason})")

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-fopenmp"]
    schemas = _schema_fingerprint()
    _log(f"op schemas: {schemas}")
    define_macros = [("SPARSEBERT_SCHEMA_FINGERPRINT", f'"{schemas}"')]
    nvcc_flags = []

    if build_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch_list and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list = DEFAULT_ARCH_LIST
            _log(f"no GPU visible and TORCH_CUDA_ARCH_LIST unset: defaulting to {DEFAULT_ARCH_LIST!r}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("SPARSEBERT_WITH_CUDA", "1"))
        define_macros.append(("SPARSEBERT_CUDA_ARCH_LIST", f'"{arch_list or "native"}"'))
        define_macros.append(("SPARSEBERT_CUDA_VERSION", f'"{torch.version.cuda}"'))
        if _package_file("switches").arch_list_has_sm90a(arch_list):
            # sm_90a code (wgmma): the opt-in wgmma forward can run (masked_attention_wgmma.cu)
            define_macros.append(("SPARSEBERT_HAS_SM90A", "1"))
        # The C++ standard is left to torch (2.14 headers need C++20).
        nvcc_flags = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + [
            "--expt-relaxed-constexpr",
        ]
        if _switch("SPARSEBERT_PTXAS_VERBOSE"):
            nvcc_flags.append("-Xptxas=-v")
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension

    return ext_cls(
        name="sparsebert._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


def main() -> None:
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
