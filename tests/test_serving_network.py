"""manifests/base/serving-networkpolicy.yaml against what Knative, KServe and Istio really do.

The facts are taken from the projects' sources, cited per version in the parameters below: knative/serving
at knative-v1.16.3 (the Knative of Kubeflow 1.10) and knative-v1.23.0 (the newest tag), kserve/kserve at
v0.14.1, v0.15.2 and aaac4e29 (the commit manifests/crds' InferenceService schema is pinned to, after
v0.20.0), istio/istio's sidecar injector. The policy is read as parsed YAML: for the base, and for the
overlays as kustomize renders them when kubectl is installed. Nothing is started: the app's metrics route is
read from the route definitions (tests/test_serving.py scrapes the in-process app's /metrics).

Who calls which port of a predictor pod:
- Knative mode: the activator (knative-serving) and the ingress gateways (istio-system, kourier-system) and
  the namespace's pods call queue-proxy's serving ports; Knative's autoscaler (knative-serving) scrapes
  queue-proxy's autoscaling metrics; the kubelet calls queue-proxy's admin port (preStop), and a
  NetworkPolicy cannot block a pod's own node, so that port stays closed to every namespace.
- Standard (raw) mode: no queue-proxy; the ingress gateway and the namespace's pods call the model server's
  own port.
- Prometheus (namespace `monitoring`) scrapes the app's /metrics: directly on the model server's port, or,
  with an Istio sidecar (the profile namespace injects one), on the sidecar's merged endpoint, 15020.
"""

from __future__ import annotations

import inspect
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys.config import load_params
from recsys.manifest_schemas import render_kustomization
from serving.routes import METRICS_PATH
from tests.conftest import REPO_ROOT

MANIFESTS = REPO_ROOT / "manifests"
KUBECTL = shutil.which("kubectl")
NAME_LABEL = "kubernetes.io/metadata.name"  # the label the API server sets on every namespace

KNATIVE_SERVING = "knative-serving"  # activator, autoscaler
ISTIO_SYSTEM = "istio-system"  # net-istio's ingress and knative-local-gateway; KServe's raw-mode ingress
KOURIER_SYSTEM = "kourier-system"  # net-kourier's gateway, where Kourier replaces Istio
MONITORING = "monitoring"  # where the policy assumes Prometheus runs
SAME = "<the policy's namespace>"  # the namespace's own pods (podSelector: {})

SCRAPE, PORT, PATH = "prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"
KSERVE_SCRAPING = "serving.kserve.io/enable-prometheus-scraping"
KSERVE_AGGREGATION = "serving.kserve.io/enable-metric-aggregation"


@dataclass(frozen=True)
class Knative:
    """Ports of Knative Serving's queue-proxy sidecar at one tag, with where the source says so."""

    tag: str
    serving_ports: tuple[int, ...]  # BackendHTTPPort, BackendHTTP2Port, BackendHTTPSPort
    autoscaler_metrics_port: int  # AutoscalingQueueMetricsPort
    user_metrics_port: int  # UserQueueMetricsPort
    admin_port: int  # QueueAdminPort
    admin_port_on_private_service: bool
    source: str


