"""MovieLens source: both layouts, directory / zip / download, the contract mapping and the errors."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.config import ConfigError, MovieLensSource, load_params
from recsys.contracts import DataContractError, check_raw_table
from sources.movielens import PUBLISHED_ARCHIVES, ChecksumError, DownloadError, read_movielens
from tests.conftest import REPO_ROOT, revalidated, shipped_params


def _movielens(**changes) -> MovieLensSource:
    """The shipped data.movielens section with the test's changes."""
    return revalidated(shipped_params().data.movielens, **changes)


# ---- fixtures in the exact published formats -------------------------------------------------------

T0 = 881_250_949  # a unix second in ml-100k's range


def _flags(*genres: int) -> str:
    return "|".join("1" if i in genres else "0" for i in range(19))


ML100K = {
    "u.user": (
        "1|24|M|technician|85711\n"
        "2|53|F|other|94043\n"
        "3|17|M|student|T8H1N\n"
        "4|56|F|writer|02138\n"  # rates nothing
    ),
    "u.item": (
        f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story|{_flags(3, 4, 5)}\n"
        f"2|Café Society (1989)|01-Jan-1989||http://us.imdb.com/x|{_flags(8)}\n"
        f"3|unknown|||http://us.imdb.com/y|{_flags()}\n"
        f"4|GoldenEye (1995)|01-Jan-1995||http://us.imdb.com/z|{_flags(1, 2, 16)}\n"
        f"5|Never Rated (2001)|05-May-2001||http://us.imdb.com/w|{_flags(5)}\n"
    ),
    "u.data": (
        f"1\t1\t5\t{T0}\n"
        f"1\t2\t3\t{T0}\n"  # same user, same second as the line above
        f"1\t4\t4\t{T0 + 1}\n"
        f"2\t1\t3\t{T0 + 50}\n"
        f"2\t3\t4\t{T0 - 949}\n"  # the earliest rating of the dataset
        f"3\t4\t1\t{T0 + 9_000}\n"
        f"2\t1\t5\t{T0 + 70}\n"  # user 2 re-rates item 1: the latest rating wins
    ),
}

T1 = 978_300_760  # a unix second in ml-1m's range

ML1M = {
    "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n",
    "movies.dat": (
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Crème de la crème (1962)::Drama\n"
        "3::Untitled::\n"  # no genre, no year
        "4::Heat (1995)::Action|Crime|Thriller\n"
    ),
    "ratings.dat": (
        f"1::1::5::{T1}\n"
        f"1::2::3::{T1}\n"
        f"1::3::4::{T1}\n"  # three ratings by user 1 in one second
        f"2::1::4::{T1 + 100}\n"
        f"3::2::2::{T1 + 200}\n"
    ),
}


def _write_dir(root: Path, files: dict[str, str], folder: str = "") -> Path:
    target = root / folder if folder else root
    target.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (target / name).write_bytes(text.encode("latin-1"))
    return root


