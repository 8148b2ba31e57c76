"""MovieLens ml-100k / ml-1m as the three raw tables (users, items, events) of the data contract.

The source is a local directory or zip (``cfg.path``), or the GroupLens archive downloaded into
``cfg.cache_dir`` and verified against its SHA-256 before it is trusted. Files may sit at the top of
the directory/zip or inside one sub-folder (``ml-100k/``, ``ml-1m/``), as in the published zips.
Reading the files and the mapping below are sources/ratings_files.py's, shared with MovieTweetings.

Mapping to the contract (MovieLens has ratings, not impressions):
- every rating is an impression; ``label`` = rating >= ``cfg.positive_rating``; ``event_type`` is
  "click" for label 1, else "impression".
- ``event_timestamp`` is the rating's unix second as UTC **plus a sub-second offset in microseconds**:
  MovieLens users often rate many movies within the same second, but the contract keys events by
  (user_id, event_timestamp) and the behaviour history needs a strict order. The offset is the rank
  of the rating within its (user, second) group ordered by item_id, so it is deterministic and never
  reaches the next second; microseconds, not nanoseconds, because Feast's offline stores keep
  timestamps at microsecond resolution (a nanosecond offset fails the cast or is lost).
- a (user, item) rated twice keeps only its latest rating (file order breaks ties).
- users: ``age_bucket`` uses the ml-1m buckets (ml-100k raw ages are bucketed the same way),
  ``occupation`` is the ml-100k name or "occ_<code>" for ml-1m, ``zip_prefix`` the first 3 zip
  characters, ``signup_timestamp`` the user's first rating (MovieLens records no sign-up time).
- items: ``category`` is the first listed genre ("unknown" when none), ``brand`` the release decade
  ("1990s"; "unknown" when the year is missing), ``price`` is 0.0 for every item because MovieLens has
  no prices, ``created_timestamp`` the movie's first rating. Users and movies without any rating get
  the first rating time of the dataset, so the whole catalogue stays available from the start.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from recsys.artifact_io import staged_path
from recsys.config import DataConfig, MovieLensSource
from recsys.contracts import DataContractError
from sources.ratings_files import UNKNOWN, Layout, check_range, read_ratings, read_table

NAME = "movielens"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishedArchive:
    url: str
    sha256: str
    size_bytes: int


# SHA-256 of the GroupLens zips as pinned by tensorflow/datasets (url_checksums/movielens.txt) and the
# TensorFlow model garden (MOVIELENS_ZIP_HASH); the archives have been frozen since their release.
PUBLISHED_ARCHIVES: dict[str, PublishedArchive] = {
    "ml-100k": PublishedArchive(
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        size_bytes=4_924_029,
    ),
    "ml-1m": PublishedArchive(
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        size_bytes=5_917_549,
    ),
}

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]  # fmt: skip
# ml-1m age buckets, each labelled by its lower bound: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
AGE_BUCKETS = np.array([1, 18, 25, 35, 45, 50, 56], dtype=np.int64)
ML1M_OCCUPATION_CODES = range(21)


class DownloadError(DataContractError):
    """The MovieLens archive could not be fetched; the message names the URL and the target file."""


class ChecksumError(DownloadError):
    """A downloaded archive whose SHA-256 differs from the expected one; nothing is kept."""


def read(data: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """The source table's reader: ``data.movielens``; ``seed`` is unused (the data is what it is)."""
    return read_movielens(data.movielens)


def read_movielens(cfg: MovieLensSource) -> dict[str, pd.DataFrame]:
    """Read a MovieLens source into contract-checked ``{"users", "items", "events"}`` tables.

    See the module docstring for the mapping; note that ``price`` is 0.0 for every item (MovieLens has
    no prices) and that event timestamps carry a microsecond tie-break offset. Nothing is written here:
    the ingest step writes the tables atomically.
    """
    source = cfg.path if cfg.path is not None else download_archive(cfg)
    return read_ratings(Path(source), _LAYOUTS[cfg.variant], cfg.positive_rating)


