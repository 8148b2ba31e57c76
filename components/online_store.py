"""Online store step: register the feature views and backfill Feast's online store from the feature tables.

The KFP pipeline runs it as a task of its own that is never cached (the online store lives outside the
run); locally the training_set step ends with the same backfill.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

from recsys.config import FeastConfig, FeaturesConfig
from recsys.contracts import FEATURE_TABLE_KEYS
from recsys.feature_store import (
    feature_repo,
    feature_table_path,
    materialize_online_store,
    open_feature_store,
    registered_repo,
)
from recsys.step_contract import STEPS

CONTRACT = STEPS["online_store"]


def run(feast: FeastConfig, features: FeaturesConfig, features_dir: str | Path) -> dict[str, str]:
    """Register the feature views over ``features_dir`` and backfill the online store from them; returns
    the materialised window.

    The KFP pipeline runs this as a step of its own that is never cached: the online store lives outside
    the run, so a cache hit on the training sets must not leave a new or emptied store unfilled.
    """
    features_dir = Path(features_dir).resolve()
    store = open_feature_store(feast)
    build_repo = functools.partial(feature_repo, feast, features)
    store.apply(registered_repo(feast, features, features_dir).objects())  # feast.source_uri's copy if set
    # paths, not tables: the backfill reads each table a record batch at a time (one row per entity held)
    sources = {name: feature_table_path(features_dir, name) for name in FEATURE_TABLE_KEYS}
    start, end = materialize_online_store(store, sources, build_repo)
    return {"start": start.isoformat(), "end": end.isoformat()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.online_store", description=__doc__)
    CONTRACT.add_path_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = CONTRACT.load(args.params)
    window = run(params.feast, params.features, **CONTRACT.paths(args))
    print(json.dumps(window))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
