"""The item catalogue as of a time: every item's profile with its latest statistics snapshot.

Export embeds it and evaluation ranks it; both must see the same items with the same features.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recsys.contracts import NUMBER_DEFAULT, TIMESTAMP


def item_catalogue(features_dir: Path, as_of: pd.Timestamp, stats_ttl_days: float) -> pd.DataFrame:
    """Every item with its profile and the latest stats snapshot at or before ``as_of`` within the TTL."""
    profile = pd.read_parquet(features_dir / "item_profile.parquet").drop(columns=[TIMESTAMP])
    stats = pd.read_parquet(features_dir / "item_stats.parquet")
    stats = stats[
        (stats[TIMESTAMP] <= as_of) & (stats[TIMESTAMP] > as_of - pd.Timedelta(days=stats_ttl_days))
    ]
    latest = stats.sort_values(TIMESTAMP).drop_duplicates("item_id", keep="last").drop(columns=[TIMESTAMP])
    catalogue = profile.merge(latest, on="item_id", how="left")
    stat_columns = [c for c in latest.columns if c != "item_id"]
    catalogue[stat_columns] = catalogue[stat_columns].fillna(NUMBER_DEFAULT)
    return catalogue.sort_values("item_id", ignore_index=True)
