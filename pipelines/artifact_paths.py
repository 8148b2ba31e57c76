"""Where a step's configured file lives inside a KFP artifact.

Locally (DVC) every step reads and writes the paths in params.yaml (``artifacts/index/items.faiss``...).
In the pipeline each output directory is a KFP artifact instead: the file keeps its name and its place
below the configured directory, and the directory is swapped for the artifact's path. ``rebase`` does that
swap, so the wrappers never hard-code a file name the config already knows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def rebase(path: str | Path, moves: Mapping[str | Path, str | Path]) -> Path:
    """``path`` moved from the configured directory it is under to that directory's artifact path.

    ``moves`` maps configured directories to artifact paths; the deepest matching directory wins, so a
    nested output (``artifacts/models/dlrm``) can move separately from its parent (``artifacts/models``).
    """
    path = Path(path)
    matches = [(Path(configured), Path(artifact)) for configured, artifact in moves.items()]
    matches = [(configured, artifact) for configured, artifact in matches if path.is_relative_to(configured)]
    if not matches:
        raise ValueError(f"{path}: not under any artifact directory ({', '.join(sorted(map(str, moves)))})")
    configured, artifact = max(matches, key=lambda match: len(match[0].parts))
    return artifact / path.relative_to(configured)


def rebase_all(files: Mapping[str, str | Path], moves: Mapping[str | Path, str | Path]) -> dict[str, Path]:
    """``rebase`` for every value of a name -> path mapping (e.g. the bundle's member list)."""
    return {name: rebase(path, moves) for name, path in files.items()}
