"""The `sparsebert` command while it imports the package.

The console script (`sparsebert.cli:main`) and `python -m sparsebert` import the whole package
before cli.main runs, and importing it reads environment switches and may warn (native kernels
missing) or fail (SPARSEBERT_REQUIRE_EXT on, kernels missing). For the command, these come out
as its own errors and warnings do: a bad switch value or a required extension that cannot load is
one line `sparsebert: error: ...` with exit status 2, a warning is one line `sparsebert:
warning: ...`, and a Ctrl-C while importing prints "interrupted" with status 130 (tracebacks and
Python's warning format with --debug or SPARSEBERT_DEBUG on). For any other program importing
sparsebert, nothing changes. Standard library only: it runs before the rest of the package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator

from sparsebert.errors import ExtensionUnavailable
from sparsebert.switches import check_switches, env_switch

COMMAND_MODULES = ("sparsebert", "sparsebert.cli", "sparsebert.__main__")


def is_command() -> bool:
    """Whether this process is the `sparsebert` command: the console script, or `python -m`
    of the package (during the package's import runpy has set sys.argv[0] to "-m", so the
    interpreter's own command line, sys.orig_argv, tells)."""
    if sys.argv and os.path.basename(sys.argv[0]) in ("sparsebert", "sparsebert.exe"):
        return True
    orig = list(getattr(sys, "orig_argv", ()))
    return any(arg == "-m" and module in COMMAND_MODULES for arg, module in zip(orig, orig[1:])) \
        or any(arg in {f"-m{module}" for module in COMMAND_MODULES} for arg in orig)


def debug_switch_on() -> bool:
    """SPARSEBERT_DEBUG on (1/true/yes/on; sparsebert.switches). A value that is neither on nor
    off counts as off here: the command refuses it as a bad switch."""
    try:
        return env_switch("SPARSEBERT_DEBUG")
    except ValueError:
        return False


def debug_on() -> bool:
    """--debug on the command line (before it is parsed) or SPARSEBERT_DEBUG on."""
    return "--debug" in sys.argv[1:] or debug_switch_on()


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the commands print it: `sparsebert: warning: ...` (with --debug or
    SPARSEBERT_DEBUG, Python's own format, with the file and line)."""
    return f"sparsebert: warning: {message}\n"


def _exit(message: str, status: int, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    raise SystemExit(status)


@contextlib.contextmanager
def package_import() -> Iterator[None]:
    """Around the package's imports (sparsebert/__init__.py): for the command, the switches
    checked first and the import's warnings, errors and Ctrl-C reported as the command does;
    for anything else, nothing."""
    if not is_command():
        yield
        return
    debug = debug_on()
    try:
        check_switches()
    except ValueError as error:
        _exit(f"sparsebert: error: {error}", 2, debug=False)
    previous_format = warnings.formatwarning
    if not debug:
        warnings.formatwarning = one_line_warning
    try:
        yield
    except ExtensionUnavailable as error:
        _exit(f"sparsebert: error: {error}", 2, debug)
    except KeyboardInterrupt:
        _exit("interrupted", 128 + signal.SIGINT, debug)
    finally:
        warnings.formatwarning = previous_format
