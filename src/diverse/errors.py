"""Errors a user can fix.

Every :class:`UserError` reaches the command line as one line on stderr and
exit code 2 (see :mod:`diverse.app.cli`). Its message names the offending value
and what is allowed.
"""


class UserError(Exception):
    """Bad input: an unknown key, a wrong type, a missing file, an unknown name."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the message names epoch and step."""
