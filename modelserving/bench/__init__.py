"""Benchmarks of the serving jobs against a plain loop, a pass-through job and in-process scoring."""
