"""Verification: a distributed layout against the single-process reference (the oracle).

``run`` is ``ma-ray verify``; ``reference_trainer`` steps the reference model with the workers'
optimizer rules; ``compare`` defines the relative errors the report and the tests use.
"""

from ma_ray.verify.run import TOLERANCE, exact_settings, parse_rebalances, steps_to_verify, verify

__all__ = ["TOLERANCE", "exact_settings", "parse_rebalances", "steps_to_verify", "verify"]
