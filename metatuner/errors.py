"""The one exception type users see.

Raise :class:`MetatunerError` for anything a user can fix (bad input, missing file, impossible
setting). The CLI prints its message as a single line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class MetatunerError(Exception):
    """A problem with the user's input or environment, explained in one line."""
