"""CLI commands for a standalone Flink cluster (filled in by the cluster work)."""


def register(subparsers) -> None:
    """Add the cluster subcommands to the ``modelserving`` parser."""
