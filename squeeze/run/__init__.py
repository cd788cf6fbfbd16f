"""The run: one recipe that train.py and evaluate.py share (squeeze.run.recipe), and what it needs around it.

  recipe     build, fit, finalize the chain, test, measure, save, record: one run top to bottom
  build      config → model spec, tokenizer, data, compressor chain, LightningModule, Trainer
  cell       what Hydra says about this run (the one reader of HydraConfig besides the entry points and the
             sweeper) and a sweep rerun's bookkeeping: skip, resume or move aside what the cell's directory holds
  guard      the record written whatever happens, loggers closed, the one-line exit
  baselines  the store of fine-tuned baselines (post-training cells and teacher=auto start from them)
  cost       what a row cost (own, total, inference)
  summary    what a finished run prints, and its figures for loggers
  loggers    W&B and the other loggers' factories, and what a run tells W&B
  sweep      which cells a sweep has (squeeze's Hydra sweeper, hydra_plugins/squeeze_sweeper, uses it)
  search     which trials a search asks Optuna for, its study (study.db) and front (pareto.json)
  plan       what a sweep would run, said before it runs (python -m squeeze.plan)

`from squeeze import run; run.train(cfg)` works as before; the recipe (Lightning, transformers) is imported only
when a run starts, so the report, the sweeper plugin and the loggers' W&B helpers stay light.
"""

from __future__ import annotations

from typing import Any


def train(cfg) -> dict[str, Any]:
    """train.py's run (squeeze.run.recipe.train)."""
    from squeeze.run import recipe

    return recipe.train(cfg)


def evaluate(cfg) -> dict[str, Any]:
    """evaluate.py's run (squeeze.run.recipe.evaluate)."""
    from squeeze.run import recipe

    return recipe.evaluate(cfg)
