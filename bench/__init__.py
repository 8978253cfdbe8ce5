"""Benchmarks: kernels against this machine's memory-bandwidth limit, measured in the same run."""
