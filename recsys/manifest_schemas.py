"""Schema validation of Kubernetes objects before they reach a cluster.

- Core kinds (ServiceAccount, Role, NetworkPolicy, Namespace, ...) against the Kubernetes openAPI
  schemas of :data:`KUBERNETES_VERSION` with ``kubernetes-validate`` (strict: an unknown field fails).
- Custom resources against the openAPI schema of their CRD, shipped in ``manifests/crds/`` (see its
  README for sources and licences): KServe's ``InferenceService``, the Kubeflow Training Operator's
  ``PyTorchJob``, the Kubeflow Spark Operator's ``SparkApplication``, ... Like ``kubectl``'s strict
  field validation, an unknown field fails wherever the CRD does not preserve unknown fields.

The shipped CRD schemas are reduced by :func:`reduce_crd` (descriptions dropped, every repeated subtree
stored once under ``$defs`` and referenced), which validates exactly as the upstream schema does.

CLI::

    python -m recsys.manifest_schemas validate manifests/overlays/production  # kubectl kustomize first
    python -m recsys.manifest_schemas validate rendered.yaml
    python -m recsys.manifest_schemas reduce-crd UPSTREAM_CRD.yaml --output manifests/crds/NAME.json \\
        --source URL
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CRDS_DIR = PROJECT_ROOT / "manifests" / "crds"
# the oldest Kubernetes the stack supports: Knative Serving 1.21's minimum (manifests/README.md)
KUBERNETES_VERSION = "1.33.0"
# (apiVersion, kind) -> the reduced CRD schema in manifests/crds/
CUSTOM_RESOURCES = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.json",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.json",
    ("argoproj.io/v1alpha1", "Application"): "argoproj.io_applications.json",
    ("kubeflow.org/v1beta1", "Experiment"): "kubeflow.org_experiments.json",
    ("sparkoperator.k8s.io/v1beta2", "SparkApplication"): "sparkoperator.k8s.io_sparkapplications.json",
}
_MIN_SHARED_BYTES = 200  # smaller repeated subtrees stay inline
# keywords whose value maps names to schemas: the map itself is never shared, its schemas are
_SCHEMA_MAPS = ("properties", "patternProperties")


class ManifestError(ValueError):
    """An object does not match its schema; the message names the object and every offending path."""


def validate_objects(objects: list[dict[str, Any]]) -> list[str]:
    """Validate every object; returns ``"<Kind>/<name>: ok (<schema>)"`` lines, raises on the first
    invalid object with all of its errors."""
    return [validate_object(obj) for obj in objects]


def validate_object(obj: dict[str, Any]) -> str:
    """Validate one object against its schema; returns a one-line report, raises :class:`ManifestError`."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if key in CUSTOM_RESOURCES:
        errors = custom_resource_errors(obj)
        if errors:
            raise ManifestError(f"{name} does not match its CRD schema:\n  " + "\n  ".join(errors))
        return f"{name}: ok (CRD schema {CUSTOM_RESOURCES[key]})"
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise ManifestError(f"{name}: no schema for {key[0]} {key[1]} (not core, no CRD shipped)") from exc
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise ManifestError(f"{name}: {path}: {exc.message}") from exc
    return f"{name}: ok (Kubernetes {KUBERNETES_VERSION})"


def custom_resource_errors(obj: dict[str, Any]) -> list[str]:
    """Every violation of the object's CRD schema, as ``path: message`` (empty when valid)."""
    import jsonschema

    schema = crd_schema(obj["apiVersion"], obj["kind"])
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]


@cache
def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    """The shipped schema of a custom resource, made strict and JSON-Schema-evaluable."""
    shipped = json.loads((CRDS_DIR / CUSTOM_RESOURCES[(api_version, kind)]).read_text())
    return _strict(shipped["schema"])