KNATIVE = [
    Knative(
        tag="knative-v1.16.3",
        serving_ports=(8012, 8013, 8112),
        autoscaler_metrics_port=9090,
        user_metrics_port=9091,
        admin_port=8022,
        admin_port_on_private_service=True,
        source=(
            "pkg/networking/constants.go (the port constants); pkg/reconciler/revision/resources/queue.go "
            "(queue-proxy's container ports: queue-port 8012 or 8013 for h2c, https-port 8112, "
            "http-queueadm 8022, http-autometric 9090, http-usermetric 9091); "
            "pkg/reconciler/serverlessservice/resources/services.go (the private Service: targetPort "
            "8012/8013, 8112, 9090, 9091 and 8022 'to work around this Istio bug' for the preStop hook); "
            "pkg/autoscaler/metrics/stats_scraper.go (portAndPath = 9090/metrics, scraped per pod IP); "
            "pkg/queue/sharedmain/main.go (admin server on 8022, Prometheus exporter on 9091); "
            "pkg/reconciler/revision/resources/deploy.go (preStop httpGet 8022 /wait-for-drain)"
        ),
    ),
    Knative(
        tag="knative-v1.23.0",
        serving_ports=(8012, 8013, 8112),
        autoscaler_metrics_port=9090,
        user_metrics_port=9091,
        admin_port=8022,
        admin_port_on_private_service=False,
        source=(
            "pkg/networking/constants.go (unchanged); pkg/reconciler/revision/resources/queue.go (8022 no "
            "longer a declared container port); pkg/reconciler/serverlessservice/resources/services.go "
            "(8022 dropped: 'Istio now handles prestop hooks correctly', 753a910584, first in 1.21); "
            "pkg/autoscaler/metrics/stats_scraper.go (9090/metrics); pkg/queue/sharedmain/otel.go (request "
            "metrics on 9091 when their protocol is prometheus); pkg/queue/sharedmain/main.go (admin 8022); "
            "pkg/reconciler/revision/resources/deploy.go (preStop httpGet 8022)"
        ),
    ),
]


@dataclass(frozen=True)
class KServe:
    """What KServe's pod webhook does with the Prometheus annotations at one version."""

    version: str
    queue_proxy_metrics_port: str  # DefaultPodPrometheusPort: Knative's UserQueueMetricsPort
    aggregate_metrics_port: str  # QueueProxyAggregatePrometheusMetricsPort (KServe's qpext image only)
    default_path: str  # DefaultPrometheusPath
    config_default: str  # inferenceservice-config metricsAggregator.enablePrometheusScraping
    source: str


KSERVE_WEBHOOK = "pkg/webhook/admission/pod/metrics_aggregate_injector.go (InjectMetricsAggregator)"
KSERVE = [
    KServe(
        version="v0.14.1",
        queue_proxy_metrics_port="9091",
        aggregate_metrics_port="9088",  # an int constant here, a string from 0.15
        default_path="/metrics",
        config_default="false",
        source=f"{KSERVE_WEBHOOK}; pkg/constants/constants.go; config/configmap/inferenceservice.yaml",
    ),
    KServe(
        version="v0.15.2",
        queue_proxy_metrics_port="9091",
        aggregate_metrics_port="9088",
        default_path="/metrics",
        config_default="false",
        source=f"{KSERVE_WEBHOOK}; pkg/constants/constants.go; config/configmap/inferenceservice.yaml",
    ),
    KServe(
        version="aaac4e29",
        queue_proxy_metrics_port="9091",
        aggregate_metrics_port="9088",
        default_path="/metrics",
        config_default="false",
        source=f"{KSERVE_WEBHOOK}; pkg/constants/constants.go; config/configmap/inferenceservice.yaml",
    ),
]

# istio/istio pkg/kube/inject/inject.go, applyPrometheusMerge: with meshConfig.enablePrometheusMerge (on by
# default) the injector copies the pod's prometheus.io/* into the sidecar's ISTIO_PROMETHEUS_ANNOTATIONS and
# points them at the agent's status port, whose /stats/prometheus merges the app's metrics with Envoy's.
ISTIO_STATUS_PORT = 15020
ISTIO_MERGED_PATH = "/stats/prometheus"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [obj for obj in objects if obj["kind"] == kind]
    return obj


def _base() -> list[dict[str, Any]]:
    return [
        *_documents(MANIFESTS / "base" / "serving-networkpolicy.yaml"),
        *_documents(MANIFESTS / "base" / "inferenceservice.yaml"),
    ]


