"""What runs in the Flink Python workers: the serving core (``records``, ``models``,
``serving``, ``statistics``, ``errors``), the model runtimes (``runtimes``, no pyflink) and
the Flink functions (``flink``)."""
