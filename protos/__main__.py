"""``python -m protos``: (re)generate the Python modules from the .proto files."""
from protos import generate

for path in generate(force=True):
    print(f"generated {path}")