@pytest.fixture(scope="module", params=["base", "overlays/dev", "overlays/production"])
def objects(request) -> list[dict[str, Any]]:
    """The policy and InferenceService as applied: the base files, the overlays as kustomize renders them."""
    if request.param == "base":
        return _base()
    if KUBECTL is None:
        pytest.skip("kubectl not installed: kustomize not rendered")
    return render_kustomization(MANIFESTS / request.param, KUBECTL)


def _namespaces(peer: dict[str, Any], own: str) -> set[str]:
    """The namespaces a `from` peer admits (every pod in them); only the forms the policy may use."""
    assert "ipBlock" not in peer, f"{peer}: an ipBlock admits addresses, not the callers named here"
    assert peer.get("podSelector", {}) == {}, f"{peer}: a pod selector narrows callers this test can't name"
    selector = peer.get("namespaceSelector")
    if selector is None:
        return {own}
    names: set[str] | None = None
    for key, value in selector.get("matchLabels", {}).items():
        assert key == NAME_LABEL, f"{peer}: namespaces are selected by name only"
        names = {value} if names is None else names & {value}
    for expression in selector.get("matchExpressions", []):
        assert expression["key"] == NAME_LABEL and expression["operator"] == "In", peer
        values = set(expression["values"])
        names = values if names is None else names & values
    assert names is not None, f"{peer}: selects every namespace"
    return names


def admitted(policy: dict[str, Any]) -> set[tuple[str, int]]:
    """Every (caller namespace, TCP port) the policy lets in; SAME stands for the policy's own namespace."""
    own = policy["metadata"].get("namespace", SAME)  # none in the base: the overlay places it
    pairs = set()
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), f"{rule}: a rule without `from` admits every source"
        assert rule.get("ports"), f"{rule}: a rule without `ports` admits every port"
        ports = []
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP" and isinstance(port["port"], int), port
            assert "endPort" not in port, port
            ports.append(port["port"])
        for peer in rule["from"]:
            for namespace in _namespaces(peer, own):
                pairs |= {(SAME if namespace == own else namespace, port) for port in ports}
    return pairs


def _container(isvc: dict[str, Any]) -> dict[str, Any]:
    (container,) = isvc["spec"]["predictor"]["containers"]
    return container


def _app_port(isvc: dict[str, Any]) -> int:
    """The model server's port: the one declared container port, also what --http_port tells it."""
    container = _container(isvc)
    (port,) = container["ports"]
    args = container["args"]
    assert args[args.index("--http_port") + 1] == str(port["containerPort"])
    return port["containerPort"]


def knative_data_path(knative: Knative) -> set[tuple[str, int]]:
    callers = {KNATIVE_SERVING, ISTIO_SYSTEM, KOURIER_SYSTEM, SAME}
    return {(caller, port) for caller in callers for port in knative.serving_ports}


def standard_data_path(app_port: int) -> set[tuple[str, int]]:
    return {(ISTIO_SYSTEM, app_port), (SAME, app_port)}


def scrapers(knative: Knative, app_port: int) -> set[tuple[str, int]]:
    return {
        (KNATIVE_SERVING, knative.autoscaler_metrics_port),
        (MONITORING, app_port),
        (MONITORING, ISTIO_STATUS_PORT),
        (MONITORING, knative.user_metrics_port),
    }


def kserve_pod_webhook(
    annotations: dict[str, str], kserve: KServe, cluster_scraping: str, cluster_aggregation: str
) -> dict[str, str]:
    """The pod's prometheus.io/* after KServe's webhook: the InferenceService's annotations reach the pod
    (predictor.go's annotation filter, ksvc_reconciler.go's revision template or the raw Deployment's pod
    template); the webhook fills the serving.kserve.io/enable-* ones from the cluster's config when absent
    and, with scraping "true", overwrites the port with queue-proxy's (the aggregate one with aggregation)."""
    pod = dict(annotations)
    aggregation = pod.setdefault(KSERVE_AGGREGATION, cluster_aggregation)
    if pod.setdefault(KSERVE_SCRAPING, cluster_scraping) == "true":
        aggregated = aggregation == "true"
        pod[PORT] = kserve.aggregate_metrics_port if aggregated else kserve.queue_proxy_metrics_port
        pod[PATH] = kserve.default_path
    return pod


