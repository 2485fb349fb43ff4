"""An opt-in cache of tokenized GLUE splits for a process that fine-tunes many times on the same
data (a sweep's workers: the full model, then every re-fine-tune of a task x seed). Entries are
keyed by what determines them (task, split, data folder, train subset, tokenizer, max length)
and kept in a small LRU. Off unless `enable()` was called, so plain `finetune` is unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

_entries: OrderedDict[Hashable, Any] | None = None
_size = 0


def enable(size: int = 8) -> None:
    """Keep the last `size` tokenized splits in this process (idempotent)."""
    global _entries, _size
    if _entries is None:
        _entries = OrderedDict()
    _size = size


def disable() -> None:
    """Drop the cache and stop caching."""
    global _entries
    _entries = None


def tokenizer_key(tokenizer) -> tuple:
    """What identifies a tokenizer's output: its source, class, vocabulary size and settings
    (the options it was loaded with, e.g. do_lower_case, and its truncation side)."""
    settings = sorted((str(name), repr(value))
                      for name, value in (getattr(tokenizer, "init_kwargs", None) or {}).items())
    return (getattr(tokenizer, "name_or_path", None), type(tokenizer).__name__, len(tokenizer),
            repr(settings), getattr(tokenizer, "truncation_side", None))


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
    """build() once per key while enabled (its result is shared: callers only read it)."""
    if _entries is None:
        return build()
    if key in _entries:
        _entries.move_to_end(key)
        return _entries[key]
    value = _entries[key] = build()
    while len(_entries) > _size:
        _entries.popitem(last=False)
    return value
