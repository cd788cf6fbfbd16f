"""Masked language modelling (issue 27: the encoder's pre-training objective, pruned during it by the thesis):
BERT's masking rule, fixed evaluation masks, and a tiny BERT that learns it, pruned, through train.py."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForMaskedLM

from squeeze import formats, run
from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX
from squeeze.tasks.mlm import MaskedLanguageModelingData, mask_tokens

from conftest import compose_cfg, fast, read_result, tiny_tokenizer


def test_bert_masking_rule_over_many_tokens():
    special, mask_id, vocab = {0, 1}, 2, 1000
    ids = [0] + [random.Random(i).randrange(3, vocab) for i in range(20_000)] + [1]
    inputs, labels = mask_tokens(ids, special, mask_id, vocab, random.Random(0), 0.15)
    chosen = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    assert labels[0] == labels[-1] == IGNORE_INDEX and inputs[0] == 0 and inputs[-1] == 1  # specials never chosen
    assert all(labels[i] == ids[i] for i in chosen)
    assert len(chosen) / (len(ids) - 2) == pytest.approx(0.15, abs=0.01)
    masked = sum(inputs[i] == mask_id for i in chosen) / len(chosen)
    kept = sum(inputs[i] == ids[i] for i in chosen) / len(chosen)
    assert masked == pytest.approx(0.8, abs=0.02) and kept == pytest.approx(0.1, abs=0.02)  # the rest: random
    unchosen = [i for i in range(len(ids)) if labels[i] == IGNORE_INDEX]
    assert all(inputs[i] == ids[i] for i in unchosen)
    # A short block still gets one token to predict.
    assert sum(x != IGNORE_INDEX for x in mask_tokens([0, 5, 1], special, mask_id, vocab, random.Random(3), 0.01)[1]) == 1


def _data(tmp_path, **settings):
    cfg = compose_cfg("train", fast("austen_mlm") + ["model=tiny_bert", "task=austen_mlm"], tmp_path)
    from hydra.utils import instantiate

    node = {**cfg.task.data, **settings}
    data = instantiate(node, tokenizer=tiny_tokenizer("tiny_bert"), seed=0, _convert_="all")
    data.setup("fit")
    return data


def test_blocks_are_wrapped_evaluation_masks_are_fixed_and_training_masks_change(tmp_path):
    data = _data(tmp_path)
    tok = data.tokenizer
    test = data.datasets["test"]
    assert all(len(f["input_ids"]) == 32 for f in test)
    assert test[0]["input_ids"][0] == tok.cls_token_id and test[0]["input_ids"][-1] == tok.sep_token_id
    again = _data(tmp_path / "again")
    assert [f["labels"] for f in again.datasets["test"]] == [f["labels"] for f in test]  # every model, same tokens
    assert data.protocol_record["scored_tokens"] == sum(sum(x != IGNORE_INDEX for x in f["labels"]) for f in test)
    train = [data.datasets["train"][i] for i in range(8)]
    torch.manual_seed(0)
    first = data.collate(train)
    second = data.collate(train)
    assert not torch.equal(first["labels"], second["labels"])  # new positions each batch
    torch.manual_seed(0)
    assert torch.equal(data.collate(train)["labels"], first["labels"])  # ... from torch's seeded RNG
    with pytest.raises(SqueezeError, match="mask_probability=1.5 must be between 0 and 1"):
        MaskedLanguageModelingData(tok, mask_probability=1.5, source="text", data_files={"train": ["x.txt"]})


def test_a_decoder_tokenizer_without_a_mask_token_is_refused(tmp_path):
    with pytest.raises(SqueezeError, match="has no mask token: masked language modelling needs an encoder"):
        MaskedLanguageModelingData(tiny_tokenizer("tiny_gpt2"), source="text", data_files={"train": ["x.txt"]})


def test_tiny_bert_learns_masked_lm_and_is_pruned_during_it(tmp_path):
    overrides = fast("austen_mlm") + ["model=tiny_bert", "task=austen_mlm", "optimizer.lr=3e-3", "trainer.max_steps=30",
                                      "trainer.limit_train_batches=30", "trainer.val_check_interval=10", "perf=null",
                                      "task.data.max_examples.train=1200", "compress=imp", "compress.imp.target=0.7"]
    record = run.train(compose_cfg("train", overrides, tmp_path))
    assert record["status"] == "ok", record["error"]
    saved = read_result(tmp_path)
    assert saved["perplexity"]["protocol"] == "masked" and saved["perplexity"]["scored_tokens"] > 0
    # Learned: well below the same model untrained, scored on the same masked tokens.
    untrained = run.evaluate(compose_cfg("eval", fast("austen_mlm") + ["model=tiny_bert", "task=austen_mlm",
                                                                       "perf=null"], tmp_path / "untrained"))
    assert saved["metrics"]["test/perplexity"] < 0.5 * untrained["metrics"]["test/perplexity"]
    assert saved["sparsity"] == pytest.approx(0.7, abs=0.01)
    model = formats.load(tmp_path / "model", "masked_lm")
    assert type(model).__name__ == "BertForMaskedLM"
    weights = [m.weight for n, m in model.named_modules() if n.startswith("bert.encoder") and hasattr(m, "weight")
               and m.weight.dim() == 2]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.7, abs=0.01)
    assert isinstance(model, type(AutoModelForMaskedLM.from_config(model.config)))


# -- the thesis' pre-training IMP: pruned while pre-training, fine-tuned with the mask kept ("IMP Full") ---------
@pytest.mark.parametrize("model,pretrain_task,target", [("tiny_bert", "austen_mlm", 0.7), ("tiny_gpt2", "austen", 0.3)])
def test_pruned_during_pretraining_then_fine_tuned_with_the_mask_kept(model, pretrain_task, target, tmp_path):
    from squeeze.config import check_before_loading, lenient_settings

    pre = fast(pretrain_task) + [f"model={model}", f"task={pretrain_task}", "optimizer.lr=3e-3", "perf=null",
                                  "trainer.max_steps=20", "trainer.limit_train_batches=20",
                                  "trainer.val_check_interval=10", "compress=imp", f"compress.imp.target={target}"]
    pretrained = run.train(compose_cfg("train", pre, tmp_path / "pre"))
    assert pretrained["status"] == "ok", pretrained["error"]
    assert pretrained["sparsity"] == pytest.approx(target, abs=0.01)
    tune = fast("rotten_tomatoes") + [f"model.name_or_path={tmp_path / 'pre' / 'model'}", "task=rotten_tomatoes",
                                      "compress=keep_mask", "trainer.max_steps=12", "optimizer.lr=1e-3", "perf=null"]
    cfg = compose_cfg("train", lenient_settings(tune), tmp_path / "tune")
    check_before_loading(cfg)
    tuned = run.train(cfg)
    assert tuned["status"] == "ok", tuned["error"]
    summary = tuned["compress"]["keep_mask"]
    # The mask came with the model and stayed: the same zeros after fine-tuning, none added, none regrown.
    assert summary["sparsity_at_start"] == pytest.approx(pretrained["sparsity"], abs=1e-6)
    assert tuned["sparsity"] == pytest.approx(pretrained["sparsity"], abs=1e-6)
    before = formats.load(tmp_path / "pre" / "model", "masked_lm" if model == "tiny_bert" else "causal_lm")
    after = formats.load(tmp_path / "tune" / "model", "sequence_classification")
    body = dict(before.base_model.named_parameters())
    changed = 0
    for name, p in after.base_model.named_parameters():
        if p.dim() == 2 and name in body and name.endswith("weight") and (body[name] == 0).float().mean() > 0.2:
            assert torch.equal(p == 0, body[name] == 0), name  # exactly the pre-training's zeros
            changed += int(not torch.equal(p, body[name]))
    assert changed > 0  # the survivors were fine-tuned
    assert "test/accuracy" in tuned["metrics"]
    # One row whose cost counts the pre-training it started from.
    assert tuned["started_from"] == str((tmp_path / "pre").resolve())
    total, own = tuned["cost"]["total"]["seconds"], tuned["cost"]["own"]["seconds"]
    assert total == pytest.approx(own + pretrained["cost"]["total"]["seconds"], rel=1e-6)


def test_keep_mask_on_a_dense_model_is_refused(tmp_path):
    overrides = fast("rotten_tomatoes") + ["model=tiny_bert", "task=rotten_tomatoes", "compress=keep_mask",
                                           "trainer.max_steps=1", "perf=null"]
    with pytest.raises(SqueezeError, match="^compress=keep_mask: the model has no zeros to keep; start from a pruned"):
        run.train(compose_cfg("train", overrides, tmp_path))
