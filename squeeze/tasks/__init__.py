"""Task kinds, one module each: `classification`, `tokens` (NER), `lm` (causal LM and LAMBADA's last word),
`mlm` (masked LM: an encoder's pre-training), `choice` (multiple choice for causal LMs: HellaSwag, StoryCloze), `dialog/` (persona dialog); on `base` (what
they share), `prompts` (a scored example as a causal LM's prompt: few-shot demonstrations, cutting to fit) and
`sources` (raw splits from the hub or files). LAMBADA and the multiple-choice tasks take `shots` (k solved
examples before each scored one, drawn with the run's seed; 0 by default).

A task kind provides, and the run (squeeze/run/recipe.py), the compressors and the measurements rely on no more:

- A data module subclassing `base.TaskData`, built from `task.data` with `tokenizer=` and `seed=` (the run's)
  added. It defines `encode(rows, split)` (a split's raw rows -> a list of examples), `collate(features)` (->
  a batch of tensors: `input_ids`, `attention_mask`, `labels`, nothing else the model would not take but the
  scoring keys of `base.SCORING_KEYS`) and `input_length` (the longest input; `length_key` names its setting).
  TaskData supplies the rest: `setup` (-> `datasets`, split -> examples), the loaders (train resumable mid-
  epoch), `check_model` (inputs fit the model's context), `calibration_source(files)` (post-training calibration's
  samples: the train split, or calibration.data_files read as the task's files) and `has_train_split` (not
  so for evaluate.py's one scored file); `tokenizer` is swapped for a saved model's own when evaluating.
  Optional: `labels` (class names the head is built with; `base._Labelled` reads them), `protocol_record`
  (the record's `perplexity` entry), `generation_prompts(split, count)` (speculative decoding's prompts).
- A LightningModule subclassing `base.FineTune`, built from `task.module` with `model=` and the `optimizer=` /
  `scheduler=` partials: `make_metrics()`, `update_metrics(metrics, batch, outputs)`, and where the defaults do
  not fit `compute_metrics`, `task_loss`, `eval_outputs`, `wants_hidden_states` (distillation wraps a task
  module through these, so its metrics and loss parts hold under kd).
- Its metrics: torchmetrics where it has them, written in the task's module where it does not.
- A YAML in conf/task/: `name`, `head` (sequence_classification | token_classification | causal_lm: the Auto
  class the model is built with), `monitor` (a `val/...` metric: the best checkpoint, validation.best, a
  teacher's best-of pick) and `monitor_mode` (min | max), `module` and `data` (each a `_target_` and its
  settings; `data` with `batch_size`, `eval_batch_size` and `max_examples: {train, validation, test}`, the
  settings the run checks before loading and the overrides tests and sweeps set).
"""
