"""Entry point: `python train.py [overrides]` runs the SessionBERT pipeline (see conf/train.yaml)."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from sessionbert.pipeline import run_pipeline

    run_pipeline(cfg)


if __name__ == "__main__":
    main()
