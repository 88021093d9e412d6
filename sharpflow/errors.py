"""The errors a user can act on: one family, one base class.

Every stage raises a subclass of :class:`SharpflowError` for a problem the user can fix (a bad
config, a missing or corrupt file, a dataset that cannot be fetched). ``sharpflow <stage>`` prints
such an error as one line naming the problem and exits with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class SharpflowError(RuntimeError):
    """A problem the user can act on (a missing, corrupt or unwritable file, a bad input)."""


class ConfigError(SharpflowError, ValueError):
    """A configuration problem; the message names the file and the field path."""


class DataError(SharpflowError, ValueError):
    """A dataset that cannot be prepared or loaded; the message says what to do."""


__all__ = ["ConfigError", "DataError", "SharpflowError"]
