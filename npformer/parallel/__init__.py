"""Parallel training simulated exactly on N ranks in one process."""
