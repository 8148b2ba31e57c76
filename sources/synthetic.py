"""The embedded default dataset: a deterministic generator with planted structure.

Each signal is planted so a good model can find it and a weak one cannot:

- **tastes**: every user has a Dirichlet preference over item categories, partly shared with users of the
  same (gender, age bucket) so profile features carry signal for new users;
- **popularity**: item exposure follows a power law (Zipf) within a category, so in-batch negatives are
  heavily skewed (what log-Q correction is for);
- **logging policy**: an impression's category is a successor of the last click (``sequential_prob``), a
  uniform draw (``explore_prob``) or the user's taste (the rest);
- **sequence**: each category has two successor categories; an impression often comes from a successor of
  a recent click, and the click probability rises when the target's category succeeds one of the last
  three clicked categories (what DIN attention over the history is for);
- **price sensitivity**: the penalty on log price depends on the user's age bucket;
- **cold start**: a fraction of the catalogue is created during the observed period; an item is never
  shown before it exists;
- **impressions**: every event is an impression, clicked with a logistic probability (label 1) or not (0);
- **item quality**: a hidden per-item offset that only an item-id embedding can learn.

Generation is vectorised: users are sorted by activity so that "the s-th event of every user who has at
least s+1 events" is a prefix of that order, and one numpy step handles all of them. There is no per-event
Python loop; the loop runs over event *positions* (at most ``max_events_per_user`` steps). The users are
cut, in that order, into blocks of at most ``EVENTS_PER_BLOCK`` events, generated one after the other
(:func:`event_blocks`, what ingest streams): a block's events depend only on its users, the catalogue and
the block's own random stream, so memory follows the block while the tables grow.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys.config import DataConfig, SyntheticSizes, SyntheticSource
from sources.stream import RawStream

NAME = "synthetic"
SECOND_NS = 1_000_000_000
DAY_S = 86_400
AGE_BUCKETS = np.array([18, 25, 35, 45, 50, 56])
AGE_PROBS = np.array([0.18, 0.30, 0.22, 0.14, 0.09, 0.07])
# price sensitivity per age bucket: the young are the most price sensitive
AGE_PRICE_SENSITIVITY = np.array([1.1, 0.8, 0.45, 0.25, 0.15, 0.35])
GENDERS = np.array(["F", "M"])
N_OCCUPATIONS = 21
N_ZIP_PREFIXES = 50
HISTORY_DEPTH = 3  # clicks that shape the next impression and its click probability
# Events per generated block (users cut in activity order, a user never split). A constant, not a memory
# setting: the data depend on the seed and this only. Every shipped preset but `large` is one block, the
# unblocked generator's data byte for byte; memory follows the block, not the dataset.
EVENTS_PER_BLOCK = 1_000_000
USERS_PER_BLOCK = 200_000  # and at most this many users (the tail of one-event users; per-user state)
TASTE_ROWS = 16_384  # users whose tastes are drawn at a time (any value gives the same tastes)


def read(data: DataConfig, seed: int) -> dict[str, pd.DataFrame]:
    """The source table's reader: ``data.synthetic`` generated from ``seed``."""
    return generate(data.synthetic, seed)


def stream(data: DataConfig, seed: int) -> RawStream:
    """The source table's streamer: the same tables as :func:`read`, the events a block at a time."""
    generated = _world(data.synthetic, seed)
    return RawStream(generated.user_table, generated.item_table, event_blocks(generated, seed))


def generate(cfg: SyntheticSource, seed: int) -> dict[str, pd.DataFrame]:
    """Return the raw ``users``, ``items`` and ``events`` tables; the same ``seed`` gives the same data."""
    generated = _world(cfg, seed)
    blocks = list(event_blocks(generated, seed))
    events = blocks[0] if len(blocks) == 1 else pd.concat(blocks, ignore_index=True)
    return {"users": generated.user_table, "items": generated.item_table, "events": events}