def reduce_crd(crd: dict[str, Any], source: str) -> dict[str, Any]:
    """The served storage version's openAPI v3 schema of ``crd``, without descriptions, every repeated
    subtree stored once under ``$defs``; with the CRD's identity and ``source`` for the record."""
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = _without_descriptions(version["schema"]["openAPIV3Schema"])
    counts: dict[str, int] = {}
    _count_subtrees(schema, counts)
    defs: dict[str, Any] = {}

    def members(node: dict[str, Any]) -> dict[str, Any]:
        """A schema's keywords, each value reduced; a name -> schema map is kept, its schemas reduced."""
        return {
            key: {name: shared(child) for name, child in value.items()}
            if key in _SCHEMA_MAPS and isinstance(value, dict)
            else shared(value)
            for key, value in node.items()
        }

    def shared(node: Any, root: bool = False) -> Any:
        if isinstance(node, list):
            return [shared(item) for item in node]
        if not isinstance(node, dict):
            return node
        digest = _digest(node)
        if not root and counts[digest] > 1 and len(json.dumps(node)) >= _MIN_SHARED_BYTES:
            if digest not in defs:
                defs[digest] = {}
                defs[digest] = members(node)
            return {"$ref": f"#/$defs/{digest}"}
        return members(node)

    reduced = shared(schema, root=True)
    reduced["$defs"] = defs
    return {
        "crd": crd["metadata"]["name"],
        "group": crd["spec"]["group"],
        "version": version["name"],
        "kind": crd["spec"]["names"]["kind"],
        "source": source,
        "schema": reduced,
    }


def render_kustomization(path: str | Path, kubectl: str | None = None) -> list[dict[str, Any]]:
    """``kubectl kustomize path`` as a list of objects."""
    kubectl = kubectl or shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl is needed to render a kustomization (kubectl kustomize)")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ManifestError(f"kubectl kustomize {path}: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 structural schema -> JSON Schema as the API server applies it: ``nullable`` admits
    null, and an object with ``properties`` rejects unknown fields unless it preserves them."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        for value in node.values():
            walk(value)
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        if node.pop("nullable", False) and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]

    walk(schema)
    # metadata is the API server's business (ObjectMeta): the CRD schema leaves it open
    schema.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
    return schema


def _without_descriptions(node: Any, names: bool = False) -> Any:
    """``node`` without its ``description`` keywords; in a name -> schema map (``names``) a field called
    ``description`` is a field, and stays (Katib's ``trialParameters[].description``)."""
    if isinstance(node, dict):
        return {
            key: _without_descriptions(value, names=not names and key in _SCHEMA_MAPS)
            for key, value in node.items()
            if names or key != "description"
        }
    if isinstance(node, list):
        return [_without_descriptions(item) for item in node]
    return node


def _count_subtrees(node: Any, counts: dict[str, int]) -> None:
    if isinstance(node, dict):
        digest = _digest(node)
        counts[digest] = counts.get(digest, 0) + 1
        for value in node.values():
            _count_subtrees(value, counts)
    elif isinstance(node, list):
        for item in node:
            _count_subtrees(item, counts)


def _digest(node: Any) -> str:
    return hashlib.sha256(json.dumps(node, sort_keys=True).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.manifest_schemas", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="validate a kustomization directory or YAML files")
    check.add_argument("paths", nargs="+", type=Path)
    reduce = commands.add_parser("reduce-crd", help="ship an upstream CRD's schema (manifests/crds/)")
    reduce.add_argument("crd", type=Path)
    reduce.add_argument("--output", type=Path, required=True)
    reduce.add_argument("--source", required=True, help="where the CRD came from (URL at a commit)")
    args = parser.parse_args(argv)
    if args.command == "reduce-crd":
        reduced = reduce_crd(yaml.safe_load(args.crd.read_text()), args.source)
        args.output.write_text(json.dumps(reduced, indent=1, sort_keys=True) + "\n")
        print(f"{args.output}: {args.output.stat().st_size} bytes, {len(reduced['schema']['$defs'])} shared")
        return 0
    failed = False
    for path in args.paths:
        if path.is_dir():
            objects = render_kustomization(path)
        else:
            objects = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for obj in objects:
            try:
                print(f"{path}: {validate_object(obj)}")
            except ManifestError as exc:
                print(f"{path}: INVALID {exc}", file=sys.stderr)
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
