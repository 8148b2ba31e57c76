"""The compiled pipelines against the KFP backends they may be uploaded to, read with each one's protos.

Supported: KFP 2.4.1 (Kubeflow 1.10), 2.15.0 (Kubeflow 1.11), 2.17.0 (upstream, the SDK's release).
Refused by ``python -m pipelines upload/schedule``: 2.2.0 and 2.3.0 (Kubeflow 1.9), which accept the
upload but give the training tasks no GPU and fail the Feast and object-store tasks in the driver.

What each backend does with a field it does not know is in tests/kfp_protos.py (with the Go sources);
``BACKENDS`` below is what the driver of each tag reads, and ``test_source_*`` check those facts against
the KFP sources where a mirror of github.com/kubeflow/pipelines is at hand ($KFP_SOURCE_MIRROR). The
table "What runs where" in pipelines/README.md says the same in words.
"""

# no `from __future__ import annotations`: kfp reads the pipeline's parameter annotations as types
import copy
import functools
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.kfp_protos import TAGS, VENDORED, ProtosUnavailable, read_as

PACKAGES = {
    "training": REPO_ROOT / "pipelines" / "recsys_training.yaml",
    "index-refresh": REPO_ROOT / "pipelines" / "recsys_index_refresh.yaml",
}
# every kfp-kubernetes feature the project uses, as one task of a small pipeline compiled here (the
# committed YAML has no PVC mount: the training pipeline mounts one only with training_nodes > 1)
FEATURES = (
    "secretAsEnv", "configMapAsVolume", "configMapAsEnv", "tolerations", "nodeSelector", "pvcMount",
    "emptyDirMounts", "imagePullSecret",
)  # fmt: skip
# both pipelines compiled as a private registry needs them: every image by digest (compile --images) and
# pipeline.image_pull_secrets set (the committed YAML has neither: its pull secrets default to none)
PINNED = {f"{name}-pinned": name for name in PACKAGES}
PULL_SECRETS = ["regcred", "mirror.example.com"]


@dataclass(frozen=True)
class Backend:
    kubeflow: str
    # what backend/src/v2/driver/driver.go reads for the GPU limit's resource name, first non-empty wins
    gpu_type_fields: tuple[str, ...]
    # an executor's kfp-kubernetes config field that the tag's protos lack:
    # "task fails" (driver: strict jsonpb), "dropped" (driver: AllowUnknownFields),
    # "run refused" (the run's compiler: strict protojson, before the driver)
    unknown_kubernetes_field: str
    supported: bool


BACKENDS = {
    "2.2.0": Backend("1.9", ("type",), "task fails", supported=False),
    "2.3.0": Backend("1.9", ("type",), "task fails", supported=False),
    "2.4.1": Backend("1.10", ("resource_type", "type"), "dropped", supported=True),
    "2.15.0": Backend("1.11", ("resource_type", "type"), "run refused", supported=True),
    "2.17.0": Backend("upstream", ("resource_type", "type"), "run refused", supported=True),
}
SUPPORTED = [tag for tag in TAGS if BACKENDS[tag].supported]
REFUSED = [tag for tag in TAGS if not BACKENDS[tag].supported]
# the driver's runtime parameter pattern (backend/src/v2/driver/util.go, inputPipelineChannelPattern)
CHANNEL = re.compile(r"\$.inputs.parameters\['(.+?)'\]")


@pytest.fixture(scope="module")
def features_package(tmp_path_factory) -> Path:
    from kfp import compiler, dsl, kubernetes

    @dsl.container_component
    def op():
        return dsl.ContainerSpec(image="python:3.11", command=["true"])

    @dsl.pipeline(name="kfp-kubernetes-features")
    def features(gpu_type: str = "nvidia.com/gpu"):
        task = op()
        task.set_accelerator_type(gpu_type).set_accelerator_limit(1)
        kubernetes.use_secret_as_env(task, "a-secret", {"KEY": "KEY"})
        kubernetes.use_config_map_as_volume(task, "a-config-map", mount_path="/etc/config")
        kubernetes.use_config_map_as_env(task, "a-config-map", {"PROJECT": "PROJECT"})
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
        kubernetes.add_node_selector(task, label_key="nvidia.com/gpu.present", label_value="true")
        kubernetes.mount_pvc(task, pvc_name="a-volume", mount_path="/mnt/training")
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit="8Gi"
        )
        kubernetes.set_image_pull_secrets(task, ["a-pull-secret"])

    path = tmp_path_factory.mktemp("features") / "features.yaml"
    compiler.Compiler().compile(features, str(path))
    return path


