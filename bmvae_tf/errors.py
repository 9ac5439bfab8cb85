"""The one exception type for bad user input.

The CLI (`trainers/cli.py`, `handle_error`) turns a UserError, an OSError (a full disk, a read-only
or missing path, permissions) and TensorFlow's I/O and data-loss errors into a one-line message
and exit code 2 (SPEC section 1); divergence is exit 1; anything else is a bug: its traceback is
printed with a request to report it, exit 3. Messages name the file, record or key and what is
wrong.
"""


class UserError(ValueError):
    """Bad input from the user: a file, a record, a config key or a command-line value."""


class RunInUse(UserError):
    """Another `bmvae train` holds the run directory's lock."""


class NoSpaceLeft(UserError):
    """A write failed for lack of space; the message is "no space left on <path>"."""

    def __init__(self, path: str):
        super().__init__(f"no space left on {path}")
        self.path = path


# errno -> how the one-line message describes it (the path comes first).
_OS_ERRORS = {
    "ENOSPC": "no space left on device",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EROFS": "read-only file system",
    "EISDIR": "is a directory, not a file",
    "ENOTDIR": "a path component is a file, not a directory",
    "EEXIST": "already exists",
    "ENOENT": "no such file or directory",
    "EDQUOT": "disk quota exceeded",
}


def os_error_line(error: OSError) -> str:
    """One line for an OSError: "no space left on <path>" for a full disk, else
    "<path>: <what is wrong>" (the path the error names, when it names one)."""
    import errno

    name = errno.errorcode.get(error.errno or -1, "")
    path = error.filename if error.filename is not None else None
    if name == "ENOSPC":
        return f"no space left on {path or 'the device'}"
    what = _OS_ERRORS.get(name) or error.strerror or str(error)
    if error.filename2 is not None:
        return f"{path} -> {error.filename2}: {what}"
    return f"{path}: {what}" if path is not None else what
