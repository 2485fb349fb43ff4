"""The fingerprint of the op schemas, which ties a built `sparsebert._C` to its sources.

The extension registers its kernels into the torch dispatcher while it is loaded (static
initialisers), against the schemas sparsebert/ops.py defined just before. A `_C` built from
other schemas (sources updated, extension not rebuilt) would make torch abort the whole
process during that load. So the build embeds the fingerprint of the `_lib.define(...)`
schemas of ops.py in the shared library, as the bytes MARKER + fingerprint, and
sparsebert._extension compares it with the sources' fingerprint before loading `_C`.

Standard library only: setup.py and CMakeLists.txt run this file by path (`python
sparsebert/schema.py sparsebert/ops.py` prints the fingerprint) before anything is built.
"""

from __future__ import annotations

import ast
import hashlib
import mmap
import os
import sys

MARKER = b"sparsebert-op-schemas:"
FINGERPRINT_LENGTH = 16  # hex digits


def schemas_in(source: str) -> list[str]:
    """The schema strings of the `_lib.define("...")` calls in Python source, in order."""
    schemas = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "define" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "_lib" and len(node.args) == 1
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            schemas.append((node.lineno, node.args[0].value))
    return [schema for _, schema in sorted(schemas)]


def fingerprint(schemas: list[str]) -> str:
    """A short hex digest of the schemas (order included)."""
    return hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:FINGERPRINT_LENGTH]


def source_fingerprint(ops_path: str | os.PathLike) -> str:
    """The fingerprint of the schemas defined in ops.py at `ops_path`; ValueError if none."""
    with open(ops_path, encoding="utf-8") as file:
        schemas = schemas_in(file.read())
    if not schemas:
        raise ValueError(f"{ops_path}: no _lib.define(\"...\") schemas found")
    return fingerprint(schemas)


def built_fingerprint(library: str | os.PathLike) -> str | None:
    """The fingerprint embedded in a built `_C` shared library, or None when it has none."""
    with open(library, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(MARKER)
        if start < 0:
            return None
        start += len(MARKER)
        value = data[start:start + FINGERPRINT_LENGTH].decode("ascii", errors="replace")
    return value if len(value) == FINGERPRINT_LENGTH else None


if __name__ == "__main__":  # the build's entry point: print the fingerprint of ops.py
    print(source_fingerprint(sys.argv[1] if len(sys.argv) > 1 else
                             os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops.py")))
