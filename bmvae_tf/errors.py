"""The one exception type for bad user input.

The CLI turns a UserError into a one-line message and exit code 2 (SPEC section 1); anything else
is a bug and keeps its traceback. Messages name the file, record or key and what is wrong.
"""


class UserError(ValueError):
    """Bad input from the user: a file, a record, a config key or a command-line value."""
