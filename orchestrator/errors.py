"""Errors the user can fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input or state the user can correct; the message names the problem and the fix."""
