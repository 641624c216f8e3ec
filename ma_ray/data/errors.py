"""The one error type of the data layer.

``DataError`` subclasses ``ValueError`` (like ``ConfigError``) so a CLI that already reports
``ValueError`` as "bad input" reports data problems the same way. Every message is one line
and names what is wrong: the ``data.path`` (or file) and the rule it breaks.
"""

from __future__ import annotations


class DataError(ValueError):
    """Training data the package cannot use; the message is one line naming the path and rule."""
