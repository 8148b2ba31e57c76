"""A compiled pipeline as a given KFP backend version reads it, from that version's own protos.

KFP's API server and driver are Go programs built against the protos of their release; the SDK in this
venv writes fields from newer ones. What a backend does with a field it does not know depends on where
the field is (backend/src at each tag):

- the PipelineSpec and the PlatformSpec documents are parsed with strict ``protojson.Unmarshal`` at
  upload (apiserver/template/v2_template.go): an unknown field rejects the upload;
- ``deploymentSpec`` is a ``google.protobuf.Struct`` in the PipelineSpec: the run's compiler reads it
  into PipelineDeploymentConfig ignoring unknown fields (v2/compiler/visitor.go, GetDeploymentConfig),
  so an unknown container field (e.g. ``accelerator.resourceType``) is silently dropped;
- each executor's Kubernetes config is a ``Struct`` in the PlatformSpec, read into that version's
  KubernetesExecutorConfig by the driver (v2/cmd/driver/main.go): strictly at 2.2/2.3 (``jsonpb``: the
  task fails), ignoring unknown fields at 2.4.1 (``jsonpb`` with ``AllowUnknownFields``: silently
  dropped); from 2.15 the run's compiler parses it strictly first (argocompiler/container.go,
  ``protojson.Unmarshal`` -> "failed to unmarshal kubernetes config": the run is not created).

:func:`read_as` parses compiled YAMLs with the protos of one tag, vendored under
``tests/fixtures/kfp_protos/<tag>/`` (see the README there) and compiled with ``grpcio-tools``' protoc
into a cache folder. Two versions of the same proto package cannot share a process's descriptor pool
(nor the kfp SDK's own ``ml_pipelines`` protos), so each tag is read in a subprocess of its own, which
imports only the generated modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

VENDORED = Path(__file__).parent / "fixtures" / "kfp_protos"
PROTOS = ("pipeline_spec.proto", "kubernetes_executor_config.proto")
# the KFP backend releases of the matrix: Kubeflow 1.9 (2.2.0, 2.3.0), 1.10 (2.4.1), 1.11 (2.15.0), upstream
TAGS = ("2.2.0", "2.3.0", "2.4.1", "2.15.0", "2.17.0")


class ProtosUnavailable(RuntimeError):
    """No protoc (``grpcio-tools``) or no vendored protos for the tag: the checks cannot run."""


def vendored(tag: str) -> Path:
    folder = VENDORED / tag
    missing = [name for name in PROTOS if not (folder / name).is_file()]
    if missing:
        raise ProtosUnavailable(f"no vendored {missing} for KFP {tag} under {folder}")
    return folder


def generated(tag: str, cache_root: Path | None = None) -> Path:
    """The folder holding ``pipeline_spec_pb2`` and ``kubernetes_executor_config_pb2`` of KFP ``tag``.

    Cached under ``cache_root`` (default: the system temp folder) by a digest of the protos, protoc's and
    protobuf's versions; written to a temporary folder and renamed, so concurrent sessions do not clash.
    """
    source = vendored(tag)
    try:
        import google.protobuf
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:
        raise ProtosUnavailable(f"no protoc: {exc} (grpcio-tools, a dependency of kserve)") from None
    try:
        import google.rpc.status_pb2  # google/rpc/status.proto, imported by pipeline_spec.proto
    except ImportError as exc:
        raise ProtosUnavailable(f"no google/rpc/status.proto: {exc} (googleapis-common-protos)") from None
    digest = hashlib.sha256()
    for name in PROTOS:
        digest.update((source / name).read_bytes())
    digest.update(f"{metadata.version('grpcio-tools')}/{google.protobuf.__version__}".encode())
    root = Path(cache_root or Path(tempfile.gettempdir()) / "recsys-kfp-protos")
    target = root / f"{tag}-{digest.hexdigest()[:16]}"
    if all((target / f"{Path(name).stem}_pb2.py").is_file() for name in PROTOS):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=root))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    googleapis = Path(google.rpc.status_pb2.__file__).parents[2]
    args = ["protoc", f"-I{source}", f"-I{well_known}", f"-I{googleapis}", f"--python_out={staging}"]
    if protoc.main([*args, *(str(source / name) for name in PROTOS)]) != 0:
        raise ProtosUnavailable(f"protoc failed on the KFP {tag} protos in {source}")
    try:
        staging.rename(target)
    except OSError:  # another session got there first
        if not target.is_dir():
            raise
    return target


def read_as(tag: str, packages: list[Path], cache_root: Path | None = None, timeout: float = 60) -> dict:
    """What KFP backend ``tag`` makes of each compiled ``package``, keyed by the package's path.

    Per package: ``upload`` (the error of the strict parse of the PipelineSpec / PlatformSpec, None if
    accepted), ``dropped_container`` (per executor, the container fields the compiler drops),
    ``container`` (per executor, the container spec as the driver receives it), ``dropped_kubernetes``
    (per executor, the Kubernetes config fields unknown to the tag) and ``kubernetes`` (per executor, the
    config with only the known fields, as the 2.4.1 driver keeps it).
    """
    modules = generated(tag, cache_root)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(modules), *map(str, packages)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"reading with the KFP {tag} protos failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


# ---- below: the subprocess, which must not import kfp (its ml_pipelines protos are the SDK's) ----

OPAQUE = {  # JSON of these well-known types is not a message's fields: nothing in it can be unknown
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Any",
    "google.protobuf.Duration",
    "google.protobuf.Timestamp",
}


def unknown_fields(value: Any, descriptor: Any, path: str = "") -> list[str]:
    """Every key of JSON ``value`` that message ``descriptor`` has no field for, as a dotted path
    (``json_format.ParseDict`` stops at the first; a proto3 JSON reader accepts the JSON and the proto
    field name)."""
    if descriptor.full_name in OPAQUE or not isinstance(value, dict):
        return []
    by_name = {f.json_name: f for f in descriptor.fields} | dict(descriptor.fields_by_name)
    found = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        field = by_name.get(key)
        if field is None:
            found.append(where)
        elif field.message_type is None:
            continue
        elif field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"].message_type
            if inner is not None and isinstance(item, dict):
                for k, v in item.items():
                    found += unknown_fields(v, inner, f"{where}[{k}]")
        elif field.is_repeated and isinstance(item, list):
            for i, v in enumerate(item):
                found += unknown_fields(v, field.message_type, f"{where}[{i}]")
        else:
            found += unknown_fields(item, field.message_type, where)
    return found


def _strict_error(document: dict, message: Any) -> str | None:
    from google.protobuf import json_format

    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        return str(exc)
    return None


def _read(package: Path) -> dict:
    import kubernetes_executor_config_pb2 as k8s  # the tag's generated modules, first on sys.path
    import pipeline_spec_pb2 as spec
    import yaml
    from google.protobuf import json_format

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    documents = [d for d in yaml.load_all(package.read_text(), Loader=loader) if d]
    pipeline = next(d for d in documents if "pipelineInfo" in d or "root" in d)
    platform = next((d for d in documents if "platforms" in d), {})
    upload = {
        "pipeline_spec": _strict_error(pipeline, spec.PipelineSpec()),
        "platform_spec": _strict_error(platform, spec.PlatformSpec()) if platform else None,
        "schema_version": pipeline.get("schemaVersion"),
    }
    container_type = spec.PipelineDeploymentConfig.PipelineContainerSpec
    dropped_container, containers = {}, {}
    for name, executor in (pipeline.get("deploymentSpec") or {}).get("executors", {}).items():
        if "container" not in executor:
            continue
        dropped = unknown_fields(executor["container"], container_type.DESCRIPTOR)
        if dropped:
            dropped_container[name] = dropped
        parsed = json_format.ParseDict(executor["container"], container_type(), ignore_unknown_fields=True)
        containers[name] = json_format.MessageToDict(parsed, preserving_proto_field_name=True)
    kubernetes = ((platform.get("platforms") or {}).get("kubernetes") or {}).get("deploymentSpec") or {}
    dropped_kubernetes, configs = {}, {}
    for name, config in (kubernetes.get("executors") or {}).items():
        dropped = unknown_fields(config, k8s.KubernetesExecutorConfig.DESCRIPTOR)
        if dropped:
            dropped_kubernetes[name] = dropped
        parsed = json_format.ParseDict(config, k8s.KubernetesExecutorConfig(), ignore_unknown_fields=True)
        configs[name] = json_format.MessageToDict(parsed)
    return {
        "upload": upload,
        "dropped_container": dropped_container,
        "container": containers,
        "dropped_kubernetes": dropped_kubernetes,
        "kubernetes": configs,
    }


def _main(argv: list[str]) -> None:
    modules, *packages = argv
    sys.path.insert(0, modules)
    print(json.dumps({package: _read(Path(package)) for package in packages}))


if __name__ == "__main__":
    sys.path.pop(0)  # this file's folder (tests/): nothing there may shadow the generated modules
    _main(sys.argv[1:])
