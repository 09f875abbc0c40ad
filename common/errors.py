"""The one exception type for bad input that a user can fix."""


class CohortInputError(ValueError):
    """Raised for input a user got wrong; its message names the problem and the fix.

    The CLI turns it into one line on stderr and exit code 2, so it must never be
    raised for a bug in Cohort itself.
    """
