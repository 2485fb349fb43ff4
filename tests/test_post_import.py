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


def test_hook_waits_for_an_import_another_thread_has_under_way(tmp_path, monkeypatch):
    """`import sparsebert` while another thread imports transformers: the module is in
    sys.modules but only partly executed; the hook runs once the import has finished (it read a
    missing attribute before, and the backend was never registered)."""
    import threading  # noqa: PLC0415

    started = threading.Event()
    (tmp_path / "sb_slow_module.py").write_text(
        "import time\nimport sb_slow_gate\nsb_slow_gate.started.set()\ntime.sleep(0.5)\n"
        "VALUE = 7\n")
    (tmp_path / "sb_slow_gate.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("sb_slow_module", "sb_slow_gate"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import sb_slow_gate  # noqa: PLC0415

    monkeypatch.setattr(sb_slow_gate, "started", started, raising=False)
    importer = threading.Thread(target=importlib.import_module, args=("sb_slow_module",))
    importer.start()
    assert started.wait(30)  # the module is under way in the other thread
    seen = []
    when_imported("sb_slow_module", lambda m: seen.append(m.VALUE))
    importer.join(30)
    assert seen == [7]
