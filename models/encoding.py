"""Feature encoding: a pandas or Arrow frame -> the tensors of an encoded batch (models/batch.py).

:class:`FeatureEncoder` is fitted on the TRAIN frame only, so validation and test values that training
never saw fall into the out-of-vocabulary bucket exactly as unseen values will at serving time. Its
state is plain JSON (saved in the model's ``config.json``). Encoding is vectorised: pandas hash
indexes for vocabulary lookups and pyarrow offsets for list columns, no Python loop over rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from models.batch import (
    DENSE_KEY,
    FIRST_ID,
    GROUP_KEY,
    LABEL_KEY,
    LENGTH_SUFFIX,
    MISSING_CATEGORY,
    OOV_ID,
    Batch,
)
from models.config import FeatureSpec

SMALL_BATCH = 256  # values per lookup up to which a binary search beats building a hash lookup

Frame = pd.DataFrame | pa.Table
ValueKind = Literal["int", "str"]


class FeatureEncoder:
    """Vocabularies, hash settings and dense statistics of the declared features (fitted on train)."""

    def __init__(
        self,
        spec: FeatureSpec,
        vocabs: Mapping[str, np.ndarray | None],
        value_kinds: Mapping[str, ValueKind],
        dense_stats: Mapping[str, tuple[float, float]],
        label_column: str = "label",
        group_column: str = "user_id",
    ) -> None:
        self.spec = spec
        self.vocabs = dict(vocabs)
        self.value_kinds = dict(value_kinds)
        self.dense_stats = dict(dense_stats)
        self.label_column = label_column
        self.group_column = group_column
        self._indexes: dict[str, pd.Index] = {}
        self._sorted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._arrow_vocabs: dict[str, pa.Array] = {}

    # ---- fitting --------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls, spec: FeatureSpec, train: Frame, label_column: str = "label", group_column: str = "user_id"
    ) -> FeatureEncoder:
        """Learn vocabularies (values seen >= min_count times) and dense mean/std from ``train`` only."""
        return EncoderFit(spec).update(train).result(label_column, group_column)

    @classmethod
    def fit_parquet(
        cls,
        spec: FeatureSpec,
        paths: Sequence[str | Path],
        label_column: str = "label",
        group_column: str = "user_id",
    ) -> FeatureEncoder:
        """:meth:`fit` over the rows of ``paths`` together, read one row group at a time (only the
        declared feature columns): memory grows with the vocabularies, not with the rows."""
        state = EncoderFit(spec)
        for part in iter_row_groups(paths, spec.names):
            state.update(part)
        return state.result(label_column, group_column)

    # ---- sizes ----------------------------------------------------------------------------------

    def num_embeddings(self, name: str) -> int:
        """Rows of the embedding table of a sparse feature, or of the table a sequence feature shares."""
        if self.spec.kind_of(name) == "sequence":
            name = self.spec.sequence_feature(name).shares
        feature = self.spec.sparse_feature(name)
        if feature.hash_buckets is not None:
            return FIRST_ID + feature.hash_buckets
        vocab = self.vocabs[name]
        assert vocab is not None
        return FIRST_ID + len(vocab)

    @property
    def dense_names(self) -> list[str]:
        return [f.name for f in self.spec.dense]

    def dense_index(self, name: str) -> int:
        return self.dense_names.index(name)

    # ---- encoding -------------------------------------------------------------------------------

    def encode(self, frame: Frame, features: Iterable[str] | None = None) -> Batch:
        """Encode ``frame`` into a batch (see the module docstring); vectorised, no per-row Python.

        ``features`` restricts encoding to those features (serving's user tower needs no item
        columns); dense columns that are not requested are left at 0, i.e. the training mean.
        """
        wanted = set(self.spec.names if features is None else features)
        unknown = sorted(wanted - set(self.spec.names))
        if unknown:
            raise KeyError(f"encode: unknown feature(s) {unknown}; declared: {self.spec.names}")
        present = set(_column_names(frame))  # once per call, not once per column

        def column(name: str) -> Any:
            return _column(frame, name, present)

        batch: Batch = {}
        for feature in self.spec.sparse:
            if feature.name in wanted:
                batch[feature.name] = torch.from_numpy(self.encode_ids(feature.name, column(feature.name)))
        for feature in self.spec.sequence:
            if feature.name in wanted:
                ids, lengths = self._encode_sequence(feature.name, column(feature.name))
                batch[feature.name] = torch.from_numpy(ids)
                batch[feature.name + LENGTH_SUFFIX] = torch.from_numpy(lengths)
        dense = np.zeros((_num_rows(frame), len(self.spec.dense)), dtype=np.float32)
        for j, feature in enumerate(self.spec.dense):
            if feature.name in wanted:
                dense[:, j] = self.standardise(feature.name, column(feature.name))
        batch[DENSE_KEY] = torch.from_numpy(dense)
        if self.label_column in present:
            batch[LABEL_KEY] = torch.from_numpy(_to_numpy(column(self.label_column)).astype(np.float32))
        if self.group_column in present:
            batch[GROUP_KEY] = torch.from_numpy(_group_codes(_to_numpy(column(self.group_column))))
        return batch

    def standardise(self, name: str, values: Any) -> np.ndarray:
        """Dense feature ``name``'s values as the models see them: transformed, minus the training mean,
        over the training standard deviation (float64; non-finite inputs count as 0)."""
        feature = self.spec.dense_feature(name)
        mean, std = self.dense_stats[name]
        return (_dense_values(values, feature.transform, name) - mean) / std

    def encode_ids(self, name: str, values: Any) -> np.ndarray:
        """Map raw values of sparse feature ``name`` to table rows (OOV for unseen and missing values)."""
        feature = self.spec.sparse_feature(name)
        kind = self.value_kinds[name]
        if (
            kind == "str"
            and feature.hash_buckets is None
            and _arrow_strings(values)
            and len(values) > SMALL_BATCH
        ):
            return self._lookup_arrow(name, values)
        arr = _as_kind(values, kind, name)
        if feature.hash_buckets is not None:
            hashed = pd.util.hash_array(arr).astype(np.uint64) % np.uint64(feature.hash_buckets)
            ids = hashed.astype(np.int64) + FIRST_ID
            if kind == "str":
                ids[arr == MISSING_CATEGORY] = OOV_ID
            return ids
        if len(arr) <= SMALL_BATCH:
            return self._lookup_small(name, arr)
        positions = self._index(name).get_indexer(arr)
        return np.where(positions >= 0, positions + FIRST_ID, OOV_ID).astype(np.int64)

    def _lookup_arrow(self, name: str, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Vocabulary rows of an Arrow string column by Arrow's hash lookup: no Python string objects
        (what the streaming loader's row groups hold). Nulls and "" are in no vocabulary: OOV, as on
        the object path."""
        if name not in self._arrow_vocabs:
            vocab = self.vocabs[name]
            assert vocab is not None
            self._arrow_vocabs[name] = pa.array(vocab.tolist(), type=pa.string())
        value_set = self._arrow_vocabs[name].cast(values.type)
        positions = pc.index_in(values, value_set=value_set)
        ids = pc.fill_null(pc.add(pc.cast(positions, pa.int64()), FIRST_ID), OOV_ID).to_numpy()
        return ids if ids.flags.writeable else ids.copy()  # callers mark invalid entries in place

    def _lookup_small(self, name: str, arr: np.ndarray) -> np.ndarray:
        """Vocabulary rows by binary search: what a serving request's few values need. A hash index's
        lookup costs ~0.2 ms of fixed overhead per call, ~100x a search over a handful of values."""
        if name not in self._sorted:
            vocab = self.vocabs[name]
            assert vocab is not None
            order = np.argsort(vocab, kind="stable")
            self._sorted[name] = (vocab[order], order)
        values, order = self._sorted[name]
        if not len(values):
            return np.full(len(arr), OOV_ID, dtype=np.int64)
        at = np.minimum(np.searchsorted(values, arr), len(values) - 1)
        hit = values[at] == arr
        return np.where(hit, order[at] + FIRST_ID, OOV_ID).astype(np.int64)

    def id_counts(self, frame: Frame, name: str) -> np.ndarray:
        """Occurrences of each table row of sparse feature ``name`` in ``frame`` (log-Q frequencies)."""
        ids = self.encode_ids(name, _column(frame, name))
        return np.bincount(ids, minlength=self.num_embeddings(name)).astype(np.int64)

    def _encode_sequence(self, name: str, column: Any) -> tuple[np.ndarray, np.ndarray]:
        feature = self.spec.sequence_feature(name)
        lengths, flat, flat_valid = _list_parts(column, name)
        codes = self.encode_ids(feature.shares, flat) if len(flat) else np.zeros(0, dtype=np.int64)
        codes[~flat_valid] = OOV_ID
        max_len = feature.max_length
        n_rows = len(lengths)
        starts = np.cumsum(lengths) - lengths
        row = np.repeat(np.arange(n_rows), lengths)
        pos = np.arange(len(flat)) - np.repeat(starts, lengths)
        # keep the most recent max_len entries (the input is oldest first, most recent last)
        drop = np.repeat(np.maximum(lengths - max_len, 0), lengths)
        keep = pos >= drop
        out = np.zeros((n_rows, max_len), dtype=np.int64)
        out[row[keep], (pos - drop)[keep]] = codes[keep]
        return out, np.minimum(lengths, max_len).astype(np.int64)

    def _index(self, name: str) -> pd.Index:
        if name not in self._indexes:
            vocab = self.vocabs[name]
            assert vocab is not None
            self._indexes[name] = pd.Index(
                vocab, dtype=np.int64 if self.value_kinds[name] == "int" else object
            )
        return self._indexes[name]

    # ---- state ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state: the spec, vocabularies, value kinds and dense statistics."""
        return {
            "format_version": 1,
            "spec": self.spec.model_dump(mode="json"),
            "label_column": self.label_column,
            "group_column": self.group_column,
            "sparse": {
                name: {
                    "kind": self.value_kinds[name],
                    "vocab": None if vocab is None else vocab.tolist(),
                }
                for name, vocab in self.vocabs.items()
            },
            "dense": {name: {"mean": mean, "std": std} for name, (mean, std) in self.dense_stats.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> FeatureEncoder:
        if state.get("format_version") != 1:
            raise ValueError(
                f"feature encoder state: unsupported format_version {state.get('format_version')!r}"
            )
        spec = FeatureSpec.model_validate(state["spec"])
        vocabs: dict[str, np.ndarray | None] = {}
        kinds: dict[str, ValueKind] = {}
        for name, entry in state["sparse"].items():
            kinds[name] = entry["kind"]
            vocab = entry["vocab"]
            if vocab is None:
                vocabs[name] = None
            else:
                vocabs[name] = np.asarray(vocab, dtype=np.int64 if entry["kind"] == "int" else object)
        stats = {name: (float(v["mean"]), float(v["std"])) for name, v in state["dense"].items()}
        return cls(spec, vocabs, kinds, stats, state["label_column"], state["group_column"])


class EncoderFit:
    """What :meth:`FeatureEncoder.fit` accumulates, one frame (a row group) at a time: value counts per
    sparse feature and (rows, mean, sum of squared deviations) per dense feature, merged with Chan et
    al.'s pairwise update. One ``update`` with the whole split gives exactly numpy's mean and std (what
    the in-memory fit always returned); several give the same vocabularies and kinds, and dense
    statistics equal to within float rounding (~1e-15 relative)."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.kinds: dict[str, ValueKind] = {}
        self._counts: dict[str, list[pd.Series]] = {f.name: [] for f in spec.sparse}
        self._merged_len: dict[str, int] = {f.name: 0 for f in spec.sparse}
        self._moments: dict[str, tuple[int, float, float]] = {f.name: (0, 0.0, 0.0) for f in spec.dense}

    def update(self, frame: Frame) -> EncoderFit:
        """Add ``frame``'s rows; a sparse column whose kind (int/str) differs from earlier rows fails."""
        if self.kinds and not _num_rows(frame):
            return self  # an empty row group: its columns' dtypes say nothing about the values
        for feature in self.spec.sparse:
            raw = _column(frame, feature.name)
            kind = _value_kind(raw, feature.name)
            if self.kinds.setdefault(feature.name, kind) != kind:
                raise ValueError(
                    f"sparse feature '{feature.name}': {kind} values after {self.kinds[feature.name]} "
                    "values in earlier rows (every file and row group must hold one kind)"
                )
            if feature.hash_buckets is None:
                values = _as_kind(raw, self.kinds[feature.name], feature.name)
                self._add_counts(feature.name, pd.Series(values).value_counts(sort=False))
        for feature in self.spec.dense:
            values = _dense_values(_column(frame, feature.name), feature.transform, feature.name)
            if len(values):
                mean = values.mean()
                deviations = values - mean
                m2 = float(np.sum(deviations * deviations))
                self._merge_moments(feature.name, len(values), float(mean), m2)
        return self

    def result(self, label_column: str = "label", group_column: str = "user_id") -> FeatureEncoder:
        vocabs: dict[str, np.ndarray | None] = {}
        for feature in self.spec.sparse:
            if feature.name not in self.kinds:
                raise ValueError(f"sparse feature '{feature.name}': no rows to fit the encoder on")
            if feature.hash_buckets is not None:
                vocabs[feature.name] = None
                continue
            counts = self._merged(feature.name)
            keep = counts[counts >= feature.min_count].index.to_numpy()
            if self.kinds[feature.name] == "str":
                keep = keep[keep != MISSING_CATEGORY]
            vocabs[feature.name] = np.sort(keep)
        stats: dict[str, tuple[float, float]] = {}
        for feature in self.spec.dense:
            n, mean, m2 = self._moments[feature.name]
            std = float(np.sqrt(m2 / n)) if n else 1.0
            stats[feature.name] = (mean if n else 0.0, std if std > 1e-12 else 1.0)
        return FeatureEncoder(self.spec, vocabs, self.kinds, stats, label_column, group_column)

    def _add_counts(self, name: str, counts: pd.Series) -> None:
        parts = self._counts[name]
        parts.append(counts)
        # merged when the pending parts outgrow the merged counts: amortised linear in the rows
        if sum(len(p) for p in parts[1:]) > max(self._merged_len[name], 1 << 16):
            self._merged(name)

    def _merged(self, name: str) -> pd.Series:
        parts = self._counts[name]
        if len(parts) != 1:
            if not parts:
                return pd.Series(dtype=np.int64)
            merged = pd.concat(parts).groupby(level=0, sort=False).sum()
            self._counts[name] = [merged]
            self._merged_len[name] = len(merged)
        return self._counts[name][0]

    def _merge_moments(self, name: str, n_b: int, mean_b: float, m2_b: float) -> None:
        n_a, mean_a, m2_a = self._moments[name]
        if n_a == 0:
            self._moments[name] = (n_b, mean_b, m2_b)
            return
        n = n_a + n_b
        delta = mean_b - mean_a
        self._moments[name] = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n)


def iter_row_groups(paths: Sequence[str | Path], columns: Iterable[str]) -> Iterator[pa.Table]:
    """The row groups of the Parquet files ``paths`` in file order, with those of ``columns`` that the
    files hold (a missing declared column fails later, naming it)."""
    wanted = set(columns)
    for path in paths:
        file = pq.ParquetFile(path)
        names = [c for c in file.schema_arrow.names if c in wanted]
        for group in range(file.num_row_groups):
            yield file.read_row_group(group, columns=names)


# ---- private helpers ------------------------------------------------------------------------------


def _column_names(frame: Frame) -> list[str]:
    return list(frame.column_names) if isinstance(frame, pa.Table) else list(frame.columns)


def _num_rows(frame: Frame) -> int:
    return frame.num_rows if isinstance(frame, pa.Table) else len(frame)


def _column(frame: Frame, name: str, present: set[str] | None = None) -> Any:
    """Column ``name`` of ``frame``; ``present``: the frame's column names when the caller has them."""
    if name not in (present if present is not None else _column_names(frame)):
        raise KeyError(f"the frame has no column '{name}' (columns: {_column_names(frame)})")
    return frame.column(name) if isinstance(frame, pa.Table) else frame[name]


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray | pa.Array):
        return values.to_numpy(zero_copy_only=False)
    if isinstance(values, pd.Series):
        if isinstance(values.dtype, pd.CategoricalDtype):
            return values.astype(object).to_numpy()
        return values.to_numpy()
    return np.asarray(values)


