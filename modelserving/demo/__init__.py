"""The demo: its data and models (``training``, ``pmml_export``) and the demo run (``run``)."""
