"""Time ingest (generate + write) and features on the default and large synthetic presets.

Run: ``python -m benchmarks.ingest_features [--presets default large]``. Results go to
``benchmarks/results/ingest_features.{json,md}``. The issue's target: ``large`` generates in < 2 min.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from components import features, ingest
from recsys.config import load_params

RESULTS = Path(__file__).parent / "results"


def measure(preset: str) -> dict:
    params = load_params(overrides={"data.synthetic.preset": preset})
    with tempfile.TemporaryDirectory() as tmp:
        raw, feats = Path(tmp) / "raw", Path(tmp) / "features"
        t0 = time.perf_counter()
        ingest.run(params.data, params.seed, raw)
        t1 = time.perf_counter()
        features.run(params.features, raw, feats)
        t2 = time.perf_counter()
        rows = {p.stem: pq.ParquetFile(p).metadata.num_rows for p in feats.glob("*.parquet")}
        sizes = params.data.synthetic.sizes()
        return {
            "preset": preset,
            "users": sizes.n_users,
            "items": sizes.n_items,
            "events": sizes.n_events,
            "ingest_s": round(t1 - t0, 2),
            "features_s": round(t2 - t1, 2),
            "feature_rows": rows,
            "raw_mb": round(sum(p.stat().st_size for p in raw.glob("*")) / 1e6, 1),
            "features_mb": round(sum(p.stat().st_size for p in feats.glob("*")) / 1e6, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["default", "large"])
    args = parser.parse_args(argv)
    runs = [measure(p) for p in args.presets]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    report = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "peak_rss_gb": round(peak_gb, 2),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest_features.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "| preset | users | items | events | ingest (s) | features (s) | raw MB | features MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['preset']} | {r['users']:,} | {r['items']:,} | {r['events']:,} | {r['ingest_s']} | "
            f"{r['features_s']} | {r['raw_mb']} | {r['features_mb']} |"
            for r in runs
        ),
        "",
        f"Machine: {report['machine']}; peak RSS {report['peak_rss_gb']} GB. Target: `large` ingest < 120 s.",
    ]
    (RESULTS / "ingest_features.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
