"""The images a registry holds, by digest: the lock file ``images/build.py push`` writes (default
``images/pushed.json``, git-ignored) and ``python -m pipelines compile --images`` pins the pipelines to.

```json
{"images": {
  "pipeline": {"reference": "registry.example.com/ml/recsys-pipeline@sha256:<64 hex>",
               "tag": "registry.example.com/ml/recsys-pipeline:0.1.0",
               "built_as": "ghcr.io/recsys-kfp/recsys-pipeline:0.1.0"},
  "serving": {...}, "training": {...}}}
```

``reference`` is what runs: the repository in the registry and the manifest digest the registry returned
for the push. ``tag`` is the tag pushed beside it, ``built_as`` the local tag it was built as (params.yaml's).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.config import ConfigError, Params, parse_params
from recsys.config.kubernetes import IMAGE_DIGEST, IMAGE_REPO

IMAGE_NAMES = ("pipeline", "serving", "training")  # images/build.py's names
# where each image goes in params.yaml: (section, repo key, digest key)
PINNED_KEYS = {
    "pipeline": ("pipeline", "image_repo", "image_digest"),
    "training": ("pipeline", "training_image_repo", "training_image_digest"),
    "serving": ("deploy", "image_repo", "image_digest"),
}
DIGEST_REFERENCE = re.compile(IMAGE_REPO.rstrip("$") + "@" + IMAGE_DIGEST.lstrip("^"))
TAGGED_REFERENCE = re.compile(r"^(?P<repo>[^@\s]+):(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")


class ImageLockError(ConfigError):
    """The lock file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class LockedImage:
    """One pushed image: ``reference`` (``repo@sha256:...``), the tag pushed and the tag it was built as."""

    reference: str
    tag: str
    built_as: str

    @property
    def repo(self) -> str:
        return self.reference.split("@", 1)[0]

    @property
    def digest(self) -> str:
        return self.reference.split("@", 1)[1]

    def as_json(self) -> dict[str, str]:
        return {"reference": self.reference, "tag": self.tag, "built_as": self.built_as}


def read_lock(path: str | Path) -> dict[str, LockedImage]:
    """The lock file's images by name, every entry checked; :class:`ImageLockError` names what is wrong."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImageLockError(
            f"{path}: no such image lock file (written by `python images/build.py push --registry ...`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ImageLockError(f"{path}: not a JSON image lock file: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), dict):
        raise ImageLockError(f"{path}: images: expected a mapping of image name -> pushed image")
    unknown = sorted(set(raw["images"]) - set(IMAGE_NAMES))
    if unknown:
        raise ImageLockError(f"{path}: images: unknown image(s) {unknown}; known: {', '.join(IMAGE_NAMES)}")
    return {name: _entry(path, name, entry) for name, entry in raw["images"].items()}


def _entry(path: Path, name: str, entry: Any) -> LockedImage:
    where = f"{path}: images.{name}"
    if not isinstance(entry, dict):
        raise ImageLockError(f"{where}: expected a mapping with reference, tag and built_as")
    missing = [key for key in ("reference", "tag", "built_as") if not isinstance(entry.get(key), str)]
    if missing:
        raise ImageLockError(f"{where}: missing or not a string: {', '.join(missing)}")
    unknown = sorted(set(entry) - {"reference", "tag", "built_as"})
    if unknown:
        raise ImageLockError(f"{where}: unknown key(s) {unknown}")
    if not DIGEST_REFERENCE.fullmatch(entry["reference"]):
        raise ImageLockError(
            f"{where}.reference: {entry['reference']!r} is not a digest reference "
            "registry/repository@sha256:<64 lowercase hex>"
        )
    for key in ("tag", "built_as"):
        if not TAGGED_REFERENCE.fullmatch(entry[key]):
            raise ImageLockError(f"{where}.{key}: {entry[key]!r} is not a repository:tag reference")
    return LockedImage(entry["reference"], entry["tag"], entry["built_as"])


def write_lock(path: str | Path, images: dict[str, LockedImage]) -> Path:
    """Write ``images`` (name -> pushed image) as the lock file, names in :data:`IMAGE_NAMES` order."""
    path = Path(path)
    ordered = {name: images[name].as_json() for name in IMAGE_NAMES if name in images}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps({"images": ordered}, indent=2) + "\n")
    staging.replace(path)
    return path


def pin_images(params: Params, lock: dict[str, LockedImage], source: str | Path = "the image lock") -> Params:
    """``params`` with every image's repository and digest set from ``lock`` (validated again): the
    pipelines' tasks then run ``repo@sha256:...`` and the deploy step serves the serving image by digest.

    The lock must hold all three images: a pipeline half pinned by digest is not reproducible."""
    absent = [name for name in IMAGE_NAMES if name not in lock]
    if absent:
        raise ImageLockError(
            f"{source}: images.{absent[0]}: not in the lock (it holds {', '.join(lock) or 'nothing'}); "
            f"push it: python images/build.py push --registry <registry> {' '.join(absent)}"
        )
    raw = params.model_dump(mode="json")
    for name, (section, repo_key, digest_key) in PINNED_KEYS.items():
        raw[section][repo_key] = lock[name].repo
        raw[section][digest_key] = lock[name].digest
    try:
        return parse_params(raw, source=f"params pinned to {source}")
    except ConfigError as exc:
        raise ImageLockError(str(exc)) from None
