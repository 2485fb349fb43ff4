"""Attribute overrides for the length of a `with` block, that may end in any order.

    with override_attributes(module, head_gate_override=gate, head_gate_live=None):
        ...  # module.head_gate_override is gate here

A block restores on exit what the attributes held when it began. Blocks on one object usually
nest (the last one begun ends first); when they overlap instead (two threads each overriding
the same module, each block ending after the other began), restoring "what I saw on entry"
would put back the other block's value and leave it in place after every block has ended.
Here each object keeps its open blocks in order: a block that ends while a later block also
set an attribute hands its saved value on to that block instead of writing it, so the object
holds its original values once every block has ended, whatever the order. (While blocks of
several threads overlap, each thread's calls see the latest value: overrides are per object,
not per thread; nn.DataParallel's worker threads rely on seeing the caller's.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCK = threading.Lock()
# id(object) -> its open blocks, oldest first; each block: {attribute: value to restore}. Keyed
# by identity, not by the object's own hash and equality (a module may define __eq__); an
# entry lives while a block holds its object, and goes with the last of them.
_OPEN: dict[int, list[dict[str, object]]] = {}


@contextlib.contextmanager
def override_attributes(obj: object, **values: object) -> Iterator[None]:
    """Within the block, obj.<name> = value for each keyword; restored on exit (also on error)
    to what it held when the block began, or handed on to a later overlapping block. While
    torch.compile traces, a plain save and restore (what the traced graph can hold)."""
    if torch.compiler.is_compiling():
        saved = {name: getattr(obj, name) for name in values}
        for name, value in values.items():
            setattr(obj, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(obj, name, value)
        return
    with _LOCK:
        saved = {name: getattr(obj, name) for name in values}
        blocks = _OPEN.setdefault(id(obj), [])
        blocks.append(saved)
        done = []
        try:
            for name, value in values.items():
                setattr(obj, name, value)
                done.append(name)
        except BaseException:  # e.g. a property that refuses the value: the block never began
            for name in reversed(done):
                setattr(obj, name, saved[name])
            blocks.pop()  # (its own: appended above, under the lock)
            if not blocks:
                del _OPEN[id(obj)]
            raise
    try:
        yield
    finally:
        with _LOCK:
            blocks = _OPEN[id(obj)]
            index = next(i for i, block in enumerate(blocks) if block is saved)
            for name, value in saved.items():
                heir = next((block for block in blocks[index + 1:] if name in block), None)
                if heir is None:  # no later block set it: the value before this block returns
                    setattr(obj, name, value)
                else:  # the later block's value stays; it restores this block's saved one
                    heir[name] = value
            del blocks[index]
            if not blocks:
                del _OPEN[id(obj)]


def outside_blocks(obj: object, state: dict[str, object],
                   names: tuple[str, ...]) -> dict[str, object]:
    """`state` (a copy of obj.__dict__, as __getstate__ returns it) with each of `names` that an
    open block set on `obj` back at its value before the oldest such block began: what a copy or
    pickle made inside blocks should take, since no block will ever restore the copy. Names no
    open block set keep their values (one assigned directly stays)."""
    restored: set[str] = set()
    with _LOCK:
        for block in _OPEN.get(id(obj), []):  # oldest first: it holds the value before them all
            for name, value in block.items():
                if name in names and name in state and name not in restored:
                    state[name] = value
                    restored.add(name)
    return state
