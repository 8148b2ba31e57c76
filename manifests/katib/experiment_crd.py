"""Katib's Experiment CRD with a schema, built from the openAPI definitions of Katib's Go types.

Why: Katib's own CRD (manifests/v1beta1/components/crd/experiment.yaml) has no schema, only
``x-kubernetes-preserve-unknown-fields: true`` at the root, so the API server accepts any field and the
controller's decoder silently drops those its types lack (a ``feasibleSpace.distribution`` on Katib
0.17, for one). The types' openAPI definitions (``pkg/apis/v1beta1/swagger.json`` at a release tag) are
what the controller reads; this inlines them into a CRD that ``python -m recsys.manifest_schemas
reduce-crd`` ships (manifests/crds/README.md). Kubernetes types the definitions only name (the trial
template's ``trialSpec``, metadata, a custom collector's container) are left open: the trial's Job is
validated against the Kubernetes schemas instead.

    python manifests/katib/experiment_crd.py swagger.json > build/katib-experiment-crd.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

OPEN_OBJECT = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
# definitions swagger.json references but does not hold (Kubernetes' own types)
EXTERNAL = {
    "v1.ObjectMeta": OPEN_OBJECT,
    "v1.ListMeta": OPEN_OBJECT,
    "v1.unstructured.Unstructured": OPEN_OBJECT,
    "v1.Container": OPEN_OBJECT,
    "v1.HTTPGetAction": OPEN_OBJECT,
    "v1.Time": {"type": "string", "format": "date-time"},
}


def experiment_crd(swagger: dict[str, Any]) -> dict[str, Any]:
    """A CRD for ``kubeflow.org/v1beta1`` ``Experiment`` whose schema is ``v1beta1.Experiment`` inlined."""
    definitions = swagger["definitions"]

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/definitions/")
            target = EXTERNAL.get(name) or inline(definitions[name])
            return target | {k: inline(v) for k, v in node.items() if k not in ("$ref", "default")}
        return {key: inline(value) for key, value in node.items() if key != "default"}

    schema = inline(definitions["v1beta1.Experiment"])
    version = {"name": "v1beta1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "experiments.kubeflow.org"},
        "spec": {
            "group": "kubeflow.org",
            "scope": "Namespaced",
            "names": {"kind": "Experiment", "plural": "experiments", "singular": "experiment"},
            "versions": [version],
        },
    }


if __name__ == "__main__":
    yaml.safe_dump(experiment_crd(json.loads(Path(sys.argv[1]).read_text())), sys.stdout, sort_keys=False)
