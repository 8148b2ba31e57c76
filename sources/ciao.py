"""Ciao product reviews (Tang, Gao & Liu; no licence stated, published for research) as the three raw tables.

Ciao (ciao.co.uk) was a consumer product-review site: members rated products of 28 top-level categories
(ids only in the release) on a 0-5 scale. The authors' ``ciao_with_rating_timestamp``
release (http://www.cse.msu.edu/~tangjili/datasetcode/truststudy.htm; cite mTrust, WSDM 2012 and eTrust,
KDD 2012) ships ``rating_with_timestamp.mat``: a MATLAB 5 file whose variable ``rating`` holds one row per
rating, six columns ``userid, productid, categoryid, rating, helpfulness, time`` (unix seconds of the
rating's day: every value is 07:00 UTC), beside ``trust.mat`` (who trusts whom; not used here). The
published release has 284,086 rows by 7,375 users on 105,114 products, 2000-05-30 to 2011-04-12. The
source is a local directory or zip (``cfg.path``: the file at the top or in one sub-folder, as the
published zip's ``ciao_with_rating_timestamp/``); the data is never downloaded or committed by the project.

The de-duplication, the microsecond tie-break of ratings in the same second and the mapping to the
contract are sources/ratings_files.py's (this module declares a :class:`Layout` whose parsers read the
matrix); what differs:
- ``label`` = rating >= ``cfg.positive_rating`` on the 0-5 scale (the release holds 34 ratings of 0: on the
  scale, always negative). 5 is the shipped choice: Ciao's ratings lean high (mean 4.2, 80% are 4 or 5),
  so 5 is the median and splits the data about in half (48.9% positive after de-duplication), the same
  share and meaning ("liked it", the top of the scale) as MovieTweetings' >= 8 and MovieLens' >= 4;
  >= 4 would make 80% positive and leave the ranker little to separate.
- ``event_timestamp`` is the rating's day as the release keeps it (dates only), plus the microsecond rank
  by item id within the user's day: a user's ratings of one day get a deterministic order, not their real
  one. A (user, item) rated more than once (1,436 rows) keeps the latest rating; on the same day the later
  row of the matrix.
- users: the release has no profile, so ``gender`` and ``occupation`` are "unknown", ``zip_prefix`` "unk"
  and ``age_bucket`` 0 for everyone; the users are those who rated, ``signup_timestamp`` the first rating.
- items: ``category`` is "cat_<categoryid>" (the release names no categories; the 101 products filed under
  two categories take their most frequent one, the smaller id on a tie), ``brand`` is "unknown" (none in
  the data), ``price`` is 0.0; the items are those rated, ``created_timestamp`` is the first rating.
- ``helpfulness`` (how useful other members found the review) and the trust network are not used.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
from scipy.io.matlab import MatReadError

from recsys.config import CiaoSource, DataConfig
from recsys.contracts import DataContractError
from sources.ratings_files import UNKNOWN, Layout, anonymous_users, check_range, read_ratings

NAME = "ciao"
RATINGS = "rating_with_timestamp.mat"
MATRIX = "rating"  # the variable holding the ratings
COLUMNS = ["user_id", "item_id", "category_id", "rating", "helpfulness", "unix_seconds"]
RATING_SCALE = (0, 5)
MAX_SECONDS = 9_000_000_000  # datetime64[ns] ends in 2262: stay clear of the overflow (as ratings_files)


def read(data: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """The source table's reader: ``data.ciao``; ``seed`` is unused (the data is what it is)."""
    return read_ciao(data.ciao)


def read_ciao(cfg: CiaoSource) -> dict[str, pd.DataFrame]:
    """Read a Ciao release into contract-checked ``{"users", "items", "events"}`` tables."""
    return read_ratings(Path(cfg.path), _LAYOUT, cfg.positive_rating)


def read_matrix(data: bytes, where: str) -> pd.DataFrame:
    """The ``rating`` matrix as int64 columns :data:`COLUMNS`; a bad file, shape or value names its row."""
    try:
        variables = scipy.io.loadmat(io.BytesIO(data))
    except (MatReadError, ValueError, TypeError, IndexError, OSError, EOFError, zlib.error,
            NotImplementedError) as exc:  # fmt: skip
        raise DataContractError(f"{where}: not a readable MATLAB 5 .mat file ({exc})") from exc
    if MATRIX not in variables:
        found = sorted(k for k in variables if not k.startswith("__"))
        raise DataContractError(f"{where}: no variable '{MATRIX}' in the file (found {found})")
    matrix = np.asarray(variables[MATRIX])
    if matrix.ndim != 2 or matrix.shape[1] != len(COLUMNS) or matrix.shape[0] == 0:
        raise DataContractError(
            f"{where}: variable '{MATRIX}' has shape {matrix.shape}, expected one row per rating and "
            f"{len(COLUMNS)} columns (userid, productid, categoryid, rating, helpfulness, time)"
        )
    if not (np.issubdtype(matrix.dtype, np.integer) or np.issubdtype(matrix.dtype, np.floating)):
        raise DataContractError(f"{where}: variable '{MATRIX}' holds {matrix.dtype} values, expected numbers")
    if np.issubdtype(matrix.dtype, np.floating):
        bad = ~np.isfinite(matrix) | (np.mod(matrix, 1) != 0)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise DataContractError(
                f"{where}: row {row + 1}, column '{COLUMNS[col]}': expected an integer, "
                f"found {matrix[row, col].item()!r}"
            )
    df = pd.DataFrame(matrix.astype(np.int64), columns=COLUMNS)
    check_range(df, "rating", *RATING_SCALE, where, unit="row")
    check_range(df, "unix_seconds", 0, MAX_SECONDS, where, unit="row")
    return df


def _parse_ratings(data: bytes, where: str) -> pd.DataFrame:
    return read_matrix(data, where)[["user_id", "item_id", "rating", "unix_seconds"]]


def _parse_users(data: bytes, where: str) -> pd.DataFrame:
    return anonymous_users(np.unique(read_matrix(data, where)["user_id"].to_numpy()))


def _parse_items(data: bytes, where: str) -> pd.DataFrame:
    counts = read_matrix(data, where).groupby(["item_id", "category_id"]).size().rename("n").reset_index()
    # each product's most frequent category, the smaller id on a tie
    top = counts.sort_values(["item_id", "n", "category_id"], ascending=[True, False, True])
    top = top.drop_duplicates("item_id", ignore_index=True)
    return pd.DataFrame({
        "item_id": top["item_id"],
        "category": "cat_" + top["category_id"].astype(str),
        "brand": UNKNOWN,
    })  # fmt: skip


# one file holds everything: the users and items are derived from the ratings matrix
_LAYOUT = Layout(
    RATINGS, RATINGS, RATINGS, "", _parse_users, _parse_items, parse_ratings=_parse_ratings, dataset="Ciao"
)
