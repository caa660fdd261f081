"""Backends: one module per backend (see mbkernels.dispatch for the contract)."""
