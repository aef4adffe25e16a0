"""Embedded cloud-console session simulator (`data=console`).

Users of a simulated cloud console (catalogue: `console_catalog.yaml`) work through persona-typical task
workflows over weeks. Every user has a primary persona (some a secondary one), a home region, an account
age and a spend tier, plus individual habits: a taste for some of their personas' tasks, a propensity
for each optional step, a preferred alternative where a step offers several (Kubernetes or containers).

Service adoption. From their task mix and habits each user has a repertoire of services, each with an
expected use. Services are taken up in a use-weighted random order that puts foundation services
(compute, storage, IAM, monitoring, ...) first and advanced ones (tracing, GenAI, WAF, ...) later: part of
the repertoire is in use from the start, the rest is adopted at exponential gaps. A service is only used
from its adoption on (steps on services not adopted yet are skipped; a task needs its key service), so
"a new service" and its first-use time come from the data: the first session after an adoption does a
task that uses the new service, sometimes reached through search or its getting-started article, and in
the weeks before it the user sometimes searches for the service or reads its help/pricing articles
(Console pages: reading about a service is not using it).

Sessions hold 1-3 tasks plus noise: console home, notifications, search, help detours, wandering to
other pages of a service, back-navigation, abandonment, loops whose length has a heavy tail, quick
console check-ins (a chore of every persona) and aimless browsing of other services.

Outputs (pyarrow Tables, `SimData`):
  events   EVENT_SCHEMA, sorted by user_id then timestamp, sessions never overlap within a user
  billing  BILLING_SCHEMA: one row per (user, month, billed service) from the month of first use on
  users    ground truth: user_id, primary_persona, secondary_persona (nullable), region,
           account_age_days (at the end of the period), spend_tier
  sessions ground truth: session_id, user_id, tasks (list<string>; "noise:browse" marks aimless browsing)
The ground truth is for evaluation only and must never be fed to a model.

Everything is vectorised numpy over chunks of `chunk_users` users; chunk c draws from
`np.random.default_rng(SeedSequence([seed, c]))`, so the data is deterministic per (seed, chunk_users)
and `simulate_to_dir` (streaming, memory bounded) writes exactly what `simulate` returns.

    python -m sessionbert.data.simulator --size default --seed 0 [--out DIR] [--workers N]

prints the data_stats JSON (see `sessionbert.data.stats`) and, with --out, writes the parquet files and
data_stats.json there.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sessionbert.data.catalog import Catalog, load_catalog
from sessionbert.data.schema import BILLING_SCHEMA, EVENT_SCHEMA

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
NOISE_BROWSE = "noise:browse"  # truth label of a session's aimless browsing of (mostly unrelated) services

#: Regions, their user shares and UTC offsets (hours) used to place sessions in local working hours.
REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-1", "ap-northeast-1", "sa-east-1")
REGION_SHARE = (0.34, 0.16, 0.16, 0.12, 0.09, 0.08, 0.05)
REGION_UTC_OFFSET = (-5, -8, 0, 1, 8, 9, -3)
#: Spend tiers: share of users and the multiplier of a service's typical monthly price.
SPEND_TIERS = ("free", "small", "medium", "large", "enterprise")
SPEND_TIER_SHARE = (0.15, 0.40, 0.28, 0.13, 0.04)
SPEND_TIER_SCALE = (0.05, 1.0, 6.0, 40.0, 300.0)

TRUTH_USERS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("primary_persona", pa.string()),
        ("secondary_persona", pa.string()),
        ("region", pa.string()),
        ("account_age_days", pa.int32()),
        ("spend_tier", pa.string()),
    ]
)
TRUTH_SESSIONS_SCHEMA = pa.schema(
    [("session_id", pa.string()), ("user_id", pa.string()), ("tasks", pa.list_(pa.string()))]
)


@dataclass(frozen=True)
class SimConfig:
    """Simulation parameters. Defaults are the calibrated `default` size (see SIZES, data_stats)."""

    # --- population and period
    n_users: int = 1800  # simulated accounts
    sessions_per_user_mean: float = 15.0  # mean sessions of a user active over the whole period
    sessions_per_user_sigma: float = 0.75  # lognormal sigma of sessions per user (heavy-tailed activity)
    min_sessions: int = 3  # floor of sessions per user (every user is seen a few times)
    max_sessions: int = 1500  # cap of sessions per user
    weeks: int = 26  # length of the period
    start_date: str = "2023-01-02"  # first day of the period (UTC)
    # --- personas and adoption
    secondary_share: float = 0.35  # share of users with a secondary persona
    secondary_mix: tuple[float, float] = (0.15, 0.4)  # uniform range of the secondary persona's task weight
    task_taste_shape: float = 1.0  # Gamma shape of a user's per-task taste multiplier (small = specialised users)
    task_keep_p: float = 1.0  # P(a task of the user's personas is in the user's repertoire at all)
    new_account_share: float = 0.25  # accounts opened during the period (they start with few services)
    min_service_share: float = 0.01  # services below this share of a user's expected use are not in their repertoire
    initial_service_share: float = 0.6  # share of its repertoire an established account uses from the start
    new_account_initial_share: float = 0.1  # the same for an account opened during the period (plus its main service)
    stage_bonus: tuple[float, float, float] = (3.0, 0.0, -1.5)  # adoption-order bonus: foundation/standard/advanced
    warm_days: float = 28.0  # services in use from the start are each used within the user's first warm_days
    adopt_gap_days: float = 30.0  # mean days between two service adoptions of a user (new accounts: x0.6)
    preview_p: float = 0.5  # P(user searches for / reads help about a service in the weeks before adopting it)
    preview_days: float = 21.0  # how far before an adoption the preview session may be
    adopt_search_p: float = 0.35  # P(the adoption session reaches the new service through search)
    adopt_help_p: float = 0.25  # P(the adoption session opens the new service's getting-started article)
    # --- sessions
    tasks_per_session: tuple[float, float, float] = (0.55, 0.30, 0.15)  # P(1, 2, 3 tasks in a session)
    intensity_sigma: float = 1.6  # lognormal sigma of a session's loop intensity (heavy tail of lengths)
    habit_concentration: float = 0.4  # propensity for an optional step ~ Beta(p*c, (1-p)*c); small c = strong habits
    alt_loyalty: float = 0.85  # P(a user takes their own preferred alternative of a step rather than a fresh draw)
    max_repeats: int = 300  # cap on repetitions of one step
    home_entry_p: float = 0.7  # P(session starts on console home)
    entry_extra_p: float = 0.3  # P(a second console page after home: notifications, recent, all services)
    between_tasks_p: float = 0.5  # P(console home/recent between two tasks)
    task_search_p: float = 0.08  # P(an ordinary task is reached through search)
    browse_p: float = 0.08  # P(session includes aimless browsing of a service: "noise:browse")
    browse_persona_p: float = 0.5  # P(browsed service comes from the user's own personas' services)
    exit_noise_p: float = 0.12  # P(a console/help page at the end of the session)
    back_p: float = 0.04  # per event: P(back-navigation to the previous page)
    help_detour_p: float = 0.025  # per event: P(detour to a help article of the current service)
    wander_p: float = 0.04  # per event: P(detour to another page of the current service)
    switch_search_p: float = 0.12  # per switch to another service: P(it goes through search)
    action_p: float = 0.75  # P(an event without a scripted action records a button/widget click)
    other_region_p: float = 0.1  # P(a session works in the user's second region)
    gap_median_s: float = 14.0  # median seconds between two events
    gap_sigma: float = 1.0  # lognormal sigma of the gap
    min_session_gap_min: float = 20.0  # minutes between the end of a session and the next one
    # --- mechanics
    seed: int = 0  # everything is drawn from np.random.default_rng(SeedSequence([seed, chunk]))
    chunk_users: int = 10_000  # users per chunk (memory bound of streaming; part of the seed identity)

    def __post_init__(self):
        if self.n_users < 1:
            raise ValueError(f"SimConfig.n_users must be >= 1, got {self.n_users}")
        if not 1 <= self.weeks <= 110:  # timestamps are packed in 36 bits of ms inside a chunk
            raise ValueError(f"SimConfig.weeks must be in 1..110, got {self.weeks}")
        if abs(sum(self.tasks_per_session) - 1) > 1e-6 or len(self.tasks_per_session) != 3:
            raise ValueError(
                f"SimConfig.tasks_per_session must be 3 probabilities summing to 1, got {self.tasks_per_session}"
            )
        if self.chunk_users < 1 or self.chunk_users > 1_000_000:
            raise ValueError("SimConfig.chunk_users must be in 1..1,000,000")
        if self.min_sessions < 1 or self.max_sessions < self.min_sessions:
            raise ValueError("SimConfig needs 1 <= min_sessions <= max_sessions")


#: Named sizes. tiny: unit tests (< 2 s); default: the CPU pipeline in minutes; paper: ~9M sessions.
SIZES: dict[str, dict] = {
    "tiny": dict(n_users=200, weeks=26),
    "default": dict(n_users=1800),
    "paper": dict(n_users=680_000, weeks=26),
}


def sim_config(size: str = "default", **overrides) -> SimConfig:
    """The SimConfig of a named size, with field overrides (e.g. seed=1)."""
    if size not in SIZES:
        raise ValueError(f"unknown simulator size '{size}', expected one of {sorted(SIZES)}")
    names = {f.name for f in fields(SimConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown SimConfig fields {bad}")
    kw = {**SIZES[size], **overrides}
    for k in ("secondary_mix", "tasks_per_session", "stage_bonus"):  # Hydra/YAML lists -> tuples (frozen)
        if k in kw:
            kw[k] = tuple(kw[k])
    return SimConfig(**kw)


@dataclass
class SimData:
    """The simulated tables (see module docstring)."""

    events: pa.Table
    billing: pa.Table
    users: pa.Table
    sessions: pa.Table


# ------------------------------------------------------------------------------ compiled catalogue


@dataclass
class _Compiled:
    """The catalogue as flat numpy arrays for vectorised sampling."""

    # services [S]
    svc_names: pa.Array
    svc_is_console: np.ndarray  # bool
    svc_is_global: np.ndarray  # bool
    svc_price: np.ndarray  # float
    svc_stage: np.ndarray  # 0 foundation, 1 standard, 2 advanced
    svc_page0: np.ndarray  # first page index of the service (pages are grouped by service)
    svc_npages: np.ndarray
    svc_overview: np.ndarray  # overview page index, -1 for console services
    svc_help: np.ndarray  # [S, 3] getting-started, pricing, troubleshooting article page indices (-1: none)
    svc_search_action: np.ndarray  # action id of 'Search: <service>' (-1 for console services)
    product_svcs: np.ndarray  # indices of product services
    # pages [P]
    page_ids: pa.Array
    page_titles: pa.Array
    page_service: np.ndarray
    page_is_help: np.ndarray  # bool: Help Center article (longer reading gap)
    page_act0: np.ndarray  # offset into act_flat
    page_nact: np.ndarray
    act_flat: np.ndarray  # action ids of all pages, concatenated
    actions: pa.Array  # action vocabulary (strings)
    # console roles (page indices)
    role: dict[str, int]
    # tasks [T], steps [NS], units [NU], unit items [NI]
    task_names: pa.Array  # T task names + NOISE_BROWSE
    task_step0: np.ndarray
    task_nsteps: np.ndarray
    task_abandon: np.ndarray
    task_key_service: np.ndarray  # -1: the task has no product service
    task_common: np.ndarray  # bool: a chore of every persona, available from the start
    step_p: np.ndarray
    step_repeat: np.ndarray
    step_altcum: np.ndarray  # [NS, MAXA] cumulative weights, inf from the last alternative on
    step_alt_unit: np.ndarray  # [NS, MAXA]
    step_alt_svc: np.ndarray  # [NS, MAXA] service of each alternative (-1: padding)
    step_unit_visits: np.ndarray  # [NS, MAXA] expected page visits of an alternative once the step is done
    step_task: np.ndarray  # [NS] task of each step
    unit_start: np.ndarray
    unit_len: np.ndarray
    item_page: np.ndarray
    item_action: np.ndarray  # -1: draw from the page's actions
    # personas [K]
    persona_names: pa.Array
    persona_share: np.ndarray
    persona_task: np.ndarray  # [K, T] rows sum to 1
    task_svc: np.ndarray  # [T, S] expected visits per task run


def _compile(cat: Catalog) -> _Compiled:
    svcs, pages = cat.services, cat.pages
    S = len(svcs)
    slug_idx = {s: i for i, s in enumerate(svcs["slug"])}
    page_service = pages["service_slug"].map(slug_idx).to_numpy(np.int32)
    svc_page0 = np.full(S, 0, np.int64)
    svc_npages = np.bincount(page_service, minlength=S)
    svc_page0[1:] = np.cumsum(svc_npages)[:-1]
    if not np.all(np.diff(page_service) >= 0):
        raise ValueError("catalogue pages must be grouped by service")

    vocab: dict[str, int] = {}

    def aid(a: str) -> int:
        return vocab.setdefault(a, len(vocab))

    act_lists = [[aid(a) for a in acts] for acts in pages["actions"]]
    page_nact = np.array([len(a) for a in act_lists], np.int64)
    page_act0 = np.concatenate([[0], np.cumsum(page_nact)[:-1]]).astype(np.int64)
    act_flat = np.array([a for acts in act_lists for a in acts], np.int32)

    is_console = svcs["is_console"].to_numpy(bool)
    svc_search_action = np.array([-1 if c else aid(f"Search: {n}") for n, c in zip(svcs["name"], is_console)], np.int32)
    page_pos = {p: i for i, p in enumerate(pages["page"])}
    svc_overview = np.array([page_pos.get(f"{s}/overview", -1) for s in svcs["slug"]], np.int32)
    svc_help = np.full((S, 3), -1, np.int32)
    for i, (pid, kind, of) in enumerate(zip(pages["page"], pages["kind"], pages["help_of"])):
        if kind == "help":
            col = 0 if pid.endswith("getting-started") else 1 if pid.endswith("pricing") else 2
            svc_help[slug_idx[of], col] = i

    # tasks -> steps -> units -> items
    task_step0, task_nsteps = [], []
    step_p, step_rep, step_w, step_u = [], [], [], []
    unit_start, unit_len, item_page, item_action = [], [], [], []
    for t in cat.tasks:
        task_step0.append(len(step_p))
        task_nsteps.append(len(t.steps))
        for st in t.steps:
            step_p.append(st.p)
            step_rep.append(st.repeat)
            step_w.append(st.weights)
            us = []
            for unit in st.units:
                us.append(len(unit_start))
                unit_start.append(len(item_page))
                unit_len.append(len(unit))
                for page, act in unit:
                    item_page.append(page_pos[page])
                    item_action.append(-1 if act is None else aid(act))
            step_u.append(us)
    NS = len(step_p)
    maxa = max(len(w) for w in step_w)
    altcum = np.full((NS, maxa), np.inf)
    alt_unit = np.zeros((NS, maxa), np.int32)
    alt_svc = np.full((NS, maxa), -1, np.int32)
    unit_visits = np.zeros((NS, maxa))
    for i, (w, us) in enumerate(zip(step_w, step_u)):
        c = np.cumsum(w)
        altcum[i, : len(w) - 1] = c[:-1]  # u >= cum[k] counts alternatives passed; the last one is inf
        alt_unit[i, : len(us)] = us
        alt_unit[i, len(us):] = us[-1]
        for k, u in enumerate(us):  # a unit stays within one service (that of its first page)
            alt_svc[i, k] = page_service[item_page[unit_start[u]]]
            unit_visits[i, k] = unit_len[u] / (1.0 - step_rep[i])
    step_task = np.repeat(np.arange(len(task_nsteps)), task_nsteps)

    roles = {k: page_pos[v] for k, v in cat.console_roles.items()}
    pshare = np.array([p.share for p in cat.personas], float)
    return _Compiled(
        svc_names=pa.array(svcs["name"].tolist(), pa.string()),
        svc_is_console=is_console,
        svc_is_global=svcs["is_global"].to_numpy(bool),
        svc_price=svcs["price"].to_numpy(float),
        svc_stage=svcs["stage"].map({"foundation": 0, "standard": 1, "advanced": 2}).to_numpy(np.int64),
        svc_page0=svc_page0,
        svc_npages=svc_npages.astype(np.int64),
        svc_overview=svc_overview,
        svc_help=svc_help,
        svc_search_action=svc_search_action,
        product_svcs=np.nonzero(~is_console)[0],
        page_ids=pa.array(pages["page"].tolist(), pa.string()),
        page_titles=pa.array(pages["title"].tolist(), pa.string()),
        page_service=page_service,
        page_is_help=((pages["kind"] == "help") | pages["page"].str.startswith("help")).to_numpy(bool),
        page_act0=page_act0,
        page_nact=page_nact,
        act_flat=act_flat,
        actions=pa.array(list(vocab), pa.string()),
        role=roles,
        task_names=pa.array(cat.task_names + [NOISE_BROWSE], pa.string()),
        task_step0=np.array(task_step0, np.int64),
        task_nsteps=np.array(task_nsteps, np.int64),
        task_abandon=np.array([t.abandon for t in cat.tasks]),
        task_key_service=np.array([slug_idx.get(t.key_service, -1) for t in cat.tasks], np.int32),
        task_common=np.array([t.name in cat.common_tasks for t in cat.tasks], bool),
        step_p=np.array(step_p),
        step_repeat=np.array(step_rep),
        step_altcum=altcum,
        step_alt_unit=alt_unit,
        step_alt_svc=alt_svc,
        step_unit_visits=unit_visits,
        step_task=step_task,
        unit_start=np.array(unit_start, np.int64),
        unit_len=np.array(unit_len, np.int64),
        item_page=np.array(item_page, np.int32),
        item_action=np.array(item_action, np.int32),
        persona_names=pa.array(cat.persona_names, pa.string()),
        persona_share=pshare / pshare.sum(),
        persona_task=cat.persona_task_weights().to_numpy(float),
        task_svc=cat.task_service_visits().to_numpy(float),
    )


# ------------------------------------------------------------------------------------ small helpers


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0..n-1 within each group of a repeat-expanded array: counts [G] -> [sum(counts)]."""
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def _categorical(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One draw per row of a non-negative weight matrix [N, C] -> [N] (rows must have positive sums)."""
    cum = np.cumsum(weights, axis=1)
    r = rng.random(len(weights)) * cum[:, -1]
    return np.minimum((cum <= r[:, None]).sum(axis=1), weights.shape[1] - 1)


class _Events:
    """Accumulates event groups as parallel arrays: session, block, ordinal, page, action."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, sess, block, ordinal, page, action):
        n = len(sess)
        if n == 0:
            return
        b = np.broadcast_to(np.asarray(block, np.int64), (n,))
        o = np.broadcast_to(np.asarray(ordinal, np.int64), (n,))
        a = np.broadcast_to(np.asarray(action, np.int32), (n,))
        self.parts.append((np.asarray(sess, np.int64), b, o, np.asarray(page, np.int32), a))

    def sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sess, block, ordn, page, act = (np.concatenate(x) for x in zip(*self.parts))
        # session-major, then block (entry, tasks, noise ...), then position inside the block
        key = (sess << 36) | (block << 28) | ordn
        o = np.argsort(key, kind="stable")
        return sess[o], page[o], act[o]


# Blocks of a session, in order: 0 entry, 1 unused, 2+2j pre-task noise of task slot j, 3+2j task j,
# 8 aimless browsing, 9 exit noise and pre-adoption previews.
_B_ENTRY, _B_BROWSE, _B_EXIT = 0, 8, 9
_ACT_DRAW, _ACT_NONE = -1, -2  # action placeholders: draw from the page's actions / no action


# --------------------------------------------------------------------------------------- one chunk


def _simulate_chunk(cfg: SimConfig, cc: _Compiled, chunk: int, u0: int, u1: int) -> SimData:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, chunk]))
    U = u1 - u0
    K, T = cc.persona_task.shape
    NS, NSV = len(cc.step_p), len(cc.svc_price)
    t0 = int(pd.Timestamp(cfg.start_date, tz="UTC").value // 1_000_000)  # ms
    span = cfg.weeks * 7 * DAY_MS
    t1 = t0 + span

    # ---------------------------------------------------------------- users [U]
    primary = rng.choice(K, size=U, p=cc.persona_share)
    has_sec = rng.random(U) < cfg.secondary_share
    secondary = np.where(has_sec, (primary + rng.integers(1, K, size=U)) % K, -1) if K > 1 else np.full(U, -1)
    mix = np.where(secondary >= 0, rng.uniform(*cfg.secondary_mix, size=U), 0.0)
    W = (1 - mix)[:, None] * cc.persona_task[primary] + mix[:, None] * cc.persona_task[np.maximum(secondary, 0)]
    # W: [U, T] the user's task mix
    # taste: users specialise in some of their personas' tasks (Gamma multipliers; small shape = strong)
    taste = rng.gamma(cfg.task_taste_shape, 1.0 / cfg.task_taste_shape, size=(U, T))
    # ... and never do some of them at all (the user's heaviest task is always kept)
    keep = rng.random((U, T)) < cfg.task_keep_p
    keep[np.arange(U), np.argmax(W * taste, axis=1)] = True
    taste = taste * keep
    taste[:, cc.task_common] = 1.0
    W = W * taste
    W /= W.sum(axis=1, keepdims=True)
    is_new = rng.random(U) < cfg.new_account_share
    signup = np.where(
        is_new,
        t0 + (rng.random(U) * 0.85 * span),
        t0 - rng.lognormal(np.log(400.0), 0.8, size=U) * DAY_MS,
    ).astype(np.int64)
    active0 = np.maximum(signup, t0)  # first moment the user can have a session
    region = rng.choice(len(REGIONS), size=U, p=REGION_SHARE)
    region2 = rng.choice(len(REGIONS), size=U, p=REGION_SHARE)
    tier = rng.choice(len(SPEND_TIERS), size=U, p=SPEND_TIER_SHARE)

    # Habits: a propensity per (user, optional step) drawn around the step's probability, so that some
    # users always put a CDN in front of their apps and others never.
    opt = (cc.step_p > 0) & (cc.step_p < 1)
    habit = np.tile((cc.step_p >= 1).astype(np.float32), (U, 1))  # [U, NS]
    c = cfg.habit_concentration
    habit[:, opt] = rng.beta(cc.step_p[opt] * c, (1 - cc.step_p[opt]) * c, size=(U, int(opt.sum())))
    # ... and each user has a preferred alternative per step (Kubernetes rather than containers, ...)
    multi = np.nonzero(np.isfinite(cc.step_altcum[:, 0]))[0]  # steps with >= 2 alternatives
    pref = np.zeros((U, NS), np.int8)  # [U, NS]
    pref[:, multi] = (rng.random((U, len(multi), 1)) >= cc.step_altcum[multi][None]).sum(axis=2)

    # Service adoption. A user's weight on a service is the use their task mix and habits would make
    # of it; services are taken up in a weight-biased random order (Gumbel top-k): the first k0 are in use
    # from the start, the others are adopted at exponential gaps. Heavy, cross-cutting services are thus
    # usually there from the start, and what is adopted later is the user's lighter, more specific tail.
    alt_w = np.where(np.isfinite(cc.step_altcum), cc.step_altcum, 1.0)
    alt_w = np.diff(np.concatenate([np.zeros((NS, 1)), alt_w], axis=1), axis=1)  # [NS, MAXA] alt weights
    step_w = W[:, cc.step_task] * habit  # [U, NS] expected executions of each step per task draw
    w_us = np.zeros((U, NSV))  # [U, S] expected visits of each service
    for k in range(cc.step_alt_svc.shape[1]):
        col = cc.step_alt_svc[:, k]
        valid = np.nonzero(col >= 0)[0]
        valid = valid[np.argsort(col[valid], kind="stable")]  # grouped by service
        # the user's share of alternative k: loyal to their preferred one, else the catalogue weights
        share_k = alt_w[valid, k] * (1 - cfg.alt_loyalty) + cfg.alt_loyalty * (pref[:, valid] == k)  # [U, V]
        contrib = step_w[:, valid] * share_k * cc.step_unit_visits[valid, k]  # [U, V]
        svc, start = np.unique(col[valid], return_index=True)
        w_us[:, svc] += np.add.reduceat(contrib, start, axis=1)  # sum the steps of each service (no BLAS)
    w_us[:, cc.svc_is_console] = 0.0
    univ = w_us > cfg.min_service_share * w_us.sum(axis=1, keepdims=True)
    # the key service of the user's heaviest own task is always in use from the start
    own_task = np.argmax(np.where(cc.task_key_service[None] >= 0, W, -1.0), axis=1)
    first_svc = cc.task_key_service[own_task]
    univ[np.arange(U), first_svc] = True
    n_univ = univ.sum(axis=1)
    k0 = np.where(is_new, 1 + rng.binomial(n_univ - 1, cfg.new_account_initial_share),
                  rng.binomial(n_univ, cfg.initial_service_share))
    k0 = np.clip(k0, 1, n_univ)
    bonus = np.asarray(cfg.stage_bonus, float)[cc.svc_stage]  # [S] foundation first, advanced later
    keys = np.where(univ, np.log(np.maximum(w_us, 1e-300)) + bonus + rng.gumbel(size=(U, NSV)), -np.inf)
    keys[np.arange(U), first_svc] = np.inf
    order = np.argsort(-keys, axis=1, kind="stable")  # [U, S] services in adoption order
    pos = np.arange(NSV)[None, :]
    gaps = rng.exponential(cfg.adopt_gap_days * DAY_MS, size=(U, NSV)) * np.where(is_new, 0.6, 1.0)[:, None]
    t_sorted = active0[:, None] + np.cumsum(np.where(pos < k0[:, None], 0.0, gaps), axis=1)
    t_sorted = np.where(pos < k0[:, None], -np.inf, t_sorted)
    t_sorted = np.where(pos < n_univ[:, None], t_sorted, np.inf)
    adopt_t = np.empty((U, NSV))  # [U, S] ms; -inf: from the start, inf: not (yet) in the repertoire
    np.put_along_axis(adopt_t, order, t_sorted, axis=1)
    adopt_t[:, cc.svc_is_console] = -np.inf
    # a task can be done once its key service is adopted (common chores: always)
    task_t = np.where(cc.task_key_service[None] >= 0, adopt_t[:, np.maximum(cc.task_key_service, 0)], -np.inf)  # [U, T]

    # ---------------------------------------------------------------- sessions [S]
    frac = (t1 - active0) / span
    mu = np.log(cfg.sessions_per_user_mean) - cfg.sessions_per_user_sigma**2 / 2
    n_s = np.rint(rng.lognormal(mu, cfg.sessions_per_user_sigma, size=U) * frac)
    n_s = np.clip(n_s, cfg.min_sessions, cfg.max_sessions).astype(np.int64)
    s_user = np.repeat(np.arange(U), n_s)
    S = len(s_user)
    # a day in the user's active span, then a local working hour (weekends are quieter)
    day = (active0[s_user] + rng.random(S) * (t1 - active0[s_user] - DAY_MS)) // DAY_MS
    weekday = (day + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    move = (weekday >= 5) & (rng.random(S) < 0.7)
    day = np.where(move, day - weekday + rng.integers(0, 5, size=S), day)  # to a weekday of the same week
    local_h = np.clip(rng.normal(13.0, 3.0, size=S), 0.0, 23.9)
    utc_h = (local_h - np.asarray(REGION_UTC_OFFSET)[region[s_user]]) % 24
    s_start = (day * DAY_MS + utc_h * HOUR_MS).astype(np.int64)
    s_start = np.clip(s_start, active0[s_user], t1 - HOUR_MS)
    skey = (s_user.astype(np.int64) << 36) | (s_start - t0)
    o = np.argsort(skey, kind="stable")
    s_start, skey = s_start[o], skey[o]  # s_user is unchanged by the sort (user-major)
    s_region = np.where(rng.random(S) < cfg.other_region_p, region2[s_user], region[s_user])
    intensity = rng.lognormal(0.0, cfg.intensity_sigma, size=S)
    n_tasks = rng.choice(3, size=S, p=cfg.tasks_per_session) + 1

    # Forced uses: the first session at/after a service's adoption time does a task that uses it; a
    # service in use from the start is used once within the user's first `warm_days` (the log starts in
    # the middle of the account's life: what the user has is what they touch), without search/previews.
    warm = np.isneginf(adopt_t) & ~cc.svc_is_console[None]
    force_t = np.where(warm, active0[:, None] + rng.random((U, NSV)) * cfg.warm_days * DAY_MS, adopt_t)
    au, asv = np.nonzero(np.isfinite(force_t) & (force_t < t1))
    a_time = force_t[au, asv]
    a_idx = np.searchsorted(skey, (au.astype(np.int64) << 36) | np.ceil(a_time - t0).astype(np.int64))
    ok = a_idx < S
    ok[ok] &= s_user[a_idx[ok]] == au[ok]
    au, asv, a_time, a_idx = au[ok], asv[ok], a_time[ok], a_idx[ok]
    a_new = np.isfinite(adopt_t[au, asv])  # a real adoption (not a warm-start use)
    # the task: one the user does, available then, that uses the service (weight x expected visits)
    tw = W[au] * cc.task_svc[:, asv].T * (task_t[au] <= s_start[a_idx, None])  # [A, T]
    ok = tw.sum(axis=1) > 0
    au, asv, a_time, a_idx, a_new, tw = au[ok], asv[ok], a_time[ok], a_idx[ok], a_new[ok], tw[ok]
    a_task = _categorical(rng, tw) if len(au) else np.zeros(0, np.int64)
    del tw
    o = np.lexsort((a_time, a_idx))
    au, asv, a_time, a_idx, a_task, a_new = au[o], asv[o], a_time[o], a_idx[o], a_task[o], a_new[o]
    rank = _ranks(np.bincount(a_idx, minlength=S)[np.unique(a_idx)]) if len(a_idx) else np.zeros(0, np.int64)
    keep = rank < 3
    forced = np.full((S, 3), -1, np.int64)  # [S, 3] task per slot forced by an adoption
    forced_svc = np.full((S, 3), -1, np.int64)  # [S, 3] the adopted service it must use
    forced_new = np.zeros((S, 3), bool)  # [S, 3] a real adoption (search/help may lead to it)
    forced[a_idx[keep], rank[keep]] = a_task[keep]
    forced_svc[a_idx[keep], rank[keep]] = asv[keep]
    forced_new[a_idx[keep], rank[keep]] = a_new[keep]
    n_tasks = np.maximum(n_tasks, (forced >= 0).sum(axis=1))

    # remaining slots: tasks available at the session time, weighted by the user's task mix
    avail = (W[s_user] * (task_t[s_user] <= s_start[:, None].astype(float))).astype(np.float32)  # [S, T]
    fr, fc = np.nonzero(forced >= 0)
    avail[fr, forced[fr, fc]] = 0.0
    chosen = forced.copy()
    for j in range(3):
        rows = np.nonzero((n_tasks > j) & (chosen[:, j] < 0))[0]
        w = avail[rows]
        ok = w.sum(axis=1) > 0
        rows, w = rows[ok], w[ok]
        if len(rows):
            pick = _categorical(rng, w)
            chosen[rows, j] = pick
            avail[rows, pick] = 0.0
    del avail

    ev = _Events()
    # ------------------------------------------------ task instances -> step visits -> events
    inst_s, inst_slot = np.nonzero(chosen >= 0)  # session-major, slot order
    inst_task = chosen[inst_s, inst_slot]
    inst_fsvc = forced_svc[inst_s, inst_slot]  # [I] adopted service the instance must use, or -1
    I = len(inst_s)
    ns = cc.task_nsteps[inst_task]
    st_inst = np.repeat(np.arange(I), ns)  # [sum ns]
    st_gid = cc.task_step0[inst_task][st_inst] + _ranks(ns)
    st_fsvc = inst_fsvc[st_inst]
    # a step offering the adopted service is done (through that alternative) in the adoption session
    st_forced = (st_fsvc >= 0) & (cc.step_alt_svc[st_gid] == st_fsvc[:, None]).any(axis=1)
    include = (rng.random(len(st_gid)) < habit[s_user[inst_s[st_inst]], st_gid]) | st_forced
    rep = cc.step_repeat[st_gid]
    m = rep / (1 - rep) * intensity[inst_s[st_inst]]  # intensity scales the mean number of extra loops
    extra = rng.geometric(1.0 / (1.0 + m)) - 1
    cnt = include * (1 + np.minimum(extra, cfg.max_repeats))
    v_row = np.repeat(np.arange(len(st_gid)), cnt)  # one row per step visit
    v_gid, v_inst = st_gid[v_row], st_inst[v_row]
    v_user = s_user[inst_s[v_inst]]
    alt = (rng.random(len(v_gid))[:, None] >= cc.step_altcum[v_gid]).sum(axis=1)
    alt = np.where(rng.random(len(v_gid)) < cfg.alt_loyalty, pref[v_user, v_gid], alt)
    v_forced = st_forced[v_row]
    alt[v_forced] = np.argmax(cc.step_alt_svc[v_gid[v_forced]] == st_fsvc[v_row[v_forced], None], axis=1)
    unit = cc.step_alt_unit[v_gid, alt]
    # services not adopted yet at the session's start are not used: their steps are skipped
    usable = adopt_t[v_user, cc.step_alt_svc[v_gid, alt]] <= s_start[inst_s[v_inst]]
    unit, v_inst = unit[usable], v_inst[usable]
    ulen = cc.unit_len[unit]
    e_row = np.repeat(np.arange(len(unit)), ulen)
    item = cc.unit_start[unit][e_row] + _ranks(ulen)
    e_inst = v_inst[e_row]
    e_page, e_act = cc.item_page[item], cc.item_action[item]
    # abandonment: cut the instance after a random number of its events (at least one; not before the
    # adopted service in an adoption session)
    n_inst = np.bincount(e_inst, minlength=I)
    e_ord = _ranks(n_inst)
    must = np.zeros(I, np.int64)  # events that must survive: up to the first use of the adopted service
    hit = (inst_fsvc[e_inst] >= 0) & (cc.page_service[e_page] == inst_fsvc[e_inst])
    np.maximum.at(must, e_inst[hit], e_ord[hit] + 1)
    aband = (rng.random(I) < cc.task_abandon[inst_task]) & (n_inst > 1)
    cut = np.where(aband, np.maximum(1 + (rng.random(I) * (n_inst - 1)).astype(np.int64), must), n_inst)
    keep = e_ord < cut[e_inst]
    e_inst, e_page, e_act, e_ord = e_inst[keep], e_page[keep], e_act[keep], e_ord[keep]
    ev.add(inst_s[e_inst], 3 + 2 * inst_slot[e_inst], e_ord + 4, e_page, e_act)
    inst_alive = np.bincount(e_inst, minlength=I) > 0  # instances whose steps were all skipped are no task

    # ------------------------------------------------ noise around the tasks
    R = cc.role
    entry = rng.random(S) < cfg.home_entry_p
    # a session that would otherwise be empty is a glance at the console home, and a user's first session
    # starts there (a first login lands on the home page; so the console itself is never "a new service")
    n_task_ev = np.bincount(inst_s[e_inst], minlength=S)
    entry |= n_task_ev == 0
    entry[np.cumsum(n_s) - n_s] = True
    ev.add(np.nonzero(entry)[0], _B_ENTRY, 0, np.full(entry.sum(), R["home"]), _ACT_DRAW)
    extra_pg = np.array([R["notifications"], R["recent"], R["all_services"]], np.int32)
    ex = np.nonzero(entry & (rng.random(S) < cfg.entry_extra_p))[0]
    ev.add(ex, _B_ENTRY, 1, extra_pg[rng.choice(3, size=len(ex), p=[0.4, 0.35, 0.25])], _ACT_DRAW)
    # between tasks
    later = np.nonzero((inst_slot > 0) & inst_alive & (rng.random(I) < cfg.between_tasks_p))[0]
    btw_pg = np.array([R["home"], R["recent"], R["all_services"], R["notifications"]], np.int32)
    ev.add(inst_s[later], 2 + 2 * inst_slot[later], 0,
           btw_pg[rng.choice(4, size=len(later), p=[0.5, 0.25, 0.15, 0.1])], _ACT_DRAW)
    # the first page of each instance tells which service a search leads to
    first_page = np.full(I, -1, np.int32)
    first = e_ord == 0
    first_page[e_inst[first]] = e_page[first]
    inst_forced = (inst_fsvc >= 0) & forced_new[inst_s, inst_slot]
    # adoption sessions: reach the new service through search and/or its getting-started article
    srch = np.nonzero(inst_forced & (rng.random(I) < cfg.adopt_search_p))[0]
    ev.add(inst_s[srch], 2 + 2 * inst_slot[srch], 1, np.full(len(srch), R["search"]),
           cc.svc_search_action[inst_fsvc[srch]])
    hlp = np.nonzero(inst_forced & (rng.random(I) < cfg.adopt_help_p))[0]
    ev.add(inst_s[hlp], 2 + 2 * inst_slot[hlp], 2, cc.svc_help[inst_fsvc[hlp], 0], _ACT_DRAW)
    ts = np.nonzero(~inst_forced & (first_page >= 0) & (rng.random(I) < cfg.task_search_p))[0]
    ts = ts[~cc.svc_is_console[cc.page_service[first_page[ts]]]]
    ts_svc = cc.page_service[first_page[ts]]
    ev.add(inst_s[ts], 2 + 2 * inst_slot[ts], 3, np.full(len(ts), R["search"]), cc.svc_search_action[ts_svc])

    # aimless browsing: a service's overview and maybe a page or two (sometimes from "All services")
    br = np.nonzero(rng.random(S) < cfg.browse_p)[0]
    own = rng.random(len(br)) < cfg.browse_persona_p
    br_svc = np.where(
        own,
        _categorical(rng, w_us[s_user[br]]) if len(br) else np.zeros(0, np.int64),
        cc.product_svcs[rng.integers(0, len(cc.product_svcs), size=len(br))],
    )
    via_all = rng.random(len(br)) < 0.4
    ev.add(br[via_all], _B_BROWSE, 0, np.full(via_all.sum(), R["all_services"]), _ACT_DRAW)
    ev.add(br, _B_BROWSE, 1, cc.svc_overview[br_svc], _ACT_DRAW)
    for k, p in ((2, 0.5), (3, 0.25)):
        more = rng.random(len(br)) < p
        bs = br_svc[more]
        pages = cc.svc_page0[bs] + (rng.random(len(bs)) * cc.svc_npages[bs]).astype(np.int64)
        ev.add(br[more], _B_BROWSE, k, pages, _ACT_DRAW)

    # exit noise: home, notifications or the help center
    xs = np.nonzero(rng.random(S) < cfg.exit_noise_p)[0]
    exit_pg = np.array([R["home"], R["notifications"], R["help_home"]], np.int32)
    ev.add(xs, _B_EXIT, 0, exit_pg[rng.choice(3, size=len(xs), p=[0.45, 0.3, 0.25])], _ACT_DRAW)

    # pre-adoption previews: in a session up to `preview_days` before adopting a service, search for it or
    # read its help/pricing articles (Console pages: reading about a service is not using it)
    pv = np.nonzero(a_new & (rng.random(len(a_idx)) < cfg.preview_p))[0]
    back = np.where(rng.random(len(pv)) < 0.7, 1, 2)
    p_idx = a_idx[pv] - back
    valid = p_idx >= 0
    pi = p_idx[valid]
    valid[valid] &= (s_user[pi] == au[pv][valid]) & (s_start[pi] >= a_time[pv][valid] - cfg.preview_days * DAY_MS)
    pv, p_idx = pv[valid], p_idx[valid]
    pv_svc = asv[pv]
    do_search = rng.random(len(pv)) < 0.5
    ev.add(p_idx[do_search], _B_EXIT, 1, np.full(do_search.sum(), R["search"]), cc.svc_search_action[pv_svc[do_search]])
    ev.add(p_idx, _B_EXIT, 2, cc.svc_help[pv_svc, np.where(rng.random(len(pv)) < 0.6, 0, 1)], _ACT_DRAW)
    second = rng.random(len(pv)) < 0.3
    ev.add(p_idx[second], _B_EXIT, 3, cc.svc_help[pv_svc[second], rng.integers(0, 3, size=second.sum())], _ACT_DRAW)

    # ------------------------------------------------ per-event detours on the ordered base events
    b_sess, b_page, b_act = ev.sorted()
    E = len(b_sess)
    b_svc = cc.page_service[b_page]
    has_prev = np.zeros(E, bool)
    has_prev[1:] = b_sess[1:] == b_sess[:-1]
    has_next = np.zeros(E, bool)
    has_next[:-1] = has_prev[1:]
    next_svc = np.empty_like(b_svc)
    next_svc[:-1] = b_svc[1:]
    next_svc[-1:] = b_svc[-1:]
    prod = ~cc.svc_is_console[b_svc]
    u = rng.random(E)
    c1, c2, c3 = cfg.back_p, cfg.back_p + cfg.help_detour_p, cfg.back_p + cfg.help_detour_p + cfg.wander_p
    ins = np.zeros(E, np.int8)  # 1 back, 2 help article, 3 other page of the service, 4 search next service
    ins[(u < c1) & has_prev] = 1
    ins[(u >= c1) & (u < c2) & prod] = 2
    ins[(u >= c2) & (u < c3) & prod] = 3
    switch = has_next & (next_svc != b_svc) & ~cc.svc_is_console[next_svc] & (b_page != R["search"])
    ins[(ins == 0) & switch & (rng.random(E) < cfg.switch_search_p)] = 4
    src = np.repeat(np.arange(E), 1 + (ins > 0))  # [E'] index of the base event each row comes from
    new = np.zeros(len(src), bool)
    new[1:] = src[1:] == src[:-1]  # the second row of a pair is the inserted detour
    sess, page, act = b_sess[src], b_page[src], b_act[src]
    k = ins[src[new]]
    sb = src[new]
    np_page = np.empty(len(sb), np.int32)
    np_act = np.full(len(sb), _ACT_DRAW, np.int32)
    m1, m2, m3, m4 = k == 1, k == 2, k == 3, k == 4
    np_page[m1] = b_page[sb[m1] - 1]
    np_act[m1] = _ACT_NONE  # going back is a plain page view
    np_page[m2] = cc.svc_help[b_svc[sb[m2]], rng.choice(3, size=m2.sum(), p=[0.35, 0.2, 0.45])]
    s3 = b_svc[sb[m3]]
    np_page[m3] = cc.svc_page0[s3] + (rng.random(len(s3)) * cc.svc_npages[s3]).astype(np.int64)
    np_page[m4] = R["search"]
    np_act[m4] = cc.svc_search_action[next_svc[sb[m4]]]
    page[new], act[new] = np_page, np_act

    # actions: scripted ones stay, the rest are a random widget of the page (or a plain view)
    draw = act == _ACT_DRAW
    click = draw & (rng.random(len(act)) < cfg.action_p) & (cc.page_nact[page] > 0)
    pick = cc.page_act0[page[click]] + (rng.random(click.sum()) * cc.page_nact[page[click]]).astype(np.int64)
    act[click] = cc.act_flat[pick]
    act[act < 0] = -1

    # ------------------------------------------------ timestamps
    N = len(sess)
    first = np.ones(N, bool)
    first[1:] = sess[1:] != sess[:-1]
    gap = rng.lognormal(np.log(cfg.gap_median_s * 1000.0), cfg.gap_sigma, size=N)
    gap = np.where(cc.page_is_help[page], gap * 2.5, gap)  # reading an article takes longer
    gap = np.clip(gap, 1000.0, 20 * 60 * 1000.0).astype(np.int64)
    gap[first] = 0
    csum = np.cumsum(gap)
    sess_first = np.nonzero(first)[0]
    n_ev = np.diff(np.append(sess_first, N))
    offset = csum - np.repeat(csum[sess_first], n_ev)  # ms since the session's first event
    s_with = sess[sess_first]  # sessions that have events (all of them, in practice)
    dur = np.zeros(S, np.int64)
    dur[s_with] = offset[np.append(sess_first[1:], N) - 1]
    # sessions of a user must not overlap: start_k >= end_{k-1} + min gap (segmented running max)
    d = dur + int(cfg.min_session_gap_min * 60_000)
    c_all = np.cumsum(d) - d  # exclusive cumsum over all sessions
    c_user = c_all - np.repeat(c_all[np.cumsum(n_s) - n_s], n_s)  # exclusive cumsum within the user
    big = np.int64(1) << 40  # > any |start - t0 - c_user|, so the running max never crosses users
    x = (s_start - t0 - c_user) + s_user.astype(np.int64) * big
    s_start = np.maximum.accumulate(x) - s_user.astype(np.int64) * big + c_user + t0
    e_ts = s_start[sess] + offset

    # ------------------------------------------------ billing: billed services from the month of first use
    e_user = s_user[sess]
    e_svc = cc.page_service[page].astype(np.int64)
    n_svc = len(cc.svc_price)
    pair, first_i = np.unique(e_user.astype(np.int64) * n_svc + e_svc, return_index=True)
    p_user, p_svc = pair // n_svc, pair % n_svc
    billable = cc.svc_price[p_svc] > 0
    p_user, p_svc, p_first = p_user[billable], p_svc[billable], e_ts[first_i[billable]]
    m0 = np.datetime64(pd.Timestamp(t0, unit="ms").strftime("%Y-%m"), "M")
    m_last = np.datetime64(pd.Timestamp(e_ts.max() if N else t1, unit="ms").strftime("%Y-%m"), "M")
    n_months = int((m_last - m0).astype(int)) + 1
    m_first = (p_first.astype("datetime64[ms]").astype("datetime64[M]") - m0).astype(np.int64)
    b_n = n_months - m_first
    b_row = np.repeat(np.arange(len(p_user)), b_n)
    b_month = m_first[b_row] + _ranks(b_n)
    month_names = pa.array([str(m0 + i) for i in range(n_months)], pa.string())
    spend = (cc.svc_price[p_svc[b_row]] * np.asarray(SPEND_TIER_SCALE)[tier[p_user[b_row]]]
             * rng.lognormal(-0.125, 0.5, size=len(b_row)))
    partial = rng.uniform(0.1, 1.0, size=len(b_row))  # the month of first use is a partial month
    spend = np.where(b_month == m_first[b_row], spend * partial, spend)
    # the last month is billed month-to-date
    last_start = pd.Timestamp(str(m_last), tz="UTC").value // 1_000_000
    last_end = (pd.Timestamp(str(m_last), tz="UTC") + pd.offsets.MonthBegin(1)).value // 1_000_000
    mtd = min(1.0, max(0.0, (max(int(e_ts.max()) if N else t1, t1) - last_start) / (last_end - last_start)))
    spend = np.round(np.where(b_month == n_months - 1, spend * mtd, spend), 2)

    # ------------------------------------------------ tables
    user_ids = pa.array([f"u{g:07d}" for g in range(u0, u1)], pa.string())
    s_rank = _ranks(n_s)
    sess_ids = pa.array([f"u{u0 + uu:07d}-s{k:04d}" for uu, k in zip(s_user.tolist(), s_rank.tolist())], pa.string())
    region_names = pa.array(list(REGIONS) + ["global"], pa.string())
    e_region = np.where(cc.svc_is_global[e_svc], len(REGIONS), s_region[sess])
    events = pa.table(
        {
            "user_id": pc.take(user_ids, pa.array(e_user, pa.int32())),
            "session_id": pc.take(sess_ids, pa.array(sess, pa.int32())),
            "timestamp": pa.array(e_ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            "service": pc.take(cc.svc_names, pa.array(e_svc, pa.int32())),
            "page": pc.take(cc.page_ids, pa.array(page, pa.int32())),
            "page_title": pc.take(cc.page_titles, pa.array(page, pa.int32())),
            "action": pc.take(cc.actions, pa.array(act, pa.int32(), mask=act < 0)),
            "region": pc.take(region_names, pa.array(e_region, pa.int32())),
        },
        schema=EVENT_SCHEMA,
    )
    billing = pa.table(
        {
            "user_id": pc.take(user_ids, pa.array(p_user[b_row], pa.int32())),
            "month": pc.take(month_names, pa.array(b_month, pa.int32())),
            "service": pc.take(cc.svc_names, pa.array(p_svc[b_row], pa.int32())),
            "spend_usd": pa.array(spend, pa.float64()),
        },
        schema=BILLING_SCHEMA,
    )
    users = pa.table(
        {
            "user_id": user_ids,
            "primary_persona": pc.take(cc.persona_names, pa.array(primary, pa.int32())),
            "secondary_persona": pc.take(cc.persona_names, pa.array(secondary, pa.int32(), mask=secondary < 0)),
            "region": pc.take(region_names, pa.array(region, pa.int32())),
            "account_age_days": pa.array(((t1 - signup) // DAY_MS).astype(np.int32), pa.int32()),
            "spend_tier": pc.take(pa.array(SPEND_TIERS, pa.string()), pa.array(tier, pa.int32())),
        },
        schema=TRUTH_USERS_SCHEMA,
    )
    # session truth: tasks in slot order, then "noise:browse" when the session browsed aimlessly
    t_sess = np.concatenate([inst_s[inst_alive], br])
    t_name = np.concatenate([inst_task[inst_alive], np.full(len(br), T)])
    t_ord = np.concatenate([inst_slot[inst_alive], np.full(len(br), 3)])
    o = np.lexsort((t_ord, t_sess))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(t_sess, minlength=S))]).astype(np.int32)
    tasks = pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pc.take(cc.task_names, pa.array(t_name[o], pa.int32()))
    )
    sessions = pa.table(
        {"session_id": sess_ids, "user_id": pc.take(user_ids, pa.array(s_user, pa.int32())), "tasks": tasks},
        schema=TRUTH_SESSIONS_SCHEMA,
    )
    return SimData(events=events, billing=billing, users=users, sessions=sessions)


# -------------------------------------------------------------------------------------- public API

_COMPILED: dict[int, tuple[Catalog, _Compiled]] = {}


def _compiled(catalog: Catalog | None) -> _Compiled:
    catalog = catalog if catalog is not None else load_catalog()
    hit = _COMPILED.get(id(catalog))
    if hit is None or hit[0] is not catalog:
        hit = (catalog, _compile(catalog))
        _COMPILED.clear()
        _COMPILED[id(catalog)] = hit
    return hit[1]


def _chunk_bounds(cfg: SimConfig) -> list[tuple[int, int, int]]:
    """(chunk index, first user, end user) of every chunk."""
    starts = range(0, cfg.n_users, cfg.chunk_users)
    return [(c, u0, min(u0 + cfg.chunk_users, cfg.n_users)) for c, u0 in enumerate(starts)]


def iter_chunks(cfg: SimConfig, catalog: Catalog | None = None, workers: int = 0) -> Iterator[SimData]:
    """The simulation chunk by chunk (users [c*chunk_users, (c+1)*chunk_users)), in chunk order.

    `workers` > 0 simulates the chunks in a pool of that many spawned processes (a caller may hold CUDA, so no
    fork), at most 2 * workers chunks in flight (bounded memory). Every chunk draws from its own
    SeedSequence([seed, c]), so the result is the same whatever the number of workers.
    """
    cc = _compiled(catalog)
    bounds = _chunk_bounds(cfg)
    if workers <= 0 or len(bounds) <= 1:
        for c, u0, u1 in bounds:
            yield _simulate_chunk(cfg, cc, c, u0, u1)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    n = min(workers, len(bounds))
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(cc,)) as pool:
        inflight: deque = deque()
        todo = iter(bounds)
        try:
            for c, u0, u1 in todo:
                inflight.append(pool.submit(_worker_chunk, cfg, c, u0, u1))
                if len(inflight) >= 2 * n:
                    yield inflight.popleft().result()
            while inflight:
                yield inflight.popleft().result()
        finally:
            for f in inflight:
                f.cancel()