@pytest.fixture(scope="module")
def protos_cache(request) -> Path | None:
    """Where the generated modules are kept between sessions (pytest's cache folder)."""
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    return cache.mkdir("kfp_protos") if cache is not None else None


def read_or_skip(tag: str, packages: list[Path], cache_root: Path | None) -> dict:
    try:
        return read_as(tag, packages, cache_root)
    except ProtosUnavailable as exc:
        pytest.skip(f"the KFP {tag} protos cannot be compiled here: {exc}")


@pytest.fixture(scope="module")
def pinned_packages(tmp_path_factory) -> dict[str, Path]:
    """Both pipelines compiled with every image by digest and ``PULL_SECRETS`` (PINNED's names)."""
    from pipelines.__main__ import main
    from tests.conftest import write_params
    from tests.test_image_lock import synthetic_lock

    folder = tmp_path_factory.mktemp("pinned")
    params = write_params(folder / "params.yaml", {"pipeline.image_pull_secrets": PULL_SECRETS})
    lock = folder / "pushed.json"
    lock.write_text(json.dumps(synthetic_lock()))
    packages = {}
    for name, pipeline in PINNED.items():
        packages[name] = folder / f"{name}.yaml"
        args = ["--params", str(params), "compile", "--pipeline", pipeline, "--images", str(lock)]
        assert main([*args, "--output", str(packages[name])]) == 0
    return packages


