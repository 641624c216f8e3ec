"""The one base class of errors that mean "the input or the cluster is wrong", not "ma-ray has a
bug": the CLI prints them as one line and exits 2. Kept free of heavy imports so the CLI can
catch them without loading torch or Ray.
"""


class MaRayError(Exception):
    """Bad input or an unusable environment; the message is one line naming what is wrong."""
