"""What the command groups share: job settings from the command line."""
from __future__ import annotations

import argparse

from jobs.settings import Settings


def with_settings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let ``parser``'s command take job settings (``--bootstrap-servers``...) anywhere on
    the line; ``settings_of`` reads them."""
    parser.set_defaults(takes_settings=True)
    return parser


def settings_of(args, **overrides) -> Settings:
    """The settings of this invocation: its job-setting options, then ``MODELSERVING_*``."""
    return Settings.from_sources(getattr(args, "job_args", None) or [], **overrides)
