"""Promote step (components/promote.py, recsys/object_store.py) against a real S3 server on loopback (moto in
server mode, tests/s3_server.py): round trip, verification before the pointer flips, immutable versions,
and KServe's own storage code downloading the promoted version with the environment the Secret gives it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import bundle as bd
from components import promote
from recsys.bundle_manifest import load_manifest
from recsys.manifest_schemas import render_kustomization
from recsys.object_store import POINTER, open_store, read_pointer, restore_previous
from tests.conftest import REPO_ROOT, revalidated, shipped_params, write_params

RUNBOOK = REPO_ROOT / "manifests" / "README.md"


def secret_example() -> dict:
    """The object-store Secret the runbook (manifests/README.md, "Object store") says to apply."""
    text = RUNBOOK.read_text()
    section = text[text.index("\n## Object store\n") :]
    section = section[: section.index("\n## ", 1)]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    (secret,) = [yaml.safe_load(b) for b in blocks if "kind: Secret" in b]
    return secret


def make_bundle(root: Path, name: str, recall: float, payload: bytes = b"weights") -> Path:
    """A real bundle (manifest with checksums) with two members, one in a subfolder."""
    sources = root / f"{name}-src"
    (sources / "models").mkdir(parents=True)
    (sources / "encoders.json").write_text(json.dumps({"bundle": name}))
    (sources / "models" / "model.bin").write_bytes(payload * 1000)
    return bd.assemble_bundle(
        {"encoders.json": sources / "encoders.json", "models/model.bin": sources / "models" / "model.bin"},
        root / name,
        params_text="seed: 1\n",
        metrics={"retrieval": {"recall@50": recall}},
        git_revision="test",
    )


def config(store_uri: str, version: str | None = None):
    return revalidated(shipped_params().promote, uri=store_uri, version=version)


def objects(bucket, prefix: str) -> dict[str, bytes]:
    client = bucket.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket.name, Prefix=prefix).get("Contents", [])]
    return {key[len(prefix) :]: client.get_object(Bucket=bucket.name, Key=key)["Body"].read() for key in keys}


def test_round_trip_uploads_verifies_and_flips_the_pointer(tmp_path, s3_env):
    store_uri = s3_env.uri("bundles")
    first = make_bundle(tmp_path, "first", 0.30)
    pointer = promote.run(config(store_uri), first, output=tmp_path / "pointer.json")
    version = load_manifest(first)["version"]
    assert pointer["uri"] == f"{store_uri}/{version}/"
    assert pointer["previous"] is None and pointer["metrics"] == {"retrieval": {"recall@50": 0.30}}
    assert json.loads((tmp_path / "pointer.json").read_text()) == pointer
    # byte for byte what the local bundle holds, under the version prefix
    stored = objects(s3_env, f"bundles/{version}/")
    local = {p.relative_to(first).as_posix(): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert stored == local
    assert json.loads(objects(s3_env, "bundles/")[POINTER]) == pointer

    second = make_bundle(tmp_path, "second", 0.35, payload=b"better")
    pointer2 = promote.run(config(store_uri), second)
    assert pointer2["version"] == load_manifest(second)["version"] != version
    assert pointer2["previous"]["version"] == version
    assert objects(s3_env, f"bundles/{version}/") == stored  # the old version stays, for a rollback
    # promoting the current bundle again changes nothing
    assert promote.run(config(store_uri), second) == pointer2


def test_a_checksum_failure_keeps_the_previous_version_current(tmp_path, s3_env):
    store_uri = s3_env.uri("bundles")
    good = make_bundle(tmp_path, "good", 0.30)
    before = promote.run(config(store_uri), good)
    bad = make_bundle(tmp_path, "bad", 0.40, payload=b"other")
    member = bad / "models" / "model.bin"
    member.write_bytes(member.read_bytes()[:-1] + b"X")  # same size, different bytes: bit rot
    with pytest.raises(promote.PromoteError, match=r"model\.bin.*current version is unchanged"):
        promote.run(config(store_uri), bad)
    assert read_pointer(open_store(store_uri)) == before
    bad_version = json.loads((bad / "manifest.json").read_text())["version"]
    assert "manifest.json" not in objects(s3_env, f"bundles/{bad_version}/")  # never a complete version


def test_damage_in_the_store_is_found_by_reading_back_and_repaired(tmp_path, s3_env):
    store_uri = s3_env.uri("bundles")
    bundle = make_bundle(tmp_path, "b", 0.30)
    pointer = promote.run(config(store_uri), bundle)
    key = f"bundles/{pointer['version']}/models/model.bin"
    s3_env.client().put_object(Bucket=s3_env.name, Key=key, Body=b"truncated")
    promote.run(config(store_uri), bundle)  # the same bundle again: repairs what does not read back right
    repaired = s3_env.client().get_object(Bucket=s3_env.name, Key=key)["Body"].read()
    assert (
        hashlib.sha256(repaired).hexdigest() == load_manifest(bundle)["files"]["models/model.bin"]["sha256"]
    )


def test_versions_are_immutable(tmp_path, s3_env):
    store_uri = s3_env.uri("bundles")
    first = promote.run(config(store_uri, version="v1"), make_bundle(tmp_path, "a", 0.30))
    assert first["uri"] == f"{store_uri}/v1/"
    with pytest.raises(promote.PromoteError, match="immutable"):
        promote.run(config(store_uri, version="v1"), make_bundle(tmp_path, "b", 0.35, payload=b"new"))
    assert read_pointer(open_store(store_uri)) == first


def test_a_rollback_restores_the_previous_pointer_only_if_still_current(tmp_path, s3_env):
    store = open_store(s3_env.uri("bundles"))
    first = promote.run(config(store.uri()), make_bundle(tmp_path, "a", 0.30))
    second = promote.run(config(store.uri()), make_bundle(tmp_path, "b", 0.35, payload=b"new"))
    assert restore_previous(store, "not-current") == second  # a newer promotion is left alone
    restored = restore_previous(store, second["version"])
    assert restored["version"] == first["version"] and read_pointer(store)["uri"] == first["uri"]
    assert restore_previous(store, first["version"]) is None  # the first promotion undone: no pointer
    assert read_pointer(store) is None


def test_a_store_that_cannot_be_reached_fails_before_anything_is_written(tmp_path, s3_env):
    with pytest.raises(promote.PromoteError, match=r"NoSuchBucket|404.*current version is unchanged"):
        promote.run(config(f"{s3_env.uri()}-missing/bundles"), make_bundle(tmp_path, "a", 0.30))
    assert objects(s3_env, "") == {}


def test_file_store_for_local_runs(tmp_path):
    store_uri = (tmp_path / "store").as_uri()
    pointer = promote.run(config(store_uri), make_bundle(tmp_path, "a", 0.30))
    assert load_manifest(Path(pointer["uri"].removeprefix("file://")))["version"] == pointer["version"]


def kserve_env(secret: dict, endpoint: str) -> dict[str, str]:
    """The storage initializer's environment for ``secret``, by KServe's rules (pkg/credentials/s3:
    BuildSecretEnvs with inferenceservice-config's default key names, BuildS3EnvVars from the
    serving.kserve.io/s3-* annotations)."""
    annotations = secret["metadata"]["annotations"]
    env = {
        "AWS_ACCESS_KEY_ID": secret["stringData"]["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": secret["stringData"]["AWS_SECRET_ACCESS_KEY"],
    }
    host = annotations["serving.kserve.io/s3-endpoint"]
    assert host == endpoint, "the test moves the example's endpoint onto the loopback server"
    scheme = "https"
    if "serving.kserve.io/s3-usehttps" in annotations:
        env["S3_USE_HTTPS"] = annotations["serving.kserve.io/s3-usehttps"]
        scheme = "http" if env["S3_USE_HTTPS"] == "0" else "https"
    env["S3_ENDPOINT"] = host
    env["AWS_ENDPOINT_URL"] = f"{scheme}://{host}"
    for annotation, name in (
        ("s3-verifyssl", "S3_VERIFY_SSL"),
        ("s3-useanoncredential", "awsAnonymousCredential"),
        ("s3-region", "AWS_DEFAULT_REGION"),
        ("s3-usevirtualbucket", "S3_USER_VIRTUAL_BUCKET"),
    ):
        if f"serving.kserve.io/{annotation}" in annotations:
            env[name] = annotations[f"serving.kserve.io/{annotation}"]
    return env


def test_the_secret_example_serves_both_readers_and_production_serving_lists_it():
    secret = secret_example()
    params = shipped_params()
    assert secret["metadata"]["name"] == params.promote.secret
    assert "namespace" not in secret["metadata"] and params.deploy.namespace is None  # kubectl -n places it
    annotations = secret["metadata"]["annotations"]
    scheme = "http" if annotations["serving.kserve.io/s3-usehttps"] == "0" else "https"
    # KFP tasks read AWS_ENDPOINT_URL from the data, KServe derives it from the annotations: they agree
    assert (
        secret["stringData"]["AWS_ENDPOINT_URL"]
        == f"{scheme}://{annotations['serving.kserve.io/s3-endpoint']}"
    )
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (renders the production overlay)")
    objects = render_kustomization(REPO_ROOT / "manifests" / "overlays" / "production")
    (account,) = [
        o
        for o in objects
        if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == params.deploy.service_account
    ]
    # KServe's storage initializer reads the serving pods' own Secret (same keys), not the pipeline's
    assert {"name": params.deploy.storage_secret} in account["secrets"]


def test_kserve_storage_initializer_downloads_the_promoted_bundle(tmp_path, s3_env):
    pytest.importorskip("kserve_storage", reason="KServe's storage code (pip install kserve-storage)")
    pointer = promote.run(config(s3_env.uri("bundles")), make_bundle(tmp_path, "a", 0.30))
    secret = secret_example()
    endpoint = f"{s3_env.endpoint.host}:{s3_env.endpoint.port}"
    secret["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] = endpoint
    secret["stringData"] |= {"AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"]}
    secret["stringData"] |= {"AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
    # only what KServe would inject (plus a PATH): nothing of this test process's S3 setup leaks in
    env = kserve_env(secret, endpoint) | {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    out = tmp_path / "mnt-models"
    script = (
        "import sys; from kserve_storage import Storage; "
        "print(Storage.download(sys.argv[1], out_dir=sys.argv[2]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, pointer["uri"], str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = load_manifest(out, verify=True)  # every member arrived intact, nothing extra
    assert manifest["version"] == pointer["bundle_version"]
    assert not (out / POINTER).exists()


def test_the_clis_promote_and_deploy_the_current_version(tmp_path, s3_env, capsys):
    from components import deploy

    params = write_params(tmp_path / "params.yaml", {"promote.uri": s3_env.uri("bundles")})
    bundle = make_bundle(tmp_path, "a", 0.30)
    assert promote.main(["--params", str(params), "--bundle-dir", str(bundle), "--version", "bootstrap"]) == 0
    uri = f"{s3_env.uri('bundles')}/bootstrap/"
    assert capsys.readouterr().out.strip() == uri
    out = tmp_path / "isvc.yaml"
    assert deploy.main(["--params", str(params), "--promoted", "--dry-run", "--output", str(out)]) == 0
    (isvc,) = yaml.safe_load_all(out.read_text())
    env = {e["name"]: e.get("value") for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == uri
    empty = write_params(tmp_path / "empty.yaml", {"promote.uri": s3_env.uri("nothing-here")})
    assert deploy.main(["--params", str(empty), "--promoted", "--dry-run", "--output", str(out)]) == 1
    assert "nothing promoted yet" in capsys.readouterr().err


def test_the_current_bundle_is_fetched_whole_and_verifies(tmp_path, s3_env):
    """What the monitor task reads of the deployed model: the current version, every member, as promoted."""
    from recsys.object_store import fetch_promoted

    store = open_store(s3_env.uri("bundles"))
    assert fetch_promoted(store, tmp_path / "none") is None  # nothing promoted yet
    promote.run(config(s3_env.uri("bundles")), make_bundle(tmp_path, "first", 0.30))
    second = make_bundle(tmp_path, "second", 0.35, payload=b"better")
    promote.run(config(s3_env.uri("bundles")), second)
    fetched = fetch_promoted(store, tmp_path / "fetched")
    assert load_manifest(fetched, verify=True)["version"] == load_manifest(second)["version"]
    local = {p.relative_to(second).as_posix(): p.read_bytes() for p in second.rglob("*") if p.is_file()}
    assert {
        p.relative_to(fetched).as_posix(): p.read_bytes() for p in fetched.rglob("*") if p.is_file()
    } == local
