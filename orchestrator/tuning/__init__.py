"""Sweeps on Ray Tune and multi-seed aggregation."""
