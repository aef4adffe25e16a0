"""Every shipped config composes and validates; bad values fail at start-up naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from sessionbert.config import ConfigError, validate

from .conftest import CONF, make_cfg

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in Path(CONF).iterdir() if g.is_dir()}


def _all_options():
    for group, options in GROUPS.items():
        for opt in options:
            if group in ("hydra", "paths"):
                continue
            yield f"{group}={opt}"


@pytest.mark.parametrize("override", list(_all_options()))
def test_config_validation_every_shipped_config_composes(tmp_path, override):
    extra = ["data.path=" + str(tmp_path)] if override == "data=events" else []
    cfg = make_cfg(tmp_path, [override] + extra)
    validate(cfg)


def test_config_validation_default_knobs_are_top_level(tmp_path):
    cfg = make_cfg(tmp_path, ["seq_len=256", "vocab_size=5000", "k=4"])
    assert cfg.tokenizer.vocab_size == 5000 and cfg.personas.k == 4 and cfg.seq_len == 256


@pytest.mark.parametrize(
    "override, key",
    [
        ("seq_len=0", "seq_len"),
        ("seq_len=1024", "seq_len"),
        ("seq_len=64.5", "seq_len"),
        ("vocab_size=4", "vocab_size"),
        ("k=1", "k"),
        ("pretrain.mlm_probability=1.5", "pretrain.mlm_probability"),
        ("pretrain.mlm_probability=0", "pretrain.mlm_probability"),
        ("model.arch=huge", "model.arch"),
        ("data.size=enormous", "data.size"),
        ("recommend.ranker=magic", "recommend.ranker"),
        ("stage=nonsense", "stage"),
        ("personas.k_range=[1,2]", "personas.k_range"),
    ],
)
def test_config_validation_bad_value_names_key(tmp_path, override, key):
    cfg = make_cfg(tmp_path, [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_config_validation_seq_len_above_pretrained_positions(tmp_path):
    cfg = make_cfg(tmp_path, ["model=bert_base", "seq_len=1024"])
    with pytest.raises(ConfigError, match="seq_len"):
        validate(cfg)


def test_config_validation_unknown_key_is_refused(tmp_path):
    with pytest.raises(ConfigCompositionException, match="no_such_knob"):
        make_cfg(tmp_path, ["no_such_knob=3"])


def test_config_validation_events_needs_existing_path(tmp_path):
    with pytest.raises(ConfigError, match="data.path"):
        validate(make_cfg(tmp_path, ["data=events"]))
    with pytest.raises(ConfigError, match="data.path: .*does not exist"):
        validate(make_cfg(tmp_path, ["data=events", f"data.path={tmp_path}/nope.parquet"]))
