"""The cloud-console catalogue: services, pages, tasks and the predefined personas.

`load_catalog()` reads `console_catalog.yaml` (packaged beside this module), expands the page templates
into concrete pages, resolves every task step to page ids and checks the whole thing, raising
`CatalogError` that names the file and the offending key on any mistake.

The simulator (`sessionbert.data.simulator`) draws sessions from a `Catalog`; the persona-mapping stage
reads `Catalog.persona_service_weights()`, the expected share of each service in a persona's task
activity, to map clusters of users to the same predefined personas.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

#: The packaged catalogue.
DEFAULT_CATALOG_PATH = Path(__file__).with_name("console_catalog.yaml")
#: Adoption stages of a service, from "used from the start" to "adopted later".
STAGES = ("foundation", "standard", "advanced")
#: Family of the console pseudo-service (home/dashboard, search, notifications, help center).
CONSOLE_FAMILY = "console"


class CatalogError(ValueError):
    """A malformed catalogue; the message names the file and the key."""


@dataclass(frozen=True)
class Step:
    """One workflow step: draw one of `units` (a unit is a fixed sequence of (page id, action|None))."""

    units: tuple[tuple[tuple[str, str | None], ...], ...]
    weights: tuple[float, ...]  # drawing weights of the units, summing to 1
    p: float = 1.0  # probability that the step happens at all
    repeat: float = 0.0  # probability of each further repetition (geometric loop)

    @property
    def expected_visits(self) -> float:
        """Expected number of times the step's unit is visited (ignoring abandonment)."""
        return self.p / (1.0 - self.repeat)


@dataclass(frozen=True)
class Task:
    """A workflow over (service, page) steps, e.g. 'deploy a web app'."""

    name: str
    description: str
    steps: tuple[Step, ...]
    abandon: float  # probability the user stops part-way through
    key_service: str | None  # service slug searched for / read about before adoption (None: no product service)


@dataclass(frozen=True)
class Persona:
    """A predefined persona: a weighted set of tasks."""

    name: str
    description: str
    share: float  # share of users with this primary persona (normalised over personas)
    tasks: dict[str, float]  # task name -> weight incl. the catalogue's common tasks, summing to 1
    own_tasks: dict[str, float] = field(default_factory=dict)  # the persona's own tasks only, summing to 1


@dataclass
class Catalog:
    """The parsed catalogue.

    services: one row per service (product services first, then the Console pseudo-service), columns
        slug, name, family, price (typical monthly USD; 0 = free), billable, stage (foundation|standard|
        advanced), is_global, is_console.
    pages: one row per page, grouped by service in `services` order, columns page (stable id),
        service_slug, service (display name), title, kind (overview|list|create|detail|settings|
        family|extra|help|console), help_of (service slug a help article is about, else ""),
        actions (list of button/widget texts).
    """

    path: Path
    families: list[str]
    services: pd.DataFrame
    pages: pd.DataFrame
    tasks: list[Task]
    personas: list[Persona]
    console_roles: dict[str, str]  # role (home, search, ...) -> page id
    common_tasks: dict[str, float] = field(default_factory=dict)  # chores of every persona -> weight (sum 1)
    common_share: float = 0.0  # share of each persona's task activity taken by the common tasks
    _page_index: dict[str, int] = field(default_factory=dict, repr=False)

    # ---- lookups
    def page_index(self, page_id: str) -> int:
        return self._page_index[page_id]

    @property
    def service_names(self) -> list[str]:
        return self.services["name"].tolist()

    @property
    def product_services(self) -> pd.DataFrame:
        return self.services[~self.services["is_console"]]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def persona_names(self) -> list[str]:
        return [p.name for p in self.personas]

    # ---- derived weights
    def persona_task_weights(self) -> pd.DataFrame:
        """personas x tasks, rows summing to 1."""
        m = pd.DataFrame(0.0, index=self.persona_names, columns=self.task_names)
        for p in self.personas:
            for t, w in p.tasks.items():
                m.loc[p.name, t] = w
        return m

    def task_service_visits(self) -> pd.DataFrame:
        """tasks x services (display names): expected events of each service in one run of the task."""
        slug_to_col = dict(zip(self.services["slug"], range(len(self.services))))
        page_service = dict(zip(self.pages["page"], self.pages["service_slug"]))
        m = np.zeros((len(self.tasks), len(self.services)))  # [T, S]
        for i, task in enumerate(self.tasks):
            for step in task.steps:
                for unit, w in zip(step.units, step.weights):
                    for page, _ in unit:
                        m[i, slug_to_col[page_service[page]]] += step.expected_visits * w
        return pd.DataFrame(m, index=self.task_names, columns=self.service_names)

    def persona_service_weights(self) -> pd.DataFrame:
        """personas x services (display names, catalogue order), rows summing to 1.

        The expected share of each service in a persona's task activity: the persona's task weights
        times each task's expected events per service (step probability x expected repetitions x
        alternative weight), normalised per persona. Console noise (home, search, help) is not part of
        any task, so those columns are 0 unless a task step visits them.
        """
        raw = self.persona_task_weights().to_numpy() @ self.task_service_visits().to_numpy()  # [K, S]
        raw = raw / raw.sum(axis=1, keepdims=True)
        return pd.DataFrame(raw, index=self.persona_names, columns=self.service_names)


