"""MovieTweetings source: the published file format (generated here, never the real data), the mapping to
the raw contract, directory / zip sources, the errors, and the ingest step selecting it by params."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.config import ConfigError, MovieTweetingsSource, load_params
from recsys.contracts import DataContractError, read_raw_tables
from sources.movietweetings import read_movietweetings, year_bucket
from tests.conftest import REPO_ROOT, revalidated, shipped_params

T0 = 1_362_062_307  # a unix second in the 100K snapshot's range (2013-02-28)

# the published layout: IMDb ids with leading zeros, UTF-8 titles, '|'-joined genres (possibly none)
FILES = {
    "users.dat": "1::18405182\n2::31260677\n3::138805259\n4::99\n",  # user 4 rates nothing
    "movies.dat": (
        "0002844::Fantômas - À l'ombre de la guillotine (1913)::Crime|Drama\n"
        "0104257::A Few Good Men (1992)::Crime|Drama|Mystery|Thriller\n"
        "1074638::Skyfall (2012)::Action|Adventure|Thriller\n"
        "1853728::Django Unchained (2012)::Western\n"
        "2357129::Jobs (2013)::\n"  # no genre listed
    ),
    "ratings.dat": (
        f"1::1074638::7::{T0 + 100}\n"
        f"1::1853728::8::{T0 + 100}\n"  # same user, same second
        f"2::0104257::10::{T0}\n"
        f"2::0002844::0::{T0 + 50}\n"  # 0 is on the scale
        f"3::2357129::9::{T0 + 7}\n"
        f"2::0104257::3::{T0 + 60}\n"  # user 2 re-rates: the latest rating wins
    ),
}


def write_snapshot(directory: Path, files: dict[str, str] = FILES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_bytes(text.encode("utf-8"))
    return directory


def _source(path: Path, positive_rating: int = 8) -> MovieTweetingsSource:
    return revalidated(shipped_params().data.movietweetings, path=path, positive_rating=positive_rating)


def test_ratings_become_labelled_impressions_in_time_order(tmp_path):
    tables = read_movietweetings(_source(write_snapshot(tmp_path)))
    events = tables["events"]
    assert len(events) == 5  # the re-rating replaced user 2's first rating of 0104257
    assert events["event_timestamp"].is_monotonic_increasing
    by_pair = events.set_index(["user_id", "item_id"])
    assert by_pair.loc[(2, 104257), "label"] == 0  # the latest rating (3) counts, not the first (10)
    assert by_pair.loc[(1, 1853728), "label"] == 1  # 8 >= positive_rating
    assert by_pair.loc[(1, 1074638), "label"] == 0  # 7 < 8
    assert by_pair.loc[(3, 2357129), "label"] == 1
    assert set(events["event_type"]) == {"click", "impression"}
    # two ratings in one second keep a strict order inside that second
    same_second = events[events["user_id"] == 1]["event_timestamp"]
    assert (
        same_second.nunique() == 2
        and (same_second.dt.floor("s") == pd.Timestamp(T0 + 100, unit="s", tz="UTC")).all()
    )


def test_positive_rating_sets_the_label_threshold(tmp_path):
    path = write_snapshot(tmp_path)
    strict = read_movietweetings(_source(path, positive_rating=10))["events"]
    assert strict["label"].sum() == 0  # nobody's latest rating is a 10
    lenient = read_movietweetings(_source(path, positive_rating=7))["events"]
    assert lenient["label"].sum() == 3


def test_items_carry_first_genre_and_release_year_bucket(tmp_path):
    items = read_movietweetings(_source(write_snapshot(tmp_path)))["items"].set_index("item_id")
    assert items.loc[1074638, "category"] == "Action"
    assert items.loc[2357129, "category"] == "unknown"
    assert items.loc[1074638, "brand"] == "2012"  # recent releases keep their year
    assert items.loc[104257, "brand"] == "1990s"  # older ones their decade
    assert items.loc[2844, "brand"] == "1910s"
    assert (items["price"] == 0.0).all()
    # the whole catalogue is there, available from the first rating (created = first rating or start)
    assert len(items) == 5
    assert items.loc[1853728, "created_timestamp"].floor("s") == pd.Timestamp(T0 + 100, unit="s", tz="UTC")


def test_users_have_a_constant_profile_and_sign_up_at_their_first_rating(tmp_path):
    users = read_movietweetings(_source(write_snapshot(tmp_path)))["users"].set_index("user_id")
    assert list(users.index) == [1, 2, 3, 4]
    assert set(users["gender"]) == {"unknown"} and set(users["occupation"]) == {"unknown"}
    assert (users["age_bucket"] == 0).all()
    # user 2's rating at T0 was replaced by a later one: the first kept rating (T0 + 50) is the sign-up
    assert users.loc[2, "signup_timestamp"] == pd.Timestamp(T0 + 50, unit="s", tz="UTC")
    start = pd.Timestamp(T0 + 7, unit="s", tz="UTC")  # the first kept rating of the dataset (user 3)
    assert users.loc[3, "signup_timestamp"] == start
    assert users.loc[4, "signup_timestamp"] == start  # no rating: available from the start


def test_year_bucket():
    buckets = year_bucket(pd.Series(["2013", "2000", "1999", None, "abcd"]))
    assert buckets.tolist() == ["2013", "2000", "1990s", "unknown", "unknown"]


def test_a_zip_with_the_files_in_a_sub_folder_reads_the_same(tmp_path):
    directory = write_snapshot(tmp_path / "plain")
    archive = tmp_path / "movietweetings.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in FILES:
            zf.write(directory / name, f"snapshot/{name}")
    from_zip = read_movietweetings(_source(archive))
    from_dir = read_movietweetings(_source(directory))
    for name in ("users", "items", "events"):
        pd.testing.assert_frame_equal(from_zip[name], from_dir[name])


@pytest.mark.parametrize(
    ("file", "line", "message"),
    [
        ("ratings.dat", "1::1074638::11::1362062307\n", "outside [0, 10]"),
        ("ratings.dat", "1::1074638::8\n", "has 3 column(s), expected 4"),
        ("ratings.dat", "9::1074638::8::1362062307\n", "missing from"),  # user 9 is not in users.dat
        ("movies.dat", "tt0001::Bad Id (2001)::Drama\n", "expected an integer"),
    ],
)
def test_broken_files_name_the_file_and_the_problem(tmp_path, file, line, message):
    files = dict(FILES)
    files[file] = files[file] + line
    with pytest.raises(DataContractError, match=re.escape(message)):
        read_movietweetings(_source(write_snapshot(tmp_path, files)))


def test_missing_file_is_named(tmp_path):
    path = write_snapshot(tmp_path)
    (path / "movies.dat").unlink()
    with pytest.raises(DataContractError, match=r"movies\.dat"):
        read_movietweetings(_source(path))


def test_ingest_selects_the_source_by_params(tmp_path):
    from components import ingest

    path = write_snapshot(tmp_path / "snapshot")
    params = load_params(
        REPO_ROOT / "params.yaml",
        overrides={"data.source": "movietweetings", "data.movietweetings.path": str(path)},
    )
    ingest.run(params.data, params.seed, tmp_path / "raw")
    raw = read_raw_tables(tmp_path / "raw")
    assert len(raw["events"]) == 5 and np.array_equal(raw["users"]["user_id"], [1, 2, 3, 4])


def test_positive_rating_must_lie_on_the_scale():
    with pytest.raises(ConfigError, match=r"data\.movietweetings\.positive_rating"):
        load_params(REPO_ROOT / "params.yaml", overrides={"data.movietweetings.positive_rating": 11})
