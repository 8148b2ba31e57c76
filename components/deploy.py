"""Deploy step: create or update the KServe InferenceService that serves a bundle, and wait for Ready.

The InferenceService is built with the KServe SDK's models (:func:`build_inference_service`), so the
pipeline's deploy task, ``--dry-run`` and the committed kustomize base (``manifests/base``) all come from
the same function and cannot drift apart. The predictor is a custom container (``kserve-container``,
the serving image running ``python -m serving``); the bundle travels as ``STORAGE_URI``, which KServe's
storage initializer downloads into ``/mnt/models`` before the server starts.

Live mode talks to the cluster through ``KServeClient``. An absent InferenceService is created whole from
the rendered object and waited for. An existing one is rolled out to (recsys/isvc_rollout.py): only the
model (the serving image and ``STORAGE_URI``) is patched, so the replicas, resources and autoscaling an
overlay or an operator set stay; in Knative mode the new revision first takes
``deploy.canary_traffic_percent`` of the traffic, and is promoted to all of it once Ready and healthy for
``deploy.canary_soak_s``, or rolled back (previous image and ``STORAGE_URI``) when it fails or is not
healthy within ``deploy.timeout_s``; a rollback then fails the step, after ``on_rollback`` (the pipeline
restores the promote pointer). With ``deploy.guardrails.enabled`` the soak also judges what the canary
does to users (recsys/guardrails.py: error rate, p99 latency, empty answers from Prometheus, served CTR
from the request log, canary version against champion version): a breach rolls back at once, naming the
guardrail, its value and threshold; promotion needs them all within thresholds when the soak ends (too
little data then: ``on_insufficient_data``); an unreachable Prometheus rolls back, named.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from recsys import artifact_layout as layout
from recsys import guardrails
from recsys import isvc_rollout as rollout
from recsys.artifact_io import write_text
from recsys.config import ConfigError, DeployConfig, PromoteConfig
from recsys.kube_namespace import NamespaceError, own_namespace
from recsys.object_store import ObjectStoreError, open_store, read_pointer
from recsys.step_contract import STEPS

CONTRACT = STEPS["deploy"]

log = logging.getLogger(__name__)

SERVING_CONTAINER = rollout.SERVING_CONTAINER  # the name KServe expects for a custom predictor
MODEL_DIR = "/mnt/models"  # where the storage initializer puts the content of STORAGE_URI
FEAST_CONFIG_DIR = "/etc/feast"  # the production feature_store.yaml, mounted from a ConfigMap
FEAST_YAML_ENV = "FEAST_FS_YAML_FILE_PATH"  # Feast's own name for "the feature_store.yaml to use"
# feature_store.production.yaml's `project: ${FEAST_PROJECT}`: a key of the same ConfigMap, one per
# environment, so dev and production keep separate objects in a shared registry
FEAST_PROJECT_ENV = "FEAST_PROJECT"
API_VERSION = "serving.kserve.io/v1beta1"
RENDERED_HEADER = (
    "# Rendered by components/deploy.py from params.yaml (deploy section); do not edit by hand.\n"
    "# Regenerate: python -m components.deploy --dry-run --output <this file>\n"
)
# fluxcd/kustomize-controller internal/controller/kustomization_controller.go: objects annotated so are
# created when absent and otherwise left as they are (fluxcd/pkg ssa/manager_apply.go IfNotPresentSelector)
FLUX_APPLY_POLICY = "kustomize.toolkit.fluxcd.io/ssa"
_REMOTE_SCHEMES = ("s3", "gs", "pvc", "https", "http", "hf", "oci", "hdfs", "webhdfs")


class DeployError(RuntimeError):
    """The InferenceService could not be rendered, applied or made Ready; the message says which."""


def run(
    deploy: DeployConfig,
    image_tag: str,
    storage_uri: str | None = None,
    manifest_path: str | Path | None = None,
    dry_run: bool = False,
    kserve_client: Any = None,
    on_rollback: Callable[[str], None] | None = None,
    promote: PromoteConfig | None = None,
) -> str | None:
    """Render the InferenceService for ``storage_uri`` (default ``deploy.storage_uri``) and roll it out.

    The rendered YAML is written to ``manifest_path`` when given (in live mode too: a record of the desired
    model; on an existing service only its image and ``STORAGE_URI`` are applied). Returns the service URL,
    or None in dry-run mode, which never touches a cluster. ``on_rollback(reason)`` runs after a rollback.
    ``promote``: the store the pods poll for index refreshes and whose Secret they write the log with.
    """
    uri = resolve_storage_uri(storage_uri or deploy.storage_uri, allow_local=dry_run)
    # deploy.image_digest set (compile --images): the serving image by digest, else deploy.image_repo:tag
    isvc = build_inference_service(deploy, deploy.image(image_tag), uri, promote)
    if manifest_path is not None:
        write_text(RENDERED_HEADER + render_yaml(isvc), manifest_path)
        where = f"{deploy.namespace}/" if deploy.namespace else "(the overlay's namespace) "
        log.info("deploy: rendered %s%s to %s", where, deploy.isvc_name, manifest_path)
    if dry_run:
        return None
    # deploy.namespace null: the task's own namespace, i.e. the profile the run belongs to
    isvc.metadata.namespace = own_namespace(deploy.namespace, "deploy.namespace")
    api = (
        kserve_client
        if isinstance(kserve_client, InferenceServiceApi)
        else InferenceServiceApi(kserve_client)
    )
    return roll_out(isvc, deploy, api, on_rollback=on_rollback)


def build_inference_service(
    deploy: DeployConfig, image: str, storage_uri: str, promote: PromoteConfig | None = None
) -> Any:
    """The ``V1beta1InferenceService`` serving ``storage_uri`` with ``image`` (KServe SDK model).

    ``promote`` (the store bundles are promoted to): with ``deploy.index_swap`` the pods poll it for index
    refreshes, and its Secret's AWS_* keys (optional) let them read it and write the request log."""
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec

    port = deploy.http_port
    secrets = [
        k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name, optional=optional))
        for name, optional in ((deploy.feast_secret, None), (deploy.storage_secret, True))
    ]
    container = k8s.V1Container(
        name=SERVING_CONTAINER,
        image=image,
        args=["--model_dir", MODEL_DIR, "--http_port", str(port), *serving_args(deploy, promote)],
        ports=[k8s.V1ContainerPort(name="http1", container_port=port, protocol="TCP")],
        env=[
            k8s.V1EnvVar(name=rollout.STORAGE_URI_ENV, value=storage_uri),
            k8s.V1EnvVar(name=FEAST_YAML_ENV, value=f"{FEAST_CONFIG_DIR}/feature_store.yaml"),
            k8s.V1EnvVar(
                name=FEAST_PROJECT_ENV,
                value_from=k8s.V1EnvVarSource(
                    config_map_key_ref=k8s.V1ConfigMapKeySelector(
                        name=deploy.feast_config_map, key=FEAST_PROJECT_ENV
                    )
                ),
            ),
            k8s.V1EnvVar(name="FEAST_USAGE", value="False"),
            # the root filesystem is read-only: libraries that write under $HOME get the tmp volume
            k8s.V1EnvVar(name="HOME", value="/tmp"),
        ],
        env_from=secrets,
        resources=k8s.V1ResourceRequirements(
            requests=deploy.resources.requests(), limits=deploy.resources.limits()
        ),
        # the startup probe holds the other two off while the bundle loads and the item cache warms
        # (up to 5 minutes), so a slow start is not mistaken for a dead process and restarted
        startup_probe=_http_probe("/v2/health/ready", port, period_s=5, initial_delay_s=0, failures=60),
        readiness_probe=_http_probe("/v2/health/ready", port, period_s=5, initial_delay_s=0),
        liveness_probe=_http_probe("/v2/health/live", port, period_s=15, initial_delay_s=0),
        security_context=k8s.V1SecurityContext(
            run_as_non_root=True,
            run_as_user=deploy.run_as_user,
            run_as_group=deploy.run_as_user,
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        volume_mounts=[
            k8s.V1VolumeMount(name="feast-config", mount_path=FEAST_CONFIG_DIR, read_only=True),
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
        ],
    )
    predictor = V1beta1PredictorSpec(
        containers=[container],
        service_account_name=deploy.service_account,
        min_replicas=deploy.min_replicas,
        max_replicas=deploy.max_replicas,
        scale_metric=deploy.scale_metric,
        scale_target=deploy.scale_target,
        # a private registry's credentials (deploy.image_pull_secrets); none: the field is left out
        image_pull_secrets=[k8s.V1LocalObjectReference(name=name) for name in deploy.image_pull_secrets]
        or None,
        volumes=[
            k8s.V1Volume(
                name="feast-config", config_map=k8s.V1ConfigMapVolumeSource(name=deploy.feast_config_map)
            ),
            k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="1Gi")),
        ],
    )
    return V1beta1InferenceService(
        api_version=API_VERSION,
        kind="InferenceService",
        metadata=k8s.V1ObjectMeta(
            name=deploy.isvc_name,
            namespace=deploy.namespace,
            labels={
                "app.kubernetes.io/name": deploy.isvc_name,
                "app.kubernetes.io/component": "serving",
                "app.kubernetes.io/part-of": "recsys-kfp",
            },
            # Prometheus scrapes the app's own /metrics (serving/routes.py) on its HTTP port, in both
            # modes. KServe's "true" would point the pod's prometheus.io/port at queue-proxy (9091, or
            # 9088 with metric aggregation), which has no app metrics and no listener in Standard mode
            # (kserve pkg/webhook/admission/pod/metrics_aggregate_injector.go); "false" keeps ours. An
            # Istio sidecar moves them to its merged 15020 endpoint. prometheus.kserve.io/*: the app's
            # port/path for KServe's queue-proxy aggregation and OTel collector. Sources and ports:
            # manifests/base/serving-networkpolicy.yaml.
            annotations={
                "serving.kserve.io/enable-prometheus-scraping": "false",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(port),
                "prometheus.io/path": "/metrics",
                "prometheus.kserve.io/port": str(port),
                "prometheus.kserve.io/path": "/metrics",
                # the pipeline patches this object's model on every promotion: a GitOps sync must create
                # it, never revert it (Flux's apply policy; Argo CD: manifests/gitops/)
                FLUX_APPLY_POLICY: "IfNotPresent",
            },
        ),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )


def resolve_storage_uri(uri: str, allow_local: bool = False) -> str:
    """A URI KServe's storage initializer can fetch: KFP's ``minio://`` artifact URIs become ``s3://``.

    A local path (what ``kfp.local`` and DVC produce) is accepted only for a dry run, as ``file://``: no
    cluster can read it, so a live deploy of it fails here instead of in a crash-looping pod.
    """
    uri = uri.strip()
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme == "minio":
        return "s3://" + uri.split("://", 1)[1]
    if scheme in _REMOTE_SCHEMES:
        return uri
    if allow_local and (scheme == "file" or (not scheme and uri)):
        local = uri.split("://", 1)[1] if scheme else uri
        log.warning("deploy: %s is a local path; a cluster cannot fetch it (dry run only)", local)
        return Path(local).resolve().as_uri()
    raise DeployError(
        f"storage URI {uri!r}: KServe cannot fetch it; use one of "
        f"{', '.join(s + '://' for s in _REMOTE_SCHEMES)} (KFP's minio:// is mapped to s3://)"
    )


def roll_out(
    isvc: Any,
    deploy: DeployConfig,
    api: InferenceServiceApi,
    on_rollback: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    guardrail_query: guardrails.Query | None = None,
) -> str:
    """Create ``isvc`` when absent; else patch in its model as a canary, promote or roll back. The URL.

    ``guardrail_query``: how the guardrails ask Prometheus (default: ``deploy.guardrails.prometheus_url``)."""
    name, namespace = isvc.metadata.name, isvc.metadata.namespace
    where = f"InferenceService {namespace}/{name}"
    live = api.get(name, namespace)
    if live is None:
        created = api.create(isvc)
        generation = created.get("metadata", {}).get("generation", 1)
        log.info("deploy: created %s (generation %s)", where, generation)
        done, decision = _await(api, name, namespace, generation, None, None, deploy, 0.0, sleep, clock)
        if not done:
            if on_rollback is not None:  # it serves nothing: the promote pointer must not say otherwise
                on_rollback(decision.reason)
            raise DeployError(
                f"{where} was created but is not Ready after {deploy.timeout_s:.0f}s (deploy.timeout_s): "
                f"{decision.reason}; inspect it with `kubectl -n {namespace} describe isvc {name}`"
            )
        return _url(done, where)

    desired = rollout.model_fields(inference_service_to_dict(isvc))
    try:
        previous = rollout.model_fields(live)
    except rollout.RolloutError as exc:
        raise DeployError(f"{where}: {exc}; not the serving container this project deploys") from exc
    if (previous.image, previous.storage_uri) == (desired.image, desired.storage_uri):
        return _already_set(api, live, previous, deploy, where, sleep, clock)
    canary = rollout.canary_share(live, deploy.canary_traffic_percent)
    revision_before = rollout.revision_before(live)
    guard = None  # made before the patch: a configuration it refuses changes nothing on the cluster
    if canary is not None and deploy.guardrails.enabled:
        guard = _Guard(deploy.guardrails, desired.storage_uri, previous.storage_uri, guardrail_query)
    patched = api.json_patch(
        name, namespace, rollout.model_patch(live, desired.image, desired.storage_uri, canary)
    )
    generation = patched["metadata"]["generation"]
    log.info(
        "deploy: %s generation %s: %s, %s%s",
        where,
        generation,
        desired.image,
        desired.storage_uri,
        f" as a {canary}% canary" if canary is not None else "",
    )
    done, decision = _await(
        api,
        name,
        namespace,
        generation,
        revision_before,
        canary,
        deploy,
        deploy.canary_soak_s,
        sleep,
        clock,
        guard,
    )
    if done and canary is not None:
        log.info("deploy: promoting the canary: %s", decision.reason)
        done, decision = _promote(api, name, namespace, canary, deploy, sleep, clock)
    if done:
        log.info("deploy: %s is Ready with %s", where, desired.storage_uri)
        return _url(done, where)
    reason = decision.reason if decision.action == "rollback" else f"not healthy in time: {decision.reason}"
    _roll_back(api, api.get(name, namespace) or patched, previous, deploy, sleep, clock)
    log.error("deploy: rolled %s back to %s: %s", where, previous.storage_uri, reason)
    if on_rollback is not None:
        on_rollback(reason)
    raise DeployError(
        f"{where}: the rollout of {desired.storage_uri} was rolled back to {previous.storage_uri}: {reason}"
    )