def _value_kind(values: Any, name: str) -> ValueKind:
    arr = _to_numpy(values)
    if arr.dtype.kind in "iub":
        return "int"
    if arr.dtype.kind in "OUSa":
        return "str"
    raise ValueError(f"sparse feature '{name}': values of dtype {arr.dtype} are neither integers nor strings")


def _as_kind(values: Any, kind: ValueKind, name: str) -> np.ndarray:
    arr = _to_numpy(values)
    if kind == "int":
        if arr.dtype.kind not in "iub":
            raise ValueError(f"sparse feature '{name}': expected integer values, got dtype {arr.dtype}")
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "O":
        return np.where(pd.isna(arr), MISSING_CATEGORY, arr).astype(str).astype(object)
    return arr.astype(str).astype(object)


def _dense_values(values: Any, transform: str, name: str) -> np.ndarray:
    arr = _to_numpy(values)
    if arr.dtype.kind not in "iufb":
        raise ValueError(f"dense feature '{name}': expected numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    out[~np.isfinite(out)] = 0.0  # what nan_to_num(nan=posinf=neginf=0) does, at a fraction of its overhead
    if transform == "log1p":
        out = np.log1p(np.maximum(out, 0.0))
    return out


def _arrow_strings(values: Any) -> bool:
    return isinstance(values, pa.Array | pa.ChunkedArray) and (
        pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
    )


def _list_parts(column: Any, name: str) -> tuple[np.ndarray, Any, np.ndarray]:
    """(lengths [B], flat values, flat validity) of a list column, from pyarrow offsets (no row loop)."""
    if isinstance(column, pd.Series):
        column = pa.array(column.to_numpy() if column.dtype == object else column, from_pandas=True)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise ValueError(f"sequence feature '{name}': expected a list column, got {column.type}")
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(column)
    valid = pc.is_valid(flat).to_numpy(zero_copy_only=False)
    values: Any
    if pa.types.is_integer(flat.type):
        values = pc.fill_null(flat, 0).to_numpy().astype(np.int64)
    elif _arrow_strings(flat):
        values = flat  # looked up by Arrow (FeatureEncoder._lookup_arrow), no Python strings
    else:
        values = flat.to_numpy(zero_copy_only=False)
    return lengths, values, valid


def _group_codes(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    codes, _ = pd.factorize(values)
    return codes.astype(np.int64)
