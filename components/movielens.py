"""MovieLens ml-100k / ml-1m as the three raw tables (users, items, events) of the data contract.

The source is a local directory or zip (``cfg.path``), or the GroupLens archive downloaded into
``cfg.cache_dir`` and verified against its SHA-256 before it is trusted. Files may sit at the top of
the directory/zip or inside one sub-folder (``ml-100k/``, ``ml-1m/``), as in the published zips.

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

import csv
import hashlib
import io
import logging
import shutil
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from recsys.artifact_io import staged_path
from recsys.config import MovieLensSource
from recsys.contracts import DataContractError, check_raw_table

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
UNKNOWN = "unknown"


class DownloadError(DataContractError):
    """The MovieLens archive could not be fetched; the message names the URL and the target file."""


class ChecksumError(DownloadError):
    """A downloaded archive whose SHA-256 differs from the expected one; nothing is kept."""


def read_movielens(cfg: MovieLensSource) -> dict[str, pd.DataFrame]:
    """Read a MovieLens source into contract-checked ``{"users", "items", "events"}`` tables.

    See the module docstring for the mapping; note that ``price`` is 0.0 for every item (MovieLens has
    no prices) and that event timestamps carry a microsecond tie-break offset. Nothing is written here:
    the ingest step writes the tables atomically.
    """
    source = cfg.path if cfg.path is not None else download_archive(cfg)
    layout = _LAYOUTS[cfg.variant]
    with _open_source(Path(source), layout.ratings) as files:
        ratings_at, users_at, items_at = (
            files.describe(n) for n in (layout.ratings, layout.users, layout.items)
        )
        ratings = _parse_ratings(files.read(layout.ratings), layout.sep, ratings_at)
        users = layout.parse_users(files.read(layout.users), users_at)
        items = layout.parse_items(files.read(layout.items), items_at)
    tables = _to_raw_tables(ratings, users, items, cfg.positive_rating, ratings_at, users_at, items_at)
    for name, where in (("users", users_at), ("items", items_at), ("events", ratings_at)):
        check_raw_table(name, tables[name], where)
    return tables


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


# --------------------------------------------------------------------------------------------------
# sources: a directory or a zip, files at the top or in one sub-folder


class _SourceFiles:
    """Reads the member files of one MovieLens source, naming each as ``<source>:<member>`` in errors."""

    def __init__(self, source: Path, prefix: str, archive: zipfile.ZipFile | None) -> None:
        self.source, self.prefix, self.archive = source, prefix, archive

    def describe(self, name: str) -> str:
        if self.archive is None:
            return str(self.source / self.prefix / name)
        return f"{self.source}:{self.prefix}{name}"

    def read(self, name: str) -> bytes:
        member = f"{self.prefix}{name}"
        if self.archive is None:
            path = self.source / member
            if not path.is_file():
                raise DataContractError(f"{path}: MovieLens file not found")
            return path.read_bytes()
        try:
            return self.archive.read(member)
        except KeyError:
            raise DataContractError(f"{self.source}: MovieLens file '{member}' is not in the zip") from None
        # a damaged member fails its CRC (BadZipFile) or its deflate stream (zlib.error, EOFError);
        # an encrypted one or an unknown compression method raises RuntimeError / NotImplementedError
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
            raise DataContractError(
                f"{self.source}: MovieLens file '{member}' in the zip is damaged or unreadable ({exc}); "
                "copy or download the archive again"
            ) from exc


@contextmanager
def _open_source(source: Path, ratings_name: str) -> Iterator[_SourceFiles]:
    if source.is_dir():
        prefixes = sorted(
            f"{d.name}/" for d in source.iterdir() if d.is_dir() and (d / ratings_name).is_file()
        )
        if (source / ratings_name).is_file():
            prefixes.insert(0, "")
        yield _SourceFiles(source, _single_prefix(prefixes, source, ratings_name), None)
        return
    if not source.exists():
        raise DataContractError(f"{source}: MovieLens source not found (expected a directory or a .zip)")
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataContractError(f"{source}: not a readable zip or directory: {exc}") from exc
    with archive:
        names = [n for n in archive.namelist() if not n.startswith("__MACOSX/")]
        prefixes = sorted(
            n[: -len(ratings_name)]
            for n in names
            if n == ratings_name or (n.endswith(f"/{ratings_name}") and n.count("/") == 1)
        )
        yield _SourceFiles(source, _single_prefix(prefixes, source, ratings_name), archive)


def _single_prefix(prefixes: list[str], source: Path, ratings_name: str) -> str:
    if "" in prefixes:
        return ""
    if len(prefixes) == 1:
        return prefixes[0]
    if not prefixes:
        raise DataContractError(
            f"{source}: no '{ratings_name}' at the top or in a sub-folder; is data.movielens.variant right?"
        )
    raise DataContractError(f"{source}: '{ratings_name}' found in several sub-folders {prefixes}; keep one")


# --------------------------------------------------------------------------------------------------
# parsing: one vectorised read per file, checked column counts and integer columns


def _read_table(
    data: bytes, sep: str, columns: list[str], where: str, int_columns: list[str]
) -> pd.DataFrame:
    """Parse a separator-delimited latin-1 file; wrong column counts and non-integers name the line."""
    if sep == "::":  # one-byte separator for the C parser (MovieLens fields never contain \x1f)
        data, sep = data.replace(b"::", b"\x1f"), "\x1f"
    data = data.rstrip(b"\r\n")
    if not data.strip():
        raise DataContractError(f"{where}: file is empty")
    _check_column_counts(data, sep.encode(), len(columns), where)
    text_columns = {c: str for c in columns if c not in int_columns}
    df = pd.read_csv(
        io.BytesIO(data), sep=sep, header=None, names=columns, dtype=text_columns, encoding="latin-1",
        quoting=csv.QUOTE_NONE, keep_default_na=False, na_filter=False, skip_blank_lines=False,
    )  # fmt: skip
    for column in int_columns:
        df[column] = _integer_column(df[column], where, column)
    return df


def _check_column_counts(data: bytes, sep: bytes, n_columns: int, where: str) -> None:
    raw = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(raw == ord("\n"))
    separators = np.flatnonzero(raw == sep[0])
    # separators before each line end (the last line has no newline: data was right-stripped)
    before = np.searchsorted(separators, np.append(newlines, len(raw)))
    per_line = np.diff(before, prepend=0) + 1
    bad = np.flatnonzero(per_line != n_columns)
    if bad.size:
        line = int(bad[0])
        raise DataContractError(
            f"{where}: line {line + 1} has {int(per_line[line])} column(s), expected {n_columns} "
            f"separated by {sep.decode()!r} ({bad.size} bad line(s))"
        )


def _integer_column(series: pd.Series, where: str, column: str) -> pd.Series:
    if pd.api.types.is_integer_dtype(series.dtype):
        return series.astype(np.int64)
    numbers = pd.to_numeric(series, errors="coerce")
    bad = numbers.isna() | (numbers % 1 != 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataContractError(
            f"{where}: line {row + 1}, column '{column}': expected an integer, found {series.iloc[row]!r}"
        )
    return numbers.astype(np.int64)


def _parse_ratings(data: bytes, sep: str, where: str, scale: tuple[int, int] = (1, 5)) -> pd.DataFrame:
    """``user::item::rating::unix_seconds`` rows; ratings outside ``scale`` (inclusive) name the line."""
    df = _read_table(data, sep, ["user_id", "item_id", "rating", "unix_seconds"], where,
                     int_columns=["user_id", "item_id", "rating", "unix_seconds"])  # fmt: skip
    _check_range(df, "rating", *scale, where)
    # datetime64[ns] ends in 2262; stay clear of the int64 overflow when adding the nanosecond offset
    _check_range(df, "unix_seconds", 0, 9_000_000_000, where)
    return df


def _check_range(df: pd.DataFrame, column: str, low: int, high: int, where: str) -> None:
    bad = (df[column] < low) | (df[column] > high)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataContractError(
            f"{where}: line {row + 1}, column '{column}': {df[column].iloc[row]} is outside [{low}, {high}]"
        )


def _check_gender(df: pd.DataFrame, where: str) -> None:
    bad = ~df["gender"].isin(["F", "M"])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataContractError(
            f"{where}: line {row + 1}, column 'gender': expected 'F' or 'M', found {df['gender'].iloc[row]!r}"
        )


def _parse_ml100k_users(data: bytes, where: str) -> pd.DataFrame:
    df = _read_table(data, "|", ["user_id", "age", "gender", "occupation", "zip"], where, ["user_id", "age"])
    _check_gender(df, where)
    _check_range(df, "age", 0, 150, where)
    # bucket lower bounds: age 17 -> 1 (under 18), 24 -> 18, 25 -> 25, ..., 56 and over -> 56
    df["age_bucket"] = AGE_BUCKETS[np.searchsorted(AGE_BUCKETS[1:], df["age"].to_numpy(), side="right")]
    return df[["user_id", "gender", "age_bucket", "occupation", "zip"]]


def _parse_ml1m_users(data: bytes, where: str) -> pd.DataFrame:
    df = _read_table(data, "::", ["user_id", "gender", "age_bucket", "occupation_code", "zip"], where,
                     int_columns=["user_id", "age_bucket", "occupation_code"])  # fmt: skip
    _check_gender(df, where)
    bad_age = ~df["age_bucket"].isin(AGE_BUCKETS)
    if bad_age.any():
        row = int(np.flatnonzero(bad_age.to_numpy())[0])
        raise DataContractError(
            f"{where}: line {row + 1}, column 'age': {df['age_bucket'].iloc[row]} is not an ml-1m age "
            f"bucket {AGE_BUCKETS.tolist()}"
        )
    _check_range(df, "occupation_code", ML1M_OCCUPATION_CODES.start, ML1M_OCCUPATION_CODES.stop - 1, where)
    df["occupation"] = "occ_" + df["occupation_code"].astype(str)
    return df[["user_id", "gender", "age_bucket", "occupation", "zip"]]


def _parse_ml100k_items(data: bytes, where: str) -> pd.DataFrame:
    columns = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *ML100K_GENRES]
    df = _read_table(data, "|", columns, where, int_columns=["item_id", *ML100K_GENRES])
    flags = df[ML100K_GENRES].to_numpy() != 0
    genres = np.asarray(ML100K_GENRES, dtype=object)
    df["category"] = np.where(flags.any(axis=1), genres[flags.argmax(axis=1)], UNKNOWN)
    df["brand"] = _decade(df["release_date"].str.extract(r"(\d{4})\s*$", expand=False))
    return df[["item_id", "category", "brand"]]


def _parse_ml1m_items(data: bytes, where: str) -> pd.DataFrame:
    df = _read_table(data, "::", ["item_id", "title", "genres"], where, int_columns=["item_id"])
    first = df["genres"].str.split("|", n=1).str[0].str.strip()
    df["category"] = first.mask(first.isin(["", "(no genres listed)"]), UNKNOWN)
    df["brand"] = _decade(df["title"].str.extract(r"\((\d{4})\)\s*$", expand=False))
    return df[["item_id", "category", "brand"]]


def _decade(years: pd.Series) -> pd.Series:
    """'1995' -> '1990s'; a missing year -> 'unknown'."""
    numbers = pd.to_numeric(years, errors="coerce")
    decades = (numbers // 10 * 10).astype("Int64").astype(str) + "s"
    return decades.where(numbers.notna(), UNKNOWN).astype(object)


@dataclass(frozen=True)
class _Layout:
    ratings: str
    users: str
    items: str
    sep: str
    parse_users: Callable[[bytes, str], pd.DataFrame]
    parse_items: Callable[[bytes, str], pd.DataFrame]


_LAYOUTS = {
    "ml-100k": _Layout("u.data", "u.user", "u.item", "\t", _parse_ml100k_users, _parse_ml100k_items),
    "ml-1m": _Layout("ratings.dat", "users.dat", "movies.dat", "::", _parse_ml1m_users, _parse_ml1m_items),
}


# --------------------------------------------------------------------------------------------------
# mapping to the raw contract


def _to_raw_tables(
    ratings: pd.DataFrame,
    users: pd.DataFrame,
    items: pd.DataFrame,
    positive_rating: int,
    ratings_at: str,
    users_at: str,
    items_at: str,
) -> dict[str, pd.DataFrame]:
    _check_known(ratings, "user_id", users, ratings_at, users_at)
    _check_known(ratings, "item_id", items, ratings_at, items_at)
    events = _events(ratings, positive_rating)
    first_event = events["event_timestamp"].iloc[0]
    signup = events.groupby("user_id")["event_timestamp"].min()
    created = events.groupby("item_id")["event_timestamp"].min()

    users_table = pd.DataFrame({
        "user_id": users["user_id"].astype(np.int64),
        "gender": users["gender"].astype(object),
        "age_bucket": users["age_bucket"].astype(np.int64),
        "occupation": users["occupation"].astype(object),
        "zip_prefix": users["zip"].str.strip().str[:3].astype(object),
        "signup_timestamp": users["user_id"].map(signup).fillna(first_event).astype("datetime64[ns, UTC]"),
    })  # fmt: skip
    items_table = pd.DataFrame({
        "item_id": items["item_id"].astype(np.int64),
        "category": items["category"].astype(object),
        "brand": items["brand"].astype(object),
        "price": np.zeros(len(items), dtype=np.float64),  # MovieLens has no prices
        "created_timestamp": items["item_id"].map(created).fillna(first_event).astype("datetime64[ns, UTC]"),
    })  # fmt: skip
    return {
        "users": users_table.sort_values("user_id", ignore_index=True),
        "items": items_table.sort_values("item_id", ignore_index=True),
        "events": events,
    }


def _check_known(
    ratings: pd.DataFrame, key: str, table: pd.DataFrame, ratings_at: str, table_at: str
) -> None:
    unknown = ~ratings[key].isin(table[key])
    if unknown.any():
        examples = sorted(ratings.loc[unknown, key].unique().tolist())[:5]
        raise DataContractError(
            f"{ratings_at}: {int(unknown.sum())} rating(s) refer to {key} values missing from {table_at}, "
            f"e.g. {examples}"
        )


def _events(ratings: pd.DataFrame, positive_rating: int) -> pd.DataFrame:
    """Deduplicate, tie-break and order the ratings; numpy sorts on packed int64 keys: fast on ml-1m."""
    user = ratings["user_id"].to_numpy(dtype=np.int64)
    item = ratings["item_id"].to_numpy(dtype=np.int64)
    seconds = ratings["unix_seconds"].to_numpy(dtype=np.int64)  # checked to be in [0, 9e9] < 2**34
    # dense codes in id order (< number of rows, so packed keys fit in int64)
    user_code = pd.factorize(user, sort=True)[0].astype(np.int64)
    item_code = pd.factorize(item)[0].astype(np.int64)

    # the latest rating of a (user, item) wins; the stable sort keeps file order among equal seconds
    by_time = np.argsort(seconds, kind="stable")
    pair = user_code[by_time] * (int(item_code.max()) + 1) + item_code[by_time]
    kept = by_time[~pd.Series(pair).duplicated(keep="last").to_numpy()]

    # order by (user, second, item_id): sort by item, then stably by the packed (user, second) key
    order = kept[np.argsort(item[kept], kind="stable")]
    order = order[np.argsort((user_code[order] << 34) | seconds[order], kind="stable")]
    group = (user_code[order] << 34) | seconds[order]
    starts = np.r_[True, group[1:] != group[:-1]]
    positions = np.arange(len(order))
    rank = positions - np.maximum.accumulate(np.where(starts, positions, 0))
    # the rank within (user, second) as a microsecond offset: unique (user_id, event_timestamp) and
    # still inside the rating's second (nothing rates a million movies in one second)
    nanos = seconds[order] * 1_000_000_000 + rank * 1_000

    # events ordered by (event_timestamp, user_id): ``order`` is already by user, so a stable sort suffices
    final = np.argsort(nanos, kind="stable")
    rows, nanos = order[final], nanos[final]
    label = (ratings["rating"].to_numpy()[rows] >= positive_rating).astype(np.int64)
    return pd.DataFrame({
        "user_id": user[rows],
        "item_id": item[rows],
        "event_timestamp": pd.to_datetime(nanos, unit="ns", utc=True),
        "label": label,
        "event_type": _EVENT_TYPES[label],
    })  # fmt: skip


_EVENT_TYPES = np.array(["impression", "click"], dtype=object)  # indexed by label


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
