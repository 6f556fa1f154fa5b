"""Packaging for the Flink model-serving jobs.

Pins: only what must resolve together (apache-flink 2.2.1 with Beam's protobuf < 6, hence
tensorflow-cpu 2.19 and onnx < 1.18). ``requirements.lock`` freezes one
tested resolution for reproducible environments; ``./dev`` installs with it.
"""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    """Generate the protobuf modules before packaging, so they never live in git."""

    def run(self):
        from protos.build import generate

        generate(force=True)
        super().run()


setup(
    name="flink-modelserving",
    version="0.1.0",
    description="Serve ML models (TensorFlow, PMML, ONNX) on Kafka streams with Apache Flink",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["protos", "udfs", "udfs.*", "jobs", "jobs.*",
                                    "modelserving", "modelserving.*"]),
    package_data={"protos": ["*.proto"], "modelserving.local": ["*.json"],
                  "modelserving.state": ["*.html"]},
    cmdclass={"build_py": BuildWithProtos},
    install_requires=[
        "apache-flink==2.2.1",
        "tensorflow-cpu~=2.19.0",
        "protobuf>=5.26,<6",
        "grpcio-tools>=1.62,<1.72",
        "onnx>=1.16,<1.18",
        "onnxruntime>=1.17",
        "pypmml>=1.5,<1.6",
        "kafka-python>=2.2",
        "scikit-learn>=1.3",
        "skl2onnx>=1.16",
        "numpy",
        "werkzeug>=3.0,<4",
        "psutil>=5.9",
        "pyyaml>=6",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2"],
                    # modelserving bench: plots, profiles of the Python worker, the bytewax peer
                    # (Quix Streams pins an older confluent-kafka: .venv-peers, made by ./dev)
                    "bench": ["matplotlib>=3.8", "py-spy>=0.3", "confluent-kafka>=2.3",
                              "bytewax[kafka]>=0.21,<0.22"]},
    entry_points={
        "console_scripts": ["modelserving=modelserving.cli:main"],
        # command groups of `modelserving` that live outside the CLI package register here
        "modelserving.commands": ["bench=modelserving.bench.command:register"],
    },
)
