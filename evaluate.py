"""Evaluate a trained run, a saved model or a pretrained model on a task; write result.json.

    python evaluate.py ckpt=outputs/minilm/rotten_tomatoes/<time>      # a squeeze run
    python evaluate.py model=smollm2 task=austen                       # zero-shot perplexity
    python evaluate.py model=smollm2 task=austen task.data.protocol=sliding task.data.stride=128
"""

import sys

import hydra
from omegaconf import DictConfig

from squeeze import run
from squeeze.config import lenient_compressor_settings
from squeeze.errors import SqueezeError


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        record = run.evaluate(cfg)
    except SqueezeError as e:
        run.main_exit(e)
    run.print_summary(record)


if __name__ == "__main__":
    sys.argv[1:] = lenient_compressor_settings(sys.argv[1:])  # compress.<name>.<key>=v for a mixed sweep
    main()
