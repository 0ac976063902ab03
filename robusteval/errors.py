"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a missing file, a malformed ε, an unknown
architecture). The CLI turns it into one line on stderr and a non-zero exit; the library raises it
wherever such a mistake is detected, so that library users get the same clear message.
"""


class UserError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""