def _already_set(
    api: InferenceServiceApi,
    live: dict[str, Any],
    fields: rollout.ModelFields,
    deploy: DeployConfig,
    where: str,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> str:
    """The service already has this model: done if it serves it; a canary of it left healthy by an
    interrupted run is promoted; anything else is for a person to look at (nothing here changed it)."""
    name, namespace = live["metadata"]["name"], live["metadata"]["namespace"]
    canary = fields.canary_traffic_percent
    workload = rollout.find_workload(live, api.get_workload)
    decision = rollout.canary_decision(live, live["metadata"].get("generation", 0), None, canary, workload)
    if decision.action == "promote" and canary is None:
        log.info("deploy: %s already serves %s", where, fields.storage_uri)
        return _url(live, where)
    if decision.action == "promote":
        log.info("deploy: %s has a healthy %s%% canary of %s: promoting", where, canary, fields.storage_uri)
        done, decision = _promote(api, name, namespace, canary, deploy, sleep, clock)
        if done:
            return _url(done, where)
    raise DeployError(
        f"{where} already has {fields.storage_uri} but is not healthy ({decision.reason}); nothing was "
        f"changed: inspect it with `kubectl -n {namespace} describe isvc {name}`"
    )


class InferenceServiceApi:
    """The calls a rollout makes: get, create and JSON-patch one InferenceService (KServe SDK client)."""

    def __init__(self, kserve_client: Any = None) -> None:
        if kserve_client is None:
            from kserve import KServeClient

            kserve_client = KServeClient()
        self.client = kserve_client

    def get(self, name: str, namespace: str) -> dict[str, Any] | None:
        """The InferenceService, or None when it does not exist (any other error is raised)."""
        from kserve.constants import constants

        try:
            return self.client.api_instance.get_namespaced_custom_object(
                constants.KSERVE_GROUP,
                constants.KSERVE_V1BETA1_VERSION,
                namespace,
                constants.KSERVE_PLURAL_INFERENCESERVICE,
                name,
            )
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            raise DeployError(
                f"{namespace}/{name}: InferenceService lookup failed: {exc.status} {exc.reason}"
            ) from exc

    def get_workload(self, ref: rollout.WorkloadRef) -> dict[str, Any] | None:
        """The Knative Service or Deployment KServe made for the predictor, or None when absent: readiness
        is read there, KServe's InferenceService status does not record it (recsys/isvc_rollout.py)."""
        try:
            return self.client.api_instance.get_namespaced_custom_object(
                ref.group, ref.version, ref.namespace, ref.plural, ref.name
            )
        except k8s.ApiException as exc:
            if exc.status == 404:
                return None
            where = f"{ref.namespace}/{ref.name} ({ref.plural}.{ref.group})"
            raise DeployError(f"{where}: lookup failed: {exc.status} {exc.reason}") from exc

    def create(self, isvc: Any) -> dict[str, Any]:
        try:
            return self.client.create(isvc, namespace=isvc.metadata.namespace)
        except RuntimeError as exc:  # the SDK wraps the API error (RBAC, admission webhook) in RuntimeError
            raise DeployError(
                f"InferenceService {isvc.metadata.namespace}/{isvc.metadata.name}: create failed: {exc}"
            ) from exc

    def json_patch(self, name: str, namespace: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        """RFC 6902 patch (the SDK's patch sends merge patches only, which replace whole lists)."""
        from kserve.constants import constants

        path = (
            f"/apis/{constants.KSERVE_GROUP}/{constants.KSERVE_V1BETA1_VERSION}/namespaces/{{namespace}}/"
            f"{constants.KSERVE_PLURAL_INFERENCESERVICE}/{{name}}"
        )
        try:
            return self.client.api_instance.api_client.call_api(
                path,
                "PATCH",
                path_params={"namespace": namespace, "name": name},
                header_params={"Accept": "application/json", "Content-Type": "application/json-patch+json"},
                body=ops,
                response_type="object",
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except k8s.ApiException as exc:  # 422: a test op failed (edited concurrently) or an invalid spec
            raise DeployError(
                f"InferenceService {namespace}/{name}: patch failed: {exc.status} {exc.reason} {exc.body}"
            ) from exc


def _await(
    api: InferenceServiceApi,
    name: str,
    namespace: str,
    generation: int,
    revision_before: str | None,
    canary: int | None,
    deploy: DeployConfig,
    soak_s: float,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
    guard: _Guard | None = None,
) -> tuple[dict[str, Any] | None, rollout.Decision]:
    """Poll until the decision is ``promote`` for ``soak_s`` in a row (returns the object), ``rollback``,
    or ``deploy.timeout_s`` passed (returns None and the last decision). ``guard``: the guardrails, asked
    every ``interval_s`` while the canary is Ready and once more when the soak ends (a breach or an
    unreachable Prometheus: ``rollback``)."""
    deadline = clock() + deploy.timeout_s
    interval = min(10.0, max(1.0, deploy.timeout_s / 60))
    if guard is not None:
        interval = min(interval, guard.config.interval_s)
    healthy_since = None
    while True:
        live = api.get(name, namespace) or {}
        workload = rollout.find_workload(live, api.get_workload)
        decision = rollout.canary_decision(live, generation, revision_before, canary, workload)
        log.info(
            "deploy: %s/%s generation %s: %s (%s)", namespace, name, generation, *vars(decision).values()
        )
        if decision.action == "rollback":
            return None, decision
        if decision.action == "promote":
            healthy_since = clock() if healthy_since is None else healthy_since
            soaked = clock() - healthy_since >= soak_s
            if guard is not None:
                judged = guard.judge(clock(), final=soaked)
                if judged is not None and judged.action == "rollback":
                    return None, judged
                if soaked and judged is not None:
                    return live, judged
            elif soaked:
                return live, decision
        else:
            healthy_since = None
        if clock() >= deadline:
            return None, decision
        sleep(interval)


class _Guard:
    """The guardrails of one canary: evaluated every ``interval_s`` during the soak and at its end."""

    def __init__(
        self,
        config: guardrails.GuardrailsConfig,
        canary_uri: str,
        champion_uri: str,
        query: guardrails.Query | None = None,
    ) -> None:
        try:
            canary, champion = guardrails.version_of(canary_uri), guardrails.version_of(champion_uri)
        except ValueError as exc:
            raise DeployError(f"deploy.guardrails: {exc}") from exc
        if canary == champion:
            raise DeployError(
                f"deploy.guardrails: the canary and the champion both serve bundle version {canary!r}; "
                "the guardrails compare versions and cannot tell them apart"
            )
        self.config, self.canary, self.champion, self.query = config, canary, champion, query
        self.since = datetime.now(UTC)  # the request log rows that count: those of this rollout
        self.last: float | None = None
        self.clicks = self._click_reader(config)

    @staticmethod
    def _click_reader(config: guardrails.GuardrailsConfig) -> guardrails.ParquetObjects | None:
        """One reader of the click feedback for the whole soak: each evaluation reads new files only."""
        uri = config.ctr.clicks_uri
        if not config.ctr.request_log_uri or not uri or (uri.endswith(".parquet") and "://" not in uri):
            return None
        return guardrails.ParquetObjects(uri)

    def judge(self, now: float, final: bool) -> rollout.Decision | None:
        """``rollback`` on a breach (or no Prometheus), ``promote`` at the end when every guardrail passed
        (or on_insufficient_data says so); None: nothing decided yet (not due, or still short of data)."""
        if not final and self.last is not None and now - self.last < self.config.interval_s:
            return None
        self.last = now
        try:
            verdict = guardrails.evaluate(
                self.config, self.canary, self.champion, self.since, self.query, self.clicks
            )
        except guardrails.GuardrailUnavailable as exc:
            return rollout.Decision("rollback", f"GuardrailUnavailable: {exc} (deploy.guardrails)")
        reason = f"canary {self.canary} vs champion {self.champion}: {verdict.reason()}"
        log.info("deploy: %s", reason)
        if verdict.status == "breach":
            return rollout.Decision("rollback", reason)
        if not final:
            return None
        if verdict.status == "pass" or self.config.on_insufficient_data == "promote":
            return rollout.Decision("promote", reason)
        return rollout.Decision("rollback", f"{reason} (deploy.guardrails.on_insufficient_data: rollback)")


def _promote(
    api: InferenceServiceApi,
    name: str,
    namespace: str,
    canary: int,
    deploy: DeployConfig,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> tuple[dict[str, Any] | None, rollout.Decision]:
    """Send all traffic to the canary and wait for that generation (as :func:`_await`)."""
    promoted = api.json_patch(name, namespace, rollout.promote_patch(canary))
    generation = promoted["metadata"]["generation"]
    return _await(api, name, namespace, generation, None, None, deploy, 0.0, sleep, clock)


def _roll_back(
    api: InferenceServiceApi,
    current: dict[str, Any],
    previous: rollout.ModelFields,
    deploy: DeployConfig,
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> None:
    """KServe's documented rollback: ``canaryTrafficPercent: 0`` first (all traffic back on the last
    rolled-out revision), then the previous model, still pinned; the previous canary setting comes back
    once that model's revision is Ready. Without a rolled-out revision to pin to (Standard mode, or none
    yet) the previous model goes back directly."""
    name, namespace = current["metadata"]["name"], current["metadata"]["namespace"]
    pinned = rollout.is_serverless(current) and rollout.rolled_out_revision(current) is not None
    failed = rollout.revision_before(current)  # the restored model must come up in a newer revision
    if pinned:
        current = api.json_patch(name, namespace, rollout.pin_patch())
    restored = api.json_patch(name, namespace, rollout.rollback_patch(current, previous, pinned=pinned))
    if not pinned:
        return
    generation = restored["metadata"]["generation"]
    done, decision = _await(api, name, namespace, generation, failed, 0, deploy, 0.0, sleep, clock)
    if done:
        api.json_patch(name, namespace, rollout.unpin_patch(done, previous))
    else:
        log.error(
            "deploy: %s/%s stays pinned to its last rolled-out revision: %s", namespace, name, decision.reason
        )


def _url(isvc: Mapping[str, Any], where: str) -> str:
    url = (isvc.get("status") or {}).get("url")
    if not url:
        raise DeployError(f"{where} is Ready but reports no status.url")
    return url


def render_yaml(isvc: Any) -> str:
    return yaml.safe_dump(inference_service_to_dict(isvc), sort_keys=False)


def inference_service_to_dict(isvc: Any) -> dict[str, Any]:
    """The manifest form (camelCase keys, no nulls), as the Kubernetes API and kubectl see it."""
    return k8s.ApiClient().sanitize_for_serialization(isvc)


def inference_service_from_dict(manifest: Mapping[str, Any]) -> Any:
    """Parse a manifest into ``V1beta1InferenceService``, strictly.

    The SDK's own deserializer silently drops keys it does not know, so a misspelled field would vanish
    without a word; here every key must be a field of its model (KServe's or Kubernetes'), every scalar
    must have its declared type, and required fields are enforced by the models' constructors.
    """
    if manifest.get("kind") != "InferenceService":
        raise DeployError(f"expected kind InferenceService, got {manifest.get('kind')!r}")
    return model_from_manifest(manifest, "V1beta1InferenceService")


def model_from_manifest(manifest: Mapping[str, Any], model: str) -> Any:
    """Any KServe or Kubernetes SDK model (``V1Role``, ...) from its manifest, with the same strictness."""
    return _to_model(manifest, model, str(manifest.get("kind", model)))


def serving_args(deploy: DeployConfig, promote: PromoteConfig | None) -> list[str]:
    """``python -m serving`` options for a pod: the request log on ``deploy.request_log_uri`` (a local
    folder cannot be written there: the root filesystem is read-only), and the index-swap poll."""
    args = ["--request_log", deploy.request_log_uri or "off"]
    if deploy.index_swap and promote is not None:
        args += ["--index_swap_from", promote.uri]
    return args


def _http_probe(path: str, port: int, period_s: int, initial_delay_s: int, failures: int = 3) -> Any:
    return k8s.V1Probe(
        http_get=k8s.V1HTTPGetAction(path=path, port=port),
        initial_delay_seconds=initial_delay_s,
        period_seconds=period_s,
        timeout_seconds=5,
        failure_threshold=failures,
    )


_SCALARS: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}


def _to_model(value: Any, type_name: str, where: str) -> Any:
    if value is None:
        return None
    if type_name.startswith("list["):
        if not isinstance(value, list):
            raise DeployError(f"{where}: expected a list, got {type(value).__name__}")
        return [_to_model(item, type_name[5:-1], f"{where}[{i}]") for i, item in enumerate(value)]
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            raise DeployError(f"{where}: expected a mapping, got {type(value).__name__}")
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        return {key: _to_model(item, inner, f"{where}.{key}") for key, item in value.items()}
    if type_name in _SCALARS:
        allowed = _SCALARS[type_name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise DeployError(f"{where}: expected {type_name}, got {type(value).__name__} {value!r}")
        return value
    if type_name in ("object", "datetime", "date"):
        return value
    return _to_model_object(value, type_name, where)


def _to_model_object(value: Any, type_name: str, where: str) -> Any:
    import kserve.models

    cls = getattr(kserve.models, type_name, None) or getattr(k8s, type_name, None)
    if cls is None:
        raise DeployError(f"{where}: no SDK model named {type_name}")
    if not isinstance(value, dict):
        raise DeployError(f"{where}: expected a {type_name} mapping, got {type(value).__name__}")
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_key))
    if unknown:
        raise DeployError(f"{where}: unknown field(s) {unknown} for {type_name}")
    kwargs = {
        by_key[key]: _to_model(item, cls.openapi_types[by_key[key]], f"{where}.{key}")
        for key, item in value.items()
    }
    try:
        return cls(**kwargs)
    except ValueError as exc:  # the models' required-field checks
        raise DeployError(f"{where}: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the project configuration file")
    parser.add_argument("--dry-run", action="store_true", help="render the YAML only; no cluster needed")
    parser.add_argument(
        "--output", default=None, help=f"where to write the YAML (dry run: {layout.INFERENCE_SERVICE})"
    )
    parser.add_argument(
        "--storage-uri", default=None, help="the bundle to serve (default: deploy.storage_uri)"
    )
    parser.add_argument(
        "--promoted",
        action="store_true",
        help="serve the version current in the promote store (promote.uri's current.json)",
    )
    parser.add_argument("--image-tag", default=None, help="serving image tag (default: pipeline.image_tag)")
    parser.add_argument(
        "--namespace", default=None, help="where to deploy (default: deploy.namespace, null: this pod's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # --image-tag and --namespace go through the config so they are validated like params.yaml's
    given = {"pipeline.image_tag": args.image_tag, "deploy.namespace": args.namespace}
    overrides = {key: value for key, value in given.items() if value} or None
    output = args.output or (layout.INFERENCE_SERVICE if args.dry_run else None)
    try:
        params = CONTRACT.load(args.params, overrides)
        storage_uri = args.storage_uri
        if args.promoted:
            pointer = read_pointer(open_store(params.promote.uri))
            if pointer is None:
                raise DeployError(f"nothing promoted yet at {params.promote.uri}")
            storage_uri = pointer["uri"]
        url = run(
            params.deploy,
            params.pipeline.image_tag,
            storage_uri,
            output,
            dry_run=args.dry_run,
            promote=params.promote,
        )
    except (ConfigError, DeployError, NamespaceError, ObjectStoreError) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    if url:
        print(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
