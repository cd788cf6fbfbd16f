"""Fine-tune (and, with compress=..., compress) a model on a task; write <run dir>/result.json.

    python train.py                                   # minilm on rotten_tomatoes, CPU
    python train.py model=tiny_gpt2 task=austen trainer.max_steps=50
    python train.py -m model=tiny_bert,tiny_gpt2 task=rotten_tomatoes,wnut16   # a sweep
"""

import sys

import hydra
from omegaconf import DictConfig

from squeeze import run
from squeeze.config import lenient_compressor_settings
from squeeze.errors import SqueezeError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        record = run.train(cfg)
    except SqueezeError as e:
        run.main_exit(e)
    run.print_summary(record)
    # A number for Hydra sweepers that optimise (e.g. Optuna): the monitored metric, on test.
    return record["metrics"].get(cfg.task.monitor.replace("val/", "test/"))


if __name__ == "__main__":
    sys.argv[1:] = lenient_compressor_settings(sys.argv[1:])  # compress.<name>.<key>=v for a mixed sweep
    main()
