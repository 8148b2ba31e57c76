"""MovieTweetings (Dooms et al., MIT licence) as the three raw tables (users, items, events) of the contract.

MovieTweetings collects IMDb ratings (0-10) that people tweeted; the snapshots ship ``ratings.dat``
(``user_id::movie_id::rating::unix_seconds``), ``movies.dat`` (``movie_id::Title (Year)::Genre1|Genre2``,
UTF-8, the movie id is the IMDb number with leading zeros) and ``users.dat`` (``user_id::twitter_id``).
The source is a local directory or zip (``cfg.path``: files at the top or in one sub-folder); the data is
never downloaded or committed by the project.

The files are MovieLens-1M-shaped, so parsing, de-duplication, the microsecond tie-break of ratings in the
same second and the mapping to the contract are sources/ratings_files.py's; what differs:
- ``label`` = rating >= ``cfg.positive_rating`` on the 0-10 scale. 8 is the shipped choice: it is the
  median rating and splits the data about in half (50.5% positive on the 100K snapshot; >= 7 would make
  73% positive, >= 9 26%), the same share and meaning ("liked it", the top of the scale) as MovieLens'
  >= 4 of 5.
- users have no profile (Twitter ids only): ``gender``, ``occupation`` and ``zip_prefix`` are
  "unknown" and ``age_bucket`` is 0 for everyone; ``signup_timestamp`` is the user's first rating.
- items: ``category`` is the first listed genre ("unknown" when none), ``brand`` the release year
  bucket: the year itself from :data:`YEAR_BUCKET_FROM` on (most tweets rate recent releases, which a
  decade would lump together), else the decade ("1990s"), "unknown" without a year; ``price`` is 0.0.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from recsys.config import DataConfig, MovieTweetingsSource
from sources.ratings_files import UNKNOWN, Layout, anonymous_users, read_ratings, read_table

NAME = "movietweetings"
RATINGS, USERS, MOVIES = "ratings.dat", "users.dat", "movies.dat"
RATING_SCALE = (0, 10)
YEAR_BUCKET_FROM = 2000  # release years from here on are their own brand; earlier ones their decade


def read(data: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """The source table's reader: ``data.movietweetings``; ``seed`` is unused (the data is what it is)."""
    return read_movietweetings(data.movietweetings)


def read_movietweetings(cfg: MovieTweetingsSource) -> dict[str, pd.DataFrame]:
    """Read a MovieTweetings snapshot into contract-checked ``{"users", "items", "events"}`` tables."""
    return read_ratings(Path(cfg.path), _LAYOUT, cfg.positive_rating)


def _parse_users(data: bytes, where: str) -> pd.DataFrame:
    df = read_table(data, "::", ["user_id", "twitter_id"], where, int_columns=["user_id"])
    return anonymous_users(df["user_id"].to_numpy())


def _parse_movies(data: bytes, where: str) -> pd.DataFrame:
    df = read_table(data, "::", ["item_id", "title", "genres"], where, int_columns=["item_id"])
    first = df["genres"].str.split("|", n=1).str[0].str.strip()
    df["category"] = first.mask(first == "", UNKNOWN)
    df["brand"] = year_bucket(df["title"].str.extract(r"\((\d{4})\)\s*$", expand=False))
    return df[["item_id", "category", "brand"]]


def year_bucket(years: pd.Series) -> pd.Series:
    """'2012' -> '2012'; '1995' -> '1990s' (before :data:`YEAR_BUCKET_FROM`); missing -> 'unknown'."""
    numbers = pd.to_numeric(years, errors="coerce")
    decades = (numbers // 10 * 10).astype("Int64").astype(str) + "s"
    buckets = numbers.astype("Int64").astype(str).where(numbers >= YEAR_BUCKET_FROM, decades)
    return buckets.where(numbers.notna(), UNKNOWN).astype(object)


_LAYOUT = Layout(RATINGS, USERS, MOVIES, "::", _parse_users, _parse_movies, scale=RATING_SCALE)
