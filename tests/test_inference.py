"""Issue 7: a trained run used from Python (`SessionBERT`) and from the `sessionbert` command, and exported.

One module-scoped smoke run; the command reproduces the pipeline's Hit@5 on the pipeline's own users."""
from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sessionbert.cli import main
from sessionbert.data.split import used_and_adopted
from sessionbert.inference import COLUMNS, SKIP_NO_HISTORY, MissingRunFileError, SessionBERT
from sessionbert.pipeline import Run, run_pipeline
from sessionbert.recommend.metrics import hit_at_k

from .conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke_inference")
    cfg = make_cfg(tmp, ["experiment=smoke"])
    m = run_pipeline(cfg)
    run = Run(cfg)
    run.stage_dirs = {k: Path(v) for k, v in m["stage_dirs"].items()}
    return tmp / "run", run, m


@pytest.fixture(scope="module")
def model(smoke):
    return SessionBERT.from_run(smoke[0], device="cpu")


def test_cli_recommend_reproduces_pipeline_hit_at_5(smoke, tmp_path, capsys):
    run_dir, run, m = smoke
    corpus = run.corpus()
    d = run.stage_dirs["data"]
    out = tmp_path / "recs.parquet"
    args = ["recommend", "--run", str(run_dir), "--events", str(d / "events.parquet"), "--out", str(out),
            "--cutoff", str(corpus.split.test_start), "--batch-users", "64"]
    if (d / "billing.parquet").exists():
        args += ["--billing", str(d / "billing.parquet")]
    assert main(args) == 0
    df = pd.read_parquet(out)
    assert list(df.columns) == list(COLUMNS) and df["user_id"].is_unique
    _, adopted = used_and_adopted(corpus.events, corpus.split)
    top = {u: list(s) for u, s in zip(df["user_id"], df["new_services"])}
    assert hit_at_k(top, adopted, 5) == m["recommend"]["hit@5"]
    # same recommendations as the pipeline's, and the same persona clusters as stage_personas
    pipe = pd.read_parquet(run.stage_dirs["recommend"] / "recommendations.parquet")
    for u, services in pipe.sort_values("rank").groupby("user_id")["service"]:
        assert top[u] == list(services)
    scored = df[df["skipped_reason"].isna()].set_index("user_id")
    users = pd.read_parquet(run.stage_dirs["personas"] / "users.parquet").set_index("user_id")
    assert len(scored) == len(users) == m["recommend"]["users_with_history"]
    assert (scored.loc[users.index, "cluster"].to_numpy() == users["cluster"].to_numpy()).all()
    if "persona" in users:
        assert (scored.loc[users.index, "persona"].to_numpy() == users["persona"].to_numpy()).all()
    assert scored["persona_similarity"].between(-1, 1.0001).all()
    assert all(len(p) == 5 for p in scored["next_pages"])
    for c in scored["new_service_counts"]:
        assert all(1 <= n <= 8 for n in c)
    n_skip = int(df["skipped_reason"].notna().sum())
    assert (df.loc[df["skipped_reason"].notna(), "skipped_reason"] == SKIP_NO_HISTORY).all()
    err = capsys.readouterr().err
    assert f"{len(scored)} users scored, {n_skip} skipped" in err


def test_cli_streamed_parquet_equals_whole_read(smoke, tmp_path):
    """A Parquet input is streamed a batch of users at a time (io.iter_events_by_user); --no-stream reads it
    whole: the two outputs are identical."""
    run_dir, run, _ = smoke
    d = run.stage_dirs["data"]
    outs = []
    for extra in ([], ["--no-stream"]):
        out = tmp_path / f"recs{len(extra)}.parquet"
        assert main(["recommend", "--run", str(run_dir), "--events", str(d / "events.parquet"), "--out", str(out),
                     "--batch-users", "50", *extra]) == 0
        outs.append(pd.read_parquet(out).sort_values("user_id").reset_index(drop=True))
    pd.testing.assert_frame_equal(outs[0], outs[1])


