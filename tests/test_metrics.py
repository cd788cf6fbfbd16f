"""Perplexity protocols, entity F1 and label alignment against hand-computed values."""

import math
from types import SimpleNamespace

import pytest
import torch

from squeeze.tasks.base import IGNORE_INDEX
from squeeze.tasks.lm import CausalLM, LanguageModelingData, perplexity_windows
from squeeze.tasks.tokens import EntityF1, align_labels, extract_entities

X = IGNORE_INDEX

# A bigram "model" over a 4-token vocabulary: P[prev][next]; its logits are log P[prev].
P = torch.tensor(
    [
        [0.10, 0.60, 0.20, 0.10],
        [0.25, 0.25, 0.40, 0.10],
        [0.05, 0.05, 0.10, 0.80],
        [0.70, 0.10, 0.10, 0.10],
    ]
)
STREAM = [0, 1, 2, 3, 0]


class Bigram(torch.nn.Module):
    config = SimpleNamespace(n_positions=16)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(logits=P.log()[input_ids], loss=torch.tensor(0.0))


def test_blocks_windows_do_not_overlap_and_skip_each_first_token():
    windows = list(perplexity_windows(STREAM, block_size=3, protocol="blocks"))
    assert windows == [([0, 1, 2], [X, 1, 2]), ([3, 0], [X, 0])]


def test_sliding_windows_score_every_token_but_the_first_exactly_once():
    windows = list(perplexity_windows(STREAM, block_size=3, protocol="sliding", stride=1))
    assert windows == [([0, 1, 2], [X, 1, 2]), ([1, 2, 3], [X, X, 3]), ([2, 3, 0], [X, X, 0])]
    long = list(range(1000))
    scored = [t for _, labels in perplexity_windows(long, 64, "sliding", 16) for t in labels if t != X]
    assert scored == long[1:]


@pytest.mark.parametrize("protocol,stride", [("blocks", None), ("sliding", 1)])
def test_perplexity_matches_hand_computation(protocol, stride):
    # blocks scores 1,2 (window 1) and 0 (window 2: its 3 is unscored); sliding scores 1,2,3,0.
    if protocol == "blocks":
        nll = -(math.log(0.60) + math.log(0.40) + math.log(0.70)) / 3
    else:
        nll = -(math.log(0.60) + math.log(0.40) + math.log(0.80) + math.log(0.70)) / 4
    data = LanguageModelingData(
        tokenizer=SimpleNamespace(pad_token_id=0), source="text", block_size=3, protocol=protocol, stride=stride
    )
    examples = data.encode(_Rows(), "test")
    module = CausalLM(Bigram())
    metrics = module.metrics["test"]
    for i in range(0, len(examples), 2):  # batches of two windows of unequal length: padding path
        batch = data.collate(examples[i : i + 2])
        module.update_metrics(metrics, batch, module(batch))
    assert metrics.compute()["perplexity"].item() == pytest.approx(math.exp(nll), rel=1e-5)
    assert data.scored_tokens["test"] == (3 if protocol == "blocks" else 4)


class _Rows:
    """Stands in for a datasets split whose tokenizer yields STREAM."""

    column_names = ["text"]

    def __getitem__(self, key):
        return ["stream"]


@pytest.fixture(autouse=True)
def _stream_tokenizer(monkeypatch):
    monkeypatch.setattr(LanguageModelingData, "token_stream", lambda self, rows: list(STREAM))


def test_protocol_arguments_are_checked():
    with pytest.raises(ValueError, match="protocol"):
        list(perplexity_windows(STREAM, 3, "overlapping"))
    with pytest.raises(ValueError, match="stride"):
        list(perplexity_windows(STREAM, 3, "sliding", stride=5))


def test_entities_follow_seqeval_bio_reading():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "B-ORG", "I-PER"]
    assert extract_entities(tags) == {("PER", 0, 2), ("LOC", 3, 5), ("LOC", 5, 6), ("ORG", 6, 7), ("PER", 7, 8)}
    with pytest.raises(ValueError, match="BIO"):
        extract_entities(["X-PER"])


def test_entity_f1_counts_exact_matches_only():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-MISC"]]
    metric = EntityF1()
    metric.update(pred, gold)
    # gold: PER(0,2) LOC(3,4) ORG(0,1); pred: PER(0,1) LOC ORG MISC -> tp 2, fp 2, fn 1
    out = metric.compute()
    assert out["precision"].item() == pytest.approx(2 / 4)
    assert out["recall"].item() == pytest.approx(2 / 3)
    assert out["f1"].item() == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_labels_go_to_first_subtoken_only():
    # [CLS] New York ##er is [SEP] with words New / Yorker / is
    word_ids = [None, 0, 1, 1, 2, None]
    assert align_labels(word_ids, [3, 4, 0]) == [X, 3, 4, X, 0, X]


class _FixedClassifier(torch.nn.Module):
    """Predicts the class given in the batch's `input_ids[:, 0]` (so the test chooses the predictions)."""

    config = SimpleNamespace(num_labels=3)

    def forward(self, input_ids, labels=None, attention_mask=None):
        return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids[:, 0], 3).float(), loss=torch.tensor(0.0))


@pytest.mark.parametrize("stage", ["val", "test"])
def test_sentiment_precision_and_recall_are_macro_like_f1(stage):
    from squeeze.tasks.classification import SequenceClassification

    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    module = SequenceClassification(_FixedClassifier())
    batch = {"input_ids": torch.tensor(pred)[:, None], "labels": torch.tensor(gold)}
    module.update_metrics(module.metrics[stage], batch, module(batch))
    out = module.compute_metrics(module.metrics[stage])
    # per class: precision 2/2, 1/2, 1/2; recall 2/3, 1/2, 1/1; F1 4/5, 1/2, 2/3
    assert out["precision"].item() == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert out["recall"].item() == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert out["f1"].item() == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert out["accuracy"].item() == pytest.approx(4 / 6)
