"""The request log's rows and files (written by serving/request_log.py, read by the monitor step): one
schema, one file layout, one reader, so the server and the monitor cannot disagree about either.

```
<uri>/date=2026-12-06/T101500Z-<host>-<pid>-000001.parquet
```
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.object_store import LocalStore, ObjectStore, open_store

RECORD_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("endpoint", pa.string(), nullable=False),  # retrieval | ranking | recommend
        pa.field("user_id", pa.int64()),  # null: a retrieval request with features only
        pa.field("model", pa.string(), nullable=False),
        pa.field("bundle_version", pa.string(), nullable=False),
        pa.field("item_ids", pa.list_(pa.int64()), nullable=False),  # in served order: position = index
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("candidates", pa.int32(), nullable=False),  # ranked (recommend) or given (ranking)
        pa.field("source", pa.string(), nullable=False),  # model | popular
        pa.field("cold_start", pa.bool_(), nullable=False),
        pa.field("degraded", pa.bool_(), nullable=False),  # the online store was down: defaults used
        pa.field("features", pa.string()),  # the user features used, JSON; null when not sampled
        # per served item, the probability the serving policy put it in its slot given the items before it
        # (serving/exploration.py); 1.0 each without exploration; null in logs written before it existed
        pa.field("propensities", pa.list_(pa.float64())),
        # the ranked candidates exploration sampled from; null without exploration (components/ope.py)
        pa.field("candidate_ids", pa.list_(pa.int64())),
    ]
)
PARTITION = "date="
SUFFIX = ".parquet"


def store_for(uri: str) -> ObjectStore:
    """``s3://bucket/prefix``, ``file:///folder`` or a plain folder path."""
    if "://" in uri:
        return open_store(uri)
    return LocalStore(Path(uri))


def records_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as RECORD_SCHEMA's table; ``features`` dicts become JSON (numpy values as lists/numbers)."""
    columns: dict[str, list[Any]] = {field.name: [] for field in RECORD_SCHEMA}
    for row in rows:
        for name, column in columns.items():
            value = row.get(name)
            if name == "features" and value is not None:
                value = json.dumps(value, default=_plain, separators=(",", ":"))
            column.append(value)
    columns["time"] = [datetime.fromtimestamp(t, UTC) for t in columns["time"]]
    return pa.Table.from_pydict(columns, schema=RECORD_SCHEMA)


class ParquetObjects:
    """The Parquet objects under a store prefix (``s3://``, ``file://`` or a folder), each read once.

    The request log and the click feedback are written as new objects, never rewritten, so a reader
    polled again (the guardrails during a soak) reads only the objects that appeared since its last call
    instead of the whole history each time.
    """

    def __init__(self, uri: str, schema: pa.Schema | None = None) -> None:
        self.uri, self.schema = uri, schema
        self._store: ObjectStore | None = None  # opened at the first read: its errors are a read's errors
        self._read: dict[str, pa.Table] = {}

    def tables(self, prefix: str = "", keep: Callable[[str], bool] = lambda key: True) -> list[pa.Table]:
        """Every ``.parquet`` object under ``prefix`` whose key ``keep`` accepts, in key order."""
        if self._store is None:
            self._store = store_for(self.uri)
        out = []
        for key in sorted(self._store.keys(prefix)):
            if not key.endswith(SUFFIX) or not keep(key):
                continue
            if key not in self._read:
                data = self._store.get_bytes(key)
                if data is None:  # deleted between the listing and the read
                    continue
                self._read[key] = pq.read_table(io.BytesIO(data), schema=self.schema)
            out.append(self._read[key])
        return out


def read_request_log(uri: str, since: datetime | None = None) -> pa.Table:
    """Every row under ``uri`` (from ``since`` on, when given) as RECORD_SCHEMA's table; empty when
    nothing was logged. Day partitions before ``since`` are not read."""
    first = f"{PARTITION}{since:%Y-%m-%d}" if since is not None else ""
    objects = ParquetObjects(uri, schema=RECORD_SCHEMA)
    tables = objects.tables(PARTITION, keep=lambda key: key.split("/", 1)[0] >= first)
    table = pa.concat_tables([RECORD_SCHEMA.empty_table(), *tables])
    if since is not None:
        table = table.filter(
            pc.greater_equal(table["time"], pa.scalar(since, RECORD_SCHEMA.field("time").type))
        )
    return table


def served_slots(answers: pd.DataFrame) -> pd.DataFrame:
    """One row per served item of logged ``answers`` (``user_id``, ``time``, ``item_ids`` and any other
    columns, kept): ``item_id``, its ``slot`` (0 = first) and ``row`` (the answer's position in
    ``answers``); answers without a user or items give none."""
    served = answers.reset_index(drop=True).rename_axis("row").reset_index()
    served = served.explode("item_ids")
    served["slot"] = served.groupby("row").cumcount()
    served = served.dropna(subset=["item_ids", "user_id"]).rename(columns={"item_ids": "item_id"})
    return served.astype({"item_id": "int64", "user_id": "int64"}).reset_index(drop=True)


def attribute_clicks(slots: pd.DataFrame, events: pd.DataFrame, hours: float) -> np.ndarray:
    """Per row of :func:`served_slots`, whether the user clicked the item (an event with ``label`` 1)
    within ``hours`` after the answer: the monitor's served CTR and the off-policy rewards."""
    clicks = events.loc[events["label"] == 1, ["user_id", "item_id", "event_timestamp"]]
    joined = slots[["user_id", "item_id", "time"]].reset_index(drop=True).reset_index()
    joined = joined.merge(clicks, on=["user_id", "item_id"], how="left")
    window = pd.Timedelta(hours=hours)
    joined["clicked"] = (joined["event_timestamp"] >= joined["time"]) & (
        joined["event_timestamp"] <= joined["time"] + window
    )
    per_slot = joined.groupby("index")["clicked"].any()
    return per_slot.reindex(range(len(slots)), fill_value=False).to_numpy(dtype=bool)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