def test_api_jsonl_cutoff_unknown_services_and_batches(model, smoke, tmp_path, capsys):
    ev = pd.DataFrame({
        "user_id": ["a", "a", "a", "b", "b"],
        "session_id": ["a1", "a1", "a2", "b1", "b1"],
        "timestamp": ["2024-01-01T10:00:00Z", "2024-01-01T10:01:00Z", "2024-01-03T09:00:00Z",
                      "2024-02-01T10:00:00Z", "2024-02-01T10:02:00Z"],
        "service": ["Compute Engine", "Totally New Service", "Object Storage", "Compute Engine", "Logging"],
        "page": ["compute/home", "zz/unseen-page", "storage/home", "compute/home", "logging/home"],
    })
    p = tmp_path / "events.csv"
    ev.to_csv(p, index=False)
    out = tmp_path / "out.jsonl"
    assert main(["recommend", "--run", str(smoke[0]), "--events", str(p), "--out", str(out),
                 "--cutoff", "2024-01-15", "--batch-users", "1", "--device", "cpu"]) == 0
    rows = {r["user_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["b"]["skipped_reason"] == SKIP_NO_HISTORY and rows["b"]["new_services"] == []
    a = rows["a"]
    assert a["skipped_reason"] is None and a["n_sessions"] == 2 and a["cluster"] is not None
    assert not {"Compute Engine", "Object Storage", "Totally New Service"} & set(a["new_services"])
    assert "1 users scored, 1 skipped (1 no sessions before the cut-off)" in capsys.readouterr().err
    # the API: no cut-off = every session; batches give the same rows as one call
    whole = model.predict(ev)
    assert whole["skipped_reason"].isna().all()
    parts = pd.concat(list(model.predict_batches(ev, batch_users=1)), ignore_index=True)
    pd.testing.assert_frame_equal(whole.drop(columns="persona_similarity"), parts.drop(columns="persona_similarity"))


def test_missing_run_pieces_and_bad_input_are_named(smoke, tmp_path, capsys):
    run_dir = smoke[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(run_dir / "metrics.json", broken / "metrics.json")
    with pytest.raises(MissingRunFileError, match="run_config.yaml"):
        SessionBERT.from_run(broken)
    shutil.copy(run_dir / "run_config.yaml", broken / "run_config.yaml")
    m = json.loads((run_dir / "metrics.json").read_text())
    m["stage_dirs"]["personas"] = str(tmp_path / "gone")
    (broken / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(MissingRunFileError, match="gone"):
        SessionBERT.from_run(broken)
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,session_id,timestamp,service,page\n"
                   "u1,s1,2024-01-01T00:00:00Z,Compute,compute/home\n"
                   "u1,s1,not-a-time,Compute,compute/list\n")
    assert main(["recommend", "--run", str(run_dir), "--events", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "events.csv:3" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()
    assert main(["recommend", "--run", str(broken), "--events", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "gone" in capsys.readouterr().err


def test_export_onnx_without_onnx_installed_says_what_to_install(smoke, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert main(["export", "--run", str(smoke[0]), "--out", str(tmp_path / "e"), "--onnx"]) == 2
    assert "onnx not installed (pip install 'sessionbert[onnx]')" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before anything was written


def test_export_hf_and_onnx_match_torch(model, smoke, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "export"
    assert main(["export", "--run", str(smoke[0]), "--out", str(out), "--onnx"]) == 0
    hf = AutoModel.from_pretrained(str(out), add_pooling_layer=False, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    texts = ["region eu-west [EVT] compute engine : instances . launch",
             "region us [EVT] home : home [EVT] 漢字 service : 漢字 page"]  # unseen characters
    b, b0 = tok(texts, padding=True, return_tensors="pt"), model.tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(b["input_ids"], b0["input_ids"]) and tok.unk_token_id in b["input_ids"][1].tolist()  # [UNK]
    with torch.no_grad():
        ref = model.module.encoder(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"]).last_hidden_state
        got = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    assert torch.allclose(got, ref, atol=1e-6)

    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for batch, seq in ((1, 5), (3, 57)):  # other shapes than the export's (2, 16): dynamic axes
        ids = torch.randint(6, len(model.tok), (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, seq // 2:] = 0
        o = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            r = model.module.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        assert o.shape == r.shape and np.abs(o - r).max() < 1e-4


def test_console_script_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sessionbert"] == "sessionbert.cli:main"
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def _sorted_events(run):
    d = run.stage_dirs["data"]
    ev = pd.read_parquet(d / "events.parquet").sort_values(["user_id", "session_id", "timestamp"], kind="stable")
    bill = pd.read_parquet(d / "billing.parquet") if (d / "billing.parquet").exists() else None
    return ev.reset_index(drop=True), bill


def test_streamed_splits_and_workers_equal_whole_predict(model, smoke, tmp_path):
    """A Parquet file with small row groups, so users straddle them: splits of whole row groups (read on past a
    split's end until its last user ends, skipping a user begun before it), in this process and in 2 worker
    processes, give exactly `predict`'s rows on the whole table."""
    import pyarrow.parquet as pq

    _, run, _ = smoke
    ev, bill = _sorted_events(run)
    keep = ev["user_id"].drop_duplicates().iloc[:60]  # 60 users: one session per encoder batch below is slow
    ev = ev[ev["user_id"].isin(keep)].reset_index(drop=True)
    bill = None if bill is None else bill[bill["user_id"].isin(keep)]
    path = tmp_path / "events.parquet"
    pq.write_table(pa_table(ev), path, row_group_size=97)
    bpath = None
    if bill is not None:
        bpath = tmp_path / "billing.parquet"
        pq.write_table(pa_table(bill.sort_values("user_id", kind="stable")), bpath, row_group_size=50)
    assert pq.ParquetFile(path).metadata.num_row_groups > 20 and len(keep) == 60
    cut = run.corpus().split.test_start
    # one session per encoder batch: outputs then do not depend on which sessions share a batch (padding width
    # changes float rounding in the last bits, which can swap near-tied services), so equality is exact
    model.max_tokens, max_tokens = 1, model.max_tokens
    try:
        whole = model.predict(ev, bill, cut).sort_values("user_id").reset_index(drop=True)
        outs = {w: list(model.recommend_file(path, bpath, cut, workers=w, batch_rows=300)) for w in (0, 2)}
    finally:
        model.max_tokens = max_tokens
    from sessionbert.inference import _frame

    for workers, tables in outs.items():
        assert len(tables) > 5
        got = pd.concat([_frame(t) for t in tables], ignore_index=True)
        assert got["user_id"].is_unique and len(got) == len(whole)
        got = got.sort_values("user_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(got.drop(columns=["persona_similarity", "new_service_scores", "next_page_probs"]),
                                      whole.drop(columns=["persona_similarity", "new_service_scores", "next_page_probs"]))
        np.testing.assert_allclose(got["persona_similarity"], whole["persona_similarity"], atol=1e-5)
        for c in ("new_service_scores", "next_page_probs"):
            for x, y in zip(got[c], whole[c]):
                np.testing.assert_allclose(x, y, atol=1e-5)


def pa_table(df):
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False)


def test_split_reading_names_a_user_found_twice(model, smoke, tmp_path):
    import pyarrow.parquet as pq

    from sessionbert.data.io import BadInputError

    _, run, _ = smoke
    ev, _ = _sorted_events(run)
    first = ev["user_id"].iloc[0]
    rows = ev[ev["user_id"] == first]
    bad = pd.concat([ev, rows.iloc[:1]], ignore_index=True)  # the first user again, at the very end
    path = tmp_path / "events.parquet"
    pq.write_table(pa_table(bad), path, row_group_size=500)
    with pytest.raises(BadInputError, match=rf"row {len(bad)}\b.*{first}"):
        list(model.recommend_file(path, None, None, workers=0, batch_rows=1000))


def _first_users(run, n: int = 60):
    ev, bill = _sorted_events(run)
    keep = ev["user_id"].drop_duplicates().iloc[:n]
    ev = ev[ev["user_id"].isin(keep)].reset_index(drop=True)
    bill = None if bill is None else bill[bill["user_id"].isin(keep)].reset_index(drop=True)
    return ev, bill


def test_streamed_csv_and_jsonl_equal_whole_predict(model, smoke, tmp_path):
    """CSV and JSONL inputs are streamed in blocks of a few rows (users straddle blocks and batches and are
    carried whole into the next batch), in this process and with 2 worker processes, with a CSV billing table read
    whole or a Parquet one read per batch: exactly `predict`'s rows on the whole table."""
    import pyarrow.parquet as pq

    from sessionbert.inference import _frame

    _, run, _ = smoke
    ev, bill = _first_users(run)
    csv_path, jsonl_path = tmp_path / "events.csv", tmp_path / "events.jsonl"
    ev.to_csv(csv_path, index=False)
    ev.to_json(jsonl_path, orient="records", lines=True, date_format="iso", date_unit="ms")
    bills = {"csv": None, "jsonl": None}
    if bill is not None:
        bills["csv"] = tmp_path / "billing.csv"
        bill.to_csv(bills["csv"], index=False)
        bills["jsonl"] = tmp_path / "billing.parquet"
        pq.write_table(pa_table(bill.sort_values("user_id", kind="stable")), bills["jsonl"], row_group_size=50)
    block = 1 << 16  # ~600 rows: users (~200 rows each here) straddle blocks, and batches of 500 rows
    assert len(ev) > 10_000 and csv_path.stat().st_size > 10 * block
    cut = run.corpus().split.test_start
    model.max_tokens, max_tokens = 1, model.max_tokens  # exact equality: see the Parquet test above
    try:
        whole = model.predict(ev, bill, cut).sort_values("user_id").reset_index(drop=True)
        outs = {(fmt, w): list(model.recommend_file(path, bills[fmt], cut, workers=w, batch_rows=500,
                                                       block_bytes=block))
                for fmt, path, w in (("csv", csv_path, 0), ("jsonl", jsonl_path, 0), ("jsonl", jsonl_path, 2))}
    finally:
        model.max_tokens = max_tokens
    approx = ["persona_similarity", "new_service_scores", "next_page_probs"]
    for key, tables in outs.items():
        assert len(tables) > 5, key
        got = pd.concat([_frame(t) for t in tables], ignore_index=True)
        assert got["user_id"].is_unique and len(got) == len(whole), key
        got = got.sort_values("user_id").reset_index(drop=True)
        pd.testing.assert_frame_equal(got.drop(columns=approx), whole.drop(columns=approx))
        np.testing.assert_allclose(got["persona_similarity"], whole["persona_similarity"], atol=1e-5)
        for c in approx[1:]:
            for x, y in zip(got[c], whole[c]):
                np.testing.assert_allclose(x, y, atol=1e-5)


def test_cli_streamed_text_errors_name_file_and_line(smoke, tmp_path, capsys):
    """A bad value late in a streamed CSV, and a user found twice in a JSONL file: exit 2, `file:line: reason` on
    stderr (physical lines, the CSV header being line 1), no output file left."""
    run_dir, run, _ = smoke
    ev, _ = _first_users(run, 30)
    out = tmp_path / "o.parquet"
    csv_path = tmp_path / "events.csv"
    ev.to_csv(csv_path, index=False)
    lines = csv_path.read_text().splitlines()
    bad = len(lines) - 3  # a late line (1-based), past many blocks and batches
    cells = lines[bad - 1].split(",")
    cells[list(ev.columns).index("timestamp")] = "2023-02-30T10:00:00Z"
    lines[bad - 1] = ",".join(cells)
    csv_path.write_text("\n".join(lines) + "\n")
    args = ["recommend", "--run", str(run_dir), "--out", str(out), "--batch-rows", "40", "--device", "cpu"]
    assert main([*args, "--events", str(csv_path)]) == 2
    err = capsys.readouterr().err
    assert f"{csv_path}:{bad}: bad timestamp: cannot parse '2023-02-30T10:00:00Z'" in err and not out.exists()

    first = ev["user_id"].iloc[0]
    again = pd.concat([ev, ev[ev["user_id"] == first].iloc[:1]], ignore_index=True)  # at the very end
    jsonl_path = tmp_path / "events.jsonl"
    again.to_json(jsonl_path, orient="records", lines=True, date_format="iso", date_unit="ms")
    assert main([*args, "--events", str(jsonl_path)]) == 2
    err = capsys.readouterr().err
    assert f"{jsonl_path}:{len(again)}: user '{first}' reappears after its rows ended" in err and not out.exists()


def test_packed_scoring_equals_padded(smoke, tmp_path):
    """`--packed` (sessions end to end, per-session attention; on CPU the padded-SDPA fallback of the varlen
    kernel) gives the padded pass's outputs: same recommendations and clusters, probabilities and embeddings equal
    to float tolerance. Also through the command line."""
    from sessionbert.score import pack_rows

    ids, offsets = np.arange(10), np.array([0, 3, 3, 7, 10])
    flat, pos, cu = pack_rows(ids, offsets, np.array([2, 0, 3]))
    assert flat.tolist() == [3, 4, 5, 6, 0, 1, 2, 7, 8, 9] and pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert cu.tolist() == [0, 4, 7, 10]
    run_dir, run, m = smoke
    d = run.stage_dirs["data"]
    cutoff = str(run.corpus().split.test_start)
    outs = {}
    for packed in (False, True):
        out = tmp_path / f"recs_{packed}.parquet"
        args = ["recommend", "--run", str(run_dir), "--events", str(d / "events.parquet"), "--out", str(out),
                "--cutoff", cutoff, "--device", "cpu", "--workers", "0"] + (["--packed"] if packed else [])
        if (d / "billing.parquet").exists():
            args += ["--billing", str(d / "billing.parquet")]
        assert main(args) == 0
        outs[packed] = pd.read_parquet(out)
    a, b = outs[False], outs[True]
    assert len(a) > 50
    for col in ("user_id", "cluster", "n_sessions", "new_service_counts", "next_pages", "skipped_reason"):
        assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), col
    assert [list(x) for x in a["new_services"]] == [list(x) for x in b["new_services"]]
    for col in ("new_service_scores", "next_page_probs"):
        np.testing.assert_allclose(np.concatenate(a[col].to_numpy()), np.concatenate(b[col].to_numpy()), atol=1e-5)
    np.testing.assert_allclose(a["persona_similarity"].to_numpy(), b["persona_similarity"].to_numpy(), atol=1e-5)


def test_packed_scoring_default_is_cuda_only(monkeypatch):
    """packed=None (the default of `score_users`, `SessionBERT`, `score_all.packed`, `sessionbert recommend`): the
    padding-free pass where the varlen kernel exists, the padded one on a CPU (the fallback is slower there)."""
    import torch

    import sessionbert.models.packed as P
    from sessionbert.cli import build_parser
    from sessionbert.score import use_packed

    cpu = torch.device("cpu")
    assert use_packed(None, cpu) is False and use_packed(True, cpu) is True and use_packed(False, cpu) is False
    monkeypatch.setattr(P, "has_varlen_kernel", lambda device: True)
    assert use_packed(None, cpu) is True and use_packed(False, cpu) is False
    base = ["recommend", "--run", "r", "--events", "e", "--out", "o"]
    p = build_parser()
    assert p.parse_args(base).packed is None
    assert p.parse_args(base + ["--packed"]).packed is True and p.parse_args(base + ["--no-packed"]).packed is False
