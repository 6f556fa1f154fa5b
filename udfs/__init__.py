"""Scoring code shared by the Flink jobs. Nothing under ``udfs.runtimes`` imports pyflink."""
