"""Fine-tune (and, with compress=..., compress) a model on a task; write <run dir>/result.json.

    python train.py                                   # minilm on rotten_tomatoes, CPU
    python train.py model=tiny_gpt2 task=austen trainer.max_steps=50
    python train.py -m model=tiny_bert,tiny_gpt2 task=rotten_tomatoes,wnut16   # a sweep
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from squeeze import config
from squeeze.errors import SqueezeError, main_exit


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    config.runs_started()
    try:
        # compressor settings, the model directory, optimizer and scheduler; search settings only in a sweep
        config.check_before_loading(cfg, sweep=HydraConfig.get().mode == RunMode.MULTIRUN)
    except SqueezeError as e:
        main_exit(e)
    # Imported here, not above: `--help` and a bad setting need no Lightning or transformers (seconds).
    from squeeze import run
    from squeeze.hardware import safe_load
    from squeeze.run.summary import print_summary

    try:
        with safe_load.trusting(cfg.get(safe_load.FLAG)):
            record = run.train(cfg)
    except SqueezeError as e:
        main_exit(e)
    print_summary(record)
    # A number for Hydra sweepers that optimise (e.g. Optuna): the monitored metric, on test.
    return record["metrics"].get(cfg.task.monitor.replace("val/", "test/"))


if __name__ == "__main__":
    config.run_entry(main)  # lenient compress.<name>.<key> / model.name_or_path; Hydra's errors as one line
