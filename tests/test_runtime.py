"""Provenance recorded in results: the git SHA names this package's own checkout only."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sparsebert.runtime import _head

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _repo(root: Path) -> str:
    """A repository at `root` with one commit; returns its HEAD."""
    root.mkdir(parents=True)
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "README").write_text("x\n")
    subprocess.run(["git", "-C", str(root), "add", "README"], check=True)
    subprocess.run(["git", *env, "-C", str(root), "commit", "-qm", "one"], check=True)
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_sha_of_the_package_checkout_only(tmp_path):
    """A source checkout (<repo>/sparsebert) gives its HEAD; a copy installed into a project's
    .venv inside another repository gives None, not that project's HEAD."""
    checkout = tmp_path / "sparsebert-src"
    head = _repo(checkout)
    (checkout / "sparsebert").mkdir()
    assert _head(checkout / "sparsebert", package=checkout / "sparsebert") == head
    project = tmp_path / "project"
    _repo(project)
    installed = project / ".venv" / "lib" / "site-packages" / "sparsebert"
    installed.mkdir(parents=True)
    assert _head(installed, package=installed) is None
    assert _head(installed) is not None  # an explicit path: that repository's HEAD
    (checkout / "README").write_text("changed\n")
    assert _head(checkout / "sparsebert", package=checkout / "sparsebert") == head + "-dirty"


def test_versions_name_the_code_that_runs():
    """The sparsebert version is the imported package's (a checkout on PYTHONPATH is not the
    installed copy's version)."""
    import sparsebert  # noqa: PLC0415
    from sparsebert.runtime import versions  # noqa: PLC0415

    assert versions()["sparsebert"] == sparsebert.__version__
