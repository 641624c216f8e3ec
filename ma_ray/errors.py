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
