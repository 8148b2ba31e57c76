"""Build the project's images: ``python images/build.py [pipeline serving training base]`` (``make images``);
push them: ``python images/build.py push --registry HOST[:PORT][/PATH] [pipeline serving training]``.

Tags come from params.yaml: ``pipeline.image_repo``, ``pipeline.training_image_repo`` and
``deploy.image_repo``, all at ``pipeline.image_tag`` (the compiled pipeline and the InferenceService
name the same references). Without arguments it builds the pipeline and serving images; the training
image (CUDA torch, several GB) only when named.

Three things make a build work on a machine that reaches no container registry, only package indexes:

- **base**: ``--base-image local`` (the default here) builds ``recsys-base:bookworm`` once from Debian's
  packages (``debootstrap``, root only) with the same Python 3.11 the public base has; ``--base-image
  python:3.11.13-slim-bookworm@sha256:...`` (or any pinned Python 3.11 image) uses a registry's.
- **CA bundle**: pip inside the build gets pip's ``cert`` setting (``$PIP_CERT`` or pip's config) or
  ``$SSL_CERT_FILE`` as the BuildKit secret ``pip_ca``, mounted for the install only, never in a layer.
- **CPU torch**: a ``torch-<version>+cpu`` wheel in pip's find-links (``$PIP_FIND_LINKS`` or pip's
  config) is linked into ``images/wheelhouse/`` and installed from there, not from the PyTorch CPU index.

BuildKit is required (secret and bind mounts): ``docker buildx`` when installed, else a Docker client
older than 23 (Debian's ``docker.io``), which still builds with the daemon's own BuildKit.

``push`` (``make images push REGISTRY=...``) retags each built image into the registry under the last
path segment of its params.yaml repository (``ghcr.io/recsys-kfp/recsys-pipeline:0.1.0`` ->
``REGISTRY/recsys-pipeline:0.1.0``), pushes it, and records the manifest digest the registry returned in
a lock file (``--lock``, default ``images/pushed.json``, git-ignored; recsys/image_lock.py):
``python -m pipelines compile --images images/pushed.json`` then names every image by that digest. The
Docker daemon logs in to the registry itself (``docker login``): no credential passes through here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO_ROOT / "images" / "wheelhouse"
LOCAL_BASE = "recsys-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# what the public python:3.11-slim base gives the Dockerfiles: python3 with venv, CA roots, tzdata
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "tzdata", "libgomp1")
CUDA_TORCH_ARGS = "--index-url https://pypi.org/simple"


class BuildError(RuntimeError):
    """An image could not be built; the message says which and why."""


@dataclass(frozen=True)
class Image:
    """One image: its Dockerfile, the tag params.yaml gives it, and how its torch is installed."""

    name: str
    dockerfile: Path
    tag: str
    cuda: bool = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["push"]:
        return push_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python images/build.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "images", nargs="*", default=["pipeline", "serving"], help="pipeline serving training"
    )
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"))
    parser.add_argument(
        "--base-image", default=os.environ.get("BASE_IMAGE", "local"), help="'local' or a pinned image"
    )
    args = parser.parse_args(argv)
    try:
        known = images(args.params)
        for name in args.images:
            if name == "base":
                print(ensure_local_base())
                continue
            image = known.get(name)
            if image is None:
                raise BuildError(f"unknown image {name!r}: choose from base, {', '.join(known)}")
            build(image, args.base_image)
    except BuildError as exc:
        print(f"images/build.py: {exc}", file=sys.stderr)
        return 1
    return 0


def images(params_path: str | Path = REPO_ROOT / "params.yaml") -> dict[str, Image]:
    """The project's images, tagged as params.yaml names them."""
    sys.path.insert(0, str(REPO_ROOT))
    from recsys.config import load_params

    params = load_params(params_path)
    here = REPO_ROOT / "images"
    tag = params.pipeline.image_tag  # built and pushed by tag; a digest exists only once pushed
    return {
        "pipeline": Image("pipeline", here / "pipeline.Dockerfile", f"{params.pipeline.image_repo}:{tag}"),
        "serving": Image("serving", here / "serving.Dockerfile", f"{params.deploy.image_repo}:{tag}"),
        "training": Image(
            "training",
            here / "pipeline.Dockerfile",
            f"{params.pipeline.training_image_repo}:{tag}",
            cuda=True,
        ),
    }