def event_blocks(
    generated: World, seed: int, block_events: int = EVENTS_PER_BLOCK, block_users: int = USERS_PER_BLOCK
) -> Iterator[pd.DataFrame]:
    """The events in user blocks of at most ``block_events`` events and ``block_users`` users (users in
    activity order, a user never split), each block in time order (ties by user). Block 0 continues
    ``generated.rng``, so a dataset of one block is exactly the unblocked generator's; block k > 0 draws
    from its own stream spawned from ``seed``. The data depend on the seed and the block limits only (the
    module's constants; tests pass small ones), and ``generated.rng`` is consumed."""
    users = generated.users
    order = np.argsort(-users.n_events, kind="stable")
    order = order[users.n_events[order] > 0]  # the idle users draw nothing
    bounds = _block_bounds(users.n_events[order], block_events, block_users)
    streams = np.random.SeedSequence(seed).spawn(max(len(bounds) - 1, 0))
    cfg = generated.cfg
    for block, (first, stop) in enumerate(bounds):
        rng = generated.rng if block == 0 else np.random.default_rng(streams[block - 1])
        yield _events(rng, cfg.sizes(), cfg, users, generated.items, generated.end_s, order[first:stop])


def _block_bounds(
    counts: np.ndarray, block_events: int, block_users: int = USERS_PER_BLOCK
) -> list[tuple[int, int]]:
    """Cut users (their event ``counts`` in order) into runs of at most ``block_events`` events and
    ``block_users`` users; a user with more events than ``block_events`` is a block alone."""
    if block_events <= 0 or block_users <= 0:
        raise ValueError(f"blocks must be positive, got {block_events} events and {block_users} users")
    ends = np.cumsum(counts)
    bounds, first = [], 0
    while first < len(counts):
        before = int(ends[first - 1]) if first else 0
        stop = int(np.searchsorted(ends, before + block_events, side="right"))
        stop = min(max(stop, first + 1), first + block_users)
        bounds.append((first, stop))
        first = stop
    return bounds


@dataclass
class World:
    """The hidden state :func:`generate` draws its events from (tastes, item quality, successors, ...),
    exposed so that a simulator can answer served lists with the generator's own click model."""

    cfg: SyntheticSource
    users: _UserWorld
    items: _ItemWorld
    user_table: pd.DataFrame
    item_table: pd.DataFrame
    start_s: int
    end_s: int
    rng: np.random.Generator  # the generator's stream, positioned where the events are drawn from

    @property
    def n_categories(self) -> int:
        return int(self.users.taste.shape[1])

    def item_category(self, item_ids: np.ndarray) -> np.ndarray:
        """Category index of each item id."""
        return self.items.category[np.asarray(item_ids, dtype=np.int64)]

    def activity(self) -> np.ndarray:
        """[n_users] events per user in the generated period: how often each user arrives."""
        return self.users.n_events

    def click_probability(self, user_ids: np.ndarray, item_ids: np.ndarray, recent: np.ndarray) -> np.ndarray:
        """P(click) of user ``user_ids[i]`` on item ``item_ids[i]`` given the user's last clicked categories
        ``recent[i]`` ([n, HISTORY_DEPTH], most recent first, -1 where none): the generator's logistic
        click model, the same function its labels are drawn from."""
        who = np.asarray(user_ids, dtype=np.int64) - 1
        item = np.asarray(item_ids, dtype=np.int64)
        logit = _click_logit(self.cfg, self.users, self.items, who, item, self.item_category(item), recent)
        return 1.0 / (1.0 + np.exp(-logit))


def world(cfg: SyntheticSource, seed: int) -> World:
    """The hidden state behind ``generate(cfg, seed)``'s tables (the same draws, so the same users and
    items), without generating the events."""
    return _world(cfg, seed)


def _world(cfg: SyntheticSource, seed: int) -> World:
    sizes = cfg.sizes()
    rng = np.random.default_rng(seed)
    start_s = int(pd.Timestamp(cfg.start_date).timestamp())
    end_s = start_s + sizes.days * DAY_S
    users, world_users = _users(rng, sizes, cfg, start_s, end_s)
    items, world_items = _items(rng, sizes, cfg, start_s, end_s)
    return World(cfg, world_users, world_items, users, items, start_s, end_s, rng)


@dataclass
class _UserWorld:
    taste: np.ndarray  # [n_users, C] float32 rows summing to 1
    price_sensitivity: np.ndarray  # [n_users]
    first_event_s: np.ndarray  # [n_users] earliest possible event time (signup or period start)
    n_events: np.ndarray  # [n_users] events per user


