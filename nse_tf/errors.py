"""The one base of every user-facing error: what a command prints as one `error:` line.

A library raises a subclass of `NSEError` (bad input, a refused configuration, data that
is not prepared, a run directory in use, …) with a message that names what is wrong and
how to fix it; `cli.run` catches this one type (plus the OS's own FileNotFoundError and
PermissionError, and FloatingPointError for a diverged run) and prints it without a
traceback, exit status 2. Subclassing ValueError keeps `except ValueError` callers working.
"""


class NSEError(ValueError):
  """A user-facing error (see the module docstring)."""


class UsageError(NSEError):
  """A bad flag value or combination."""