def _write_zip(path: Path, files: dict[str, str], folder: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        if folder:
            zf.writestr(f"{folder}/", b"")
        for name, text in files.items():
            zf.writestr(f"{folder}/{name}" if folder else name, text.encode("latin-1"))
    return path


def _utc(seconds: int, micros: int = 0) -> pd.Timestamp:
    return pd.Timestamp(seconds * 1_000_000_000 + micros * 1_000, unit="ns", tz="UTC")


def _ml100k(tmp_path: Path, files: dict[str, str] | None = None, **kwargs) -> dict[str, pd.DataFrame]:
    root = _write_dir(tmp_path / "src", files or ML100K)
    return read_movielens(_movielens(variant="ml-100k", path=root, **kwargs))


# ---- ml-100k -----------------------------------------------------------------------------------------


def test_ml100k_users_are_mapped_to_the_contract(tmp_path):
    users = _ml100k(tmp_path)["users"].set_index("user_id")
    assert users.index.tolist() == [1, 2, 3, 4]
    assert users["age_bucket"].tolist() == [18, 50, 1, 56]  # raw ages 24, 53, 17, 56 -> ml-1m buckets
    assert users["age_bucket"].dtype == "int64"
    assert users["gender"].tolist() == ["M", "F", "M", "F"]
    assert users["occupation"].tolist() == ["technician", "other", "student", "writer"]
    assert users["zip_prefix"].tolist() == ["857", "940", "T8H", "021"]  # leading zero kept
    assert str(users["signup_timestamp"].dtype) == "datetime64[ns, UTC]"
    assert users.loc[1, "signup_timestamp"] == _utc(T0)
    assert users.loc[2, "signup_timestamp"] == _utc(T0 - 949)
    # user 4 never rated: the dataset's first rating time keeps the profile available from the start
    assert users.loc[4, "signup_timestamp"] == _utc(T0 - 949)


def test_ml100k_items_are_mapped_to_the_contract(tmp_path):
    items = _ml100k(tmp_path)["items"].set_index("item_id")
    assert items["category"].tolist() == ["Animation", "Drama", "unknown", "Action", "Comedy"]
    assert items["brand"].tolist() == ["1990s", "1980s", "unknown", "1990s", "2000s"]
    assert items["price"].dtype == "float64"
    assert (items["price"] == 0.0).all()
    assert items.loc[1, "created_timestamp"] == _utc(T0)  # first rating of movie 1
    assert items.loc[3, "created_timestamp"] == _utc(T0 - 949)
    assert items.loc[4, "created_timestamp"] == _utc(T0 + 1)
    assert items.loc[5, "created_timestamp"] == _utc(T0 - 949)  # never rated: dataset start


def test_ml100k_events_labels_ties_and_order(tmp_path):
    events = _ml100k(tmp_path)["events"]
    assert [str(events[c].dtype) for c in events.columns] == [
        "int64", "int64", "datetime64[ns, UTC]", "int64", "object",
    ]  # fmt: skip
    rows = list(
        events[["user_id", "item_id", "event_timestamp", "label", "event_type"]].itertuples(index=False)
    )
    assert [tuple(r) for r in rows] == [
        (2, 3, _utc(T0 - 949), 1, "click"),
        (1, 1, _utc(T0), 1, "click"),  # rating 5
        (1, 2, _utc(T0, 1), 0, "impression"),  # rating 3, same second: +1 µs, after item 1
        (1, 4, _utc(T0 + 1), 1, "click"),  # rating 4 is positive
        (2, 1, _utc(T0 + 70), 1, "click"),  # re-rated 3 -> 5: only the latest rating is kept
        (3, 4, _utc(T0 + 9_000), 0, "impression"),
    ]
    assert not events.duplicated(["user_id", "event_timestamp"]).any()
    assert not events.duplicated(["user_id", "item_id"]).any()
    assert events["event_timestamp"].is_monotonic_increasing


def test_positive_rating_threshold_comes_from_config(tmp_path):
    events = _ml100k(tmp_path, positive_rating=3)["events"]
    assert events.set_index(["user_id", "item_id"]).loc[(1, 2), "label"] == 1  # a 3 is now positive
    assert events.set_index(["user_id", "item_id"]).loc[(3, 4), "label"] == 0
    assert (events["event_type"] == events["label"].map({1: "click", 0: "impression"})).all()


def test_ml100k_zip_with_sub_folder_reads_the_same_tables(tmp_path):
    from_dir = _ml100k(tmp_path)
    archive = _write_zip(tmp_path / "ml-100k.zip", ML100K, folder="ml-100k")
    from_zip = read_movielens(_movielens(variant="ml-100k", path=archive))
    for name, df in from_dir.items():
        pd.testing.assert_frame_equal(from_zip[name], df)


def test_ml100k_directory_with_sub_folder(tmp_path):
    root = _write_dir(tmp_path / "download", ML100K, folder="ml-100k")
    tables = read_movielens(_movielens(variant="ml-100k", path=root))
    assert len(tables["events"]) == 6


# ---- ml-1m -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_zip", [False, True])
def test_ml1m_layout_is_mapped_to_the_contract(tmp_path, as_zip):
    if as_zip:
        source = _write_zip(tmp_path / "ml-1m.zip", ML1M)  # files at the top of the zip
    else:
        source = _write_dir(tmp_path / "src", ML1M, folder="ml-1m")
    tables = read_movielens(_movielens(variant="ml-1m", path=source))
    for name, df in tables.items():
        check_raw_table(name, df, "test")

    users = tables["users"].set_index("user_id")
    assert users["age_bucket"].tolist() == [1, 56, 25]  # already bucketed in ml-1m
    assert users["occupation"].tolist() == ["occ_10", "occ_16", "occ_15"]
    assert users["gender"].tolist() == ["F", "M", "M"]
    assert users["zip_prefix"].tolist() == ["480", "700", "551"]

    items = tables["items"].set_index("item_id")
    assert items["category"].tolist() == ["Animation", "Drama", "unknown", "Action"]
    assert items["brand"].tolist() == ["1990s", "1960s", "unknown", "1990s"]  # latin-1 title parsed
    assert items.loc[4, "created_timestamp"] == _utc(T1)  # never rated: dataset start

    events = tables["events"]
    assert events["event_timestamp"].tolist()[:3] == [_utc(T1), _utc(T1, 1), _utc(T1, 2)]
    assert events["item_id"].tolist() == [1, 2, 3, 1, 2]
    assert events["label"].tolist() == [1, 0, 1, 1, 0]
    assert not events.duplicated(["user_id", "event_timestamp"]).any()
    assert (events["event_timestamp"].dt.floor("s") == pd.to_datetime(
        [T1, T1, T1, T1 + 100, T1 + 200], unit="s", utc=True
    )).all()  # fmt: skip


def test_ties_across_users_are_ordered_by_timestamp_then_user(tmp_path):
    ratings = f"3::4::5::{T1}\n1::2::3::{T1}\n1::1::5::{T1}\n2::3::4::{T1}\n"  # file order is not id order
    root = _write_dir(tmp_path / "src", ML1M | {"ratings.dat": ratings})
    events = read_movielens(_movielens(variant="ml-1m", path=root))["events"]
    assert [(e.user_id, e.item_id, e.event_timestamp) for e in events.itertuples()] == [
        (1, 1, _utc(T1)),
        (2, 3, _utc(T1)),
        (3, 4, _utc(T1)),
        (1, 2, _utc(T1, 1)),
    ]


def test_random_ratings_keep_the_event_invariants(tmp_path):
    rng = np.random.default_rng(7)
    n = 3_000
    users, items = rng.integers(1, 40, n), rng.integers(1, 60, n)
    seconds = T1 + rng.integers(0, 30, n)  # many ties within a second and repeated (user, item) pairs
    stars = rng.integers(1, 6, n)
    lines = [f"{u}::{i}::{r}::{t}\n" for u, i, r, t in zip(users, items, stars, seconds, strict=True)]
    files = {
        "users.dat": "".join(f"{u}::M::25::1::12345\n" for u in range(1, 40)),
        "movies.dat": "".join(f"{i}::Movie {i} (1999)::Drama\n" for i in range(1, 60)),
        "ratings.dat": "".join(lines),
    }
    events = read_movielens(_movielens(variant="ml-1m", path=_write_dir(tmp_path / "src", files)))["events"]

    raw = pd.DataFrame({"user_id": users, "item_id": items, "rating": stars, "second": seconds})
    latest = raw.iloc[np.argsort(seconds, kind="stable")].drop_duplicates(["user_id", "item_id"], keep="last")
    merged = events.merge(latest, on=["user_id", "item_id"], validate="one_to_one")
    assert len(merged) == len(events) == len(latest)
    assert (merged["label"] == (merged["rating"] >= 4)).all()
    second = merged["event_timestamp"].dt.floor("s")
    assert (second == pd.to_datetime(merged["second"], unit="s", utc=True)).all()
    offsets = (merged["event_timestamp"] - second).to_numpy().astype(np.int64)  # nanoseconds
    expected = merged.groupby(["user_id", "second"])["item_id"].rank(method="first").astype("int64") - 1
    assert (offsets == expected * 1_000).all()  # rank by item_id within (user, second), in microseconds
    assert not events.duplicated(["user_id", "event_timestamp"]).any()
    pd.testing.assert_frame_equal(
        events, events.sort_values(["event_timestamp", "user_id"], ignore_index=True)
    )


# ---- download ----------------------------------------------------------------------------------------


def _published_zip(tmp_path: Path) -> tuple[Path, str]:
    archive = _write_zip(tmp_path / "mirror" / "ml-100k.zip", ML100K, folder="ml-100k")
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_download_verifies_checksum_and_caches(tmp_path):
    archive, digest = _published_zip(tmp_path)
    cache = tmp_path / "cache"
    cfg = _movielens(variant="ml-100k", url=archive.as_uri(), sha256=digest, cache_dir=cache)
    tables = read_movielens(cfg)
    assert len(tables["events"]) == 6
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k.zip"]
    assert (cache / "ml-100k.zip").read_bytes() == archive.read_bytes()

    archive.unlink()  # the second read must come from the verified cache, not the URL
    again = read_movielens(cfg)
    pd.testing.assert_frame_equal(again["events"], tables["events"])


def test_download_replaces_a_corrupt_cached_archive(tmp_path):
    archive, digest = _published_zip(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ml-100k.zip").write_bytes(b"truncated")
    cfg = _movielens(variant="ml-100k", url=archive.as_uri(), sha256=digest, cache_dir=cache)
    assert len(read_movielens(cfg)["users"]) == 4
    assert (cache / "ml-100k.zip").read_bytes() == archive.read_bytes()


def test_download_with_wrong_checksum_fails_and_keeps_nothing(tmp_path):
    archive, digest = _published_zip(tmp_path)
    cache = tmp_path / "cache"
    wrong = "0" * 64
    cfg = _movielens(variant="ml-100k", url=archive.as_uri(), sha256=wrong, cache_dir=cache)
    with pytest.raises(ChecksumError) as err:
        read_movielens(cfg)
    message = str(err.value)
    assert str(cache / "ml-100k.zip") in message
    assert wrong in message and digest in message
    assert list(cache.iterdir()) == []  # neither the archive nor a temporary file is left


def test_download_defaults_to_the_published_checksum_of_the_variant(tmp_path):
    archive, digest = _published_zip(tmp_path)  # our fixture is not the GroupLens archive
    cfg = _movielens(variant="ml-100k", url=archive.as_uri(), cache_dir=tmp_path / "cache")
    with pytest.raises(ChecksumError, match=PUBLISHED_ARCHIVES["ml-100k"].sha256) as err:
        read_movielens(cfg)
    assert digest in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_failure_names_the_url(tmp_path):
    url = (tmp_path / "missing.zip").as_uri()
    cfg = _movielens(variant="ml-1m", url=url, sha256="0" * 64, cache_dir=tmp_path / "cache")
    with pytest.raises(DownloadError, match=r"missing\.zip"):
        read_movielens(cfg)
    assert list((tmp_path / "cache").iterdir()) == []


def test_default_url_and_checksums_are_the_grouplens_archives():
    assert _movielens().variant == "ml-100k"
    assert PUBLISHED_ARCHIVES["ml-100k"].url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
    assert PUBLISHED_ARCHIVES["ml-1m"].url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert PUBLISHED_ARCHIVES["ml-100k"].sha256.startswith("50d2a982")
    assert PUBLISHED_ARCHIVES["ml-1m"].sha256.startswith("a6898adb")


# ---- errors ------------------------------------------------------------------------------------------


def _error_for(tmp_path: Path, variant: str, files: dict[str, str]) -> str:
    root = _write_dir(tmp_path / "bad", files)
    with pytest.raises(DataContractError) as err:
        read_movielens(_movielens(variant=variant, path=root))
    return str(err.value)


def test_missing_source_is_named(tmp_path):
    missing = tmp_path / "nowhere.zip"
    with pytest.raises(DataContractError, match=r"nowhere\.zip"):
        read_movielens(_movielens(path=missing))


def test_not_a_zip_is_named(tmp_path):
    bogus = tmp_path / "ml-100k.zip"
    bogus.write_text("not a zip")
    with pytest.raises(DataContractError, match=r"ml-100k\.zip.*not a readable zip"):
        read_movielens(_movielens(path=bogus))


def test_wrong_variant_names_the_expected_file(tmp_path):
    message = _error_for(tmp_path, "ml-100k", ML1M)
    assert "u.data" in message and str(tmp_path / "bad") in message


def test_missing_member_file_is_named(tmp_path):
    message = _error_for(tmp_path, "ml-100k", {k: v for k, v in ML100K.items() if k != "u.user"})
    assert str(tmp_path / "bad" / "u.user") in message


def test_missing_member_in_zip_is_named(tmp_path):
    files = {k: v for k, v in ML1M.items() if k != "movies.dat"}
    archive = _write_zip(tmp_path / "ml-1m.zip", files, folder="ml-1m")
    with pytest.raises(DataContractError, match=r"ml-1m\.zip.*'ml-1m/movies\.dat'"):
        read_movielens(_movielens(variant="ml-1m", path=archive))


def _damage_member(archive: Path, member: str) -> None:
    """Flip bytes in the middle of ``member``'s data, as a bad copy would; the zip directory stays intact."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(member)
    data = bytearray(archive.read_bytes())
    # local file header: 30 fixed bytes, then the file name and the extra field (lengths at 26 and 28)
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length
    middle = start + info.compress_size // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
def test_damaged_member_in_zip_names_zip_and_member(tmp_path, compression):
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w", compression=compression) as zf:
        for name, text in ML1M.items():
            zf.writestr(f"ml-1m/{name}", (text * 40).encode("latin-1"))
    _damage_member(archive, "ml-1m/ratings.dat")
    with pytest.raises(DataContractError) as err:
        read_movielens(_movielens(variant="ml-1m", path=archive))
    assert f"{archive}: MovieLens file 'ml-1m/ratings.dat' in the zip is damaged" in str(err.value)


@pytest.mark.parametrize(
    ("variant", "file", "edit", "message"),
    [
        ("ml-100k", "u.data", lambda t: t + "4\t1\t5\n", "u.data: line 8 has 3 column(s), expected 4"),
        (
            "ml-1m",
            "users.dat",
            lambda t: t.replace("2::M::56::16::70072", "2::M::56::16"),
            "users.dat: line 2 has 4 column(s), expected 5",
        ),
        (
            "ml-100k",
            "u.data",
            lambda t: t.replace(f"3\t4\t1\t{T0 + 9_000}", f"x3\t4\t1\t{T0 + 9_000}"),
            "u.data: line 6, column 'user_id': expected an integer, found 'x3'",
        ),
        (
            "ml-1m",
            "ratings.dat",
            lambda t: t.replace(f"3::2::2::{T1 + 200}", f"3::2::2.5::{T1 + 200}"),
            "ratings.dat: line 5, column 'rating': expected an integer",
        ),
        (
            "ml-100k",
            "u.item",
            lambda t: t.replace("5|Never Rated", "five|Never Rated"),
            "u.item: line 5, column 'item_id'",
        ),
    ],
    ids=["column_count", "dat_column_count", "non_integer_id", "non_integer_rating", "non_integer_movie_id"],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, variant, file, edit, message):
    files = ML100K if variant == "ml-100k" else ML1M
    assert message in _error_for(tmp_path, variant, files | {file: edit(files[file])})


def test_empty_ratings_file_is_named(tmp_path):
    message = _error_for(tmp_path, "ml-1m", ML1M | {"ratings.dat": "\n"})
    assert "ratings.dat: file is empty" in message


def test_ratings_of_unknown_users_and_movies_name_the_ids(tmp_path):
    files = ML1M | {"ratings.dat": ML1M["ratings.dat"] + f"9::1::4::{T1}\n7::1::4::{T1}\n"}
    message = _error_for(tmp_path, "ml-1m", files)
    assert "ratings.dat: 2 rating(s) refer to user_id values missing from" in message
    assert "users.dat" in message and "[7, 9]" in message

    files = ML1M | {"ratings.dat": ML1M["ratings.dat"] + f"1::42::4::{T1 + 5}\n"}
    message = _error_for(tmp_path / "items", "ml-1m", files)
    assert "item_id values missing from" in message and "movies.dat" in message and "[42]" in message


def test_invalid_profile_values_are_rejected(tmp_path):
    files = ML1M | {"users.dat": ML1M["users.dat"].replace("3::M::25", "3::M::30")}
    assert "users.dat: line 3, column 'age': 30 is not an ml-1m age bucket" in _error_for(
        tmp_path, "ml-1m", files
    )
    files = ML100K | {"u.user": ML100K["u.user"].replace("2|53|F", "2|53|X")}
    message = _error_for(tmp_path / "g", "ml-100k", files)
    assert "u.user: line 2, column 'gender'" in message


def test_duplicate_user_ids_are_rejected_by_the_contract(tmp_path):
    files = ML1M | {"users.dat": ML1M["users.dat"] + "3::F::18::1::12345\n"}
    message = _error_for(tmp_path, "ml-1m", files)
    assert "users.dat" in message and "duplicate user_id" in message


# ---- config ------------------------------------------------------------------------------------------


def test_params_yaml_movielens_block_loads():
    cfg = load_params(REPO_ROOT / "params.yaml").data.movielens
    assert cfg.positive_rating == 4 and cfg.url is None and cfg.sha256 is None


def test_config_rejects_unsupported_url_scheme(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.movielens\.url"):
        load_params(
            REPO_ROOT / "params.yaml", overrides={"data.movielens.url": "ftp://example.org/ml-100k.zip"}
        )


def test_several_candidate_sub_folders_are_ambiguous(tmp_path):
    root = _write_dir(tmp_path / "data", ML100K, folder="ml-100k")
    _write_dir(root, ML100K, folder="ml-100k-copy")
    with pytest.raises(DataContractError, match=r"several sub-folders \['ml-100k-copy/', 'ml-100k/'\]"):
        read_movielens(_movielens(path=root))
