"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a missing file, a malformed ε, an unknown
architecture). The CLI turns it into one line on stderr and a non-zero exit; the library raises it
wherever such a mistake is detected, so that library users get the same clear message.

Messages speak of the caller's *arguments*, written in backquotes: ```arch```. The library shows the
argument's name (``pass arch=NAME``); the command line shows the flag (``pass --arch=NAME``), through
:meth:`UserError.as_flags`. So a library message never quotes a CLI flag, and the CLI never re-words
the library by hand.
"""

from __future__ import annotations

import re

_ARGUMENT = re.compile(r"`([a-z][a-z0-9_]*)`")


class UserError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""

    def __str__(self) -> str:
        return _ARGUMENT.sub(r"\1", super().__str__())

    def as_flags(self) -> str:
        """The message with each ```argument``` written as the command line's ``--argument`` flag."""
        return _ARGUMENT.sub(lambda m: "--" + m.group(1).replace("_", "-"), super().__str__())
