"""The Flink side of serving, by concern: ``keys`` (key selectors, Flink's key groups),
``batching`` (micro-batches in keyed state), ``metrics``, ``publishing`` (statistics to the
state topic) and ``joins`` (the keyed and the broadcast join built from them)."""