def download_archive(cfg: MovieLensSource) -> Path:
    """Fetch the variant's zip into ``cfg.cache_dir`` (or reuse a verified cached copy) and return it.

    The bytes land in a temporary sibling and are renamed into place only after the SHA-256 matches,
    so a truncated or tampered download never sits in the cache where a later run would trust it.
    """
    published = PUBLISHED_ARCHIVES[cfg.variant]
    url = cfg.url or published.url
    expected = (cfg.sha256 or published.sha256).lower()
    name = PurePosixPath(urlparse(url).path).name or f"{cfg.variant}.zip"
    target = Path(cfg.cache_dir) / name
    if target.is_file():
        cached = _sha256_of(target)
        if cached == expected:
            return target
        log.warning(
            "%s: cached archive has SHA-256 %s, expected %s; downloading again", target, cached, expected
        )
        target.unlink()
    log.info("downloading %s -> %s", url, target)
    with staged_path(target) as tmp:
        try:
            with (
                urllib.request.urlopen(url, timeout=cfg.download_timeout_s) as response,
                tmp.open("wb") as out,
            ):
                shutil.copyfileobj(response, out, length=1 << 20)
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(f"{url}: download to {target} failed: {exc}") from exc
        actual = _sha256_of(tmp)
        if actual != expected:
            raise ChecksumError(
                f"{target}: SHA-256 mismatch for {url}: expected {expected}, got {actual}; "
                "the download was discarded (set data.movielens.sha256 only for a mirror you trust)"
            )
    return target


def _check_gender(df: pd.DataFrame, where: str) -> None:
    bad = ~df["gender"].isin(["F", "M"])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataContractError(
            f"{where}: line {row + 1}, column 'gender': expected 'F' or 'M', found {df['gender'].iloc[row]!r}"
        )


def _parse_ml100k_users(data: bytes, where: str) -> pd.DataFrame:
    df = read_table(data, "|", ["user_id", "age", "gender", "occupation", "zip"], where, ["user_id", "age"])
    _check_gender(df, where)
    check_range(df, "age", 0, 150, where)
    # bucket lower bounds: age 17 -> 1 (under 18), 24 -> 18, 25 -> 25, ..., 56 and over -> 56
    df["age_bucket"] = AGE_BUCKETS[np.searchsorted(AGE_BUCKETS[1:], df["age"].to_numpy(), side="right")]
    return df[["user_id", "gender", "age_bucket", "occupation", "zip"]]


def _parse_ml1m_users(data: bytes, where: str) -> pd.DataFrame:
    df = read_table(data, "::", ["user_id", "gender", "age_bucket", "occupation_code", "zip"], where,
                     int_columns=["user_id", "age_bucket", "occupation_code"])  # fmt: skip
    _check_gender(df, where)
    bad_age = ~df["age_bucket"].isin(AGE_BUCKETS)
    if bad_age.any():
        row = int(np.flatnonzero(bad_age.to_numpy())[0])
        raise DataContractError(
            f"{where}: line {row + 1}, column 'age': {df['age_bucket'].iloc[row]} is not an ml-1m age "
            f"bucket {AGE_BUCKETS.tolist()}"
        )
    check_range(df, "occupation_code", ML1M_OCCUPATION_CODES.start, ML1M_OCCUPATION_CODES.stop - 1, where)
    df["occupation"] = "occ_" + df["occupation_code"].astype(str)
    return df[["user_id", "gender", "age_bucket", "occupation", "zip"]]


def _parse_ml100k_items(data: bytes, where: str) -> pd.DataFrame:
    columns = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *ML100K_GENRES]
    df = read_table(data, "|", columns, where, int_columns=["item_id", *ML100K_GENRES])
    flags = df[ML100K_GENRES].to_numpy() != 0
    genres = np.asarray(ML100K_GENRES, dtype=object)
    df["category"] = np.where(flags.any(axis=1), genres[flags.argmax(axis=1)], UNKNOWN)
    df["brand"] = _decade(df["release_date"].str.extract(r"(\d{4})\s*$", expand=False))
    return df[["item_id", "category", "brand"]]


def _parse_ml1m_items(data: bytes, where: str) -> pd.DataFrame:
    df = read_table(data, "::", ["item_id", "title", "genres"], where, int_columns=["item_id"])
    first = df["genres"].str.split("|", n=1).str[0].str.strip()
    df["category"] = first.mask(first.isin(["", "(no genres listed)"]), UNKNOWN)
    df["brand"] = _decade(df["title"].str.extract(r"\((\d{4})\)\s*$", expand=False))
    return df[["item_id", "category", "brand"]]


def _decade(years: pd.Series) -> pd.Series:
    """'1995' -> '1990s'; a missing year -> 'unknown'."""
    numbers = pd.to_numeric(years, errors="coerce")
    decades = (numbers // 10 * 10).astype("Int64").astype(str) + "s"
    return decades.where(numbers.notna(), UNKNOWN).astype(object)


_LAYOUTS = {
    "ml-100k": Layout("u.data", "u.user", "u.item", "\t", _parse_ml100k_users, _parse_ml100k_items),
    "ml-1m": Layout("ratings.dat", "users.dat", "movies.dat", "::", _parse_ml1m_users, _parse_ml1m_items),
}


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
