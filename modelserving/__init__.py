"""The tooling around the Flink jobs; never shipped to a TaskManager, never imported by them.

``cli`` (the ``modelserving`` command, one module per command group), ``kafka`` (clients,
topic admin, failures as one line), ``local`` (a local broker and Flink cluster, jars,
processes, waiting, HTTP), ``state`` (the live model state service), ``demo`` (demo data,
models and the demo run), ``bench`` (the benchmark, a plug-in command); ``errors`` and
``paths`` are shared by all of them.
"""
