"""Helpers for the Feast tests: a private copy of feature_repo/ and a hand-made dataset.

The hand-made tables are tiny and follow the data contract exactly, with values chosen so that each
point-in-time rule has one event that breaks if the rule breaks (see ``handmade_dataset``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import TrainingSetConfig
from tests.conftest import revalidated, shipped_params

REPO_ROOT = Path(__file__).resolve().parents[1]
DAY0 = pd.Timestamp("2026-06-01", tz="UTC")


def day(d: float, hours: float = 0.0) -> pd.Timestamp:
    return DAY0 + pd.Timedelta(days=d) + pd.Timedelta(hours=hours)


def copy_feature_repo(destination: Path) -> Path:
    """The project's feature repo files (not its data/) under ``destination/feature_repo``."""
    repo = destination / "feature_repo"
    repo.mkdir(parents=True)
    for path in (REPO_ROOT / "feature_repo").iterdir():
        if path.is_file():
            shutil.copy(path, repo / path.name)
    return repo


# Events of the hand-made case (user, item, time, label) and what each one tests:
#   e0 user 1, day 2 12:00: stats changed after the event (day-3 snapshot) -> the day-1 value is used
#   e1 user 2, day 6 08:00: user 2's only stats snapshot is day 1, beyond the 2-day TTL -> Feast drops the
#      row; it must come back with stats defaults (0) and its other features intact
#   e2 user 3, day 2 13:00: before user 3 signed up (day 5) and before any of its rows -> profile defaults
#   e3 user 1, day 7 10:00: history row at the event time holds [10]; the later trailing row is ignored
#   e4 user 2, day 9 10:00 and e5 user 3, day 9 11:00: the test split
HANDMADE_EVENTS = [
    (1, 10, day(2, 12), 1),
    (2, 11, day(6, 8), 0),
    (3, 10, day(2, 13), 0),
    (1, 11, day(7, 10), 1),
    (2, 10, day(9, 10), 1),
    (3, 11, day(9, 11), 0),
]
HANDMADE_CUTS = {"valid_start": day(7).to_pydatetime(), "test_start": day(9).to_pydatetime()}


def training_set_outputs(root: Path) -> dict[str, Path]:
    """The training-set step's output arguments under ``root`` (the layout's names, another root)."""
    return {
        "output_dir": root / "training",
        "metrics_file": root / "metrics" / "training_set.json",
        "report_file": root / "reports" / "training_set.md",
    }


def handmade_training_config() -> TrainingSetConfig:
    return revalidated(
        shipped_params().training_set,
        chunk_rows=2,
        call_rows=3,
        **HANDMADE_CUTS,
    )


def handmade_dataset(root: Path) -> tuple[Path, Path]:
    """Write raw tables and feature tables of the hand-made case; returns (raw_dir, features_dir)."""
    raw_dir, features_dir = root / "raw", root / "features"
    raw_dir.mkdir(parents=True)
    features_dir.mkdir(parents=True)
    users = pd.DataFrame(
        {
            "user_id": np.array([1, 2, 3], dtype=np.int64),
            "gender": ["F", "M", "F"],
            "age_bucket": np.array([25, 35, 45], dtype=np.int64),
            "occupation": ["occ_1", "occ_2", "occ_3"],
            "zip_prefix": ["z01", "z02", "z03"],
            "signup_timestamp": [day(-30), day(-10), day(5)],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": np.array([10, 11], dtype=np.int64),
            "category": ["cat_a", "cat_b"],
            "brand": ["brand_a", "brand_b"],
            "price": [9.5, 20.0],
            "created_timestamp": [day(-100), day(-50)],
        }
    )
    events = pd.DataFrame(HANDMADE_EVENTS, columns=["user_id", "item_id", "event_timestamp", "label"])
    events["event_type"] = np.where(events["label"] == 1, "click", "impression")
    for name, table in (("users", users), ("items", items), ("events", events)):
        table.to_parquet(raw_dir / f"{name}.parquet", index=False)

    profile = users.rename(columns={"signup_timestamp": "event_timestamp"})
    pq.write_table(pa.Table.from_pandas(profile, preserve_index=False), features_dir / "user_profile.parquet")
    item_profile = items.rename(columns={"created_timestamp": "event_timestamp"})
    pq.write_table(
        pa.Table.from_pandas(item_profile, preserve_index=False), features_dir / "item_profile.parquet"
    )
    history = [  # user, time, ids, categories
        (1, day(2, 12), [], []),
        (1, day(7, 10), [10], ["cat_a"]),
        (1, day(7, 10) + pd.Timedelta(seconds=1), [10, 11], ["cat_a", "cat_b"]),
        (2, day(6, 8), [], []),
        (2, day(9, 10), [], []),
        (2, day(9, 10) + pd.Timedelta(seconds=1), [10], ["cat_a"]),
    ]
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([h[0] for h in history], pa.int64()),
                "event_timestamp": pa.array([h[1] for h in history], pa.timestamp("ns", tz="UTC")),
                "hist_item_ids": pa.array([h[2] for h in history], pa.list_(pa.int64())),
                "hist_categories": pa.array([h[3] for h in history], pa.list_(pa.string())),
                "hist_length": pa.array([len(h[2]) for h in history], pa.int64()),
            }
        ),
        features_dir / "user_history.parquet",
    )
    user_stats = [
        (1, day(1), 1),
        (1, day(3), 5),
        (1, day(7), 7),
        (2, day(1), 3),
        (2, day(9), 4),
        (1, day(8), 8),
    ]
    item_stats = [(10, day(2), 11), (11, day(6), 12), (11, day(7), 13), (10, day(9), 14), (11, day(9), 15)]
    for name, prefix, rows in (("user_stats", "user", user_stats), ("item_stats", "item", item_stats)):
        pq.write_table(_stats_table(prefix, rows), features_dir / f"{name}.parquet")
    return raw_dir, features_dir


def _stats_table(prefix: str, rows: list[tuple[int, pd.Timestamp, int]]) -> pa.Table:
    """Stats rows whose impression counts are the given marker value (clicks = marker // 2)."""
    marker = np.array([r[2] for r in rows], dtype=np.int64)
    columns = {
        f"{prefix}_id": pa.array([r[0] for r in rows], pa.int64()),
        "event_timestamp": pa.array([r[1] for r in rows], pa.timestamp("ns", tz="UTC")),
    }
    for days in (7, 30):
        columns[f"{prefix}_impressions_{days}d"] = pa.array(marker * (1 if days == 7 else 10))
        columns[f"{prefix}_clicks_{days}d"] = pa.array(marker // 2)
        columns[f"{prefix}_ctr_{days}d"] = pa.array((marker // 2) / np.maximum(marker, 1))
    return pa.table(columns)
