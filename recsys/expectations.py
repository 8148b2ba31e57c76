"""great-expectations suites run as one Checkpoint with Data Docs, and their results summarised: the
machinery behind the validate step (raw tables, training sets) and the monitor's suite on served
features, with the project's two custom expectations (sequence lengths, a foreign key into another
table's file).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no usage analytics, set before GX is imported

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation
from great_expectations.expectations.metrics.map_metric_provider import (
    ColumnMapMetricProvider,
    column_condition_partial,
)

from recsys.contracts import parquet_schema, read_parquet

_DOCS_SITE = "validation_docs"


class ColumnValuesListLengthBetween(ColumnMapMetricProvider):
    """Metric: each value is a list/array whose length lies in [min_value, max_value] (nulls skipped).

    GX's built-in value-length expectation measures ``str(value)``, which for an array is its printed
    form, so sequence features need this one.
    """

    condition_metric_name = "column_values.list_length.between"
    condition_value_keys = ("min_value", "max_value")

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, min_value: int, max_value: int, **kwargs: Any) -> pd.Series:
        lengths = column.map(lambda v: len(v) if isinstance(v, np.ndarray | list | tuple) else -1)
        return (lengths >= min_value) & (lengths <= max_value)


class ColumnValuesInReferenceTable(ColumnMapMetricProvider):
    """Metric: each value occurs in ``reference_column`` of the parquet file ``reference_path``."""

    condition_metric_name = "column_values.in_reference_table"
    condition_value_keys = ("reference_path", "reference_column")

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(
        cls, column: pd.Series, reference_path: str, reference_column: str, **kwargs: Any
    ) -> pd.Series:
        path = Path(reference_path)
        modified = path.stat().st_mtime_ns if path.exists() else 0
        return column.isin(_reference_ids(reference_path, reference_column, modified))


class ExpectColumnValuesToBeInReferenceTable(ColumnMapExpectation):
    """Expect every value to be a key of another table (a foreign key), e.g. each event's item_id."""

    reference_path: str
    reference_column: str
    map_metric = "column_values.in_reference_table"
    success_keys = ("reference_path", "reference_column", "mostly")
    args_keys = ("column", "reference_path", "reference_column")


class ExpectColumnValueListLengthsToBeBetween(ColumnMapExpectation):
    """Expect every sequence in the column to hold between min_value and max_value elements."""

    min_value: int = 0
    max_value: int
    map_metric = "column_values.list_length.between"
    success_keys = ("min_value", "max_value", "mostly")
    args_keys = ("column", "min_value", "max_value")


@dataclass
class TableChecks:
    """One table's expectations and the parquet file they run on (relative to the data directory)."""

    name: str
    path: str
    expectations: list[gxe.Expectation] = field(default_factory=list)


def run_suites(
    target: str,
    data_dir: Path,
    tables: list[TableChecks],
    report_dir: Path,
    examples: int,
) -> Any:
    """Run one Checkpoint over every table of ``data_dir`` (suites named ``<target>.<table>``); the Data
    Docs are built in a temp dir, then moved onto ``report_dir``."""
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{report_dir.name}.", dir=report_dir.parent)).resolve()
    try:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.add_data_docs_site(
            site_name=_DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(staging),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                # validation results only: they show every expectation with its outcome, and the
                # suite pages would be rebuilt after each table (seconds, for nothing new)
                "site_section_builders": {"expectations": "0", "profiling": "0"},
            },
        )
        source = context.data_sources.add_pandas_filesystem(name=target, base_directory=data_dir.resolve())
        definitions = []
        for table in tables:
            asset = source.add_parquet_asset(name=table.name)
            batch = asset.add_batch_definition_path(name=table.name, path=table.path)
            suite = context.suites.add(
                gx.ExpectationSuite(name=f"{target}.{table.name}", expectations=table.expectations)
            )
            definitions.append(
                context.validation_definitions.add(
                    gx.ValidationDefinition(name=f"{target}.{table.name}", data=batch, suite=suite)
                )
            )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{target}_tables",
                validation_definitions=definitions,
                actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[_DOCS_SITE])],
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": examples},
            )
        )
        results = checkpoint.run()
        if report_dir.exists():
            shutil.rmtree(report_dir)
        os.replace(staging, report_dir)
        return results
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summarise(target: str, data_dir: Path, results: Any, examples: int, report_dir: Path) -> dict[str, Any]:
    failures = []
    evaluated = 0
    for run_result in results.run_results.values():
        table = run_result.suite_name.split(".", 1)[1]
        for result in run_result.results:
            evaluated += 1
            if result.success:
                continue
            config = result.expectation_config
            details = result.result or {}
            column = config.kwargs.get("column") or ", ".join(config.kwargs.get("column_list") or [])
            exception = _exception_message(result.exception_info)
            failures.append(
                {
                    "table": table,
                    "expectation": config.type,
                    "column": column or None,
                    "observed_value": _plain(details.get("observed_value")),
                    "unexpected_count": int(details.get("unexpected_count") or 0),
                    "unexpected_percent": _plain(details.get("unexpected_percent")),
                    "examples": [
                        _plain(v) for v in (details.get("partial_unexpected_list") or [])[:examples]
                    ],
                    "exception": exception,
                }
            )
    return {
        "target": target,
        "data_dir": str(data_dir),
        "success": bool(results.success) and not failures,
        "evaluated": evaluated,
        "failed": len(failures),
        "failures": failures,
        "data_docs": str(report_dir / "index.html"),
        "validated_at": datetime.now(UTC).isoformat(),
    }


def failure_message(summary: dict[str, Any]) -> str:
    """One line per failed expectation: table, expectation, column, observed value, example bad values."""
    lines = [f"validation of the {summary['target']} tables in {summary['data_dir']} failed:"]
    for failure in summary["failures"]:
        where = f"column '{failure['column']}'" if failure["column"] else "the table"
        detail = []
        if failure["observed_value"] is not None:
            detail.append(f"observed {failure['observed_value']}")
        if failure["unexpected_count"]:
            detail.append(f"{failure['unexpected_count']} unexpected value(s), e.g. {failure['examples']}")
        if failure["exception"]:
            detail.append(f"error: {failure['exception']}")
        lines.append(
            f"  {failure['table']}: {failure['expectation']} failed on {where}"
            + (f" ({'; '.join(detail)})" if detail else "")
        )
    lines.append(f"  Data Docs: {summary['data_docs']}")
    return "\n".join(lines)


# ---- great-expectations plumbing ------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _reference_ids(path: str, column: str, modified_ns: int) -> np.ndarray:
    """The distinct ids of a dimension table; a missing file or column yields none (every row fails)."""
    if not Path(path).exists() or column not in parquet_schema(path).names:
        return np.array([], dtype=np.int64)
    return read_parquet(path, columns=[column])[column].dropna().unique()


def _exception_message(info: dict[str, Any] | None) -> str | None:
    """The first error message in a GX result's exception info (flat, or keyed by metric in GX 1.x)."""
    if not info:
        return None
    if "exception_message" in info:
        return info["exception_message"] if info.get("raised_exception", True) else None
    messages = (_exception_message(v) for v in info.values() if isinstance(v, dict))
    return next((m for m in messages if m), None)


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a GX result value (timestamps and numpy scalars become plain values)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN / inf (a NaN price, say) as text: the summary stays strict JSON
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, pd.Timestamp | datetime):
        return value.isoformat()
    if hasattr(value, "item") and not isinstance(value, list | dict | str):
        try:
            item = value.item()
        except (ValueError, AttributeError):
            return str(value)
        return _plain(item) if isinstance(item, float) else item
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
