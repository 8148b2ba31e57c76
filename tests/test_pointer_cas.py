"""The promote pointer is written by compare-and-swap (recsys/object_store.py, components/promote.py), on
the real S3 server on loopback (moto, tests/s3_server.py) and on a local folder: a writer that read the
pointer before another one wrote it is refused, so interleaved promotions and rollbacks lose nothing.

Each interleaving is made deterministic: read, let another writer write, then write with what was read.
Without the conditional write every one of these tests ends with a lost promotion or a wrong ``previous``.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from components import promote
from recsys import object_store
from recsys.bundle_manifest import load_manifest
from recsys.object_store import (
    PointerConflict,
    PointerState,
    open_store,
    read_pointer,
    read_pointer_state,
    restore_previous,
    write_pointer,
)
from tests.conftest import write_params
from tests.test_promote import config, make_bundle


@pytest.fixture(params=["s3", "local"])
def store_uri(request, tmp_path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_env").uri("bundles")
    return (tmp_path / "store").as_uri()


def bundle(tmp_path: Path, name: str) -> Path:
    """A bundle of its own content (so of its own version)."""
    return make_bundle(tmp_path, name, 0.30, payload=name.encode())


def version_of(bundle_dir: Path) -> str:
    return load_manifest(bundle_dir)["version"]


def before_first_write(monkeypatch, other_writer: Callable[[], None]) -> None:
    """promote.run reads the pointer, then ``other_writer`` flips it, then run writes with what it read."""
    real_write = promote.write_pointer
    pending = [other_writer]

    def write(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if pending:
            pending.pop()()
        return real_write(*args, **kwargs)

    monkeypatch.setattr(promote, "write_pointer", write)


def after_first_read(monkeypatch, other_writer: Callable[[], None]) -> None:
    """restore_previous reads the pointer, then ``other_writer`` flips it before the write."""
    real_read = object_store.read_pointer_state
    pending = [other_writer]

    def read(store: object_store.ObjectStore) -> PointerState:
        state = real_read(store)
        if pending:
            pending.pop()()
        return state

    monkeypatch.setattr(object_store, "read_pointer_state", read)


def test_a_stale_token_is_refused_and_the_pointer_is_untouched(tmp_path, store_uri):
    store = open_store(store_uri)
    first = promote.run(config(store_uri), bundle(tmp_path, "a"))
    stale = read_pointer_state(store)
    assert stale.pointer == first and stale.token
    second = promote.run(config(store_uri), bundle(tmp_path, "b"))  # another writer, after the read
    late = load_manifest(bundle(tmp_path, "c"))
    expected = rf"changed since it was read \(it now points to '{second['version']}'.*nothing was changed"
    with pytest.raises(PointerConflict, match=expected) as refused:
        write_pointer(store, late["version"], late, stale)
    assert refused.value.current == second
    assert read_pointer(store) == second


def test_a_first_promotion_does_not_replace_one_that_came_in_between(tmp_path, store_uri):
    store = open_store(store_uri)
    nothing = read_pointer_state(store)
    assert nothing == PointerState(None, None)
    other = promote.run(config(store_uri), bundle(tmp_path, "other"))
    late = load_manifest(bundle(tmp_path, "late"))
    with pytest.raises(PointerConflict, match=f"now points to '{other['version']}'"):
        write_pointer(store, late["version"], late, nothing)
    assert read_pointer(store) == other


def test_a_retried_write_that_already_landed_is_not_a_conflict(tmp_path, store_uri):
    """A request retried after its response was lost fails its own precondition: the pointer holding
    exactly what was written counts as success; anything else is a conflict."""
    store = open_store(store_uri)
    promote.run(config(store_uri), bundle(tmp_path, "a"))
    read = read_pointer_state(store)
    manifest = load_manifest(bundle(tmp_path, "b"))
    written = write_pointer(store, manifest["version"], manifest, read)
    object_store._put_pointer(store, written, read)  # the same bytes again, with the token now stale
    assert read_pointer(store) == written
    with pytest.raises(PointerConflict):
        object_store._put_pointer(store, written | {"promoted_at": "later"}, read)
    assert read_pointer(store) == written


def test_a_promotion_that_came_in_between_becomes_previous(tmp_path, store_uri, monkeypatch):
    first = promote.run(config(store_uri), bundle(tmp_path, "first"))
    between: dict[str, Any] = {}
    before_first_write(
        monkeypatch, lambda: between.update(promote.run(config(store_uri), bundle(tmp_path, "between")))
    )
    late = promote.run(config(store_uri), bundle(tmp_path, "late"))
    assert between["previous"]["version"] == first["version"]
    assert late["previous"]["version"] == between["version"]  # not first: "between" is not lost
    assert read_pointer(open_store(store_uri)) == late


def test_two_promotions_at_once_each_keep_the_other(tmp_path, store_uri, monkeypatch):
    """Two threads promote at once, both having read the same pointer: one wins, the other re-reads and
    names the winner as previous."""
    first = promote.run(config(store_uri), bundle(tmp_path, "first"))
    both_read = threading.Barrier(2, timeout=60)
    # moto checks If-Match and stores the object in separate, unlocked steps, so on it the two writes go
    # one at a time (as AWS S3 serves conditional writes); the local store's flock needs no help
    one_write = threading.Lock() if store_uri.startswith("s3://") else None
    real_write = promote.write_pointer
    waited = threading.local()

    def write(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if not getattr(waited, "done", False):
            waited.done = True
            both_read.wait()  # both threads read the pointer (first) before either writes
        if one_write is None:
            return real_write(*args, **kwargs)
        with one_write:
            return real_write(*args, **kwargs)

    monkeypatch.setattr(promote, "write_pointer", write)
    bundles = [bundle(tmp_path, "left"), bundle(tmp_path, "right")]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda b: promote.run(config(store_uri), b), bundles))
    final = read_pointer(open_store(store_uri))
    assert {r["version"] for r in results} == {version_of(b) for b in bundles}
    (winner,) = [r for r in results if r["version"] != final["version"]]
    assert winner["previous"]["version"] == first["version"]
    assert final["previous"]["version"] == winner["version"]


def _promote_when_all_have_read(store_uri: str, bundle_dir: Path, barrier: Any, results: Any) -> None:
    """In a process of its own: promote, waiting before the first pointer write until all have read."""
    real_write = promote.write_pointer
    pending = [barrier.wait]

    def write(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if pending:
            pending.pop()()
        return real_write(*args, **kwargs)

    promote.write_pointer = write
    results.put(promote.run(config(store_uri), bundle_dir))


def test_processes_promoting_at_once_on_a_local_store_lose_nothing(tmp_path):
    """Three processes read the same pointer, then all write at once: the flock'ed compare-and-swap lets
    one through at a time, the others retry (at most ATTEMPTS - 1 times each), and the pointers form one
    chain, every version replacing a different one."""
    store_uri = (tmp_path / "store").as_uri()
    first = promote.run(config(store_uri), bundle(tmp_path, "first"))
    bundles = [bundle(tmp_path, f"p{i}") for i in range(3)]
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(len(bundles), timeout=120), spawn.Queue()
    workers = [
        spawn.Process(target=_promote_when_all_have_read, args=(store_uri, b, barrier, results))
        for b in bundles
    ]
    for worker in workers:
        worker.start()
    pointers = [results.get(timeout=180) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    replaced = {p["previous"]["version"]: p["version"] for p in pointers}
    assert len(replaced) == len(bundles)  # no two replaced the same version: none was lost
    chain = [first["version"]]
    while chain[-1] in replaced:
        chain.append(replaced[chain[-1]])
    store = open_store(store_uri)
    assert sorted(chain[1:]) == sorted(version_of(b) for b in bundles)
    assert read_pointer(store)["version"] == chain[-1]
    assert (tmp_path / "store" / ".current.json.lock").is_file()
    assert ".current.json.lock" not in store.keys("")


def test_require_current_refuses_a_newer_promotion_that_came_in_between(tmp_path, store_uri, monkeypatch):
    """The index refresh grew version ``grown_from``; a training run promoted after it read the pointer:
    the refreshed bundle must not replace the newer one."""
    grown_from = promote.run(config(store_uri), bundle(tmp_path, "trained"))
    retrained, refreshed = bundle(tmp_path, "retrained"), bundle(tmp_path, "refreshed")
    newer: dict[str, Any] = {}
    before_first_write(monkeypatch, lambda: newer.update(promote.run(config(store_uri), retrained)))
    expected = rf"may only replace '{grown_from['version']}'.*'{version_of(retrained)}' is current"
    with pytest.raises(promote.PromoteError, match=expected):
        promote.run(config(store_uri), refreshed, require_current=grown_from["version"])
    assert read_pointer(open_store(store_uri)) == newer


def test_require_current_promotes_over_that_version_and_refuses_others_before_uploading(tmp_path, store_uri):
    store = open_store(store_uri)
    refreshed = bundle(tmp_path, "refreshed")
    with pytest.raises(promote.PromoteError, match=r"may only replace 'v0'.*nothing is promoted"):
        promote.run(config(store_uri), refreshed, require_current="v0")
    current = promote.run(config(store_uri), bundle(tmp_path, "trained"))
    with pytest.raises(promote.PromoteError, match=f"'{current['version']}' is current"):
        promote.run(config(store_uri), refreshed, require_current="v0")
    assert store.keys(f"{version_of(refreshed)}/") == []  # refused before anything was uploaded
    pointer = promote.run(config(store_uri), refreshed, require_current=current["version"])
    assert pointer["previous"]["version"] == current["version"]
    # the same run again: already current, nothing to flip, not an error
    assert promote.run(config(store_uri), refreshed, require_current=current["version"]) == pointer


def test_the_cli_takes_require_current(tmp_path, capsys):
    store_uri = (tmp_path / "store").as_uri()
    params = write_params(tmp_path / "params.yaml", {"promote.uri": store_uri})
    current = promote.run(config(store_uri), bundle(tmp_path, "trained"))
    args = ["--params", str(params), "--bundle-dir", str(bundle(tmp_path, "refreshed"))]
    assert promote.main([*args, "--require-current", "older"]) == 1
    assert f"'{current['version']}' is current" in capsys.readouterr().err
    assert promote.main([*args, "--require-current", current["version"]]) == 0
    assert read_pointer(open_store(store_uri))["previous"]["version"] == current["version"]


def test_a_rollback_leaves_a_promotion_that_came_in_between_alone(tmp_path, store_uri, monkeypatch):
    store = open_store(store_uri)
    promote.run(config(store_uri), bundle(tmp_path, "first"))
    failed = promote.run(config(store_uri), bundle(tmp_path, "failed"))
    newer: dict[str, Any] = {}
    after_first_read(
        monkeypatch, lambda: newer.update(promote.run(config(store_uri), bundle(tmp_path, "new")))
    )
    assert restore_previous(store, failed["version"]) == newer  # read "failed", then refused, re-read
    assert read_pointer(store) == newer and newer["previous"]["version"] == failed["version"]


def test_undoing_the_first_promotion_leaves_one_that_came_in_between(tmp_path, store_uri, monkeypatch):
    """The conditional delete: the first version's rollout failed, but another promotion came in."""
    store = open_store(store_uri)
    only = promote.run(config(store_uri), bundle(tmp_path, "only"))
    newer: dict[str, Any] = {}
    after_first_read(
        monkeypatch, lambda: newer.update(promote.run(config(store_uri), bundle(tmp_path, "new")))
    )
    assert restore_previous(store, only["version"]) == newer
    assert read_pointer(store) == newer


def test_a_pointer_that_keeps_changing_ends_in_a_promote_error(tmp_path, store_uri, monkeypatch):
    store = open_store(store_uri)
    flippers = [load_manifest(bundle(tmp_path, name)) for name in ("x", "y")]
    flips: list[dict[str, Any]] = []
    real_write = promote.write_pointer

    def write(*args: Any, **kwargs: Any) -> dict[str, Any]:
        other = flippers[len(flips) % 2]  # another writer, between every read and write
        flips.append(real_write(store, other["version"], other, read_pointer_state(store)))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(promote, "write_pointer", write)
    late = bundle(tmp_path, "late")
    with pytest.raises(promote.PromoteError, match=r"kept changing.*\(3 attempts.*uploaded but not current"):
        promote.run(config(store_uri), late)
    assert len(flips) == promote.ATTEMPTS
    assert read_pointer(store) == flips[-1]
