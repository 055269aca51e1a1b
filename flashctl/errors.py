"""User-facing errors: the CLI prints them as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Bad input (file, field, argument). The message names what is wrong and where."""

    exit_code = 1
