"""Run report: `report.md` with our numbers beside the paper's claims, and a silhouette-vs-k plot."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from .config import STAGES as CONFIG_STAGES  # noqa: E402

PAPER = {
    "page_f1": "SessionBERT +3% relative F1 over BERT-base (next page link)",
    "service_f1": "SessionBERT +1% relative F1 over BERT-base (next service)",
    "finetune_time": "fine-tuning 10x faster at seq_len 64 than 512",
    "hit@5": "Hit@5 of top-5 new services: 0.58",
    "personas": "K-means (cosine) on SessionBERT embeddings, k = 3..9 by silhouette",
}


def _f(x, nd: int = 4) -> str:
    return "n/a" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def silhouette_plot(sil: dict, path: Path, label: str = "") -> None:
    ks = sorted(int(k) for k in sil)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ks, [sil[str(k)] if str(k) in sil else sil[k] for k in ks], marker="o", label=label or None)
    ax.set_xlabel("k")
    ax.set_ylabel("cosine silhouette")
    ax.set_title("Silhouette vs k (user embeddings)")
    ax.grid(alpha=0.3)
    if label:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the pipeline's stages in order (config.STAGES without the `stage=` choices that run no stage of their own)
STAGES = tuple(st for st in CONFIG_STAGES if st not in ("all", "report"))


def stage_times(m: dict) -> dict[str, float]:
    """Seconds of each pipeline stage in a run's metrics.json, in pipeline order: a reused cached stage keeps the time
    of the run that computed it, and pretraining adds the training time of the interrupted runs it resumed (a
    SIGTERM checkpoint + resume=auto chain, `train_seconds_total`)."""
    times = {st: m[st]["stage_seconds"] for st in STAGES if isinstance(m.get(st), dict) and "stage_seconds" in m[st]}
    pt = m.get("pretrain") or {}
    if "pretrain" in times and pt.get("train_seconds_total") and pt.get("seconds"):
        times["pretrain"] += pt["train_seconds_total"] - pt["seconds"]
    return times


def write_run_report(out: Path, m: dict) -> Path:
    ft, pe, rc, pt = (m.get(s, {}) for s in ("finetune", "personas", "recommend", "pretrain"))
    cfg = m.get("config", {})
    lines = [
        "# SessionBERT run report",
        "",
        f"model `{cfg.get('model')}`, data `{cfg.get('data')}`, seq_len {cfg.get('seq_len')}, "
        f"vocab_size {cfg.get('vocab_size')}, seed {cfg.get('seed')}",
        "",
        "| experiment | paper | ours |",
        "|---|---|---|",
        f"| MLM pretraining | SessionBERT from scratch, 30k vocab | val MLM loss {_f(pt.get('mlm_loss'))} |",
        f"| next page F1 | {PAPER['page_f1']} | micro {_f(ft.get('page_f1_micro'))}, macro {_f(ft.get('page_f1_macro'))}, "
        f"weighted {_f(ft.get('page_f1_weighted'))} |",
        f"| next service F1 | {PAPER['service_f1']} | micro {_f(ft.get('service_f1_micro'))}, "
        f"macro {_f(ft.get('service_f1_macro'))}, weighted {_f(ft.get('service_f1_weighted'))} |",
        f"| fine-tuning time | {PAPER['finetune_time']} | {_f(ft.get('seconds'), 1)} s at seq_len {cfg.get('seq_len')} "
        "(compare runs: `make report`) |",
        f"| personas | {PAPER['personas']} | k = {pe.get('k')}, ARI {_f(pe.get('ari'))}, NMI {_f(pe.get('nmi'))}, "
        f"mapping accuracy {_f(pe.get('mapping_accuracy'))} |",
        f"| new-service Hit@5 | {PAPER['hit@5']} | {_f(rc.get('hit@5'))} (popularity {_f(rc.get('hit@5_popularity'))}, "
        f"persona oracle {_f(rc.get('hit@5_persona_oracle'))}; {rc.get('users')} users) |",
        "",
    ]
    sa = m.get("score_all") or {}
    if sa:  # every user scored through the API's streaming path (score_all.enabled)
        lines += ["## Every user (score_all)", "",
                  f"{sa.get('users')} users scored in {_f(sa.get('score_seconds'), 1)} s ({sa.get('users_per_s')} "
                  f"users/s, {sa.get('workers')} prep workers): Hit@5 {_f(sa.get('hit@5'))} over "
                  f"{sa.get('adopting_users')} adopting users, persona ARI {_f(sa.get('ari'))}.", ""]
        sample = ft.get("corpus_sample")
        if sample:
            lines += [f"Fine-tuning, personas and the Hit@5 above ran on a seeded sample of {sample['users']} of "
                      f"{sample['of_users']} users (corpus.max_users).", ""]
    times = stage_times(m)
    if times:
        lines += ["## Stage times", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {st} | {_f(v, 1)} |" for st, v in times.items()]
        lines += [f"| **total** | **{_f(sum(times.values()), 1)}** |", "",
                  "Each stage's time when it ran (a reused cached stage shows the run that computed it); pretraining "
                  "includes the training time of interrupted runs it resumed.", ""]
    skipped = m.get("skipped") or {}
    if skipped:  # public data lacking users / services / time (issue 5): skipped and said, never faked
        lines += ["## Skipped", "", "| stage | why |", "|---|---|"] + [f"| {k} | {v} |" for k, v in skipped.items()]
        lines += [""]
    sil = pe.get("silhouette")
    if sil:
        lines += ["## Silhouette vs k", "", "| k | silhouette |", "|---|---|"]
        lines += [f"| {k} | {_f(v)} |" for k, v in sorted(sil.items(), key=lambda kv: int(kv[0]))]
        lines += ["", "![silhouette](silhouette.png)", ""]
        silhouette_plot({str(k): v for k, v in sil.items()}, out / "silhouette.png")
    if rc.get("protocol"):
        lines += [f"Hit@5 protocol: {rc['protocol']}; ranker `{rc.get('ranker')}`, filter `{rc.get('filter_used')}`.", ""]
    p = out / "report.md"
    p.write_text("\n".join(lines))
    return p


# ---- grid reports: `python -m sessionbert.report RUN_OR_MULTIRUN_DIR... [--out DIR]` (`make report RUNS=...`) ----
AXES = ("model", "seq_len", "vocab_size", "ranker")
COLUMNS = {  # results.csv column -> (stage, key) in metrics.json
    "mlm_loss": ("pretrain", "mlm_loss"),
    "vocab_actual": ("pretrain", "vocab_size"),
    "page_f1_micro": ("finetune", "page_f1_micro"),
    "page_f1_macro": ("finetune", "page_f1_macro"),
    "page_f1_weighted": ("finetune", "page_f1_weighted"),
    "service_f1_micro": ("finetune", "service_f1_micro"),
    "service_f1_macro": ("finetune", "service_f1_macro"),
    "service_f1_weighted": ("finetune", "service_f1_weighted"),
    "finetune_seconds": ("finetune", "seconds"),
    "finetune_real_tokens": ("finetune", "real_tokens"),  # non-pad tokens trained on (time should follow these)
    "finetune_padded_slots": ("finetune", "padded_slots"),  # B x T summed over the training batches
    "k_chosen": ("personas", "k"),
    "ari": ("personas", "ari"),
    "nmi": ("personas", "nmi"),
    "mapping_accuracy": ("personas", "mapping_accuracy"),
    "hit@5": ("recommend", "hit@5"),
    "hit@5_popularity": ("recommend", "hit@5_popularity"),
    "hit@5_cooccurrence": ("recommend", "hit@5_cooccurrence"),
    "hit@5_persona_popularity": ("recommend", "hit@5_persona_popularity"),
    "hit@5_persona_oracle": ("recommend", "hit@5_persona_oracle"),
    "rec_users": ("recommend", "users"),
}


def collect_runs(paths) -> list[dict]:
    """Every metrics.json below the given run / multirun dirs (plus failed jobs' job_status.json), as flat rows
    with the job's overrides from `.hydra/overrides.yaml` when present."""
    import json

    import yaml

    rows, seen = [], set()
    for root in map(Path, paths):
        found = sorted(root.rglob("metrics.json")) if root.is_dir() else [root]
        for mp in found:
            d = mp.parent
            if "stages" in d.parts or d.name.startswith(".") or d in seen:
                continue  # stage folders of cache-less runs hold their own metrics.json
            m = json.loads(mp.read_text())
            if "config" not in m:
                continue
            seen.add(d)
            ov = d / ".hydra" / "overrides.yaml"
            overrides = yaml.safe_load(ov.read_text()) if ov.exists() else []
            cfg = m.get("config", {})
            row = {"dir": str(d), "status": "COMPLETED", "overrides": " ".join(overrides or []),
                   "model": cfg.get("model"), "seq_len": cfg.get("seq_len"), "vocab_size": cfg.get("vocab_size"),
                   "k": cfg.get("k"), "seed": cfg.get("seed"), "data": cfg.get("data"),
                   "ranker": m.get("recommend", {}).get("ranker")}
            for col, (stage, key) in COLUMNS.items():
                row[col] = m.get(stage, {}).get(key)
            row["silhouette"] = m.get("personas", {}).get("silhouette")
            rows.append(row)
        if root.is_dir():
            for sp in sorted(root.rglob("job_status.json")):
                s = json.loads(sp.read_text())
                if s.get("status") == "FAILED" and sp.parent not in seen:
                    rows.append({"dir": str(sp.parent), "status": "FAILED", "overrides": " ".join(s["overrides"]),
                                 "error": s.get("error")})
    return rows


def _mode(s):
    s = s.dropna()
    return None if s.empty else s.value_counts().index[0]


def _fix_others(df, keep: tuple[str, ...], relevant: tuple[str, ...]):
    """Rows where every relevant axis not in `keep` equals its most common value (one slice of the grid)."""
    for ax in relevant:
        if ax in keep or ax not in df or df[ax].nunique(dropna=True) <= 1:
            continue
        df = df[df[ax] == _mode(df[ax])]
    return df


def _line_plot(df, x: str, ys: list[tuple[str, str]], by: str, path: Path, title: str, ylabel: str,
               logx: bool = False) -> bool:
    import numpy as np

    d = df.dropna(subset=[x] + [c for c, _ in ys], how="any")
    if d[x].nunique() < 2:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for g, gd in d.groupby(by, dropna=False):
        agg = gd.groupby(x)[[c for c, _ in ys]].mean().sort_index()
        for c, lab in ys:
            ax.plot(agg.index.to_numpy(dtype=float), agg[c].to_numpy(dtype=float), marker="o",
                    label=f"{g} {lab}".strip())
    if logx:
        ax.set_xscale("log", base=2)
        ticks = np.sort(d[x].unique().astype(float))
        ax.set_xticks(ticks, [str(int(t)) for t in ticks])
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def grid_plots(df, out: Path) -> list[str]:
    """PNG plots of the axes the runs actually vary; returns the file names written."""
    made = []
    f1 = [("service_f1_micro", "service F1"), ("page_f1_micro", "page F1")]
    d = _fix_others(df, ("model", "seq_len"), ("vocab_size", "seed"))
    if _line_plot(d, "seq_len", f1, "model", out / "f1_vs_seq_len.png", "Next-service / next-page F1 (micro)",
                  "F1 micro", logx=True):
        made.append("f1_vs_seq_len.png")
    if _line_plot(d, "seq_len", [("finetune_seconds", "")], "model", out / "finetune_time_vs_seq_len.png",
                  "Fine-tuning wall time", "seconds", logx=True):
        made.append("finetune_time_vs_seq_len.png")
    d = _fix_others(df[df["model"] != "bert_base"] if "model" in df else df, ("model", "vocab_size"),
                    ("seq_len", "seed"))
    if _line_plot(d, "vocab_size", f1, "model", out / "f1_vs_vocab_size.png", "F1 vs WordPiece vocabulary",
                  "F1 micro", logx=True):
        made.append("f1_vs_vocab_size.png")
    sil = df.dropna(subset=["silhouette"]) if "silhouette" in df else df.iloc[:0]
    sil = _fix_others(sil, ("model",), ("seq_len", "vocab_size", "seed"))
    if len(sil):
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for model, gd in sil.groupby("model"):
            s = gd.iloc[0]["silhouette"]
            ks = sorted(int(k) for k in s)
            ax.plot(ks, [s[str(k)] if str(k) in s else s[k] for k in ks], marker="o", label=str(model))
        ax.set_xlabel("k")
        ax.set_ylabel("cosine silhouette")
        ax.set_title("Silhouette vs k per model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "silhouette_vs_k.png", dpi=120)
        plt.close(fig)
        made.append("silhouette_vs_k.png")
    rk = df.dropna(subset=["hit@5"]) if "hit@5" in df else df.iloc[:0]
    rk = _fix_others(rk, ("ranker",), ("model", "seq_len", "vocab_size"))
    if len(rk):
        bars = {f"ranker {r}": g["hit@5"].mean() for r, g in rk.groupby("ranker")}
        for b in ("popularity", "cooccurrence", "persona_popularity", "persona_oracle"):
            v = rk.get(f"hit@5_{b}")
            if v is not None and v.notna().any():
                bars[b] = float(v.mean())
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(len(bars)), list(bars.values()), color=["C0" if k.startswith("ranker") else "C7" for k in bars])
        ax.set_xticks(range(len(bars)), list(bars), rotation=30, ha="right", fontsize=8)
        ax.axhline(0.58, ls="--", color="C3", lw=1, label="paper 0.58")
        ax.set_ylabel("Hit@5 (new services)")
        ax.set_title("Hit@5 per ranker and baselines")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "hit5_per_ranker.png", dpi=120)
        plt.close(fig)
        made.append("hit5_per_ranker.png")
    return made


