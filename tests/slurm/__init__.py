"""Helpers for tests that need a real (one-node) SLURM cluster."""
