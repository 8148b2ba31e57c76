"""Validation step: great-expectations gates on the raw tables and on the training sets.

``python -m components.validate --target raw|training`` builds an ephemeral GX context with a pandas
filesystem data source over the tables on disk (one parquet asset and batch definition per table), one
ExpectationSuite and ValidationDefinition per table, and a Checkpoint whose UpdateDataDocsAction writes
the Data Docs (HTML) to ``reports/validation/<target>/``. A JSON summary goes to
``reports/validation/<target>_summary.json``. When any expectation fails, the failures are printed with
the expectation, the column and example bad values, and the step raises (the CLI exits 1), so nothing
downstream runs.

raw: every contract column present and every file readable (else the file is named before GX runs);
ids not null and int64; item prices not null and >= 0, item categories not null; labels in {0, 1};
event times inside [validation.earliest_timestamp, now]; no duplicate (user_id, event_timestamp); every
event's user and item in the dimension tables (a foreign-key expectation that reads the dimension's ids
from its file, so the Data Docs name the table instead of listing a million ids); row counts and
positive rate inside the configured bounds.

training (reads ``manifest.json`` written by the training-set step): rows equal the entity rows, row ids
unique; null share of every column under ``validation.max_null_fraction``; history lengths <=
``features.history_length``; each split inside its cut points and strictly after the previous split's
last event (so the splits cannot overlap); label rate per ranking split inside bounds, retrieval all 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

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

from recsys import artifact_layout as layout
from recsys.artifact_io import write_json
from recsys.config import ConfigError, ValidationConfig
from recsys.contracts import (
    RAW_TABLES,
    TIMESTAMP,
    DataContractError,
    check_raw_columns,
    parquet_schema,
    read_parquet,
)
from recsys.step_contract import STEPS

CONTRACT = STEPS["validate"]

log = logging.getLogger(__name__)

Target = Literal["raw", "training"]
TARGETS: tuple[Target, ...] = ("raw", "training")
TRAINING_SETS = ("retrieval", "ranking")
SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"  # written by components/training_set.py
SEQUENCE_COLUMNS = ("hist_item_ids", "hist_categories")
_DOCS_SITE = "validation_docs"


class DataValidationError(RuntimeError):
    """At least one expectation failed; the message lists each failure with example bad values."""


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


def run(
    config: ValidationConfig,
    target: Target,
    data_dir: str | Path,
    *,
    report_dir: str | Path,
    summary_file: str | Path,
) -> dict[str, Any]:
    """Validate the ``target`` tables in ``data_dir``; write Data Docs + summary; raise on any failure."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    data_dir = Path(data_dir)
    report_dir, summary_file = Path(report_dir), Path(summary_file)
    tables = raw_checks(config, data_dir) if target == "raw" else training_checks(config, data_dir)
    results = _run_checkpoint(target, data_dir, tables, report_dir, config.unexpected_examples)
    summary = _summarise(target, data_dir, results, config.unexpected_examples, report_dir)
    write_json(summary, summary_file)
    if not summary["success"]:
        raise DataValidationError(failure_message(summary))
    log.info(
        "validate %s: %d expectations passed on %d tables (Data Docs: %s)",
        target,
        summary["evaluated"],
        len(tables),
        report_dir / "index.html",
    )
    return summary


