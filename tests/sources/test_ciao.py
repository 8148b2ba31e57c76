"""Ciao source: the published file format (a MATLAB matrix generated here, never the real data), the mapping
to the raw contract, directory / zip sources, the errors, the ingest step selecting it by params, and the
real release when $CIAO_PATH points at it."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io

from recsys.config import CiaoSource, ConfigError, load_params
from recsys.contracts import DataContractError, read_raw_tables
from sources.ciao import RATINGS, read_ciao
from tests.conftest import REPO_ROOT, revalidated, shipped_params

DAY = 86_400
T0 = 1_105_858_800  # 2005-01-16 07:00 UTC: the release stores each rating's day at 07:00 UTC

# userid, productid, categoryid, rating (0-5), helpfulness, time: the columns of the published 'rating'
ROWS = [
    (1, 10, 3, 5, 1, T0 + DAY),
    (1, 12, 3, 4, 2, T0 + DAY),  # same user, same day: ordered by item id inside the day
    (2, 12, 3, 5, 1, T0),
    (2, 11, 7, 0, 1, T0 + 2 * DAY),  # 0 is on the scale (the release has 34 of them)
    (3, 13, 7, 3, 1, T0 + DAY),
    (2, 12, 3, 2, 1, T0 + 3 * DAY),  # user 2 re-rates product 12 later: the latest rating wins
    (3, 10, 5, 5, 1, T0 + 2 * DAY),  # product 10 is filed under 3 and 5 once each: the smaller id
    (3, 13, 7, 5, 4, T0 + DAY),  # re-rated the same day: the later row wins
    (4, 11, 9, 4, 1, T0 + 2 * DAY),
    (5, 11, 9, 3, 1, T0 + 2 * DAY),  # product 11 is filed under 9 twice, 7 once: category 9
]


def mat_bytes(rows=ROWS, name: str = "rating", dtype=np.int32) -> bytes:
    buffer = io.BytesIO()
    # as the release: MATLAB 5 format, compressed, one matrix of integers
    scipy.io.savemat(buffer, {name: np.asarray(rows, dtype=dtype)}, do_compression=True)
    return buffer.getvalue()


def write_release(directory: Path, ratings: bytes | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RATINGS).write_bytes(mat_bytes() if ratings is None else ratings)
    trust = io.BytesIO()
    scipy.io.savemat(trust, {"trust": np.array([[1, 2], [2, 3]], dtype=np.int32)})
    (directory / "trust.mat").write_bytes(trust.getvalue())  # shipped beside it, not read
    return directory


def _source(path: Path, positive_rating: int = 5) -> CiaoSource:
    return revalidated(shipped_params().data.ciao, path=path, positive_rating=positive_rating)


def _ts(seconds: int, micros: int = 0) -> pd.Timestamp:
    return pd.Timestamp(seconds, unit="s", tz="UTC") + pd.Timedelta(microseconds=micros)


def test_ratings_become_labelled_impressions_in_time_order(tmp_path):
    events = read_ciao(_source(write_release(tmp_path)))["events"]
    assert len(events) == 8  # two re-ratings replaced earlier rows
    assert events["event_timestamp"].is_monotonic_increasing
    by_pair = events.set_index(["user_id", "item_id"])
    assert by_pair.loc[(1, 10), "label"] == 1  # 5 >= positive_rating
    assert by_pair.loc[(1, 12), "label"] == 0  # 4 < 5
    assert by_pair.loc[(2, 11), "label"] == 0  # 0
    assert by_pair.loc[(2, 12), "label"] == 0  # the latest rating (2) counts, not the first (5)
    assert by_pair.loc[(2, 12), "event_timestamp"] == _ts(T0 + 3 * DAY)
    assert by_pair.loc[(3, 13), "label"] == 1  # the later row of the same day (5), not the first (3)
    assert events["label"].sum() == 3
    assert set(events["event_type"]) == {"click", "impression"}
    assert (events["event_type"] == np.where(events["label"] == 1, "click", "impression")).all()


def test_ratings_of_one_day_are_ordered_by_item_inside_the_day(tmp_path):
    events = read_ciao(_source(write_release(tmp_path)))["events"]
    user_1 = events[events["user_id"] == 1]
    assert user_1["item_id"].tolist() == [10, 12]
    assert user_1["event_timestamp"].tolist() == [_ts(T0 + DAY), _ts(T0 + DAY, micros=1)]
    assert not events.duplicated(["user_id", "event_timestamp"]).any()
    # the same input gives the same events, whatever order the rows of one day come in
    swapped = [ROWS[1], ROWS[0], *ROWS[2:]]
    again = read_ciao(_source(write_release(tmp_path / "swapped", mat_bytes(swapped))))["events"]
    pd.testing.assert_frame_equal(again, events)


def test_positive_rating_sets_the_label_threshold(tmp_path):
    path = write_release(tmp_path)
    assert read_ciao(_source(path, positive_rating=4))["events"]["label"].sum() == 5
    assert read_ciao(_source(path, positive_rating=1))["events"]["label"].sum() == 7  # all but the 0


def test_items_carry_their_most_frequent_category(tmp_path):
    items = read_ciao(_source(write_release(tmp_path)))["items"].set_index("item_id")
    assert list(items.index) == [10, 11, 12, 13]  # the products rated
    assert items["category"].to_dict() == {10: "cat_3", 11: "cat_9", 12: "cat_3", 13: "cat_7"}
    assert set(items["brand"]) == {"unknown"} and (items["price"] == 0.0).all()
    # created at the first kept rating: product 12's first kept rating is user 1's, second in its day
    assert items.loc[12, "created_timestamp"] == _ts(T0 + DAY, micros=1)
    assert items.loc[11, "created_timestamp"] == _ts(T0 + 2 * DAY)


def test_users_have_a_constant_profile_and_sign_up_at_their_first_rating(tmp_path):
    users = read_ciao(_source(write_release(tmp_path)))["users"].set_index("user_id")
    assert list(users.index) == [1, 2, 3, 4, 5]
    assert set(users["gender"]) == {"unknown"} and set(users["occupation"]) == {"unknown"}
    assert set(users["zip_prefix"]) == {"unk"} and (users["age_bucket"] == 0).all()
    # user 2's rating at T0 was replaced by a later one: the first kept rating (T0 + 2 days) is the sign-up
    assert users.loc[2, "signup_timestamp"] == _ts(T0 + 2 * DAY)
    assert users.loc[3, "signup_timestamp"] == _ts(T0 + DAY)


def test_a_float_matrix_of_whole_numbers_reads_the_same(tmp_path):
    # MATLAB stores doubles; the release's integers may come back as float64
    as_int = read_ciao(_source(write_release(tmp_path / "int")))
    as_float = read_ciao(_source(write_release(tmp_path / "float", mat_bytes(dtype=np.float64))))
    for name in ("users", "items", "events"):
        pd.testing.assert_frame_equal(as_float[name], as_int[name])


def test_a_zip_with_the_files_in_a_sub_folder_reads_the_same(tmp_path):
    directory = write_release(tmp_path / "plain")
    archive = tmp_path / "ciao_with_rating_timestamp.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:  # the published zip's layout
        for name in (RATINGS, "trust.mat"):
            zf.write(directory / name, f"ciao_with_rating_timestamp/{name}")
    from_zip = read_ciao(_source(archive))
    from_dir = read_ciao(_source(directory))
    for name in ("users", "items", "events"):
        pd.testing.assert_frame_equal(from_zip[name], from_dir[name])
    # and a directory with the files in one sub-folder
    nested = write_release(tmp_path / "nested" / "ciao_with_rating_timestamp")
    pd.testing.assert_frame_equal(read_ciao(_source(nested.parent))["events"], from_dir["events"])


def _bad_row(column: int, value) -> list:
    rows = [list(r) for r in ROWS]
    rows[3][column] = value  # the 4th row
    return rows


@pytest.mark.parametrize(
    ("ratings", "message"),
    [
        (mat_bytes(_bad_row(3, 6)), "row 4, column 'rating': 6 is outside [0, 5]"),
        (mat_bytes(_bad_row(3, -1)), "row 4, column 'rating': -1 is outside [0, 5]"),
        (mat_bytes(_bad_row(5, -DAY)), "row 4, column 'unix_seconds': -86400 is outside"),
        (
            mat_bytes(_bad_row(3, 4.5), dtype=np.float64),
            "row 4, column 'rating': expected an integer, found 4.5",
        ),
        (
            mat_bytes(_bad_row(5, np.nan), dtype=np.float64),
            "row 4, column 'unix_seconds': expected an integer",
        ),
        (
            mat_bytes([r[:5] for r in ROWS]),
            "variable 'rating' has shape (10, 5), expected one row per rating",
        ),
        (mat_bytes(name="ratings"), "no variable 'rating' in the file (found ['ratings'])"),
        (b"userid,productid\n1,10\n", "not a readable MATLAB 5 .mat file"),
        (mat_bytes()[:200], "not a readable MATLAB 5 .mat file"),  # truncated
    ],
    ids=[
        "rating_high",
        "rating_negative",
        "time",
        "fraction",
        "nan",
        "columns",
        "variable",
        "csv",
        "truncated",
    ],
)
def test_broken_files_name_the_file_and_the_problem(tmp_path, ratings, message):
    path = write_release(tmp_path, ratings)
    with pytest.raises(DataContractError, match=re.escape(message)) as err:
        read_ciao(_source(path))
    assert str(err.value).startswith(f"{path / RATINGS}: ")


def test_a_missing_release_or_file_is_named(tmp_path):
    with pytest.raises(DataContractError, match=r"nowhere\.zip: Ciao source not found"):
        read_ciao(_source(tmp_path / "nowhere.zip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataContractError, match=r"no 'rating_with_timestamp\.mat' at the top or in a sub-folder$"
    ):
        read_ciao(_source(tmp_path / "empty"))
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ciao/trust.mat", b"")
    with pytest.raises(DataContractError, match=r"other\.zip: no 'rating_with_timestamp\.mat'"):
        read_ciao(_source(archive))


def test_ingest_selects_the_source_by_params(tmp_path):
    from components import ingest

    path = write_release(tmp_path / "release")
    params = load_params(
        REPO_ROOT / "params.yaml", overrides={"data.source": "ciao", "data.ciao.path": str(path)}
    )
    ingest.run(params.data, params.seed, tmp_path / "raw")
    raw = read_raw_tables(tmp_path / "raw")
    assert len(raw["events"]) == 8 and np.array_equal(raw["users"]["user_id"], [1, 2, 3, 4, 5])


def test_positive_rating_must_lie_on_the_scale():
    with pytest.raises(ConfigError, match=r"data\.ciao\.positive_rating"):
        load_params(REPO_ROOT / "params.yaml", overrides={"data.ciao.positive_rating": 6})


REAL_RELEASE = os.environ.get("CIAO_PATH")


@pytest.mark.skipif(
    not REAL_RELEASE, reason="set CIAO_PATH to the Ciao release (directory or zip) to read it"
)
def test_the_real_release_reads_as_measured():
    tables = read_ciao(_source(Path(REAL_RELEASE)))
    users, items, events = tables["users"], tables["items"], tables["events"]
    # 284,086 published rows, 1,436 of them repeated (user, product) pairs
    assert (len(users), len(items), len(events)) == (7_375, 105_114, 282_650)
    assert int(events["label"].sum()) == 138_141  # 48.9% rated 5
    assert events["event_timestamp"].min() == pd.Timestamp("2000-05-30 07:00", tz="UTC")
    assert events["event_timestamp"].max().floor("s") == pd.Timestamp("2011-04-12 07:00", tz="UTC")
    assert items["category"].nunique() == 28
    assert not events.duplicated(["user_id", "event_timestamp"]).any()
