"""``python -m sessionbert.realdata [--datasets msnbc,fifa,...] [--out experiments/results]``: each dataset
module's ``evaluate(cfg)`` with cfg = the ``realdata`` node of ``conf/experiment/real_<name>.yaml``; writes
``real_data.csv`` (RESULT_COLUMNS) and ``real_data.md`` (table, goal met?, command, commit, date, machine)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from .base import RESULT_COLUMNS, ResultRow

ALL = ("msnbc", "fifa", "helpdesk", "bpi12w", "msweb", "beauty")
CONF = Path(__file__).resolve().parents[2] / "conf" / "experiment"
log = logging.getLogger("sessionbert")


def dataset_cfg(name: str, conf_dir: Path = CONF) -> dict:
    path = conf_dir / f"real_{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no experiment config for dataset {name!r}")
    node = OmegaConf.load(path)
    if "realdata" not in node:
        raise ValueError(f"{path}: no `realdata:` node (the evaluation config)")
    return OmegaConf.to_container(node.realdata, resolve=True)


def goal_status(rows: list[ResultRow], goal: dict | None) -> dict[int, str]:
    """Row index -> "yes ..." / "NO ..." for the row a dataset's goal names (see the real_*.yaml `goal:`)."""
    if not goal:
        return {}

    def match(r: ResultRow, src: str) -> bool:
        return (r.metric == goal["metric"] and r.source.startswith(src)
                and goal.get("protocol_contains", "") in r.protocol and r.ours is not None)

    out = {}
    for i, r in enumerate(rows):
        if not match(r, goal["ours_source"]):
            continue
        if "at_least" in goal:
            t = float(goal["at_least"])
            out[i] = f"yes (>= {t})" if r.ours >= t else f"NO: short of {t} by {t - r.ours:.4f}"
        elif "above_source" in goal:
            refs = [x.ours for x in rows if match(x, goal["above_source"]) and x.protocol == r.protocol]
            if not refs:
                out[i] = "no reference row"
            else:
                best = max(refs)
                out[i] = f"yes (> {best:.4f}, best reference)" if r.ours > best else f"NO: {r.ours:.4f} <= {best:.4f}"
    return out


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and pd.isna(x)) else f"{x:.4f}"


