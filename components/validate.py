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
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no usage analytics, set before GX is imported

import great_expectations.expectations as gxe
import pandas as pd

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
from recsys.expectations import (
    ExpectColumnValueListLengthsToBeBetween,
    ExpectColumnValuesToBeInReferenceTable,
    TableChecks,
    failure_message,
    run_suites,
    summarise,
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
    results = run_suites(target, data_dir, tables, report_dir, config.unexpected_examples)
    summary = summarise(target, data_dir, results, config.unexpected_examples, report_dir)
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


def _id_expectations(column: str, unique: bool = False) -> list[gxe.Expectation]:
    checks: list[gxe.Expectation] = [
        gxe.ExpectColumnToExist(column=column),
        gxe.ExpectColumnValuesToNotBeNull(column=column),
        gxe.ExpectColumnValuesToBeOfType(column=column, type_="int64"),
    ]
    if unique:
        checks.append(gxe.ExpectColumnValuesToBeUnique(column=column))
    return checks


def _last_event(path: Path) -> pd.Timestamp | None:
    """The split's last event time; None when it has none (the column-set expectation names a lack)."""
    if TIMESTAMP not in parquet_schema(path).names:
        return None
    stamps = read_parquet(path, columns=[TIMESTAMP])[TIMESTAMP]
    return None if stamps.empty else pd.Timestamp(stamps.max())


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
