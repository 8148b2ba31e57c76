"""Metrics published to a KFP artifact (pipelines/metrics_artifact.py): the finite numbers by dotted path,
and the file travels with the artifact."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def test_published_metrics_are_the_finite_numbers_by_dotted_path(tmp_path):
    from pipelines.metrics_artifact import publish_metrics

    source = tmp_path / "evaluation.json"
    source.write_text(
        json.dumps({"ranking": {"dlrm": {"auc": 0.71, "ok": True}}, "n": 3, "nan": float("nan")})
    )
    logged: dict[str, float] = {}
    artifact = SimpleNamespace(path=str(tmp_path / "out" / "metrics"), log_metric=logged.__setitem__)
    assert publish_metrics(source, artifact) == {"ranking.dlrm.auc": 0.71, "n": 3.0}
    assert logged == {"ranking.dlrm.auc": 0.71, "n": 3.0}
    assert json.loads(Path(artifact.path).read_text())["n"] == 3  # the file travels with the artifact
