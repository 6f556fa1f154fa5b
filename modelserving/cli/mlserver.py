"""``modelserving mlserver start|stop|status``: a local MLServer serving the demo wine model
(Open Inference Protocol V2) for EXTERNAL models; see ``modelserving.local.mlserver``."""
from __future__ import annotations

from pathlib import Path

from modelserving.cli.common import settings_of, with_settings
from modelserving.paths import var_dir

DEFAULT_PORT = 8085   # kept equal to modelserving.local.mlserver's (importing it loads psutil)


def cmd_mlserver(args) -> int:
    from modelserving.local.mlserver import LocalMLServer

    server = LocalMLServer(Path(args.workdir), port=args.port)
    if args.action == "start":
        server.start()
        print(f"MLServer serving '{server.model_name}' at {server.url} (V2: POST "
              f"{server.url}/v2/models/{server.model_name}/infer; files in {server.workdir}); "
              f"stop with: modelserving mlserver stop")
    elif args.action == "stop":
        print("MLServer stopped" if server.stop() else "MLServer was not running")
    elif args.action == "measure":
        return measure(server, args)
    elif args.action == "publish":
        return publish(server, args)
    else:
        ready = server.is_running() and server.is_ready()
        print(f"MLServer at {server.url}: {'serving ' + server.model_name if ready else 'not serving'}")
        return 0 if ready else 1
    return 0


def publish(server, args) -> int:
    """Publish the EXTERNAL descriptor of the served demo model to the models topic."""
    from modelserving.kafka import clients

    settings = settings_of(args)
    descriptor = server.descriptor(args.data_type, url=args.url, timeout_ms=args.timeout_ms)
    producer = clients.producer(settings)
    try:
        clients.publish_model(producer, settings.models_topic, descriptor)
    finally:
        producer.close()
    print(f"published EXTERNAL model '{descriptor.name}' for data type '{descriptor.dataType}' "
          f"(served at {descriptor.server.url}) to {settings.models_topic}; the job needs "
          f"--model-servers {descriptor.server.url}")
    return 0


def measure(server, args) -> int:
    """One job subtask's view of the server: a bounded call per batch, timed. With --hung,
    the same against a server that accepts connections and never answers."""
    import json
    import socket

    from modelserving.errors import ToolError

    if args.hung:
        hung = socket.create_server(("127.0.0.1", 0))   # accepts (backlog), never answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
    elif not server.is_ready():
        raise ToolError(f"MLServer does not serve {server.model_name} at {server.url}: "
                        f"modelserving mlserver start")
    else:
        hung, url = None, server.url
    from modelserving.local.mlserver import measure_calls

    try:
        figures = measure_calls(server.descriptor(url=url), url, args.batches, args.rows,
                                args.timeout_ms or 1000)
    finally:
        if hung is not None:
            hung.close()
    print(json.dumps({"server": url, "hung": args.hung, **figures}, indent=2))
    return 0


def register(sub) -> None:
    mlserver = sub.add_parser("mlserver", help="a local MLServer serving the demo model "
                              "(for EXTERNAL models)")
    mlserver.add_argument("action", choices=["start", "stop", "status", "publish", "measure"],
                          help="publish: the EXTERNAL descriptor of the served model (job "
                               "settings name the topic); measure: time calls as a job's "
                               "subtask makes them")
    mlserver.add_argument("--workdir", default=str(var_dir() / "mlserver"))
    mlserver.add_argument("--port", type=int, default=DEFAULT_PORT,
                          help="HTTP port on 127.0.0.1; gRPC and metrics take the next two "
                               "(default: %(default)s)")
    mlserver.add_argument("--data-type", default="", help="publish: default wine-cultivar")
    mlserver.add_argument("--url", default="", help="publish: the server URL in the descriptor "
                          "(default: this server's)")
    mlserver.add_argument("--batches", type=int, default=500, help="measure: calls to make")
    mlserver.add_argument("--rows", type=int, default=64, help="measure: records per call")
    mlserver.add_argument("--timeout-ms", type=int, default=0,
                          help="publish: the descriptor's timeout (0: the job's); measure: the "
                               "per-call timeout (0: 1000)")
    mlserver.add_argument("--hung", action="store_true",
                          help="measure against a server that never answers instead")
    mlserver.set_defaults(func=cmd_mlserver)
    with_settings(mlserver)