@dataclass
class _ItemWorld:
    ids_by_key: np.ndarray  # item ids sorted by (category, created time)
    key: np.ndarray  # category * 2**32 + created seconds since origin, sorted
    origin_s: int
    cum_weight: np.ndarray  # [n_items + 1] cumulative popularity in the sorted order, leading 0
    category: np.ndarray  # [n_items + 1] category index by item id (index 0 unused)
    log_price_z: np.ndarray  # [n_items + 1] standardised log price by item id
    quality: np.ndarray  # [n_items + 1] hidden per-item click offset
    log_popularity: np.ndarray  # [n_items + 1]
    successors: np.ndarray  # [C, 2] successor categories


def _users(
    rng: np.random.Generator, sizes: SyntheticSizes, cfg: SyntheticSource, start_s: int, end_s: int
) -> tuple[pd.DataFrame, _UserWorld]:
    n, n_cat = sizes.n_users, sizes.n_categories
    gender_idx = rng.integers(0, 2, n)
    age_idx = rng.choice(len(AGE_BUCKETS), size=n, p=AGE_PROBS)
    occupation = rng.integers(0, N_OCCUPATIONS, n)
    zip_prefix = rng.integers(0, N_ZIP_PREFIXES, n)

    # 85% signed up before the period; the rest during its first 70% (new users arrive over time)
    new_user = rng.random(n) < 0.15
    period = end_s - start_s
    signup_s = np.where(
        new_user,
        start_s + (rng.random(n) * 0.7 * period).astype(np.int64),
        start_s - (rng.random(n) * 365 * DAY_S).astype(np.int64) - 1,
    )

    group = gender_idx * len(AGE_BUCKETS) + age_idx
    group_taste = rng.gamma(0.3, size=(2 * len(AGE_BUCKETS), n_cat))
    group_taste /= group_taste.sum(axis=1, keepdims=True)
    # row blocks of users: the same draws in the same order as one (n, n_cat) draw, the same rows, but
    # float64 temporaries of a block instead of the population (they were the peak at a million users)
    taste = np.empty((n, n_cat), dtype=np.float32)
    for first in range(0, n, TASTE_ROWS):
        rows = min(TASTE_ROWS, n - first)
        own_taste = rng.gamma(cfg.taste_concentration, size=(rows, n_cat)) + 1e-9
        own_taste /= own_taste.sum(axis=1, keepdims=True)
        taste[first : first + rows] = 0.65 * own_taste + 0.35 * group_taste[group[first : first + rows]]

    sensitivity = AGE_PRICE_SENSITIVITY[age_idx] * rng.lognormal(0.0, 0.2, n)
    n_events = _events_per_user(rng, sizes)

    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n + 1, dtype=np.int64),
            "gender": _labels("{}", GENDERS)[gender_idx],
            "age_bucket": AGE_BUCKETS[age_idx].astype(np.int64),
            "occupation": _labels("occ_{}", range(N_OCCUPATIONS))[occupation],
            "zip_prefix": _labels("z{:02d}", range(N_ZIP_PREFIXES))[zip_prefix],
            "signup_timestamp": _to_utc(signup_s),
        }
    )
    world = _UserWorld(
        taste=taste,
        price_sensitivity=sensitivity.astype(np.float32),
        first_event_s=np.maximum(signup_s + 1, start_s),
        n_events=n_events,
    )
    return users, world


def _events_per_user(rng: np.random.Generator, sizes: SyntheticSizes) -> np.ndarray:
    """Heavy-tailed activity that sums exactly to ``n_events`` with nobody above the per-user cap."""
    cap = sizes.max_events_per_user
    if sizes.n_events > cap * sizes.n_users:
        raise ValueError(
            f"data.synthetic: n_events={sizes.n_events} cannot fit n_users={sizes.n_users} x "
            f"max_events_per_user={cap}"
        )
    weight = rng.lognormal(0.0, 1.0, sizes.n_users)
    counts = np.minimum(rng.multinomial(sizes.n_events, weight / weight.sum()), cap)
    while (deficit := sizes.n_events - int(counts.sum())) > 0:
        room = (counts < cap) * weight
        counts = np.minimum(counts + rng.multinomial(deficit, room / room.sum()), cap)
    return counts.astype(np.int64)


