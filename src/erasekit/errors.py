"""The error type for mistakes a user can fix: the CLI prints its message on one line, no traceback."""


class ErasekitError(Exception):
    """Bad input or an unusable model/file; the message says what and how to fix it."""