def _claims(df) -> list[str]:
    """One row per experiment: the paper's claim beside ours (only what the runs measured)."""
    rows = []
    ok = df[df["status"] == "COMPLETED"] if "status" in df else df
    # comparisons along one axis hold the others at their most common value, the seed too: a grid runs the extra
    # seeds at one configuration only, and averaging them there would compare a 3-seed mean with single runs
    base = _fix_others(ok, ("model",), ("seq_len", "vocab_size", "seed"))
    by_model = base.groupby("model")[["page_f1_micro", "service_f1_micro"]].mean() if "model" in base else None
    for head, claim in (("page", PAPER["page_f1"]), ("service", PAPER["service_f1"])):
        col = f"{head}_f1_micro"
        if by_model is None or by_model[col].dropna().empty:
            continue
        vals = ", ".join(f"{m} {v:.4f}" for m, v in by_model[col].dropna().items())
        sb = [m for m in by_model.index if m != "bert_base" and not _isnan(by_model.loc[m, col])]
        if "bert_base" in by_model.index and sb and not _isnan(by_model.loc["bert_base", col]):
            rel = by_model.loc[sb[0], col] / by_model.loc["bert_base", col] - 1
            vals += f"; {sb[0]} vs bert_base {rel:+.1%} relative"
        rows.append(f"| next {head} F1 (micro) | {claim} | {vals} |")
    t = _fix_others(ok, ("seq_len", "model"), ("vocab_size", "seed")).dropna(subset=["finetune_seconds"])
    t = t[t["model"] != "bert_base"] if "model" in t else t
    if t["seq_len"].nunique() >= 2:
        g = t.groupby("seq_len")["finetune_seconds"].mean().sort_index()
        lo, hi = g.index[0], g.index[-1]
        work = ""
        for col, what in (("finetune_real_tokens", "real tokens"), ("finetune_padded_slots", "padded slots")):
            w = t.dropna(subset=[col]).groupby("seq_len")[col].mean() if col in t else None
            if w is not None and lo in w and hi in w and w[lo] > 0:
                work += f"; {what} {w[hi] / w[lo]:.1f}x"
        rows.append(f"| fine-tuning time | {PAPER['finetune_time']} | " + ", ".join(f"{int(s)}: {v:.1f} s" for s, v in
                    g.items()) + f"; {int(hi)} / {int(lo)} = {g[hi] / g[lo]:.1f}x{work} |")
    if "k_chosen" in ok and ok["k_chosen"].notna().any():
        ks = ok.dropna(subset=["k_chosen"]).groupby("model")["k_chosen"].agg(lambda s: sorted(set(int(x) for x in s)))
        ari = ok.groupby("model")["ari"].mean() if "ari" in ok else {}
        rows.append(f"| personas | {PAPER['personas']} | " + "; ".join(
            f"{m}: k = {k}, ARI {_f(float(ari.get(m)) if m in ari else None)}" for m, k in ks.items()) + " |")
    if "hit@5" in ok and ok["hit@5"].notna().any():
        rk = _fix_others(ok.dropna(subset=["hit@5"]), ("ranker",), ("model", "seq_len", "vocab_size"))
        # one value per seed: jobs of other grids with the same seed and ranker repeat the same cached result
        parts = [f"{r} {_mean_sd(g.drop_duplicates('seed')['hit@5'] if 'seed' in g else g['hit@5'])}"
                 for r, g in rk.groupby("ranker")]
        for b in ("popularity", "cooccurrence", "persona_popularity", "persona_oracle"):
            c = f"hit@5_{b}"
            if c in rk and rk[c].notna().any():
                parts.append(f"{b} {_mean_sd(rk.drop_duplicates('seed')[c] if 'seed' in rk else rk[c])}")
        rows.append(f"| new-service Hit@5 | {PAPER['hit@5']} | " + ", ".join(parts) + " |")
    v = _fix_others(ok[ok["model"] != "bert_base"], ("vocab_size", "model"), ("seq_len", "seed")).dropna(
        subset=["service_f1_micro"])
    if v["vocab_size"].nunique() >= 2:
        g = v.groupby("vocab_size")[["vocab_actual", "service_f1_micro"]].mean().sort_index()
        rows.append("| vocabulary size | 30k WordPiece vocabulary (no ablation) | " + ", ".join(
            f"{int(s)} (actual {_f(a if a == a else None, 0)}): {f:.4f}" for s, (a, f) in g.iterrows()) + " |")
    return rows