def _items(
    rng: np.random.Generator, sizes: SyntheticSizes, cfg: SyntheticSource, start_s: int, end_s: int
) -> tuple[pd.DataFrame, _ItemWorld]:
    n, n_cat = sizes.n_items, sizes.n_categories
    category_share = rng.dirichlet(np.full(n_cat, 2.0))
    category = rng.choice(n_cat, size=n, p=category_share)
    category[:n_cat] = np.arange(n_cat)  # every category has at least one item
    brand = category * 7919 % sizes.n_brands + rng.integers(0, max(1, sizes.n_brands // n_cat), n)
    brand %= sizes.n_brands
    category_log_price = rng.uniform(1.5, 5.0, n_cat)
    log_price = category_log_price[category] + rng.normal(0.0, 0.45, n)
    price = np.round(np.exp(log_price), 2)

    cold = rng.random(n) < cfg.cold_start_fraction
    cold[:n_cat] = False  # the first item of each category exists before the period starts
    created_s = np.where(
        cold,
        start_s + (rng.random(n) * (end_s - start_s - DAY_S)).astype(np.int64),
        start_s - (rng.random(n) * 2 * 365 * DAY_S).astype(np.int64) - 1,
    )
    rank = rng.permutation(n) + 1
    popularity = rank.astype(np.float64) ** -cfg.popularity_exponent

    origin_s = int(created_s.min())
    key = category.astype(np.int64) * 2**32 + (created_s - origin_s)
    order = np.argsort(key, kind="stable")
    successors = np.stack([rng.permutation(n_cat), rng.permutation(n_cat)], axis=1)

    def by_id(values: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        out = np.zeros(n + 1, dtype=dtype)
        out[1:] = values
        return out

    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n + 1, dtype=np.int64),
            "category": _labels("cat_{:02d}", range(n_cat))[category],
            "brand": _labels("brand_{}", range(sizes.n_brands))[brand],
            "price": price.astype(np.float64),
            "created_timestamp": _to_utc(created_s),
        }
    )
    world = _ItemWorld(
        ids_by_key=(order + 1).astype(np.int64),
        key=key[order],
        origin_s=origin_s,
        cum_weight=np.concatenate([[0.0], np.cumsum(popularity[order])]),
        category=by_id(category, np.int64),
        log_price_z=by_id((log_price - log_price.mean()) / log_price.std()),
        quality=by_id(rng.normal(0.0, 0.5, n)),
        log_popularity=by_id(np.log(popularity / popularity.max())),
        successors=successors,
    )
    return items, world


def _events(
    rng: np.random.Generator,
    sizes: SyntheticSizes,
    cfg: SyntheticSource,
    users: _UserWorld,
    items: _ItemWorld,
    end_s: int,
    block: np.ndarray,
) -> pd.DataFrame:
    """The events of the users ``block`` (indices in descending activity order), in time order."""
    n_cat = sizes.n_categories
    # at position s the block's active users are a prefix of ``block`` (sorted by activity, descending)
    counts = users.n_events[block]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    active_at = np.searchsorted(-counts, -np.arange(counts.max() if total else 0), side="left")

    ts = _event_times(rng, counts, users.first_event_s[block], end_s)
    item_out = np.empty(total, dtype=np.int64)
    label_out = np.empty(total, dtype=np.int8)
    recent = np.full((len(block), HISTORY_DEPTH), -1, dtype=np.int64)  # last clicked categories
    taste_cdf = _taste_cdf(users.taste[block])  # the block's rows only: row i is user block[i]

    for position, n_active in enumerate(active_at):
        slot = offsets[:n_active] + position
        who = block[:n_active]
        last = recent[:n_active]
        category = _impression_category(rng, cfg, taste_cdf[:n_active], last, items.successors, n_cat)
        item = _pick_items(rng, items, category, ts[slot])
        logit = _click_logit(cfg, users, items, who, item, category, last)
        clicked = rng.random(n_active) < 1.0 / (1.0 + np.exp(-logit))
        item_out[slot] = item
        label_out[slot] = clicked
        shifted = np.concatenate([category[:, None], last[:, :-1]], axis=1)
        recent[:n_active] = np.where(clicked[:, None], shifted, last)

    del recent, taste_cdf
    user_ids = np.repeat((block + 1).astype(np.int64), counts)
    # time order (ties by user), applied to one column at a time, each source array dropped once moved: the
    # frame takes the sorted arrays as they are (no consolidated copy)
    by_time = np.lexsort((user_ids, ts))
    columns: dict[str, object] = {"user_id": user_ids[by_time]}
    del user_ids
    columns["item_id"] = item_out[by_time]
    del item_out
    columns["event_timestamp"] = _to_utc(ts[by_time])
    del ts
    label = label_out[by_time]
    columns["label"] = label.astype(np.int64)
    columns["event_type"] = np.array(["impression", "click"], dtype=object)[label]  # two shared objects
    return pd.DataFrame(columns, copy=False)