_WORKER_CC: _Compiled | None = None


def _worker_init(cc: _Compiled) -> None:
    global _WORKER_CC
    _WORKER_CC = cc


def _worker_chunk(cfg: SimConfig, c: int, u0: int, u1: int) -> SimData:
    return _simulate_chunk(cfg, _WORKER_CC, c, u0, u1)


def simulate(cfg: SimConfig, catalog: Catalog | None = None, workers: int = 0) -> SimData:
    """Simulate in memory (fine up to a few million sessions; use simulate_to_dir beyond)."""
    parts = list(iter_chunks(cfg, catalog, workers))
    return SimData(
        *(pa.concat_tables([getattr(p, f) for p in parts]).combine_chunks()
          for f in ("events", "billing", "users", "sessions"))
    )


OUTPUT_FILES = {
    "events": "events.parquet",
    "billing": "billing.parquet",
    "users": "truth_users.parquet",
    "sessions": "truth_sessions.parquet",
}


def simulate_to_dir(
    cfg: SimConfig,
    out_dir: str | Path,
    catalog: Catalog | None = None,
    write_stats: bool = True,
    stats_max_users: int = 20_000,
    workers: int = 0,
) -> dict[str, Path]:
    """Stream the simulation to parquet files in `out_dir`, one chunk of users at a time.

    Returns {"events", "billing", "users", "sessions"} -> path (events.parquet, billing.parquet,
    truth_users.parquet, truth_sessions.parquet) plus "data_stats" -> data_stats.json when
    `write_stats`. Stats are measured on the first chunks' users (at most `stats_max_users`: users are
    i.i.d. across chunks, so they are a random sample), with the totals (n_users, n_sessions, n_events)
    counted over everything written.

    `workers` > 0 simulates the chunks in that many spawned processes (`iter_chunks`); the files are written
    in chunk order by this process, so they are byte-for-byte those of the serial run.
    """
    from sessionbert.data.stats import data_stats, write_data_stats

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in OUTPUT_FILES.items()}
    schemas = {"events": EVENT_SCHEMA, "billing": BILLING_SCHEMA, "users": TRUTH_USERS_SCHEMA,
               "sessions": TRUTH_SESSIONS_SCHEMA}
    writers = {k: pq.ParquetWriter(paths[k], schemas[k]) for k in paths}
    sample: list[SimData] = []
    n_sample_users = 0
    totals = dict(n_users=0, n_sessions=0, n_events=0)
    try:
        for part in iter_chunks(cfg, catalog, workers):
            for k, w in writers.items():
                w.write_table(getattr(part, k))
            totals["n_users"] += part.users.num_rows
            totals["n_sessions"] += part.sessions.num_rows
            totals["n_events"] += part.events.num_rows
            if write_stats and n_sample_users < stats_max_users:
                sample.append(part)
                n_sample_users += part.users.num_rows
    finally:
        for w in writers.values():
            w.close()
    if write_stats:
        ev = pa.concat_tables([p.events for p in sample]).to_pandas()
        us = pa.concat_tables([p.users for p in sample]).to_pandas()
        del sample
        stats = data_stats(ev, us, seed=cfg.seed, max_users=stats_max_users)
        if totals["n_users"] > stats["n_users"]:
            stats["stats_sample_users"] = stats["n_users"]
            stats.update(totals)
        stats["sim_config"] = asdict(cfg)
        paths["data_stats"] = write_data_stats(stats, out / "data_stats.json")
    return paths


def main(argv: list[str] | None = None) -> int:
    from sessionbert.data.stats import data_stats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m sessionbert.data.simulator")
    ap.add_argument("--size", default="default", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the parquet files and data_stats.json here")
    ap.add_argument("--n-users", type=int, default=None, help="override the size's number of users")
    ap.add_argument("--catalog", type=Path, default=None, help="catalogue YAML (default: the packaged one)")
    ap.add_argument("--workers", type=int, default=0,
                    help="simulate chunks in this many processes (0: in this one); the output is the same")
    a = ap.parse_args(argv)
    over = {"seed": a.seed} | ({"n_users": a.n_users} if a.n_users else {})
    cfg = sim_config(a.size, **over)
    catalog = load_catalog(a.catalog) if a.catalog else None
    if a.out is not None:
        paths = simulate_to_dir(cfg, a.out, catalog, workers=a.workers)
        stats = json.loads(paths["data_stats"].read_text())
    else:
        data = simulate(cfg, catalog, workers=a.workers)
        stats = data_stats(data.events.to_pandas(), data.users.to_pandas(), seed=cfg.seed)
        stats["sim_config"] = asdict(cfg)
    json.dump(stats, sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
