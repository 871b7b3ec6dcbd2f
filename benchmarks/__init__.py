"""Microbenchmarks of minorsft against eager PyTorch, torch.compile, Liger-Kernel and TRL.

Run from the repository root as modules, e.g. ``python -m benchmarks.bench_logprobs``;
``python -m benchmarks.plot`` turns the JSON results into a table and plots.
"""
