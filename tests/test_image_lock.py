"""The image lock (recsys/image_lock.py) without Docker: what ``images/build.py push`` writes, how it is
read and checked, and the pipelines compiled from a synthetic lock (``compile --images``): every executor
image by digest, the deploy step's serving image by digest, and nothing else changed. Pushing to a real
registry and running the pulled images: tests/test_image_registry.py."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.__main__ import main
from recsys.config import ConfigError, load_params, params_from_yaml_text
from recsys.image_lock import (
    IMAGE_NAMES,
    ImageLockError,
    LockedImage,
    pin_images,
    read_lock,
    write_lock,
)
from tests.conftest import REPO_ROOT, write_params

REGISTRY = "registry.example.com:5000/ml"
DIGESTS = {name: f"sha256:{str(i + 1) * 64}" for i, name in enumerate(IMAGE_NAMES)}
REPOS = {"pipeline": "recsys-pipeline", "serving": "recsys-serving", "training": "recsys-training"}


def synthetic_lock(names=IMAGE_NAMES) -> dict[str, Any]:
    return {
        "images": {
            name: {
                "reference": f"{REGISTRY}/{REPOS[name]}@{DIGESTS[name]}",
                "tag": f"{REGISTRY}/{REPOS[name]}:0.1.0",
                "built_as": f"ghcr.io/recsys-kfp/{REPOS[name]}:0.1.0",
            }
            for name in names
        }
    }


def _write(path: Path, content: Any) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def lock_file(tmp_path) -> Path:
    return _write(tmp_path / "pushed.json", synthetic_lock())


# ---- reading and checking the lock --------------------------------------------------------------


def test_a_lock_reads_back_what_was_written(tmp_path, lock_file):
    images = read_lock(lock_file)
    assert set(images) == set(IMAGE_NAMES)
    serving = images["serving"]
    assert serving.repo == f"{REGISTRY}/recsys-serving" and serving.digest == DIGESTS["serving"]
    assert serving.built_as == "ghcr.io/recsys-kfp/recsys-serving:0.1.0"
    again = write_lock(tmp_path / "again" / "pushed.json", images)
    assert read_lock(again) == images
    assert json.loads(again.read_text()) == synthetic_lock()  # names in pipeline, serving, training order


def _broken(**changes: Any) -> dict[str, Any]:
    lock = synthetic_lock()
    for dotted, value in changes.items():
        name, key = dotted.split("__")
        if value is None:
            del lock["images"][name][key]
        else:
            lock["images"][name][key] = value
    return lock


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not a JSON image lock file"),
        ({"pipeline": {}}, "images: expected a mapping"),
        ({"images": {"gpu": {}}}, r"unknown image\(s\) \['gpu'\]"),
        ({"images": {"pipeline": "r/a@sha256:x"}}, "images.pipeline: expected a mapping"),
        (_broken(serving__reference=None), "images.serving: missing or not a string: reference"),
        (_broken(serving__extra="x"), r"images.serving: unknown key\(s\) \['extra'\]"),
        (
            _broken(pipeline__reference=f"{REGISTRY}/recsys-pipeline:0.1.0"),
            "images.pipeline.reference: .* is not a digest reference",
        ),
        (
            _broken(pipeline__reference=f"{REGISTRY}/recsys-pipeline@sha256:{'A' * 64}"),
            "images.pipeline.reference",
        ),
        (
            _broken(training__reference=f"{REGISTRY}/recsys-training@sha256:{'0' * 63}"),
            "images.training.reference",
        ),
        (_broken(training__reference=f"recsys-training@{DIGESTS['training']}"), "images.training.reference"),
        (_broken(serving__built_as="ghcr.io/recsys-kfp/recsys-serving"), "images.serving.built_as"),
    ],
)
def test_a_malformed_lock_is_named_by_file_and_key(tmp_path, content, message):
    path = _write(tmp_path / "pushed.json", content)
    with pytest.raises(ImageLockError, match=message) as raised:
        read_lock(path)
    assert str(raised.value).startswith(str(path))
    assert isinstance(raised.value, ConfigError)  # the CLIs report it like a bad params file


def test_no_lock_file_says_what_writes_one(tmp_path):
    with pytest.raises(ImageLockError, match=r"no such image lock file.*images/build\.py push"):
        read_lock(tmp_path / "absent.json")


# ---- pinning the params -------------------------------------------------------------------------


def test_pinning_sets_every_repository_and_digest():
    params = load_params(REPO_ROOT / "params.yaml")
    lock = {name: LockedImage(**entry) for name, entry in synthetic_lock()["images"].items()}
    pinned = pin_images(params, lock)
    assert pinned.pipeline.image == f"{REGISTRY}/recsys-pipeline@{DIGESTS['pipeline']}"
    assert pinned.pipeline.training_image == f"{REGISTRY}/recsys-training@{DIGESTS['training']}"
    assert pinned.deploy.image("0.1.0") == f"{REGISTRY}/recsys-serving@{DIGESTS['serving']}"
    assert pinned.pipeline.image_tag == params.pipeline.image_tag  # still the release's name
    # everything else as it was
    unpinned = pinned.model_dump()
    for section, repo, digest in (
        ("pipeline", "image_repo", "image_digest"),
        ("pipeline", "training_image_repo", "training_image_digest"),
        ("deploy", "image_repo", "image_digest"),
    ):
        unpinned[section][repo] = getattr(getattr(params, section), repo)
        unpinned[section][digest] = None
    assert unpinned == params.model_dump()


def test_a_lock_without_an_image_is_refused_naming_it(tmp_path):
    params = load_params(REPO_ROOT / "params.yaml")
    path = _write(tmp_path / "pushed.json", synthetic_lock(("pipeline", "serving")))
    with pytest.raises(ImageLockError, match=r"pushed.json: images.training: not in the lock"):
        pin_images(params, read_lock(path), source=path)


# ---- the config keys ----------------------------------------------------------------------------


def test_the_shipped_params_name_images_by_tag_and_no_pull_secrets():
    params = load_params(REPO_ROOT / "params.yaml")
    cfg = params.pipeline
    assert (cfg.image_digest, cfg.training_image_digest, params.deploy.image_digest) == (None, None, None)
    assert cfg.image == f"{cfg.image_repo}:{cfg.image_tag}"
    assert cfg.image_pull_secrets == [] and params.deploy.image_pull_secrets == []


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("pipeline.image_digest", "sha256:abc", "pipeline.image_digest"),
        ("pipeline.training_image_digest", "md5:" + "0" * 64, "pipeline.training_image_digest"),
        ("deploy.image_digest", "sha256:" + "F" * 64, "deploy.image_digest"),
        ("pipeline.image_pull_secrets", ["Regcred"], r"pipeline.image_pull_secrets.0"),
        ("pipeline.image_pull_secrets", ["a" * 254], r"pipeline.image_pull_secrets.0"),
        ("deploy.image_pull_secrets", ["regcred", "regcred"], "named more than once"),
        ("deploy.image_pull_secrets", ["-x"], r"deploy.image_pull_secrets.0"),
    ],
)
def test_bad_digests_and_secret_names_are_refused_with_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_params(REPO_ROOT / "params.yaml", overrides={key: value})


def test_secret_names_are_dns_1123_subdomains():
    params = load_params(
        REPO_ROOT / "params.yaml",
        overrides={"pipeline.image_pull_secrets": ["regcred", "ghcr.io-pull", "a" * 253]},
    )
    assert params.pipeline.image_pull_secrets[1] == "ghcr.io-pull"


# ---- compile --images ---------------------------------------------------------------------------


def _compile(tmp_path: Path, which: str, *extra: str, params: Path | None = None) -> dict[str, Any]:
    out = tmp_path / f"{which}.yaml"
    args = ["--params", str(params or REPO_ROOT / "params.yaml"), "compile", "--pipeline", which]
    assert main([*args, "--output", str(out), *extra]) == 0
    spec, *platform = [d for d in yaml.safe_load_all(out.read_text()) if d]
    return {"spec": spec, "platform": platform[0] if platform else {}}


def executor_images(spec: dict[str, Any]) -> dict[str, str]:
    return {
        name: executor["container"]["image"] for name, executor in spec["deploymentSpec"]["executors"].items()
    }


def params_default(spec: dict[str, Any]):
    return params_from_yaml_text(
        spec["root"]["inputDefinitions"]["parameters"]["params_yaml"]["defaultValue"]
    )


@pytest.mark.parametrize("which", ["training", "index-refresh"])
def test_compiled_with_a_lock_every_executor_runs_its_image_by_digest(tmp_path, lock_file, which):
    (tmp_path / "plain").mkdir()
    plain = _compile(tmp_path / "plain", which)
    pinned = _compile(tmp_path, which, "--images", str(lock_file))
    lock = read_lock(lock_file)
    images = executor_images(pinned["spec"])
    training = {name for name in images if re.fullmatch(r"exec-(train|search)(-\d+)?", name)}
    assert (which == "training") == bool(training)
    for name, image in images.items():
        expected = lock["training" if name in training else "pipeline"].reference
        assert image == expected, name
        assert re.fullmatch(r"[^@:]+(:\d+)?/[^@]+@sha256:[0-9a-f]{64}", image)
    # the deploy step renders the InferenceService from this config: the serving image by digest
    pinned_params = params_default(pinned["spec"])
    assert pinned_params.deploy.image(pinned_params.pipeline.image_tag) == lock["serving"].reference
    # nothing but the images and the config default differs from the plain compile
    for compiled in (plain, pinned):
        for executor in compiled["spec"]["deploymentSpec"]["executors"].values():
            executor["container"].pop("image")
        compiled["spec"]["root"]["inputDefinitions"]["parameters"]["params_yaml"].pop("defaultValue")
    assert pinned == plain


def test_a_malformed_or_incomplete_lock_fails_compile_naming_file_and_key(tmp_path, capsys):
    incomplete = _write(tmp_path / "incomplete.json", synthetic_lock(("pipeline", "training")))
    args = ["--params", str(REPO_ROOT / "params.yaml"), "compile", "--output", str(tmp_path / "p.yaml")]
    assert main([*args, "--images", str(incomplete)]) == 1
    assert f"pipelines compile: {incomplete}: images.serving: not in the lock" in capsys.readouterr().err
    broken = _write(tmp_path / "broken.json", _broken(pipeline__reference="ghcr.io/a/b:1"))
    assert main([*args, "--images", str(broken)]) == 1
    assert f"{broken}: images.pipeline.reference" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


# ---- pull secrets in the compiled pipelines -----------------------------------------------------


def _executor_configs(compiled: dict[str, Any]) -> dict[str, dict[str, Any]]:
    kubernetes = compiled["platform"].get("platforms", {}).get("kubernetes", {})
    return kubernetes.get("deploymentSpec", {}).get("executors", {})


@pytest.mark.parametrize("which", ["training", "index-refresh"])
def test_every_task_pulls_with_the_pull_secrets_and_none_by_default(tmp_path, which):
    params = write_params(tmp_path / "params.yaml", {"pipeline.image_pull_secrets": ["regcred", "mirror"]})
    with_secrets = _compile(tmp_path, which, params=params)
    executors = set(with_secrets["spec"]["deploymentSpec"]["executors"])
    configs = _executor_configs(with_secrets)
    assert set(configs) == executors  # every task's pod, not only those with other kubernetes config
    for name, config in configs.items():
        assert [entry["secretName"] for entry in config["imagePullSecret"]] == ["regcred", "mirror"], name
    committed = REPO_ROOT / "pipelines" / f"recsys_{which.replace('-', '_')}.yaml"
    assert "imagePullSecret" not in committed.read_text()  # the default, []: nothing added


# ---- images/build.py push's parsing ---------------------------------------------------------------


@pytest.fixture(scope="module")
def build_script():
    spec = importlib.util.spec_from_file_location("images_build", REPO_ROOT / "images" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_push_reads_the_digest_docker_push_prints(build_script):
    digest = "sha256:" + "ab" * 32
    output = f"The push refers to repository [r:5000/x]\nabc: Pushed\n0.1.0: digest: {digest} size: 1572\n"
    assert build_script._pushed_digest(output, "0.1.0") == digest
    assert build_script._pushed_digest(output, "0.2.0") is None
    assert build_script._pushed_digest("0.1.0: digest: sha256:abc size: 1\n", "0.1.0") is None


@pytest.mark.parametrize(
    ("registry", "accepted"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("registry.example.com/ml/", "registry.example.com/ml"),
        ("localhost:5000/a/b", "localhost:5000/a/b"),
        ("localhost", "localhost"),
        ("myorg", None),  # Docker Hub namespace, not a host
        ("Registry.example.com", None),
        ("registry.example.com:port", None),
        ("", None),
    ],
)
def test_push_takes_only_a_registry_host(build_script, registry, accepted):
    if accepted is None:
        with pytest.raises(build_script.BuildError, match="not HOST"):
            build_script.checked_registry(registry)
    else:
        assert build_script.checked_registry(registry) == accepted


def test_push_merges_into_an_earlier_lock(build_script, tmp_path, lock_file):
    fresh = LockedImage(
        reference=f"other.example.com/recsys-training@sha256:{'9' * 64}",
        tag="other.example.com/recsys-training:0.2.0",
        built_as="ghcr.io/recsys-kfp/recsys-training:0.2.0",
    )
    build_script.record(lock_file, {"training": fresh})
    merged = read_lock(lock_file)
    assert merged["training"] == fresh and merged["pipeline"].digest == DIGESTS["pipeline"]
    _write(lock_file, "{broken")
    build_script.record(lock_file, {"training": fresh})  # an unusable lock is replaced, saying so
    assert read_lock(lock_file) == {"training": fresh}


def test_push_refuses_an_image_that_is_not_built_naming_it(build_script, monkeypatch):
    monkeypatch.setattr(build_script, "image_exists", lambda tag: False)
    image = build_script.images(REPO_ROOT / "params.yaml")["training"]
    with pytest.raises(
        build_script.BuildError, match=r"image 'training': .* is not built here.*images-training"
    ):
        build_script.push(image, "127.0.0.1:5000")