def istio_sidecar_injector(pod: dict[str, str]) -> tuple[dict[str, str], tuple[str, str] | None]:
    """The pod's prometheus.io/* after Istio's injector with metrics merging, and the app endpoint the
    agent scrapes behind the merged one (None when the pod asks for no scraping)."""
    if pod.get(SCRAPE, "true") == "false":
        return pod, None
    app = (pod.get(PORT, ""), pod.get(PATH, "/metrics"))
    return pod | {SCRAPE: "true", PORT: str(ISTIO_STATUS_PORT), PATH: ISTIO_MERGED_PATH}, app


# --- the policy's frame ---------------------------------------------------------------------------------


def test_the_policy_covers_exactly_the_predictor_pods_and_ingress(objects):
    policy, isvc = _one(objects, "NetworkPolicy"), _one(objects, "InferenceService")
    assert policy["spec"]["podSelector"] == {
        "matchLabels": {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    }
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # the same namespace: the one an overlay gives both (the base names none; kubectl -n places it)
    assert policy["metadata"].get("namespace") == isvc["metadata"].get("namespace")


def test_nothing_is_admitted_that_no_caller_needs(objects):
    """The admitted (namespace, port) pairs are exactly the union of what the sources name, over the
    Knative versions and both modes: no extra port, no extra namespace."""
    policy, isvc = _one(objects, "NetworkPolicy"), _one(objects, "InferenceService")
    app_port = _app_port(isvc)
    needed = standard_data_path(app_port)
    for knative in KNATIVE:
        needed |= knative_data_path(knative) | scrapers(knative, app_port)
    assert admitted(policy) == needed


# --- Knative mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("knative", KNATIVE, ids=lambda k: k.tag)
def test_knative_data_path_reaches_queue_proxy(objects, knative):
    """Requests reach queue-proxy's serving ports, from the activator, the gateways and the namespace;
    the model server's port itself is behind queue-proxy (localhost), not on the Knative path."""
    missing = knative_data_path(knative) - admitted(_one(objects, "NetworkPolicy"))
    assert not missing, f"{knative.tag}: {sorted(missing)} not admitted ({knative.source})"


@pytest.mark.parametrize("knative", KNATIVE, ids=lambda k: k.tag)
def test_knative_autoscaler_scrapes_queue_proxy(objects, knative):
    pairs = admitted(_one(objects, "NetworkPolicy"))
    assert (KNATIVE_SERVING, knative.autoscaler_metrics_port) in pairs, knative.source
    assert (MONITORING, knative.user_metrics_port) in pairs, knative.source


@pytest.mark.parametrize("knative", KNATIVE, ids=lambda k: k.tag)
def test_queue_proxy_admin_port_stays_closed(objects, knative):
    """Only the kubelet calls 8022 (the user container's preStop drain hook), from the pod's own node,
    which a NetworkPolicy does not filter; whether the private Service lists it (up to 1.20, an Istio
    workaround) changes nothing for the policy."""
    assert knative.admin_port not in {port for _, port in admitted(_one(objects, "NetworkPolicy"))}, (
        f"{knative.tag}: admin port on the private Service: {knative.admin_port_on_private_service}"
    )


# --- Standard (raw) mode --------------------------------------------------------------------------------


def test_standard_mode_data_path_reaches_the_model_server(objects):
    policy, isvc = _one(objects, "NetworkPolicy"), _one(objects, "InferenceService")
    assert standard_data_path(_app_port(isvc)) <= admitted(policy)
    # the knative-serving namespace never calls the model server's port directly
    assert (KNATIVE_SERVING, _app_port(isvc)) not in admitted(policy)


def test_the_http_port_is_the_one_params_yaml_sets():
    isvc = _one(_base(), "InferenceService")
    assert _app_port(isvc) == load_params(REPO_ROOT / "params.yaml").deploy.http_port


# --- Prometheus: the app's own /metrics -----------------------------------------------------------------


def test_scrape_annotations_name_the_app_port_and_its_metrics_route():
    """prometheus.io/* and prometheus.kserve.io/* name the model server's port and the path it serves its
    metrics on: KServe's REST server registers /metrics, and serving/routes.py answers it over every
    worker process."""
    from kserve.protocol.rest.server import RESTServer

    isvc = _one(_base(), "InferenceService")
    annotations = isvc["metadata"]["annotations"]
    port = str(_app_port(isvc))
    assert annotations[SCRAPE] == "true"
    assert annotations[PORT] == annotations["prometheus.kserve.io/port"] == port
    assert annotations[PATH] == annotations["prometheus.kserve.io/path"] == METRICS_PATH
    routes = inspect.getsource(RESTServer._register_endpoints)
    assert re.search(r"add_api_route\(\s*r?[\"']" + re.escape(METRICS_PATH) + r"[\"']", routes)


@pytest.mark.parametrize("kserve", KSERVE, ids=lambda k: k.version)
def test_kserve_scraping_annotation_is_off_so_the_app_port_survives(kserve):
    """ "true" would make KServe's webhook point the pod at queue-proxy's metrics (9091, or 9088 with
    aggregation): not the app's, and no listener at all in Standard mode, where there is no queue-proxy."""
    annotations = _one(_base(), "InferenceService")["metadata"]["annotations"]
    assert annotations[KSERVE_SCRAPING] == "false", kserve.source
    turned_on = kserve_pod_webhook(annotations | {KSERVE_SCRAPING: "true"}, kserve, "false", "false")
    assert turned_on[PORT] == kserve.queue_proxy_metrics_port != annotations[PORT], kserve.source


@pytest.mark.parametrize("kserve", KSERVE, ids=lambda k: k.version)
@pytest.mark.parametrize("mode", ["Knative", "Standard"])
@pytest.mark.parametrize("sidecar", [False, True], ids=["no-sidecar", "istio-sidecar"])
@pytest.mark.parametrize("cluster_defaults", [("false", "false"), ("true", "true")], ids=["off", "on"])
def test_prometheus_reaches_the_apps_metrics(objects, kserve, mode, sidecar, cluster_defaults):
    """Whatever the cluster's metricsAggregator defaults, after KServe's webhook (and Istio's injector when
    the namespace injects sidecars) Prometheus connects to a port the policy admits from its namespace, and
    what it reads there is the model server's /metrics (behind the sidecar's merged endpoint with Istio).
    The mode changes nothing: the pod's own port is scraped in both, never queue-proxy's."""
    policy, isvc = _one(objects, "NetworkPolicy"), _one(objects, "InferenceService")
    pod = kserve_pod_webhook(isvc["metadata"]["annotations"], kserve, *cluster_defaults)
    app = (str(_app_port(isvc)), METRICS_PATH)
    if sidecar:
        pod, behind = istio_sidecar_injector(pod)
        assert behind == app, f"{mode}: the agent would scrape {behind}"
    else:
        assert (pod[PORT], pod[PATH]) == app, f"{mode}: Prometheus would scrape {pod[PORT]}{pod[PATH]}"
    assert pod[SCRAPE] == "true"
    assert (MONITORING, int(pod[PORT])) in admitted(policy), f"{mode}: {pod[PORT]} not admitted"


def test_the_profile_namespace_injects_istio_sidecars():
    """Why 15020 is admitted: the shipped namespace gets sidecars, so Prometheus scrapes the merged port."""
    (namespace,) = _documents(MANIFESTS / "profile" / "namespace.yaml")
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
