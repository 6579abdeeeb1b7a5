"""Torch twins of npformer models: oracles for the tests, baselines for the benchmarks."""
