"""``modelserving state serve``: the live model state (the jobs' serving statistics) over HTTP.

Kafka access (bootstrap servers, state topic, SASL/TLS) comes from the job settings, as for
every command that talks to Kafka: ``--bootstrap-servers``, ``--state-topic``,
``--security-protocol``, ``--sasl-mechanism``, ``--sasl-username``, ``--ssl-cafile``,
``--kafka-properties-file`` anywhere on the line, or their ``MODELSERVING_*`` variables.
``--bootstrap`` and ``--topic`` remain as short forms of the first two.
"""
from __future__ import annotations

import argparse
import logging

from modelserving.cli.common import settings_of, with_settings

DEFAULT_HOST = "127.0.0.1"   # kept equal to modelserving.state.service's (checked by a test):
DEFAULT_PORT = 5500          # importing it here would load werkzeug for every command

DESCRIPTION = """\
Serve the compacted state topic (ModelStats messages published by the jobs) over HTTP:
  /models               every data type, per job: current model and statistics (JSON)
  /state/<data type>    one data type (JSON; 404 naming the known ones)
  /history/<data type>  the last models of a data type, newest first (JSON; ?limit=N)
  /health               200 once caught up with the topic, 503 before (JSON)
  /repository           the model repository (repository topic): latest version per data type
  /repository/<data type>   every version with each job's decisions (JSON; ?version=V)
  /                     a page showing the same, refreshing itself (?refresh=SECONDS)

Kafka settings are job settings: --bootstrap-servers, --state-topic, --repository-topic,
--security-protocol,
--sasl-mechanism, --sasl-username, --ssl-cafile, --kafka-properties-file (or MODELSERVING_*
variables; the SASL password only as MODELSERVING_SASL_PASSWORD or in the properties file).
"""


def cmd_serve(args) -> int:
    from modelserving.state.service import StateService

    overrides = {}
    if args.bootstrap:
        overrides["bootstrap_servers"] = args.bootstrap
    if args.topic:
        overrides["state_topic"] = args.topic
    settings = settings_of(args, **overrides)
    if not getattr(args, "verbose", False):  # a line per HTTP request (two a second per open page) is noise
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    service = StateService(settings, host=args.host, port=args.port)
    service.bind()
    protocol = service.feed.consumer_config["security_protocol"]
    print(f"state service on {service.url}/ (topic {settings.state_topic} on "
          f"{settings.bootstrap_servers}, {protocol}); Ctrl-C stops it", flush=True)
    service.serve_forever()
    return 0


def register(subparsers) -> None:
    """Add ``state serve`` to the ``modelserving`` parser."""
    state = subparsers.add_parser("state", help="the live model state: serving statistics over HTTP")
    actions = state.add_subparsers(dest="state_action", required=True)
    serve = actions.add_parser("serve", help="serve the state topic over HTTP (JSON and a page)",
                               description=DESCRIPTION,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--bootstrap", help="short for --bootstrap-servers")
    serve.add_argument("--topic", help="short for --state-topic")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help="address to bind; 0.0.0.0 for every interface (default: %(default)s)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    serve.set_defaults(func=cmd_serve)
    with_settings(serve)
