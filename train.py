"""Entry point: `python train.py [overrides]` runs the SessionBERT pipeline (see conf/train.yaml)."""
import hydra
from omegaconf import DictConfig

from sessionbert.grid import register_resolvers

register_resolvers()  # ${sessionbert_n_gpus:} in conf/hydra/launcher/joblib_gpu.yaml


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    from sessionbert.grid import pin_gpu_for_job, run_job_safely

    pin_gpu_for_job(cfg)  # multirun on several GPUs: one GPU per job, before anything initialises CUDA
    from sessionbert.pipeline import run_pipeline

    # in a multirun a failing job returns a JobFailure (logged in its own log) and the sweep goes on;
    # sessionbert.grid.FailureSummary lists the failures at the end and exits non-zero
    return run_job_safely(run_pipeline, cfg)


if __name__ == "__main__":
    main()
