"""Run report: `report.md` with our numbers beside the paper's claims, and a silhouette-vs-k plot."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

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