def raw_checks(config: ValidationConfig, raw_dir: Path) -> list[TableChecks]:
    """Suites for users, items and events; a missing, unreadable or column-short file is named first."""
    for name in RAW_TABLES:
        path = raw_dir / f"{name}.parquet"
        if not path.exists():
            raise DataContractError(f"{path}: raw table '{name}' not found")
        check_raw_columns(name, parquet_schema(path).names, path)
    bounds = config.row_counts
    now = datetime.now(UTC)
    users = TableChecks("users", "users.parquet", _id_expectations("user_id", unique=True))
    users.expectations += [
        gxe.ExpectTableRowCountToBeBetween(min_value=bounds.users_min, max_value=bounds.users_max),
        gxe.ExpectColumnValuesToNotBeNull(column="signup_timestamp"),
    ]
    items = TableChecks("items", "items.parquet", _id_expectations("item_id", unique=True))
    items.expectations += [
        gxe.ExpectTableRowCountToBeBetween(min_value=bounds.items_min, max_value=bounds.items_max),
        gxe.ExpectColumnValuesToNotBeNull(column="created_timestamp"),
        gxe.ExpectColumnValuesToNotBeNull(column="category"),
        gxe.ExpectColumnValuesToNotBeNull(column="price"),  # NaN too: the range check skips nulls
        gxe.ExpectColumnValuesToBeBetween(column="price", min_value=0),
    ]
    events = TableChecks(
        "events", "events.parquet", _id_expectations("user_id") + _id_expectations("item_id")
    )
    events.expectations += [
        gxe.ExpectTableRowCountToBeBetween(min_value=bounds.events_min, max_value=bounds.events_max),
        gxe.ExpectColumnValuesToNotBeNull(column="label"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]),
        gxe.ExpectColumnMeanToBeBetween(
            column="label", min_value=config.positive_rate_min, max_value=config.positive_rate_max
        ),
        gxe.ExpectColumnValuesToNotBeNull(column=TIMESTAMP),
        gxe.ExpectColumnValuesToBeBetween(
            column=TIMESTAMP, min_value=config.earliest_timestamp, max_value=now
        ),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", TIMESTAMP]),
    ]
    events.expectations += [
        ExpectColumnValuesToBeInReferenceTable(
            column=key, reference_path=str((raw_dir / f"{table}.parquet").resolve()), reference_column=key
        )
        for key, table in (("user_id", "users"), ("item_id", "items"))
    ]
    return [users, items, events]


def training_checks(config: ValidationConfig, training_dir: Path) -> list[TableChecks]:
    """Suites for the six training-set files, bounded by the manifest the training-set step wrote."""
    manifest = _read_manifest(training_dir)
    cuts = {
        "train": (None, pd.Timestamp(manifest["valid_start"])),
        "valid": (pd.Timestamp(manifest["valid_start"]), pd.Timestamp(manifest["test_start"])),
        "test": (pd.Timestamp(manifest["test_start"]), None),
    }
    max_length = int(manifest["history_length"])
    columns = ["row_id", "user_id", "item_id", TIMESTAMP, "label", *manifest["feature_columns"]]
    mostly = 1.0 - config.max_null_fraction
    tables = []
    for name in TRAINING_SETS:
        previous_last: pd.Timestamp | None = None
        for split in SPLITS:
            file = f"{name}_{split}.parquet"
            if not (training_dir / file).exists():
                raise DataContractError(f"{training_dir / file}: training set not found")
            parquet_schema(training_dir / file)  # a truncated file is named here, not deep inside GX
            checks = TableChecks(f"{name}_{split}", file)
            checks.expectations += [
                gxe.ExpectTableRowCountToEqual(value=int(manifest["entity_rows"][f"{name}_{split}"])),
                gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=True),
                gxe.ExpectColumnValuesToBeUnique(column="row_id"),
                gxe.ExpectColumnValuesToBeOfType(column="user_id", type_="int64"),
                gxe.ExpectColumnValuesToBeOfType(column="item_id", type_="int64"),
            ]
            checks.expectations += [
                gxe.ExpectColumnValuesToNotBeNull(column=column, mostly=mostly) for column in columns
            ]
            checks.expectations += [
                ExpectColumnValueListLengthsToBeBetween(column=column, min_value=0, max_value=max_length)
                for column in SEQUENCE_COLUMNS
                if column in columns
            ]
            if "hist_length" in columns:
                checks.expectations.append(
                    gxe.ExpectColumnValuesToBeBetween(column="hist_length", min_value=0, max_value=max_length)
                )
            low, high = cuts[split]
            checks.expectations.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=TIMESTAMP,
                    min_value=None if low is None else low.to_pydatetime(),
                    max_value=None if high is None else high.to_pydatetime(),
                    strict_max=high is not None,
                )
            )
            if previous_last is not None:  # the splits' actual time ranges must not overlap
                checks.expectations.append(
                    gxe.ExpectColumnMinToBeBetween(
                        column=TIMESTAMP, min_value=previous_last.to_pydatetime(), strict_min=True
                    )
                )
            previous_last = _last_event(training_dir / file)
            if name == "retrieval":
                checks.expectations.append(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[1]))
            else:
                checks.expectations += [
                    gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1]),
                    gxe.ExpectColumnMeanToBeBetween(
                        column="label", min_value=config.positive_rate_min, max_value=config.positive_rate_max
                    ),
                ]
            tables.append(checks)
    return tables


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


