"""Throughput benchmarks of mbkernels against eager PyTorch, torch.compile and the memory-bandwidth floor.

Run with `pytest benchmarks/` (results land in benchmarks/results/), then `python -m benchmarks.report`.
"""