def _mean_sd(v) -> str:
    """'mean' for one value, 'mean ± sd (n seeds)' for several (sample standard deviation)."""
    v = v.dropna().astype(float)
    if len(v) <= 1:
        return f"{v.mean():.4f}" if len(v) else ""
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f} (n={len(v)})"


SEED_METRICS = ("hit@5", "hit@5_popularity", "hit@5_cooccurrence", "hit@5_persona_popularity", "service_f1_micro",
                "page_f1_micro", "ari")


def seed_spread(df) -> list[str]:
    """Markdown table of every configuration run with several seeds: mean ± sd over seeds per metric."""
    ok = df[df["status"] == "COMPLETED"]
    keys = [c for c in ("model", "seq_len", "vocab_size", "ranker") if c in ok]
    if "seed" not in ok or ok["seed"].nunique(dropna=True) < 2:
        return []
    mets = [m for m in SEED_METRICS if m in ok and ok[m].notna().any()]
    lines = ["## Spread over seeds", "", "Mean ± sample standard deviation over the seeds of each configuration.", "",
             "| " + " | ".join(keys + ["seeds"] + mets) + " |", "|" + "---|" * (len(keys) + 1 + len(mets))]
    for k, g in ok.groupby(keys, dropna=False):
        g = g.drop_duplicates("seed")  # the same configuration and seed in two grids is one cached result
        if len(g) < 2:
            continue
        k = k if isinstance(k, tuple) else (k,)
        lines.append("| " + " | ".join([_cell(x) for x in k] + [str(g["seed"].nunique())] +
                                        [_mean_sd(g[m]) for m in mets]) + " |")
    return lines + [""] if len(lines) > 6 else []


