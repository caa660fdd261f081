"""Matching and numeric proof, below both the fused modules (mbkernels.nn) and the planner (mbkernels.planner).

structural  what a module tree says a fusable computation is (depthwise runs, squeeze-excite, blocks)
probe       the numeric proof every swap needs (float64 stock vs float32 fused on a random probe), tolerances,
            randomize_batchnorm
"""
from .probe import VERIFY_TOLERANCE, Proof, probe_copy, probe_input, prove, randomize_batchnorm, relative_error

__all__ = ["VERIFY_TOLERANCE", "Proof", "probe_copy", "probe_input", "prove", "randomize_batchnorm",
           "relative_error"]