# ----------------------------------------------------------------------------------------- parsing


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Reader:
    """Small helpers that raise CatalogError naming the file and the key path."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, msg: str) -> CatalogError:
        return CatalogError(f"{self.path.name}: {where}: {msg}")

    def get(self, d: Any, key: str, where: str, kind: type | tuple[type, ...] | None = None, default: Any = ...):
        if not isinstance(d, dict):
            raise self.fail(where, f"expected a mapping, got {type(d).__name__}")
        if key not in d:
            if default is ...:
                raise self.fail(where, f"missing key '{key}'")
            return default
        v = d[key]
        if kind is not None and not isinstance(v, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail(f"{where}.{key}", f"expected {names}, got {type(v).__name__}")
        return v

    def prob(self, d: dict, key: str, where: str, default: float, upper_open: bool = False) -> float:
        v = self.get(d, key, where, (int, float), default)
        if not (0.0 <= v <= 1.0) or (upper_open and v >= 1.0):
            raise self.fail(f"{where}.{key}", f"must be a probability in [0, 1{')' if upper_open else ']'}, got {v}")
        return float(v)


def _fmt(template: str, svc: dict[str, str]) -> str:
    try:
        return template.format(**svc)
    except (KeyError, IndexError) as e:  # unknown placeholder
        raise KeyError(str(e)) from None


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load and validate a console catalogue (default: the packaged `console_catalog.yaml`)."""
    path = Path(path) if path is not None else DEFAULT_CATALOG_PATH
    r = _Reader(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"{path}: catalogue file not found") from None
    except yaml.YAMLError as e:
        raise CatalogError(f"{path.name}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise r.fail("<top level>", "expected a mapping")

    families = r.get(raw, "families", "<top level>", list)
    templates = r.get(raw, "page_templates", "<top level>", dict)
    common = r.get(templates, "common", "page_templates", list)
    help_tpl = r.get(raw, "help_articles", "<top level>", list)

    services_rows: list[dict] = []
    page_rows: list[dict] = []

    def add_page(
        where: str, page_id: str, slug: str, name: str, title: str, kind: str, actions: list, help_of: str = ""
    ) -> None:
        if not isinstance(actions, list) or not all(isinstance(a, str) and a for a in actions):
            raise r.fail(f"{where}.actions", "expected a list of non-empty strings")
        page_rows.append(
            dict(page=page_id, service_slug=slug, service=name, title=title, kind=kind, help_of=help_of,
                 actions=list(actions))
        )

    # ---- product services: templates + own pages
    raw_services = r.get(raw, "services", "<top level>", list)
    for i, s in enumerate(raw_services):
        where = f"services[{i}]"
        slug = r.get(s, "slug", where, str)
        name = r.get(s, "name", where, str)
        family = r.get(s, "family", where, str)
        if family not in families:
            raise r.fail(f"{where}.family", f"'{family}' is not one of families {families}")
        item = r.get(s, "item", where, list)
        if len(item) != 2 or not all(isinstance(x, str) for x in item):
            raise r.fail(f"{where}.item", "expected [singular, plural]")
        price = float(r.get(s, "price", where, (int, float)))
        stage = r.get(s, "stage", where, str, default="standard")
        if stage not in STAGES:
            raise r.fail(f"{where}.stage", f"'{stage}' is not one of {list(STAGES)}")
        fmt = dict(Service=name, item=item[0], items=item[1], Item=_cap(item[0]), Items=_cap(item[1]), slug=slug)
        path_fmt = dict(fmt, items=_slugify(item[1]), item=_slugify(item[0]))
        services_rows.append(
            dict(slug=slug, name=name, family=family, price=price, billable=price > 0, stage=stage,
                 is_global=bool(s.get("global", False)), is_console=False)
        )
        fam_tpl = r.get(templates, family, "page_templates", list, default=[])
        for j, t in enumerate(list(common) + list(fam_tpl)):
            tw = (f"page_templates.common[{j}]" if j < len(common)
                  else f"page_templates.{family}[{j - len(common)}]")
            try:
                p = _fmt(r.get(t, "path", tw, str), path_fmt)
                title = _fmt(r.get(t, "title", tw, str), fmt)
                actions = [_fmt(a, fmt) for a in r.get(t, "actions", tw, list)]
            except KeyError as e:
                raise r.fail(tw, f"unknown placeholder {e}") from None
            kind = t.get("key", "family") if j < len(common) else "family"
            add_page(tw, f"{slug}/{p}", slug, name, title, kind, actions)
        for j, pg in enumerate(r.get(s, "pages", where, list, default=[])):
            pw = f"{where}.pages[{j}]"
            add_page(pw, f"{slug}/{r.get(pg, 'path', pw, str)}", slug, name, r.get(pg, "title", pw, str), "extra",
                     r.get(pg, "actions", pw, list))

    # ---- the console pseudo-service (home, search, notifications, help center) and the help articles
    con = r.get(raw, "console", "<top level>", dict)
    con_slug, con_name = r.get(con, "slug", "console", str), r.get(con, "name", "console", str)
    product_rows = list(services_rows)
    services_rows.append(dict(slug=con_slug, name=con_name, family=CONSOLE_FAMILY, price=0.0, billable=False,
                              stage="foundation", is_global=True, is_console=True))
    for j, pg in enumerate(r.get(con, "pages", "console", list)):
        pw = f"console.pages[{j}]"
        add_page(pw, r.get(pg, "path", pw, str), con_slug, con_name, r.get(pg, "title", pw, str), "console",
                 r.get(pg, "actions", pw, list))
    for s in product_rows:
        fmt = dict(Service=s["name"], slug=s["slug"])
        for j, t in enumerate(help_tpl):
            tw = f"help_articles[{j}]"
            try:
                add_page(tw, _fmt(r.get(t, "path", tw, str), fmt), con_slug, con_name,
                         _fmt(r.get(t, "title", tw, str), fmt), "help",
                         [_fmt(a, fmt) for a in r.get(t, "actions", tw, list)], help_of=s["slug"])
            except KeyError as e:
                raise r.fail(tw, f"unknown placeholder {e}") from None

    services = pd.DataFrame(services_rows)
    dup = [v for c in ("slug", "name") for v in services[c][services[c].duplicated()]]
    if dup:
        raise r.fail("services", f"duplicate service slug/name {sorted(set(dup))}")
    # Pages grouped by service in service order (the simulator draws "a random page of service s" as a range).
    order = {slug: k for k, slug in enumerate(services["slug"])}
    pages = pd.DataFrame(page_rows)
    pages["_o"] = pages["service_slug"].map(order)
    pages = pages.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
    dup = pages["page"][pages["page"].duplicated()].tolist()
    if dup:
        raise r.fail("pages", f"duplicate page ids {sorted(set(dup))[:10]}")
    page_index = {p: k for k, p in enumerate(pages["page"])}
    page_service = dict(zip(pages["page"], pages["service_slug"]))

    roles = r.get(raw, "console_roles", "<top level>", dict)
    for role in ("home", "search", "all_services", "notifications", "recent", "help_home"):
        pid = r.get(roles, role, "console_roles", str)
        if pid not in page_index:
            raise r.fail(f"console_roles.{role}", f"unknown page '{pid}'")

    # ---- tasks
    def parse_ref(ref: Any, where: str, action: str | None = None) -> tuple[str, str | None]:
        if isinstance(ref, dict):
            return parse_ref(r.get(ref, "page", where, str), where, ref.get("action"))
        if not isinstance(ref, str):
            raise r.fail(where, f"expected a page id string, got {type(ref).__name__}")
        page, _, act = ref.partition("|")
        page, act = page.strip(), (act.strip() or None)
        if page not in page_index:
            raise r.fail(where, f"unknown page '{page}'")
        return page, act or action

    tasks: list[Task] = []
    for i, t in enumerate(r.get(raw, "tasks", "<top level>", list)):
        where = f"tasks[{i}]"
        name = r.get(t, "name", where, str)
        where = f"tasks[{i}]({name})"
        steps: list[Step] = []
        for j, st in enumerate(r.get(t, "steps", where, list)):
            sw = f"{where}.steps[{j}]"
            if isinstance(st, str):
                steps.append(Step(units=((parse_ref(st, sw),),), weights=(1.0,)))
                continue
            if not isinstance(st, dict):
                raise r.fail(sw, "expected a page string or a mapping")
            if ("page" in st) == ("seq" in st):
                raise r.fail(sw, "needs exactly one of 'page' or 'seq'")
            if "seq" in st:
                seq = r.get(st, "seq", sw, list)
                units = (tuple(parse_ref(x, f"{sw}.seq[{k}]") for k, x in enumerate(seq)),)
            else:
                alts = st["page"] if isinstance(st["page"], list) else [st["page"]]
                units = tuple((parse_ref(x, f"{sw}.page[{k}]", st.get("action")),) for k, x in enumerate(alts))
            if not units or not all(units):
                raise r.fail(sw, "empty step")
            w = r.get(st, "weights", sw, list, default=[1.0] * len(units))
            if len(w) != len(units) or any((not isinstance(x, (int, float))) or x <= 0 for x in w):
                raise r.fail(f"{sw}.weights", f"expected {len(units)} positive numbers")
            w = np.asarray(w, float) / np.sum(w)
            steps.append(Step(units=units, weights=tuple(w.tolist()), p=r.prob(st, "p", sw, 1.0),
                              repeat=r.prob(st, "repeat", sw, 0.0, upper_open=True)))
        if not steps or not any(s.p == 1.0 for s in steps):
            raise r.fail(f"{where}.steps", "a task needs at least one required step (p = 1)")
        # key service: declared, or the product service with the most expected visits
        visits: dict[str, float] = {}
        for s in steps:
            for unit, w in zip(s.units, s.weights):
                for page, _ in unit:
                    visits[page_service[page]] = visits.get(page_service[page], 0.0) + s.expected_visits * w
        product_visits = {k: v for k, v in visits.items() if not services.loc[order[k], "is_console"]}
        key = t.get("key_service") or (max(product_visits, key=product_visits.get) if product_visits else None)
        if key is not None and (key not in order or services.loc[order[key], "is_console"]):
            raise r.fail(f"{where}.key_service", f"unknown product service '{key}'")
        tasks.append(Task(name=name, description=str(r.get(t, "description", where, str)), steps=tuple(steps),
                          abandon=r.prob(t, "abandon", where, 0.0, upper_open=True), key_service=key))
    task_names = [t.name for t in tasks]
    if len(set(task_names)) != len(task_names):
        raise r.fail("tasks", "duplicate task names")

    # ---- personas (own tasks, plus the common tasks every persona does now and then)
    def task_weights(tw: Any, where: str) -> dict[str, float]:
        if not isinstance(tw, dict) or not tw:
            raise r.fail(where, "expected a non-empty mapping task -> weight")
        for tname, w in tw.items():
            if tname not in task_names:
                raise r.fail(where, f"unknown task '{tname}'")
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0:
                raise r.fail(f"{where}.{tname}", f"weight must be a positive number, got {w!r}")
        total = float(sum(tw.values()))
        return {k: float(v) / total for k, v in tw.items()}

    common = r.get(raw, "common_tasks", "<top level>", dict, default={"share": 0.0, "tasks": {}})
    common_share = r.prob(common, "share", "common_tasks", 0.0, upper_open=True)
    common_w = {}
    if common_share > 0:
        common_w = task_weights(r.get(common, "tasks", "common_tasks", dict), "common_tasks.tasks")
    personas: list[Persona] = []
    for i, p in enumerate(r.get(raw, "personas", "<top level>", list)):
        where = f"personas[{i}]"
        name = r.get(p, "name", where, str)
        where = f"personas[{i}]({name})"
        own = task_weights(r.get(p, "tasks", where, dict), f"{where}.tasks")
        mixed = {t: (1 - common_share) * w for t, w in own.items()}
        for t, w in common_w.items():
            mixed[t] = mixed.get(t, 0.0) + common_share * w
        share = r.get(p, "share", where, (int, float), 1.0)
        if share <= 0:
            raise r.fail(f"{where}.share", f"must be positive, got {share}")
        personas.append(Persona(name=name, description=str(r.get(p, "description", where, str)), share=float(share),
                                tasks=mixed, own_tasks=own))
    if len({p.name for p in personas}) != len(personas) or not personas:
        raise r.fail("personas", "needs at least one persona, with unique names")

    return Catalog(path=path, families=list(families), services=services, pages=pages, tasks=tasks,
                   personas=personas, console_roles=dict(roles), common_tasks=common_w, common_share=common_share,
                   _page_index=page_index)
