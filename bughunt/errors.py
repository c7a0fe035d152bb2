"""The one exception type for problems a user can cause and fix (bad paths, bad configs, bad flags)."""


class BughuntError(Exception):
    """A user-facing error: the message says what was wrong and what to do about it.

    The CLI prints it without a traceback and exits with code 2.
    """
