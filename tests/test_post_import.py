"""sparsebert.hf.post_import: hooks that run right after a module is imported."""

from __future__ import annotations

import importlib
import inspect
import sys

from sparsebert.hf.post_import import when_imported


def test_hook_runs_after_import_and_at_once_when_loaded(tmp_path, monkeypatch):
    (tmp_path / "sb_probe_module.py").write_text("VALUE = 41\n\ndef answer():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sb_probe_module", raising=False)
    seen = []
    when_imported("sb_probe_module", lambda m: seen.append(("first", m.VALUE)))
    when_imported("sb_probe_module", lambda m: seen.append(("second", m.answer())))
    assert seen == []  # nothing imported yet
    module = importlib.import_module("sb_probe_module")
    assert seen == [("first", 41), ("second", 42)]  # after the module body ran, in order
    assert "return 42" in inspect.getsource(module.answer)  # the real loader still serves source
    when_imported("sb_probe_module", lambda m: seen.append(("loaded", m.VALUE)))
    assert seen[-1] == ("loaded", 41)  # already imported: at once
    importlib.reload(module)
    assert len(seen) == 3  # once per hook, not on every load