def _run_checkpoint(
    target: Target,
    data_dir: Path,
    tables: list[TableChecks],
    report_dir: Path,
    examples: int,
) -> Any:
    """Run one Checkpoint over every table; the Data Docs are built in a temp dir, then moved in place."""
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


def _summarise(
    target: Target, data_dir: Path, results: Any, examples: int, report_dir: Path
) -> dict[str, Any]:
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


def _id_expectations(column: str, unique: bool = False) -> list[gxe.Expectation]:
    checks: list[gxe.Expectation] = [
        gxe.ExpectColumnToExist(column=column),
        gxe.ExpectColumnValuesToNotBeNull(column=column),
        gxe.ExpectColumnValuesToBeOfType(column=column, type_="int64"),
    ]
    if unique:
        checks.append(gxe.ExpectColumnValuesToBeUnique(column=column))
    return checks


@functools.lru_cache(maxsize=8)
def _reference_ids(path: str, column: str, modified_ns: int) -> np.ndarray:
    """The distinct ids of a dimension table; a missing file or column yields none (every row fails)."""
    if not Path(path).exists() or column not in parquet_schema(path).names:
        return np.array([], dtype=np.int64)
    return read_parquet(path, columns=[column])[column].dropna().unique()


def _last_event(path: Path) -> pd.Timestamp | None:
    """The split's last event time; None when it has none (the column-set expectation names a lack)."""
    if TIMESTAMP not in parquet_schema(path).names:
        return None
    stamps = read_parquet(path, columns=[TIMESTAMP])[TIMESTAMP]
    return None if stamps.empty else pd.Timestamp(stamps.max())


def _exception_message(info: dict[str, Any] | None) -> str | None:
    """The first error message in a GX result's exception info (flat, or keyed by metric in GX 1.x)."""
    if not info:
        return None
    if "exception_message" in info:
        return info["exception_message"] if info.get("raised_exception", True) else None
    messages = (_exception_message(v) for v in info.values() if isinstance(v, dict))
    return next((m for m in messages if m), None)


def _read_manifest(training_dir: Path) -> dict[str, Any]:
    path = training_dir / MANIFEST
    if not path.exists():
        raise DataContractError(f"{path}: training-set manifest not found (run the training_set step)")
    manifest = json.loads(path.read_text())
    keys = ("valid_start", "test_start", "history_length", "entity_rows", "feature_columns")
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise DataContractError(f"{path}: manifest lacks key(s) {missing}")
    return manifest


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.validate", description=__doc__)
    CONTRACT.add_path_options(parser)
    parser.add_argument("--target", choices=TARGETS, required=True, help="which tables to validate")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: the tables of --target")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)  # the latter sets INFO on itself
    try:
        params = CONTRACT.load(args.params)
        default_dir = layout.RAW_DIR if args.target == "raw" else layout.TRAINING_DIR
        run(
            params.validation,
            args.target,
            args.data_dir or default_dir,
            report_dir=layout.validation_docs(args.target),
            summary_file=layout.validation_summary(args.target),
        )
    except (ConfigError, DataValidationError, DataContractError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