def build(image: Image, base_image: str = "local") -> str:
    """Build ``image`` from ``base_image`` ('local': the debootstrapped base); returns its tag."""
    base = ensure_local_base() if base_image == "local" else base_image
    torch_args = CUDA_TORCH_ARGS if image.cuda else _cpu_torch_args()
    command = [
        *_buildkit_client(),
        "--file",
        str(image.dockerfile),
        "--tag",
        image.tag,
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--progress",
        "plain",
    ]
    if torch_args is not None:
        command += ["--build-arg", f"TORCH_PIP_ARGS={torch_args}"]
    ca_bundle = _pip_setting("cert") or os.environ.get("SSL_CERT_FILE")
    if ca_bundle and Path(ca_bundle).is_file():
        command += ["--secret", f"id=pip_ca,src={ca_bundle}"]
    started = time.monotonic()
    _run([*command, str(REPO_ROOT)], f"building {image.tag}", env=_buildkit_env())
    print(f"built {image.tag} in {time.monotonic() - started:.0f} s", flush=True)
    return image.tag


def ensure_local_base() -> str:
    """``recsys-base:bookworm`` from Debian's packages (debootstrap + docker import), built once."""
    if image_exists(LOCAL_BASE):
        return LOCAL_BASE
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin")
    if debootstrap is None or os.geteuid() != 0:
        raise BuildError(
            f"no base image: building {LOCAL_BASE} needs root and debootstrap (apt-get install debootstrap); "
            "or pass --base-image python:3.11.13-slim-bookworm@sha256:... where a registry is reachable"
        )
    with tempfile.TemporaryDirectory(prefix="recsys-base-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        _run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            "debootstrap of the base image",
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
        ]
        _run(
            ["docker", "import", *[arg for c in changes for arg in ("--change", c)], "-", LOCAL_BASE],
            "docker import of the base image",
            stdin=tar.stdout,
        )
        tar.wait()
    return LOCAL_BASE


DEFAULT_LOCK = REPO_ROOT / "images" / "pushed.json"


def push_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python images/build.py push",
        description="Push built images to a registry and record their digests (the image lock).",
    )
    parser.add_argument(
        "images", nargs="*", default=["pipeline", "serving"], help="pipeline serving training"
    )
    parser.add_argument(
        "--registry", required=True, help="HOST[:PORT][/PATH], e.g. registry.example.com/ml or 127.0.0.1:5000"
    )
    parser.add_argument("--lock", default=str(DEFAULT_LOCK), help="the image lock file to write (merged)")
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"))
    args = parser.parse_args(argv)
    try:
        registry = checked_registry(args.registry)
        known = images(args.params)
        unknown = [name for name in args.images if name not in known]
        if unknown:
            raise BuildError(f"unknown image(s) {unknown}: choose from {', '.join(known)}")
        pushed = {name: push(known[name], registry) for name in dict.fromkeys(args.images)}
        lock = record(args.lock, pushed)
    except BuildError as exc:
        print(f"images/build.py push: {exc}", file=sys.stderr)
        return 1
    for name, image in pushed.items():
        print(f"{name}: {image.reference}")
    print(f"wrote {lock}")
    return 0


def checked_registry(registry: str) -> str:
    """``registry`` without a trailing slash, refused unless its first component names a registry host:
    Docker reads ``name/...`` without a dot, a port or ``localhost`` as a Docker Hub namespace."""
    from recsys.config.kubernetes import IMAGE_REPO

    registry = registry.strip().rstrip("/")
    host = registry.split("/", 1)[0]
    if not ("." in host or ":" in host or host == "localhost") or not re.fullmatch(
        IMAGE_REPO, f"{registry}/image"
    ):
        raise BuildError(
            f"--registry {registry!r}: not HOST[:PORT][/PATH] (lowercase; the host needs a dot, a :port or "
            "to be localhost, else Docker reads it as a Docker Hub namespace: docker.io/<namespace>)"
        )
    return registry


def push(image: Image, registry: str) -> Any:
    """Tag ``image`` into ``registry``, push it, and return what the registry holds (a ``LockedImage``):
    ``registry/<name>@sha256:...``, the digest the registry returned for the push."""
    from recsys.image_lock import LockedImage

    if not image_exists(image.tag):
        raise BuildError(
            f"image {image.name!r}: {image.tag} is not built here; build it first "
            f"(python images/build.py {image.name}, or make {'images-training' if image.cuda else 'images'})"
        )
    repo, tag = image.tag.rsplit(":", 1)
    target_repo = f"{registry}/{repo.rsplit('/', 1)[-1]}"
    target = f"{target_repo}:{tag}"
    _run(["docker", "tag", image.tag, target], f"tagging image {image.name!r} as {target}")
    print(f"+ docker push {target}", flush=True)
    started = time.monotonic()
    done = subprocess.run(["docker", "push", target], capture_output=True, text=True, check=False)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        subprocess.run(["docker", "rmi", target], capture_output=True, check=False)  # only our tag
        reason = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise BuildError(
            f"pushing image {image.name!r} ({image.tag}) to registry {registry} failed "
            f"(exit {done.returncode}): {' '.join(reason)}. Is the registry running and reachable from the "
            "Docker daemon, and logged in to (docker login) where it needs credentials? A plain-HTTP "
            "registry outside 127.0.0.0/8 must be in the daemon's insecure-registries."
        )
    digest = _pushed_digest(done.stdout, tag)
    held = _repo_digests(target, target_repo)
    if digest is None:  # an older client's output: the daemon's record of the push
        if len(held) != 1:
            raise BuildError(
                f"pushed image {image.name!r} to {target}, but cannot tell its digest: no digest in the "
                f"push output and {len(held)} RepoDigests for {target_repo}"
            )
        digest = held[0]
    elif held and digest not in held:
        raise BuildError(
            f"pushed image {image.name!r} to {target}: the push reported {digest}, the daemon records "
            f"{held} for {target_repo}"
        )
    print(f"pushed {target_repo}@{digest} in {time.monotonic() - started:.0f} s", flush=True)
    return LockedImage(reference=f"{target_repo}@{digest}", tag=target, built_as=image.tag)


