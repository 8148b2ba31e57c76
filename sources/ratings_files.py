"""Rating dumps in the MovieLens file layout as the three raw tables (users, items, events) of the contract.

MovieLens and MovieTweetings ship the same shape of files (a ratings file ``user, item, rating, unix
seconds`` beside a users and an items file, in a directory or zip, at the top or in one sub-folder), so
reading, checking, de-duplicating and tie-breaking the ratings and mapping them to the contract live here
once; a source module only declares its :class:`Layout` (file names, separator, rating scale and its own
users/items parsers). A source whose ratings are not such a text file (Ciao's MATLAB matrix) also declares
its ratings parser. See sources/movielens.py for the mapping to the contract.
"""

from __future__ import annotations

import csv
import io
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.contracts import DataContractError, check_raw_table

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Layout:
    """One source's files: names, field separator, rating scale and the users/items parsers."""

    ratings: str
    users: str
    items: str
    sep: str
    parse_users: Callable[[bytes, str], pd.DataFrame]
    parse_items: Callable[[bytes, str], pd.DataFrame]
    scale: tuple[int, int] = (1, 5)  # inclusive rating range; a rating outside it names its line
    # ratings that are not ``user<sep>item<sep>rating<sep>seconds`` text: bytes -> user_id, item_id, rating,
    # unix_seconds (int64), checked by the parser itself (None: the text format above)
    parse_ratings: Callable[[bytes, str], pd.DataFrame] | None = None
    dataset: str = "MovieLens"  # the name errors give the source and its files


def read_ratings(source: Path, layout: Layout, positive_rating: int) -> dict[str, pd.DataFrame]:
    """Read a directory or zip laid out as ``layout`` into contract-checked raw tables.

    ``label`` = rating >= ``positive_rating``. Nothing is written here: the ingest step writes the tables
    atomically.
    """
    with _open_source(source, layout.ratings, layout.dataset) as files:
        ratings_at, users_at, items_at = (
            files.describe(n) for n in (layout.ratings, layout.users, layout.items)
        )
        if layout.parse_ratings is None:
            ratings = _parse_ratings(files.read(layout.ratings), layout.sep, ratings_at, layout.scale)
        else:
            ratings = layout.parse_ratings(files.read(layout.ratings), ratings_at)
        users = layout.parse_users(files.read(layout.users), users_at)
        items = layout.parse_items(files.read(layout.items), items_at)
    tables = _to_raw_tables(ratings, users, items, positive_rating, ratings_at, users_at, items_at)
    for name, where in (("users", users_at), ("items", items_at), ("events", ratings_at)):
        check_raw_table(name, tables[name], where)
    return tables


# --------------------------------------------------------------------------------------------------
# sources: a directory or a zip, files at the top or in one sub-folder


class _SourceFiles:
    """Reads the member files of one source, naming each as ``<source>:<member>`` in errors."""

    def __init__(self, source: Path, prefix: str, archive: zipfile.ZipFile | None, dataset: str) -> None:
        self.source, self.prefix, self.archive, self.dataset = source, prefix, archive, dataset

    def describe(self, name: str) -> str:
        if self.archive is None:
            return str(self.source / self.prefix / name)
        return f"{self.source}:{self.prefix}{name}"

    def read(self, name: str) -> bytes:
        member = f"{self.prefix}{name}"
        if self.archive is None:
            path = self.source / member
            if not path.is_file():
                raise DataContractError(f"{path}: {self.dataset} file not found")
            return path.read_bytes()
        try:
            return self.archive.read(member)
        except KeyError:
            raise DataContractError(
                f"{self.source}: {self.dataset} file '{member}' is not in the zip"
            ) from None
        # a damaged member fails its CRC (BadZipFile) or its deflate stream (zlib.error, EOFError);
        # an encrypted one or an unknown compression method raises RuntimeError / NotImplementedError
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
            raise DataContractError(
                f"{self.source}: {self.dataset} file '{member}' in the zip is damaged or unreadable ({exc}); "
                "copy or download the archive again"
            ) from exc


@contextmanager
def _open_source(source: Path, ratings_name: str, dataset: str) -> Iterator[_SourceFiles]:
    if source.is_dir():
        prefixes = sorted(
            f"{d.name}/" for d in source.iterdir() if d.is_dir() and (d / ratings_name).is_file()
        )
        if (source / ratings_name).is_file():
            prefixes.insert(0, "")
        yield _SourceFiles(source, _single_prefix(prefixes, source, ratings_name, dataset), None, dataset)
        return
    if not source.exists():
        raise DataContractError(f"{source}: {dataset} source not found (expected a directory or a .zip)")
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
        yield _SourceFiles(source, _single_prefix(prefixes, source, ratings_name, dataset), archive, dataset)


def _single_prefix(prefixes: list[str], source: Path, ratings_name: str, dataset: str) -> str:
    if "" in prefixes:
        return ""
    if len(prefixes) == 1:
        return prefixes[0]
    if not prefixes:
        hint = "; is data.movielens.variant right?" if dataset == "MovieLens" else ""
        raise DataContractError(f"{source}: no '{ratings_name}' at the top or in a sub-folder{hint}")
    raise DataContractError(f"{source}: '{ratings_name}' found in several sub-folders {prefixes}; keep one")


# --------------------------------------------------------------------------------------------------
# parsing: one vectorised read per file, checked column counts and integer columns


def read_table(data: bytes, sep: str, columns: list[str], where: str, int_columns: list[str]) -> pd.DataFrame:
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
    df = read_table(data, sep, ["user_id", "item_id", "rating", "unix_seconds"], where,
                     int_columns=["user_id", "item_id", "rating", "unix_seconds"])  # fmt: skip
    check_range(df, "rating", *scale, where)
    # datetime64[ns] ends in 2262; stay clear of the int64 overflow when adding the nanosecond offset
    check_range(df, "unix_seconds", 0, 9_000_000_000, where)
    return df


def check_range(df: pd.DataFrame, column: str, low: int, high: int, where: str, unit: str = "line") -> None:
    """Fail naming the first ``unit`` (a text file's line, a matrix's row) whose ``column`` is outside."""
    bad = (df[column] < low) | (df[column] > high)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataContractError(
            f"{where}: {unit} {row + 1}, column '{column}': {df[column].iloc[row]} is outside [{low}, {high}]"
        )


def anonymous_users(user_ids: np.ndarray) -> pd.DataFrame:
    """Users without demographics: one constant profile (the models' profile features carry no signal)."""
    return pd.DataFrame({
        "user_id": user_ids,
        "gender": UNKNOWN,
        "age_bucket": np.zeros(len(user_ids), dtype=np.int64),
        "occupation": UNKNOWN,
        "zip": UNKNOWN,
    })  # fmt: skip


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
