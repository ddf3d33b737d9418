"""Every error a user can fix, in one small module that imports nothing else from `lab`.

Each message is one line naming the bad value and what would be valid; the CLI prints it as
`lab: error: ...` and exits with code 2, without a traceback. They subclass `ValueError`, so code
that already catches bad values catches these too.
"""

from __future__ import annotations


class LabError(ValueError):
    """Base of the lab's one-line, user-fixable errors."""


class ConfigError(LabError):
    """A config value, key, or file is wrong; the message is one line saying what and what is valid."""


class RunError(LabError):
    """A run folder, run name or run file is missing, damaged or not allowed; one clear line."""


class RunLockedError(RunError):
    """Another process is writing this run folder (it holds the folder's writer lock); the message names its PID."""


class StorageError(LabError, OSError):
    """The filesystem refused a read or write (a file in the way, read-only, full disk); one line naming the path.
    Also an `OSError`, so code that handles filesystem trouble catches it."""
