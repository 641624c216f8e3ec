"""The one base class of errors that mean "the input or the cluster is wrong", not "ma-ray has a
bug": the CLI prints them as one line and exits 2, or 1 for those that are also a
``RuntimeError`` (a run that failed while it ran: ``JobFailed``, a worker call that failed, a
cluster that cannot hold the job). Kept free of heavy imports so the CLI can catch them without
loading torch or Ray.
"""


class MaRayError(Exception):
    """Bad input or an unusable environment; the message is one line naming what is wrong."""


class JobFailed(MaRayError, RuntimeError):
    """A run failed while it ran; the message is one line naming where and why."""



def one_line(message: object) -> str:
    """``message`` with its whitespace, newlines included, collapsed: how the terminal shows it."""
    return " ".join(str(message).split())


def message_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """``Type: first line``: how a failure is named in one line."""
    return f"{type(exc).__name__}: {message_line(exc)}"


def is_int(value: object) -> bool:
    """An integer and not a bool (``True`` is an ``int`` to Python, never to ma-ray's input)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
