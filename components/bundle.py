"""The versioned bundle: user tower, item embeddings + index, rankers and encoders in one checksummed dir.

Serving loads the bundle as a unit, so model and index cannot drift apart: the manifest records the SHA-256
and size of every file, the params and git revision it came from and its evaluation metrics, and the
embedding dim of every index and embedding table in it (which must agree). The bundle is built in a
temporary sibling directory and renamed into place, so a half-built bundle never appears under its name.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from recsys import artifact_layout as layout
from recsys.artifact_io import read_json
from recsys.bundle_assembly import assemble_bundle
from recsys.bundle_blend import BLEND_MEMBER, NEIGHBOURS_MEMBER, blend_of_metrics, write_blend
from recsys.bundle_manifest import BundleIntegrityError, load_manifest
from recsys.step_contract import STEPS

CONTRACT = STEPS["bundle"]

log = logging.getLogger(__name__)

__all__ = [
    "assemble_bundle",
    "main",
    "run",
]  # assemble_bundle: recsys/bundle_assembly.py, shared with index refresh


def run(
    params_path: str | Path,
    metrics_file: str | Path,
    out_dir: str | Path,
    files: Mapping[str, str | Path],
) -> Path:
    """Assemble ``files`` (bundle member name -> file) with the evaluation metrics of ``metrics_file`` and
    the params file's text (the whole configuration the run was built with). When the evaluate step chose
    a retrieval blend (``retrieval.blend``), it joins the bundle as ``retrieval_blend.json``; when that
    blend is item-kNN's, so does the neighbour table the evaluate step wrote beside ``metrics_file``."""
    metrics = read_json(Path(metrics_file), BundleIntegrityError, "evaluation metrics not found")
    params_text = Path(params_path).read_text()
    blend = blend_of_metrics(metrics)
    if blend is None:
        return assemble_bundle(files, Path(out_dir), params_text=params_text, metrics=metrics)
    with tempfile.TemporaryDirectory() as scratch:
        members = {**files, BLEND_MEMBER: write_blend(blend, Path(scratch) / BLEND_MEMBER)}
        if blend.get("source") == "item_knn":
            members[NEIGHBOURS_MEMBER] = neighbour_table_file(Path(metrics_file))
        return assemble_bundle(members, Path(out_dir), params_text=params_text, metrics=metrics)


def neighbour_table_file(metrics_file: Path) -> Path:
    """The evaluate step's item-kNN neighbour table beside ``metrics_file``, checked to load."""
    from models.blend import NeighbourTable

    path = metrics_file.with_name(NEIGHBOURS_MEMBER)
    if not path.is_file():
        raise BundleIntegrityError(
            f"{path}: the evaluation chose the item-kNN blend but its neighbour table is missing "
            "(the evaluate step writes it beside its metrics)"
        )
    try:
        NeighbourTable.load(path)
    except ValueError as exc:
        raise BundleIntegrityError(str(exc)) from exc
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.bundle", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    assemble = commands.add_parser("assemble", help="build the bundle from the layout's artifacts")
    CONTRACT.add_path_options(assemble)
    verify = commands.add_parser("verify", help="check every file of a bundle against its manifest")
    verify.add_argument("bundle_dir", help="the bundle directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "assemble":
        CONTRACT.load(args.params)  # validated whole: the bundle records it
        run(args.params, args.metrics_file, args.out_dir, layout.bundle_members())
        return 0
    try:
        manifest = load_manifest(args.bundle_dir, verify=True)
    except BundleIntegrityError as exc:
        print(f"bundle verify FAILED: {exc}", file=sys.stderr)
        return 1
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    dim = next(iter(manifest["dims"].values()), None)
    print(
        f"bundle {args.bundle_dir}: OK version {manifest['version']}, {len(manifest['files'])} files, "
        f"{total:,} bytes, dim {dim}, git {manifest.get('git_revision')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
