"""The one error type of the data layer.

``DataError`` is a ``MaRayError`` (like ``ConfigError``), so the CLI reports data problems as
bad input: one line, exit 2. Every message names what is wrong: the ``data.path`` (or file)
and the rule it breaks.
"""

from __future__ import annotations

from ma_ray.errors import MaRayError


class DataError(MaRayError, ValueError):
    """Training data the package cannot use; the message is one line naming the path and rule."""
