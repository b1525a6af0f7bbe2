"""The one exception type users see.

Raise :class:`MetatunerError` for anything a user can fix (bad input, missing file, impossible
setting). The CLI prints its message as a single line and exits with status 2; anything else is a
bug and keeps its traceback.
"""


class MetatunerError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The message speaks to a caller of the Python API (argument names, never command-line flags). Where the
    command line names the fix differently, ``cli`` is the same message in its terms (``--out`` for
    ``out_dir``); the CLI prints that one.

    Args:
        message: the line a Python caller sees.
        cli: the line the command line prints instead (default: ``message``).
    """

    def __init__(self, message: str, cli: str | None = None):
        super().__init__(message)
        self.cli = cli if cli is not None else message


def folder_taken(folder) -> MetatunerError:
    """The error for a results folder that exists and is not empty."""
    return MetatunerError(f"results folder {folder} already exists; choose another out_dir or remove it",
                          cli=f"results folder {folder} already exists; choose another --out or remove it")