@pytest.fixture(scope="module")
def hardened_package(tmp_path_factory) -> Path:
    """The training pipeline compiled with ``pipeline.task_security_context`` (every task's container)."""
    from pipelines.__main__ import main
    from tests.conftest import write_params

    folder = tmp_path_factory.mktemp("hardened")
    params = write_params(folder / "params.yaml", {"pipeline.task_security_context": True})
    path = folder / "hardened.yaml"
    assert main(["--params", str(params), "compile", "--pipeline", "training", "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def read(protos_cache, features_package, pinned_packages):
    """``read(tag)``: what KFP ``tag`` makes of both compiled pipelines, the features pipeline and the
    pinned pipelines (one subprocess per tag, cached for the module)."""
    named = {**PACKAGES, "features": features_package, **pinned_packages}
    seen: dict[str, dict] = {}

    def read_tag(tag: str) -> dict:
        if tag not in seen:
            found = read_or_skip(tag, list(named.values()), protos_cache)
            seen[tag] = {name: found[str(path)] for name, path in named.items()}
        return seen[tag]

    return read_tag


@functools.cache
def _documents(path: Path) -> tuple[dict, dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    pipeline, *rest = [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]
    return pipeline, (rest[0] if rest else {})


def documents(path: Path) -> tuple[dict, dict]:
    """The PipelineSpec and the PlatformSpec of a compiled YAML (a copy: callers may change it)."""
    return copy.deepcopy(_documents(path))


def kubernetes_configs(path: Path) -> dict[str, dict]:
    platform = documents(path)[1]
    return platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})


def gpu_limit(tag: str, container: dict) -> tuple[str, str] | None:
    """The (resource name, count) the tag's driver puts in the pod's limits, as driver.go computes it
    from the container spec the run's compiler gives it (None: no accelerator limit)."""
    accelerator = container.get("resources", {}).get("accelerator")
    if not accelerator:
        return None
    name = next((accelerator[f] for f in BACKENDS[tag].gpu_type_fields if accelerator.get(f)), "")
    if "resource_type" in BACKENDS[tag].gpu_type_fields:  # 2.4+: resourceCount, else count
        count = accelerator.get("resource_count") or (
            str(accelerator["count"]) if accelerator.get("count") else ""
        )
    else:  # 2.2/2.3: GetType() != "" && GetCount() > 0
        count = str(accelerator["count"]) if int(accelerator.get("count") or 0) > 0 else ""
    return (name, count) if name and count else None


def harmless_drop(config: dict, path: str) -> str | None:
    """Why losing ``path`` of an executor's kfp-kubernetes ``config`` changes nothing on the 2.4.1 driver
    (backend/src/v2/driver/driver.go, extendPodSpecPatch), or None if it would."""
    match = re.fullmatch(r"(\w+)\[(\d+)\]\.(\w+)", path)
    if match is None:
        return None
    kind, field = match[1], match[3]
    entry = config[kind][int(match[2])]
    same_name = {
        "secretNameParameter": "secretName",
        "configMapNameParameter": "configMapName",
        "pvcNameParameter": "constant",
    }.get(field)
    if (
        same_name
        and entry.get(same_name)
        and entry[field] == {"runtimeValue": {"constant": entry[same_name]}}
    ):
        return f"the driver reads the same name from {kind}.{same_name}"
    if kind in ("secretAsEnv", "configMapAsEnv") and field == "optional" and entry[field] is False:
        # driver.go 2.4.1: SecretKeySelector / ConfigMapKeySelector (line 669) are built without Optional
        return "the driver's key selector has no optional: required, as optional=false asks"
    return None


@pytest.mark.parametrize("package", [*PACKAGES, "features", *PINNED])
@pytest.mark.parametrize("tag", TAGS)
def test_upload_accepts_the_compiled_pipeline(read, tag, package):
    """The API server parses both documents with strict protojson (template/v2_template.go): a field
    unknown to the tag would reject the upload; it accepts only schemaVersion 2.1.0 (template.go)."""
    upload = read(tag)[package]["upload"]
    assert upload["pipeline_spec"] is None, f"KFP {tag} rejects the PipelineSpec: {upload['pipeline_spec']}"
    assert upload["platform_spec"] is None, f"KFP {tag} rejects the PlatformSpec: {upload['platform_spec']}"
    assert upload["schema_version"] == "2.1.0"


@pytest.mark.parametrize("package", [*PACKAGES, "features", *PINNED])
@pytest.mark.parametrize("tag", SUPPORTED)
def test_the_run_keeps_every_container_field(read, tag, package):
    """deploymentSpec is read ignoring unknown fields (v2/compiler/visitor.go): one unknown to the tag
    would be lost without a word (e.g. a resource request)."""
    assert read(tag)[package]["dropped_container"] == {}


@pytest.mark.parametrize("package", [*PACKAGES, "features", *PINNED])
@pytest.mark.parametrize("tag", SUPPORTED)
def test_the_driver_applies_every_kubernetes_config(read, features_package, pinned_packages, tag, package):
    """Every executor's kfp-kubernetes config reaches the tag's driver whole, or loses only fields whose
    value the driver also reads elsewhere (2.4.1: the ``*NameParameter`` twins of the plain names)."""
    dropped = read(tag)[package]["dropped_kubernetes"]
    if BACKENDS[tag].unknown_kubernetes_field == "run refused":
        assert dropped == {}, f"KFP {tag} refuses to create the run: unknown kfp-kubernetes fields {dropped}"
        return
    configs = kubernetes_configs({**PACKAGES, "features": features_package, **pinned_packages}[package])
    lost = {
        (executor, field)
        for executor, fields in dropped.items()
        for field in fields
        if harmless_drop(configs[executor], field) is None
    }
    assert not lost, f"the KFP {tag} driver silently drops {sorted(lost)}: see pipelines/README.md"


def test_kubeflow_1_10_loses_only_the_twins_of_what_its_driver_reads(read):
    """The fields the 2.4.1 driver drops (kfp-kubernetes >= 2.5 writes them next to the older ones);
    pipelines/README.md lists them."""
    dropped = read("2.4.1")["features"]["dropped_kubernetes"]["exec-op"]
    assert {re.sub(r"\[\d+\]", "", field) for field in dropped} == {
        "secretAsEnv.secretNameParameter",
        "secretAsEnv.optional",
        "configMapAsVolume.configMapNameParameter",
        "configMapAsEnv.configMapNameParameter",
        "configMapAsEnv.optional",
        "pvcMount.pvcNameParameter",
        "imagePullSecret.secretNameParameter",
    }


def test_a_drop_that_loses_something_is_not_harmless():
    by_parameter = {"secretName": "", "secretNameParameter": {"componentInputParameter": "secret"}}
    assert harmless_drop({"secretAsEnv": [by_parameter]}, "secretAsEnv[0].secretNameParameter") is None
    assert harmless_drop({"secretAsEnv": [{"optional": True}]}, "secretAsEnv[0].optional") is None
    assert harmless_drop({"securityContext": {"runAsNonRoot": True}}, "securityContext") is None


def test_an_unknown_field_is_named(protos_cache, tmp_path):
    """The checks are not vacuous: a field the tag lacks rejects the upload or is listed as dropped."""
    pipeline, platform = documents(PACKAGES["index-refresh"])
    pipeline["pipelineInfo"]["futureField"] = "x"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    next(iter(executors.values()))["securityContext"] = {"runAsNonRoot": True}  # KFP 2.17 protos only
    path = tmp_path / "future.yaml"
    path.write_text(yaml.safe_dump_all([pipeline, platform]))
    found = read_or_skip("2.15.0", [path], protos_cache)[str(path)]
    assert "futureField" in found["upload"]["pipeline_spec"]
    assert list(found["dropped_kubernetes"].values()) == [["securityContext"]]


@pytest.mark.parametrize("tag", SUPPORTED)
def test_every_kfp_kubernetes_feature_reaches_the_driver(read, tag):
    """What the driver applies (extendPodSpecPatch) is there after the tag's parse, for each feature."""
    config = read(tag)["features"]["kubernetes"]["exec-op"]
    assert config["secretAsEnv"][0]["secretName"] == "a-secret"
    assert config["secretAsEnv"][0]["keyToEnv"] == [{"secretKey": "KEY", "envVar": "KEY"}]
    assert config["configMapAsVolume"][0]["configMapName"] == "a-config-map"
    assert config["configMapAsVolume"][0]["mountPath"] == "/etc/config"
    assert config["configMapAsEnv"][0]["configMapName"] == "a-config-map"
    assert config["configMapAsEnv"][0]["keyToEnv"] == [{"configMapKey": "PROJECT", "envVar": "PROJECT"}]
    assert config["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert config["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert config["pvcMount"][0]["constant"] == "a-volume"
    assert config["pvcMount"][0]["mountPath"] == "/mnt/training"
    assert config["emptyDirMounts"] == [
        {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "8Gi"}
    ]
    assert [entry["secretName"] for entry in config["imagePullSecret"]] == ["a-pull-secret"]


@pytest.mark.parametrize("package", PINNED)
@pytest.mark.parametrize("tag", SUPPORTED)
def test_every_task_of_a_pinned_pipeline_pulls_its_digest_with_the_pull_secrets(read, tag, package):
    """With ``compile --images`` and ``pipeline.image_pull_secrets``: each executor's image reaches the
    tag's driver as ``repo@sha256:...`` and its pod gets every pull secret (driver: imagePullSecrets from
    ``imagePullSecret[].secretName``, or its ``secretNameParameter`` twin from 2.15)."""
    found = read(tag)[package]
    assert found["container"], package
    for executor, container in found["container"].items():
        digest_reference = r"\S+/recsys-(pipeline|training)@sha256:[0-9a-f]{64}"
        assert re.fullmatch(digest_reference, container["image"]), executor
        secrets = found["kubernetes"][executor]["imagePullSecret"]
        assert [entry["secretName"] for entry in secrets] == PULL_SECRETS, executor


def test_the_features_pipeline_covers_what_the_project_compiles(pinned_packages):
    """A kfp-kubernetes feature the pipelines start to use must join FEATURES (and the README table)."""
    used = {
        key
        for path in [*PACKAGES.values(), *pinned_packages.values()]
        for config in kubernetes_configs(path).values()
        for key in config
    }
    assert used, "no kfp-kubernetes config in the compiled pipelines"
    assert used <= set(FEATURES), f"not in the version matrix: {sorted(used - set(FEATURES))}"


def gpu_executors(path: Path) -> dict[str, str]:
    """Executor label -> its component's name, for the executors that ask for an accelerator."""
    pipeline = documents(path)[0]
    executors = pipeline["deploymentSpec"]["executors"]
    return {
        component["executorLabel"]: name
        for name, component in pipeline["components"].items()
        if "executorLabel" in component
        and executors[component["executorLabel"]].get("container", {}).get("resources", {}).get("accelerator")
    }


def run_parameter_of(pipeline: dict, component: str, parameter: str) -> str | None:
    """The pipeline (run) parameter that task input ``parameter`` of the task running ``component``
    comes from, following ``componentInputParameter`` up through the enclosing DAGs (None: another
    source, e.g. a task output or a constant)."""
    dags = {"root": pipeline["root"]} | {name: c for name, c in pipeline["components"].items() if "dag" in c}
    for dag_name, dag in dags.items():
        for task in dag["dag"].get("tasks", {}).values():
            if task["componentRef"]["name"] != component:
                continue
            source = task.get("inputs", {}).get("parameters", {}).get(parameter, {})
            upper = source.get("componentInputParameter")
            if upper is None:
                return None
            return upper if dag_name == "root" else run_parameter_of(pipeline, dag_name, upper)
    return None


@pytest.mark.parametrize("tag", SUPPORTED)
def test_gpu_tasks_get_the_gpu_type_of_the_run(read, tag):
    """driver.go (2.4+) takes the limit's resource name from accelerator.resourceType and resolves the
    placeholder from the task's input parameters (util.go, resolvePodSpecInputRuntimeParameter), which
    the DAG feeds from the run parameter ``gpu_type``."""
    pipeline = documents(PACKAGES["training"])[0]
    gpu = gpu_executors(PACKAGES["training"])
    assert {"exec-train"} <= set(gpu)
    containers = read(tag)["training"]["container"]
    for executor, component in gpu.items():
        limit = gpu_limit(tag, containers[executor])
        assert limit is not None, f"KFP {tag}: {executor} gets no GPU limit"
        name, count = limit
        parameter = CHANNEL.fullmatch(name.strip("{}"))
        assert parameter, f"{executor}: the GPU type {name!r} is not a task input placeholder"
        assert run_parameter_of(pipeline, component, parameter[1]) == "gpu_type", executor
        assert int(count) >= 1


@pytest.mark.parametrize("tag", REFUSED)
def test_kubeflow_1_9_gives_no_gpu_and_fails_the_feast_and_object_store_tasks(read, tag):
    """What ``upload``/``schedule`` refuse a 2.2/2.3 backend for (pipelines/kubeflow.py)."""
    found = read(tag)["training"]
    gpu = gpu_executors(PACKAGES["training"])
    assert gpu and all(gpu_limit(tag, found["container"][executor]) is None for executor in gpu)
    # the driver parses each kfp-kubernetes config strictly (jsonpb): any unknown field fails the task
    failing = set(found["dropped_kubernetes"])
    assert {"exec-training-set", "exec-online-store", "exec-gate", "exec-promote", "exec-deploy"} <= failing
    assert all(
        field.split("[")[0]
        in ("secretAsEnv", "configMapAsVolume", "configMapAsEnv", "pvcMount", "emptyDirMounts")
        for fields in found["dropped_kubernetes"].values()
        for field in fields
    )
    if tag == "2.2.0":  # no emptyDir in its protos (added in 2.3): the GPU tasks fail too
        assert set(gpu) <= failing


# ---- the facts above, against the KFP sources at each tag (skipped without a mirror) ----

MIRROR = Path(os.environ.get("KFP_SOURCE_MIRROR", "/work/.mirror/kubeflow+pipelines/repo"))


def source(tag: str, path: str) -> str:
    if not (MIRROR / "HEAD").is_file() and not (MIRROR / ".git").exists():
        pytest.skip(f"no KFP source mirror at {MIRROR} (set $KFP_SOURCE_MIRROR)")
    shown = subprocess.run(
        ["git", "-C", str(MIRROR), "show", f"{tag}:{path}"], capture_output=True, text=True, check=False
    )
    if shown.returncode != 0:
        pytest.skip(f"{tag}:{path} not in the mirror: {shown.stderr.strip()}")
    return shown.stdout


@pytest.mark.parametrize("tag", TAGS)
def test_source_vendored_protos_are_the_tags(tag):
    assert (VENDORED / tag / "pipeline_spec.proto").read_text() == source(
        tag, "api/v2alpha1/pipeline_spec.proto"
    )
    assert (VENDORED / tag / "kubernetes_executor_config.proto").read_text() == source(
        tag, "kubernetes_platform/proto/kubernetes_executor_config.proto"
    )


@pytest.mark.parametrize("tag", TAGS)
def test_source_driver_reads_the_gpu_type_from(tag):
    driver = source(tag, "backend/src/v2/driver/driver.go")
    reads_resource_type = "accelerator.GetResourceType()" in driver
    assert reads_resource_type == ("resource_type" in BACKENDS[tag].gpu_type_fields)
    assert "accelerator.GetType()" in driver


@pytest.mark.parametrize("tag", TAGS)
def test_source_what_happens_to_an_unknown_kubernetes_field(tag):
    driver_main = source(tag, "backend/src/v2/cmd/driver/main.go")
    container = source(tag, "backend/src/v2/compiler/argocompiler/container.go")
    behaviour = BACKENDS[tag].unknown_kubernetes_field
    strict_driver = "jsonpb.UnmarshalString(*k8sExecConfigJson, k8sExecCfg)" in driver_main
    assert strict_driver == (behaviour == "task fails")
    if not strict_driver:
        assert "util.UnmarshalString(*k8sExecConfigJson, k8sExecCfg)" in driver_main
        lenient = source(tag, "backend/src/common/util/json.go")
        assert "AllowUnknownFields: true" in lenient or "DiscardUnknown: true" in lenient
    refuses_run = "failed to unmarshal kubernetes config" in container
    assert refuses_run == (behaviour == "run refused")


@pytest.mark.parametrize("tag", TAGS)
def test_source_upload_is_strict_and_the_run_drops_unknown_container_fields(tag):
    template = source(tag, "backend/src/apiserver/template/v2_template.go")
    assert "protojson.Unmarshal(jsonData, &spec)" in template
    assert "protojson.Unmarshal(platformSpecJson, &platformSpec)" in template
    assert "DiscardUnknown" not in template and "AllowUnknownFields" not in template
    visitor = source(tag, "backend/src/v2/compiler/visitor.go")
    assert "AllowUnknownFields: true" in visitor or "DiscardUnknown: true" in visitor


@pytest.mark.parametrize("tag", TAGS)
def test_source_driver_puts_the_pull_secrets_in_the_pod(tag):
    """extendPodSpecPatch: each ``imagePullSecret`` entry becomes one of the pod's imagePullSecrets, by
    its ``secretName`` (2.2-2.4: driver.go), or its ``secretNameParameter``, else ``secretName`` (2.15+:
    k8s.go)."""
    path = "backend/src/v2/driver/" + ("k8s.go" if tag in ("2.15.0", "2.17.0") else "driver.go")
    driver = source(tag, path)
    loop = driver.index("range kubernetesExecutorConfig.GetImagePullSecret()")
    body = driver[loop : loop + 1200]
    assert "podSpec.ImagePullSecrets = append(" in body
    assert "imagePullSecret.GetSecretName()" in body or "secretName = imagePullSecret.SecretName" in body


@pytest.mark.parametrize("tag", TAGS)
def test_source_healthz_answers_the_tag_name(tag):
    """pipelines/kubeflow.py reads the version from /apis/v2beta1/healthz."""
    main_go = source(tag, "backend/src/apiserver/main.go")
    handler = main_go.index('HandleFunc("/apis/v2beta1/healthz"')
    assert "tag_name" in main_go[handler : handler + 400] or (
        "newHealthzResponse" in main_go[handler : handler + 400] and 'json:"tag_name"' in main_go
    )


def test_upload_refuses_exactly_the_unsupported_backends():
    from pipelines.kubeflow import MIN_KFP_BACKEND

    for tag in TAGS:
        major, minor = map(int, tag.split(".")[:2])
        assert ((major, minor) >= MIN_KFP_BACKEND) == BACKENDS[tag].supported, tag


@pytest.mark.parametrize("tag", SUPPORTED)
def test_source_driver_resolves_the_placeholder_as_the_test_does(tag):
    util = source(tag, "backend/src/v2/driver/util.go")
    assert f"inputPipelineChannelPattern = `{CHANNEL.pattern}`" in util


@pytest.mark.parametrize("tag", SUPPORTED)
def test_a_task_security_context_reaches_the_2_17_driver_and_no_older_one(
    protos_cache, hardened_package, tag
):
    """kfp-kubernetes' securityContext is in the 2.17 protos only: that driver applies it to the task's
    container (backend/src/v2/driver/k8s.go, with every capability dropped); 2.15's run compiler refuses
    the run and 2.4.1's driver drops it, so upload refuses such a package there (check_package_fits)."""
    # int64 fields are strings in protobuf's JSON mapping
    wanted = {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}
    configs = kubernetes_configs(hardened_package)
    assert configs and all(config["securityContext"] == wanted for config in configs.values())
    found = read_or_skip(tag, [hardened_package], protos_cache)[str(hardened_package)]
    if tag == "2.17.0":
        assert found["dropped_kubernetes"] == {}
        assert all(found["kubernetes"][executor]["securityContext"] == wanted for executor in configs)
    else:
        assert set(found["dropped_kubernetes"]) == set(configs)
        assert all("securityContext" in fields for fields in found["dropped_kubernetes"].values())
