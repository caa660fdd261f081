"""Backends: one module per backend and op (see mbkernels.dispatch for the contract)."""