def _taste_cdf(taste: np.ndarray) -> np.ndarray:
    """Cumulative tastes per row (float32, the last column exactly 1): what a category is drawn from.
    Accumulated in place: ``taste`` is the caller's own copy of the rows."""
    cdf = np.cumsum(taste, axis=1, out=taste)
    cdf[:, -1] = 1.0
    return cdf


def _event_times(rng: np.random.Generator, counts: np.ndarray, first_s: np.ndarray, end_s: int) -> np.ndarray:
    """Strictly increasing times per user between their first possible time and the period end."""
    owner = np.repeat(np.arange(len(counts)), counts)
    within = np.sort(owner + rng.random(len(owner))) - owner  # sorted uniforms per user block
    rank = np.arange(len(owner)) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    span = np.maximum(end_s - first_s[owner] - counts[owner] - 1, 0)
    return first_s[owner] + (within * span).astype(np.int64) + rank


def _impression_category(
    rng: np.random.Generator,
    cfg: SyntheticSource,
    taste_cdf: np.ndarray,
    last: np.ndarray,
    successors: np.ndarray,
    n_cat: int,
) -> np.ndarray:
    """The logging policy: successors of the last click, the user's taste, or exploration."""
    n = len(taste_cdf)
    u = rng.random(n, dtype=np.float32)
    by_taste = (taste_cdf < u[:, None]).sum(axis=1).clip(max=n_cat - 1)
    explore = rng.integers(0, n_cat, n)
    successor = successors[np.maximum(last[:, 0], 0), rng.integers(0, 2, n)]
    draw = rng.random(n)
    has_click = last[:, 0] >= 0
    seq = has_click & (draw < cfg.sequential_prob)
    return np.where(seq, successor, np.where(draw < 1.0 - cfg.explore_prob, by_taste, explore))


def _pick_items(
    rng: np.random.Generator, items: _ItemWorld, category: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """Popularity-weighted choice among the category's items that already exist at ``ts``."""
    base = category.astype(np.int64) * 2**32
    lo = np.searchsorted(items.key, base, side="left")
    hi = np.searchsorted(items.key, base + (ts - items.origin_s), side="right")
    hi = np.maximum(hi, lo + 1)
    cw = items.cum_weight
    target = cw[lo] + rng.random(len(category)) * (cw[hi] - cw[lo])
    pos = np.clip(np.searchsorted(cw, target, side="right") - 1, lo, hi - 1)
    return items.ids_by_key[pos]


def _click_logit(
    cfg: SyntheticSource,
    users: _UserWorld,
    items: _ItemWorld,
    who: np.ndarray,
    item: np.ndarray,
    category: np.ndarray,
    last: np.ndarray,
) -> np.ndarray:
    n_cat = users.taste.shape[1]
    affinity = np.log(users.taste[who, category] * n_cat + 1e-3).clip(-3.0, 2.5)
    follows = np.zeros(len(who), dtype=np.float32)
    for depth, weight in enumerate((1.6, 0.9, 0.5)):
        prev = last[:, depth]
        succ = items.successors[np.maximum(prev, 0)]
        hit = (prev >= 0) & ((succ[:, 0] == category) | (succ[:, 1] == category))
        follows += weight * hit
    price_penalty = users.price_sensitivity[who] * items.log_price_z[item]
    return (
        cfg.base_ctr_logit
        + 0.9 * affinity
        + follows
        + items.quality[item]
        + 0.15 * items.log_popularity[item].clip(-8.0, 0.0)
        - price_penalty
    )


def _labels(template: str, values: Iterable[object]) -> np.ndarray:
    """One string object per value, to index with a code array: a million rows share a few dozen str
    objects instead of a fixed-width unicode copy and a str each."""
    return np.array([template.format(value) for value in values], dtype=object)


def _to_utc(seconds: np.ndarray) -> pd.Series:
    return pd.Series(pd.to_datetime(np.asarray(seconds, dtype=np.int64) * SECOND_NS, utc=True))
