"""The errors that end a command with a line for the user instead of a traceback (README: exit codes)."""


class UserError(Exception):
    """Bad input or state the user can correct; the message names the problem and the fix. Exit status 2."""


class RunStopped(Exception):
    """The run cannot go on (a finetuning job failed, the budget is spent); everything done so far is stored.

    Exit status 1: the run is resumable once the cause is dealt with."""