def record(lock_path: str | Path, pushed: dict[str, Any]) -> Path:
    """Merge ``pushed`` into the lock file (images pushed earlier and not now stay) and write it."""
    from recsys.image_lock import ImageLockError, read_lock, write_lock

    lock_path = Path(lock_path)
    earlier = {}
    if lock_path.exists():
        try:
            earlier = read_lock(lock_path)
        except ImageLockError as exc:
            print(f"images/build.py push: replacing an unusable lock: {exc}", file=sys.stderr)
    return write_lock(lock_path, earlier | pushed)


def _pushed_digest(output: str, tag: str) -> str | None:
    """The digest ``docker push`` prints for ``tag`` (``<tag>: digest: sha256:<hex> size: <n>``)."""
    pattern = rf"^{re.escape(tag)}: digest: (sha256:[0-9a-f]{{64}}) size: \d+$"
    found = re.findall(pattern, output, re.MULTILINE)
    return found[-1] if found else None


def _repo_digests(image: str, repo: str) -> list[str]:
    """The digests the daemon records for ``image`` in repository ``repo`` (``docker inspect``)."""
    done = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", image],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return []
    entries = json.loads(done.stdout or "null") or []
    return [entry.split("@", 1)[1] for entry in entries if entry.split("@", 1)[0] == repo]


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def _cpu_torch_args() -> str | None:
    """pip arguments for CPU torch: the local wheel when pip's find-links hold one, else None (the
    Dockerfile's default, the PyTorch CPU index)."""
    version = _pinned_torch()
    for folder in _pip_setting("find-links").split():
        for wheel in sorted(Path(folder).glob(f"torch-{version}+cpu-cp311-*.whl")):
            WHEELHOUSE.mkdir(exist_ok=True)
            target = WHEELHOUSE / wheel.name
            if not target.exists():
                try:
                    os.link(wheel, target)
                except OSError:
                    shutil.copyfile(wheel, target)
            return "--no-index"
    return None


def _pip_setting(name: str) -> str:
    """A pip setting as this machine's pip sees it: ``$PIP_<NAME>``, else pip's config files."""
    value = os.environ.get(f"PIP_{name.upper().replace('-', '_')}")
    if value:
        return value
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", f"global.{name}"], capture_output=True, text=True
    )
    return done.stdout.strip().strip("'\"") if done.returncode == 0 else ""


def _pinned_torch() -> str:
    text = (REPO_ROOT / "images" / "constraints.txt").read_text()
    match = re.search(r"^torch==(\S+)$", text, flags=re.MULTILINE)
    if match is None:
        raise BuildError("images/constraints.txt pins no torch version")
    return match.group(1)


def _buildkit_client() -> list[str]:
    """A ``docker ... build`` command line that builds with BuildKit."""
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0:
        return ["docker", "buildx", "build", "--load"]
    for client in dict.fromkeys(filter(None, [shutil.which("docker"), "/usr/bin/docker"])):
        version = subprocess.run(
            [client, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True
        ).stdout.strip()
        if version and int(version.split(".")[0]) < 23:
            return [client, "build"]
    raise BuildError(
        "no Docker client that builds with BuildKit: install docker buildx, or Debian's docker.io "
        "(its client, /usr/bin/docker, builds with the daemon's BuildKit)"
    )


def _buildkit_env() -> dict[str, str]:
    return {**os.environ, "DOCKER_BUILDKIT": "1"}


def _run(command: list[str], what: str, **kwargs) -> None:
    print(f"+ {' '.join(command)}", flush=True)
    result = subprocess.run(command, check=False, **kwargs)
    if result.returncode != 0:
        raise BuildError(f"{what} failed (exit {result.returncode}); its output is above")


if __name__ == "__main__":
    raise SystemExit(main())