def write_results(rows: list[ResultRow], goals: dict[int, str], out: Path, meta: dict, extra_md: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame([r.as_dict() for r in rows], columns=list(RESULT_COLUMNS))
    tmp = out / ".real_data.csv.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, out / "real_data.csv")
    runs = meta.get("runs") or {}
    seconds = json.dumps({d: r["seconds"] for d, r in runs.items()}) if runs else meta.get("seconds", "{}")
    lines = ["# SessionBERT on real public session data (issue 5)", "",
             f"- table written by: `{meta['command']}` at git commit `{meta['commit']}`, {meta['date']} (UTC)",
             f"- machine: {meta['machine']}", f"- seconds per dataset: {seconds}", ""]
    if runs:
        lines += ["Each dataset's rows come from this run (`--keep` merges runs):", ""]
        lines += [f"- {d}: `{r['command']}` at `{r['commit']}`, {r['date']} (UTC), {r['seconds']} s"
                  for d, r in runs.items()]
        lines.append("")
    lines += [
             "`ours` is the value measured in this run by the model named in `source` (SessionBERT, a reference "
             "such as CPT+, or a floor); `published` is the number the literature reports under that protocol.", "",
             "| dataset | metric | protocol | ours | published | source | goal met? |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {r.dataset} | {r.metric} | {r.protocol} | {_fmt(r.ours)} | {_fmt(r.published)} | "
                     f"{r.source} | {goals.get(i, '')} |")
    short = [f"- {rows[i].dataset}: {s}" for i, s in goals.items() if not s.startswith("yes")]
    lines += ["", "## Goals", ""] + (short or ["All goals of the datasets run here are met."])
    tmp = out / ".real_data.md.tmp"
    tmp.write_text("\n".join(lines) + "\n" + extra_md)
    os.replace(tmp, out / "real_data.md")


def _personas_md(out: Path, names) -> str:
    parts = []
    for n in names:
        p = out / f"{n}_personas.json"
        if not p.exists():
            continue
        d = json.loads(p.read_text())
        parts += ["", f"## Personas on {n}: clusters at the best k (top pages: share of the cluster's events, lift)", ""]
        for what in ("SessionBERT embedding", "bag of pages (floor)"):
            if what not in d:
                continue
            parts.append(f"**{what}**, best k = {d[what]['k_best']} ({d['users']:,} users):")
            parts.append("")
            for c, v in d[what]["clusters"].items():
                tops = ", ".join(f"{p} {s:.0%} (x{l})" for p, s, l in v["top"])
                parts.append(f"- cluster {c} ({v['users']:,} users): {tops}")
            parts.append("")
    return "\n".join(parts)


def _meta(argv: list[str]) -> dict:
    """This invocation's provenance: command, git commit (flagged when the tree has uncommitted changes), machine."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except OSError:
        commit = "unknown"
    import torch

    return {"command": "python -m sessionbert.realdata " + " ".join(argv), "commit": commit, "date": _now(),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                       f"({'cuda' if torch.cuda.is_available() else 'cpu'})"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")


def _save(rows, goals, out: Path, meta: dict, runs: dict) -> None:
    """real_data.{csv,md} plus real_data_runs.json: per dataset, the run its rows come from (seconds, command,
    commit, date), which `--keep` carries over."""
    ran = sorted({r.dataset for r in rows})
    meta = {**meta, "date": _now(), "runs": {d: r for d, r in runs.items() if d in ran}}
    write_results(rows, goals, out, meta, _personas_md(out, ran))
    (out / "real_data_runs.json").write_text(json.dumps(meta["runs"], indent=1))


def _kept(out: Path, names: list[str], conf_dir: Path) -> tuple[list[ResultRow], dict[int, str], dict[str, dict]]:
    """Rows (and their goal status, recomputed) of the datasets in OUT/real_data.csv that are not run now, and
    their runs' provenance from OUT/real_data_runs.json."""
    csv = out / "real_data.csv"
    if not csv.exists():
        return [], {}, {}
    df = pd.read_csv(csv)
    rows: list[ResultRow] = []
    goals: dict[int, str] = {}
    for name, g in df[~df["dataset"].isin(names)].groupby("dataset", sort=False):
        r = [ResultRow(**{k: (None if pd.isna(v) else v) for k, v in rec.items()}) for rec in g.to_dict("records")]
        try:
            goal = dataset_cfg(name, conf_dir).get("goal")
        except (FileNotFoundError, ValueError):
            goal = None
        base = len(rows)
        rows += r
        goals.update({base + i: st for i, st in goal_status(r, goal).items()})
    rp = out / "real_data_runs.json"
    runs = json.loads(rp.read_text()) if rp.exists() else {}
    kept = {r.dataset for r in rows}
    log.info("kept from %s: %s", csv, ", ".join(sorted(kept)) or "nothing")
    return rows, goals, {d: r for d, r in runs.items() if d in kept}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m sessionbert.realdata", description=__doc__)
    ap.add_argument("--datasets", default=",".join(ALL), help=f"comma-separated, of {ALL}")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--conf-dir", default=str(CONF))
    ap.add_argument("--keep", action="store_true",
                    help="keep the rows of datasets not run now from an existing OUT/real_data.csv (incremental runs: "
                         "one table from several invocations); their provenance comes from OUT/real_data_runs.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL]
    if bad:
        ap.error(f"--datasets: unknown {bad}; known {ALL}")
    out = Path(args.out)
    rows: list[ResultRow] = []
    goals: dict[int, str] = {}
    runs: dict[str, dict] = {}  # dataset -> the run its rows come from
    failed = False
    meta = _meta(argv)
    if args.keep:
        rows, goals, runs = _kept(out, names, Path(args.conf_dir))
    for name in names:
        if importlib.util.find_spec(f"sessionbert.realdata.{name}") is None:
            log.warning("%s: no module sessionbert.realdata.%s yet, skipped", name, name)
            rows.append(ResultRow(name, "-", "-", None, None, f"not run: module sessionbert.realdata.{name} absent"))
            continue
        t0 = time.perf_counter()
        try:
            cfg = dataset_cfg(name, Path(args.conf_dir))
            cfg["out_dir"] = str(out)
            r = importlib.import_module(f"sessionbert.realdata.{name}").evaluate(cfg)
            base = len(rows)
            rows += r
            goals.update({base + i: s for i, s in goal_status(r, cfg.get("goal")).items()})
        except Exception as e:  # one dataset failing must not lose the others' results; exit status says so
            log.exception("%s failed", name)
            rows.append(ResultRow(name, "-", "-", None, None, f"FAILED: {type(e).__name__}: {e}"))
            failed = True
        runs[name] = {"seconds": round(time.perf_counter() - t0, 1), "command": meta["command"],
                      "commit": meta["commit"], "date": _now()}
        log.info("%s done in %.0fs", name, runs[name]["seconds"])
        # after every dataset, so a long run interrupted later keeps what it finished
        _save(rows, goals, out, meta, runs)
    _save(rows, goals, out, meta, runs)
    log.info("wrote %s and %s", out / "real_data.csv", out / "real_data.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
