"""Matching and numeric proof, below both the fused modules (mbkernels.nn) and the planner (mbkernels.planner).

What a module tree says a fusable computation is, never by class or model names, before a probe proves it:
layers      depthwise convs, foldable BatchNorms, activation modules, what runs next in a plain Sequential
padding     the zero padding a Conv2d (or a subclass's forward) computes
se          squeeze-excite modules
block       inverted-residual blocks
dataflow    what a forward's code computes: its torch.fx capture and the patterns in it
probe       the numeric proof every swap needs (float64 stock vs float32 fused on a random probe), tolerances,
            randomize_batchnorm
"""
from .probe import VERIFY_TOLERANCE, Proof, probe_copy, probe_input, prove, randomize_batchnorm, relative_error

__all__ = ["VERIFY_TOLERANCE", "Proof", "probe_copy", "probe_input", "prove", "randomize_batchnorm",
           "relative_error"]
