"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class MixqError(Exception):
    """Bad input or an impossible request, explained in one line for the user."""
