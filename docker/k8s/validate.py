"""Validate the Kubernetes manifests of docker/k8s against their schemas, with no cluster.

    .venv-containers/bin/python docker/k8s/validate.py --operator-api-jar JAR FILE...

(``tests/containers/test_manifests.py`` fetches the jar and runs this.) Every document of
every file is checked strictly: an unknown field is an error, as with
``kubectl apply --validate=strict``.

- Kubernetes' own kinds (Namespace, ConfigMap, Secret, PersistentVolumeClaim...): against
  Kubernetes' OpenAPI schemas of the newest version ``kubernetes-validate`` ships.
- ``FlinkDeployment``: against the ``openAPIV3Schema`` of the operator's CRD, read from the
  operator's API jar (``flink-kubernetes-operator-api`` on Maven Central; its newest
  release there is 1.10.0). That CRD predates Flink 2.x, so its ``flinkVersion`` enum gets
  the values of operator 1.13 (``v2_0``, ``v2_1``, ``v2_2``); nothing else is changed.
- ``PodMonitor``: against the prometheus-operator models of
  ``cloudcoil-models-prometheus-operator`` (generated from its CRDs); a field the model
  does not know is an error.
- ``Kustomization`` files are read by kustomize, not the API server: only their resource
  list is checked (every file named exists).

Prints one line per document, ``ok <file> <kind>/<name> (<schema>)``, or the errors; exit 1
if any document fails.
"""
from __future__ import annotations

import argparse
import copy
import sys
import zipfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from cloudcoil.models.prometheus_operator import v1 as prometheus_v1

CRD_ENTRY = "META-INF/fabric8/flinkdeployments.flink.apache.org-v1.yml"
FLINK_2_VERSIONS = ("v2_0", "v2_1", "v2_2")


def strict(schema: dict) -> dict:
    """``schema`` with unknown fields refused wherever the CRD lists the fields of an object
    (what the API server's strict field validation does)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


def flink_deployment_schema(operator_api_jar: Path, version: str = "v1beta1") -> dict:
    with zipfile.ZipFile(operator_api_jar) as jar:
        crd = yaml.safe_load(jar.read(CRD_ENTRY))
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = served["schema"]["openAPIV3Schema"]
    versions = schema["properties"]["spec"]["properties"]["flinkVersion"]["enum"]
    versions.extend(v for v in FLINK_2_VERSIONS if v not in versions)
    # the fields every object has, which a CRD leaves to the API server
    schema["properties"].update({
        "apiVersion": {"type": "string", "enum": [f"{crd['spec']['group']}/{version}"]},
        "kind": {"type": "string", "enum": [crd["spec"]["names"]["kind"]]},
        "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}})
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata"})
    return strict(schema)


def errors_of_flink_deployment(doc: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(document)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def errors_of_pod_monitor(doc: dict) -> list[str]:
    try:
        model = prometheus_v1.PodMonitor.model_validate(doc)
    except ValueError as exc:  # pydantic's ValidationError, one line per error
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    known = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"{path}: unknown field" for path in unknown_fields(doc, known)]


def unknown_fields(given, known, path: str = "") -> list[str]:
    """Paths of ``given`` that the model's dump ``known`` dropped."""
    if isinstance(given, dict) and isinstance(known, dict):
        found = []
        for key, value in given.items():
            where = f"{path}.{key}" if path else key
            found += (unknown_fields(value, known[key], where) if key in known else [where])
        return found
    if isinstance(given, list) and isinstance(known, list):
        return [p for i, (g, k) in enumerate(zip(given, known))
                for p in unknown_fields(g, k, f"{path}[{i}]")]
    return []


def errors_of_kubernetes_kind(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(map(str, exc.path)) or "(document)"
        return [f"{where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"no schema: {exc}"]
    return []


def errors_of_kustomization(doc: dict, directory: Path) -> list[str]:
    return [f"resources: {name} does not exist" for name in doc.get("resources", [])
            if not (directory / name).exists()]


def validate(files: list[Path], operator_api_jar: Path) -> list[str]:
    """One line per document, ``ok ...`` or ``FAIL ...: <error>``."""
    flink_schema = flink_deployment_schema(operator_api_jar)
    k8s = kubernetes_validate.latest_version()
    lines = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            kind = doc.get("kind", "?")
            name = f"{kind}/{(doc.get('metadata') or {}).get('name', '?')}"
            if kind == "FlinkDeployment":
                schema = f"operator CRD from {operator_api_jar.name} + {', '.join(FLINK_2_VERSIONS)}"
                errors = errors_of_flink_deployment(doc, flink_schema)
            elif kind == "PodMonitor":
                schema = "prometheus-operator monitoring.coreos.com/v1 models"
                errors = errors_of_pod_monitor(doc)
            elif kind == "Kustomization":
                name, schema = "Kustomization", "its resource list"
                errors = errors_of_kustomization(doc, path.parent)
            else:
                schema = f"Kubernetes {k8s}"
                errors = errors_of_kubernetes_kind(doc)
            if errors:
                lines += [f"FAIL {path.name} {name}: {error}" for error in errors]
            else:
                lines.append(f"ok {path.name} {name} ({schema})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operator-api-jar", type=Path, required=True,
                        help="flink-kubernetes-operator-api jar (holds the CRDs)")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    lines = validate(args.files, args.operator_api_jar)
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
