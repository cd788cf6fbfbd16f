"""Evaluate a trained run, a saved model or a pretrained model on a task; write result.json.

    python evaluate.py ckpt=outputs/minilm/rotten_tomatoes/<time>      # a squeeze run
    python evaluate.py model=smollm2 task=austen                       # zero-shot perplexity
    python evaluate.py model=smollm2 task=austen task.data.protocol=sliding task.data.stride=128
"""

import hydra
from omegaconf import DictConfig

from squeeze import config
from squeeze.errors import SqueezeError, main_exit


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    config.runs_started()
    try:
        config.check_before_loading(cfg)  # compressor settings, the model directory, optimizer and scheduler
    except SqueezeError as e:
        main_exit(e)
    # Imported here, not above: `--help` and a bad setting need no Lightning or transformers (seconds).
    from squeeze import run
    from squeeze.hardware import safe_load
    from squeeze.run.summary import print_summary

    try:
        with safe_load.trusting(cfg.get(safe_load.FLAG)):
            record = run.evaluate(cfg)
    except SqueezeError as e:
        main_exit(e)
    print_summary(record)


if __name__ == "__main__":
    config.run_entry(main)  # lenient compress.<name>.<key> / model.name_or_path; Hydra's errors as one line
