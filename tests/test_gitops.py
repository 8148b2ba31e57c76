"""A GitOps sync must not revert what the pipeline's deploy task patches on the InferenceService.

Flux: the object carries kustomize-controller's apply policy ``IfNotPresent`` (created when absent, else
left alone). Argo CD: manifests/gitops/argocd-application.yaml ignores the patched fields in diff and sync.
Its jq expressions are run with the real ``jq`` (the language Argo CD's ``jqPathExpressions`` use) on the
rendered object before and after the rollout's own patches (recsys/isvc_rollout.py applied by
``jsonpatch``): with the selected fields deleted, both must be equal, and each expression must select
something, so a renamed container or env var shows up here rather than as a sync reverting a model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from components import deploy
from recsys import isvc_rollout as rollout
from recsys.manifest_schemas import validate_objects
from tests.conftest import REPO_ROOT

APPLICATION = REPO_ROOT / "manifests" / "gitops" / "argocd-application.yaml"
needs_jq = pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")


def _isvc() -> dict[str, Any]:
    text = (REPO_ROOT / "manifests" / "base" / "inferenceservice.yaml").read_text()
    return yaml.safe_load(text)


def _application() -> dict[str, Any]:
    return yaml.safe_load(APPLICATION.read_text())


def _jq(program: str, document: dict[str, Any]) -> Any:
    done = subprocess.run(
        ["jq", "-c", program], input=json.dumps(document), capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def _patched_by_a_rollout(isvc: dict[str, Any]) -> dict[str, Any]:
    ops = rollout.model_patch(isvc, "r.example/recsys-serving:9.9.9", "s3://recsys-models/bundles/v9/", 10)
    return jsonpatch.apply_patch(isvc, ops)


def test_flux_creates_the_inference_service_but_never_reverts_it():
    assert _isvc()["metadata"]["annotations"][deploy.FLUX_APPLY_POLICY] == "IfNotPresent"


def test_the_argo_cd_application_matches_argo_cds_crd_and_targets_the_overlay():
    application = _application()
    assert validate_objects([application]) == [
        "Application/recsys-production: ok (CRD schema argoproj.io_applications.json)"
    ]
    assert (REPO_ROOT / application["spec"]["source"]["path"] / "kustomization.yaml").is_file()
    assert "RespectIgnoreDifferences=true" in application["spec"]["syncPolicy"]["syncOptions"]


@needs_jq
def test_argo_cd_ignores_exactly_what_a_rollout_patches():
    isvc = _isvc()
    patched = _patched_by_a_rollout(isvc)
    assert patched != isvc
    (ignored,) = _application()["spec"]["ignoreDifferences"]
    assert (ignored["group"], ignored["kind"]) == ("serving.kserve.io", "InferenceService")
    assert ignored["name"] == isvc["metadata"]["name"]
    expressions = ignored["jqPathExpressions"]
    for expression in expressions:
        if "canaryTrafficPercent" not in expression:  # the base has no canary; a rollout adds it
            assert _jq(expression, isvc) != [], f"{expression} selects nothing in the rendered object"
    program = "del(" + ", ".join(f"({e})" for e in expressions) + ")"
    assert _jq(program, isvc) == _jq(program, patched)  # nothing else differs: no sync reverts it
    other = json.loads(json.dumps(patched))
    other["spec"]["predictor"]["maxReplicas"] = 99  # a change made in git is still synced
    assert _jq(program, other) != _jq(program, patched)


def test_the_flux_policy_is_the_one_kustomize_controller_reads():
    """kustomize-controller sets IfNotPresentSelector to {"<its API group>/ssa": "IfNotPresent"}
    (internal/controller/kustomization_controller.go; api/v1 kustomization_types.go IfNotPresentValue)."""
    group, _, key = deploy.FLUX_APPLY_POLICY.partition("/")
    assert (group, key) == ("kustomize.toolkit.fluxcd.io", "ssa")
    assert Path(APPLICATION).read_text().count("kustomize.toolkit.fluxcd.io/ssa: IfNotPresent") == 1
