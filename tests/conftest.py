"""Shared fixtures: compose the real Hydra config (as train.py does) with a tmp output and cache dir."""
from __future__ import annotations

import os
from pathlib import Path

import sessionbert  # noqa: F401  first: sets OMP_WAIT_POLICY=PASSIVE before anything loads torch (see sessionbert/__init__.py)
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_cfg(tmp_path: Path, overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


def experiment_module(name: str):
    """The script experiments/<name>.py loaded as a module (experiments/ is not a package): its functions in-process."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda overrides=(): make_cfg(tmp_path, overrides)
