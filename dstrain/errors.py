"""The one exception type users see.

A `DstrainError` carries a message written for the person at the terminal: what is wrong,
where (file, line, field), and what to do about it. The CLI prints it as one paragraph and
exits non-zero without a traceback. Internal invariants use `assert`, never this class.
"""


class DstrainError(Exception):
    """A problem with the user's input or environment that they can fix.

    `exit_code` is 1 for invalid input and 2 for usage errors (click's convention).
    """

    def __init__(self, message: str, *, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
