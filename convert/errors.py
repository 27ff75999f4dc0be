"""The one exception type of the converter."""


class ConversionError(ValueError):
    """Bad input (a source, a destination, an option, a checkpoint's content) that the user can act on.

    The CLI prints its message as one line, without a traceback, so the message names the file, key or argument and
    the expected and found values.
    """


def first_line(error: BaseException) -> str:
    """The first line of the message of an exception's root cause (library errors, e.g. tensorstore's, wrap the
    useful message and run to many lines)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