def _cell(x) -> str:
    if _isnan(x) or x == "":
        return ""
    if isinstance(x, float) and x.is_integer() and abs(x) >= 1:
        return str(int(x))
    return _f(float(x)) if isinstance(x, float) else str(x)


def _isnan(x) -> bool:
    return x is None or x != x


def write_grid_report(paths, out: Path | None = None) -> Path:
    """report.md + results.csv + PNG plots over the runs below `paths`, written into `out` (default: the first)."""
    import pandas as pd

    paths = [Path(p) for p in paths]
    out = Path(out) if out else paths[0]
    out.mkdir(parents=True, exist_ok=True)
    rows = collect_runs(paths)
    if not rows:
        raise SystemExit(f"no metrics.json below {', '.join(map(str, paths))}")
    df = pd.DataFrame(rows)
    for c in ("model", "seq_len", "vocab_size", "ranker", "status", "hit@5", "service_f1_micro", "page_f1_micro",
              "finetune_seconds", "vocab_actual", "k_chosen", "ari", "silhouette"):
        if c not in df:
            df[c] = None
    df.drop(columns=["silhouette"]).to_csv(out / "results.csv", index=False)
    done = df[df["status"] == "COMPLETED"]
    plots = grid_plots(done, out)
    lines = ["# SessionBERT grid report", "",
             f"{len(done)} runs ({(df['status'] == 'FAILED').sum()} failed) from " + ", ".join(f"`{p}`" for p in paths),
             "", "| experiment | paper | ours |", "|---|---|---|", *_claims(df), ""]
    cols = [c for c in ("overrides", "model", "seq_len", "vocab_size", "ranker", "seed", "mlm_loss", "service_f1_micro",
                        "page_f1_micro", "finetune_seconds", "k_chosen", "ari", "hit@5", "hit@5_popularity",
                        "hit@5_cooccurrence", "hit@5_persona_popularity", "status") if c in df]
    lines += seed_spread(df)
    lines += ["## Runs", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
    lines.append("")
    for p in plots:
        lines += [f"![{p[:-4]}]({p})", ""]
    lines.append("Each plot holds the other axes at their most common value in these runs; results.csv has every run.")
    rp = out / "report.md"
    rp.write_text("\n".join(lines) + "\n")
    return rp


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="report.md, results.csv and plots over run / multirun dirs")
    ap.add_argument("runs", nargs="+", help="run or multirun dirs (every metrics.json below them)")
    ap.add_argument("--out", default=None, help="where to write (default: the first dir)")
    a = ap.parse_args(argv)
    print(write_grid_report(a.runs, a.out))


if __name__ == "__main__":
    main()
