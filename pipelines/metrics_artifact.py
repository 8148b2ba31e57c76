"""Metrics JSON (what the steps write) -> scalars on a KFP ``Metrics`` artifact (what the UI shows).

The steps stay KFP-agnostic and write nested JSON; a component copies the file to its ``Metrics``
artifact and logs every finite number in it under its dotted path, so the run page lists them and runs
can be compared side by side.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
from collections.abc import Iterator, Mapping
from html import escape
from pathlib import Path
from typing import Any


def publish_metrics(source: str | Path, artifact: Any, prefix: str = "") -> dict[str, float]:
    """Copy the metrics JSON ``source`` to ``artifact.path`` and log its numbers; returns what was logged."""
    source = Path(source)
    values = json.loads(source.read_text())
    target = Path(artifact.path)
    if target.resolve() != source.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    logged = dict(scalar_metrics(values, prefix))
    for name, value in logged.items():
        artifact.log_metric(name, value)
    return logged


def scalar_metrics(values: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every finite number in nested JSON as (dotted.path, value); booleans and strings are skipped."""
    if isinstance(values, Mapping):
        for key, value in values.items():
            yield from scalar_metrics(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(values, int | float) and not isinstance(values, bool) and math.isfinite(values):
        yield prefix, float(values)


def png_page(png: str | Path, html: str | Path, title: str) -> Path:
    """A one-file HTML page showing ``png`` inline (the KFP UI renders an HTML artifact, not a PNG)."""
    encoded = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title></head>"
        f"<body><h3>{escape(title)}</h3><img alt='{escape(title)}' src='data:image/png;base64,{encoded}'>"
        "</body></html>\n"
    )
    html = Path(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(page)
    return html
