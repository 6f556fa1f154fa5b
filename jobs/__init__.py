"""Flink jobs: each is a ``build_pipeline(...)`` function plus a thin ``main``."""
