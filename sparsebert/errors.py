"""One base class for errors a user can fix (bad input, bad files, bad config).

The `sparsebert` command catches SparsebertError and prints its message on one line with exit
status 2 (a traceback only with --debug or SPARSEBERT_DEBUG on: 1/true/yes/on). Subclasses also
derive from ValueError, so callers that caught ValueError before keep working.
"""

from __future__ import annotations


class SparsebertError(ValueError):
    """A user-fixable error: the message names the argument or file and what to do."""


class ConfigError(SparsebertError):
    """A bad configuration value (flag, config field, option)."""


class RunDirError(SparsebertError):
    """A run directory that is missing, holds another run, or has damaged files."""


class WriteError(RunDirError, OSError):
    """A file that could not be written (a full disk, a read-only folder), named in the message;
    an OSError as well, so callers that handle those keep doing so (errno: the cause's)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ExtensionUnavailable(ImportError):
    """The native extension (sparsebert._C) could not be loaded and SPARSEBERT_REQUIRE_EXT is on;
    the message says why and how to build it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler's time limit, `docker stop`), handled as Ctrl-C is: the
    command's cleanup runs (a sweep stops its workers and records that it was interrupted)."""
