"""The model lifecycle as plain Python (no Flink): digests, the validation gate, drift,
canary and shadow routing, and the model repository's entries and views.

Nothing is imported here: ``udfs.serving`` and the joins may import any of the submodules
without pulling in the others (or importing them in a circle).
"""
