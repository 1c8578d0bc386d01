"""The one exception type a user sees for bad input."""


class UserError(ValueError):
  """Bad input from the user: a one-line message naming the file, line or field and the fix.

  The CLI prints these without a traceback; everything else is a bug and keeps its traceback.
  """
