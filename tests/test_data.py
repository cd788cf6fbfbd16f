"""The held-out examples do not move with the run's seed: carved validation/test splits (and samples of them)
are drawn with the data module's fixed split_seed, while the training sample and its order follow the seed.
A sweep over seeds is scored on one test set, and a teacher fine-tuned at one seed never trained on what a
student at another seed is tested on."""

from hydra.utils import instantiate

from conftest import compose_cfg, tiny_tokenizer


def _data(tmp_path, task: str, model: str, seed: int, *extra: str):
    cfg = compose_cfg("train", [f"model={model}", f"task={task}", f"seed={seed}", *extra], tmp_path / f"{task}{seed}")
    data = instantiate(cfg.task.data, tokenizer=tiny_tokenizer(model), seed=cfg.seed, _convert_="all")
    data.setup()
    return data


def _texts(data, split: str) -> list[tuple]:
    return [tuple(example["input_ids"]) for example in data.datasets[split]]


def test_classification_held_out_splits_are_the_same_for_every_seed(tmp_path):
    limits = ["task.data.max_examples.train=200", "task.data.max_examples.validation=50"]
    a, b = (_data(tmp_path, "rotten_tomatoes", "tiny_bert", seed, *limits) for seed in (1, 2))
    assert _texts(a, "test") == _texts(b, "test") and _texts(a, "validation") == _texts(b, "validation")
    assert len(_texts(a, "validation")) == 50
    assert _texts(a, "train") != _texts(b, "train")  # the training sample is the seed's
    # The whole training split is one pool whatever the seed: seed 2 trains on none of seed 1's held-out examples.
    whole = ["task.data.max_examples.train=null"]
    assert _texts(_data(tmp_path, "rotten_tomatoes", "tiny_bert", 1, *whole), "train") == \
        _texts(_data(tmp_path, "rotten_tomatoes", "tiny_bert", 2, *whole), "train")
    other = _data(tmp_path, "rotten_tomatoes", "tiny_bert", 1, *limits, "+task.data.split_seed=7")
    assert _texts(other, "test") != _texts(a, "test")  # the split itself is a setting


def test_dialog_held_out_examples_and_their_distractors_are_the_same_for_every_seed(tmp_path):
    small = ["task.data.max_examples.train=40", "task.data.max_examples.validation=10",
             "task.data.max_examples.test=10"]
    a, b = (_data(tmp_path, "chatterbot", "tiny_gpt2", seed, *small) for seed in (1, 2))
    for split in ("validation", "test"):
        assert [(e["reply"], e["distractors"]) for e in a.examples[split]] == \
            [(e["reply"], e["distractors"]) for e in b.examples[split]]
    assert [e["reply"] for e in a.examples["train"]] != [e["reply"] for e in b.examples["train"]]
