"""gpufleet's benchmark: python -m bench (see docs/benchmark.md)."""
