"""Run a function right after a module is imported, without importing it now.

`import sparsebert` registers its transformers attention backend this way: transformers is heavy
(seconds to import), and many sparsebert commands never need it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable
from types import ModuleType

Hook = Callable[[ModuleType], None]


class _ThenRun(importlib.abc.Loader):
    """Wraps a module's loader: executes the module, then the hooks waiting for it."""

    def __init__(self, loader: importlib.abc.Loader, hooks: list[Hook]) -> None:
        self._loader, self._hooks = loader, hooks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for hook in self._hooks:
            hook(module)

    def __getattr__(self, name: str):  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """First in sys.meta_path while hooks wait: hands out the real spec with a wrapped loader."""

    def __init__(self) -> None:
        self.waiting: dict[str, list[Hook]] = {}
        self.lock = threading.Lock()

    def find_spec(self, fullname, path, target=None):
        with self.lock:
            hooks = self.waiting.pop(fullname, None)
        if hooks is None:
            return None
        spec = importlib.util.find_spec(fullname)  # the other finders: this one no longer matches
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            with self.lock:
                self.waiting[fullname] = hooks  # not importable that way: wait for a later import
            return spec
        spec.loader = _ThenRun(spec.loader, hooks)
        return spec


_FINDER = _Finder()


def when_imported(name: str, hook: Hook) -> None:
    """Call hook(module) once module `name` is imported: now if it already is, else right after
    its import finishes."""
    module = sys.modules.get(name)
    if module is not None:
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            # Another thread is still importing it: wait for that import to finish (Python's
            # per-module import lock; in the importing thread itself this returns at once).
            module = importlib.import_module(name)
        hook(module)
        return
    with _FINDER.lock:
        _FINDER.waiting.setdefault(name, []).append(hook)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
