"""Distillation (compress=kd, compress=pkd): which layers, the losses, the student cut from the teacher,
the teacher cache, real runs from a finished teacher run, a sweep, and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, FAST, build_tiny, compose_cfg, fast, read_result, run_cli, text_batch, tiny_tokenizer
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from squeeze import run
from squeeze import formats
from squeeze.compress import teacher_cache as tc
from squeeze.arch import adapter_for
from squeeze.compress.distillation import Distillation
from squeeze.compress.distillation.losses import (
    attention_loss,
    hidden_loss,
    kd_loss,
    last_token_index,
    loss_parts,
    pick_hidden,
    topk_kd_loss,
)
from squeeze.compress.distillation.module import teacher_targets
from squeeze.compress.distillation.student import cut_layers, pkd_layer_pairs, student_layer_ids
from squeeze.compress.teacher_cache import TargetSpec
from squeeze.errors import SqueezeError

LABELS = ["rotten", "fresh"]
SHORT = ["trainer.max_steps=4", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
QUIET = ["callbacks.energy=null", "perf=null"]  # not under test here; each costs seconds a run
SPIES: list["Spy"] = []


class Spy(Distillation):
    """Distillation that remembers itself, so a test can look at the teacher after a real run."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        SPIES.append(self)


# -- which layers -------------------------------------------------------------------------------------
def test_student_layer_ids_for_each_init():
    assert student_layer_ids(12, 6, "first") == [0, 1, 2, 3, 4, 5]
    assert student_layer_ids(12, 6, "alternate") == [0, 2, 4, 6, 8, 10]
    assert student_layer_ids(12, 6, "skip") == [1, 3, 5, 7, 9, 11]
    assert student_layer_ids(30, 4, "alternate") == [0, 7, 15, 22]
    assert student_layer_ids(30, 4, "skip") == [6, 14, 21, 29]
    assert student_layer_ids(4, 4, "alternate") == [0, 1, 2, 3]
    assert student_layer_ids(12, 3, [1, 6, 12]) == [0, 5, 11]


def test_pkd_layer_pairs_for_each_strategy():
    assert pkd_layer_pairs(12, 6, "skip") == [(2, 1), (4, 2), (6, 3), (8, 4), (10, 5)]
    assert pkd_layer_pairs(12, 6, "last") == [(7, 1), (8, 2), (9, 3), (10, 4), (11, 5)]
    assert pkd_layer_pairs(12, 3, "skip") == [(4, 1), (8, 2)]
    assert pkd_layer_pairs(6, 3, [3, 5]) == [(3, 1), (5, 2)]
    assert pkd_layer_pairs(4, 1, "skip") == []


@pytest.mark.parametrize("call, message", [
    (lambda: student_layer_ids(4, 6, "first"), "student.layers=6 is more than the 4 layers"),
    (lambda: student_layer_ids(4, 0, "first"), "at least one layer"),
    (lambda: student_layer_ids(4, 2, "middle"), "student.init='middle'"),
    (lambda: student_layer_ids(4, 2, [1, 5]), "teacher layer 5 is out of range; the teacher has layers 1..4"),
    (lambda: student_layer_ids(4, 2, [1]), "lists 1 teacher layers but student.layers=2"),
    (lambda: pkd_layer_pairs(4, 2, [0]), "teacher layer 0 is out of range"),
    (lambda: pkd_layer_pairs(4, 2, [1, 2, 3]), "the student has only 2"),
    (lambda: pkd_layer_pairs(4, 2, "first"), "strategy='first'"),
])
def test_layer_choices_refuse_bad_numbers(call, message):
    with pytest.raises(SqueezeError, match=message):
        call()


# -- losses ---------------------------------------------------------------------------------------------
def test_kd_loss_is_zero_for_identical_logits_and_matches_its_definition():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, 11), torch.randn(5, 7, 11)
    assert kd_loss(s, s.clone(), 2.0).abs() < 1e-6
    T = 3.0
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    by_hand = T * T * (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(kd_loss(s, t, T), by_hand.mean(), atol=1e-5)
    mask = torch.ones(5, 7)
    mask[:, 4:] = 0
    assert torch.allclose(kd_loss(s, t, T, mask), by_hand[:, :4].mean(), atol=1e-5)


def test_topk_kd_loss_is_a_kl_over_the_top_tokens_and_the_rest():
    torch.manual_seed(1)
    s, t = torch.randn(3, 6, 50), torch.randn(3, 6, 50) * 3
    T = 2.0
    full = kd_loss(s, t, T)
    log_p = torch.log_softmax(t / T, -1)
    for k in (50, 10):
        values, indices = log_p.topk(k, -1)
        assert topk_kd_loss(t, values, indices, T).abs() < 1e-5  # student = teacher
        coarse = topk_kd_loss(s, values, indices, T)
        if k == 50:
            assert torch.allclose(coarse, full, atol=1e-5)  # all tokens kept: the exact KL
        else:
            assert 0 < coarse < full  # coarsening can only lose divergence


def test_hidden_loss_matches_a_hand_computation():
    torch.manual_seed(2)
    s, t = torch.randn(3, 2, 8), torch.randn(3, 2, 8)  # [B, P, H]
    expected = 0.0
    for b in range(3):
        for layer in range(2):
            u, v = s[b, layer], t[b, layer]
            expected += float(((u / u.norm() - v / v.norm()) ** 2).sum())
    assert math.isclose(float(hidden_loss(s, t)), expected / 3, rel_tol=1e-5)
    assert float(hidden_loss(s, s * 5.0)) < 1e-10  # scale-free: only directions count
    # Token level: masked positions do not count.
    s4, t4 = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    kept = hidden_loss(s4[mask.bool()], t4[mask.bool()])
    assert torch.allclose(hidden_loss(s4, t4, mask), kept, atol=1e-6)


def test_pooled_position_is_cls_for_encoders_and_the_last_real_token_for_decoders():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3]
    assert last_token_index(left).tolist() == [3, 3]
    states = [torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3) + 100 * i for i in range(3)]
    first = pick_hidden(states, [1, 2], right, TargetSpec(level="sequence", pool="first"))
    last = pick_hidden(states, [1, 2], right, TargetSpec(level="sequence", pool="last"))
    assert first.shape == last.shape == (2, 2, 3)
    assert torch.equal(first[0, 1], states[2][0, 0]) and torch.equal(last[0, 0], states[1][0, 2])
    assert pick_hidden(states, [2], right, TargetSpec(level="token")).shape == (2, 4, 1, 3)


# -- the student -------------------------------------------------------------------------------------------
def _tiny(name: str, layers: int = 4, head: str = "sequence_classification"):
    return build_tiny(name, head, LABELS, layers=layers)[0]


@pytest.mark.parametrize("init", ["first", "alternate"])
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_gpt2", "tiny_llama", "tiny_opt"])
def test_student_holds_exactly_the_chosen_teacher_layers(name, init, tmp_path):
    teacher = _tiny(name, layers=4)
    keep = student_layer_ids(4, 2, init)
    student = cut_layers(teacher, keep)
    _, t_layers = adapter_for(teacher).layer_stack(teacher)
    _, s_layers = adapter_for(student).layer_stack(student)
    assert len(s_layers) == 2 and student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for j, i in enumerate(keep):
        t_state, s_state = t_layers[i].state_dict(), s_layers[j].state_dict()
        assert t_state.keys() == s_state.keys()
        assert all(torch.equal(t_state[k], s_state[k]) for k in t_state)
    # Everything outside the stack (embeddings, final norm, head) is copied.
    stack = next(n for n, m in teacher.named_modules() if m is t_layers) + "."
    t_rest = {k: v for k, v in teacher.state_dict().items() if not k.startswith(stack)}
    s_rest = {k: v for k, v in student.state_dict().items() if not k.startswith(stack)}
    assert t_rest.keys() == s_rest.keys() and len(t_rest) > 2
    assert all(torch.equal(t_rest[k], s_rest[k]) for k in t_rest)
    # A plain transformers directory: reloads without squeeze, computing the same function.
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    batch = text_batch(tiny_tokenizer(name))
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, student.eval()(**batch).logits, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama"])
def test_losses_are_zero_when_the_student_is_the_teacher(name):
    teacher = _tiny(name, layers=4)
    student = cut_layers(teacher, [0, 1, 2, 3])
    batch = {**text_batch(tiny_tokenizer(name)), "labels": torch.tensor([1, 0, 1])}
    pairs = pkd_layer_pairs(4, 4, "skip")
    spec = TargetSpec(level="sequence", pool="first" if name == "tiny_bert" else "last",
                      teacher_layers=tuple(t for t, _ in pairs), student_layers=tuple(s for _, s in pairs),
                      temperature=2.0)
    with torch.no_grad():
        parts = loss_parts(student(**batch, output_hidden_states=True), teacher_targets(teacher, batch, spec),
                           batch, spec, alpha=0.5, beta=100.0)
    assert parts["loss_kd"].abs() < 1e-6 and parts["loss_hidden"].abs() < 1e-6
    assert torch.allclose(parts["loss"], 0.5 * parts["loss_task"])


# -- dialog: the task's next-utterance loss stays in the task share ------------------------------------------
@pytest.fixture(scope="module")
def dialog_batches(tmp_path_factory):
    """A chatterbot training batch (2 candidates per example) and a test batch (5 per example), as train.py
    builds them for tiny_gpt2."""
    from squeeze.tasks.dialog.data import DialogData

    data = DialogData(tiny_tokenizer("tiny_gpt2"), source="chatterbot", asset="chatterbot", splits={"train": "train"},
                      carve={"validation": 0.1, "test": 0.1}, skip_malformed=True, num_candidates=5,
                      train_candidates=2, batch_size=8, eval_batch_size=10,
                      max_examples={"train": 8, "validation": 2, "test": 2}, seed=0)
    data.setup()
    return next(iter(data.train_dataloader())), next(iter(data.test_dataloader()))


def test_dialog_distillation_keeps_the_mc_loss_and_scores_candidates_packed(dialog_batches):
    from squeeze.compress.distillation import Distill
    from squeeze.tasks.dialog.module import DialogModule
    from squeeze.tasks.dialog.scoring import CandidateScores, score_candidates

    train, test = dialog_batches
    teacher = build_tiny("tiny_gpt2", "causal_lm", layers=2, seed=1)[0]
    spec = TargetSpec(level="token", pool="last", top_k=None, temperature=2.0)
    parts = {}
    for mc_coef in (1.0, 0.0):
        torch.manual_seed(0)
        student = build_tiny("tiny_gpt2", "causal_lm", layers=1)[0]
        task = DialogModule(student, mc_coef=mc_coef, eval_candidates=5, hits_at=[1], generate_on=[], bertscore=None)
        module = Distill(task, teacher, spec, alpha=0.25, beta=0.0)
        parts[mc_coef] = module.losses(train)
    kept, dropped = parts[1.0], parts[0.0]
    # The task share is the dialog module's own loss: lm_coef · reply LM loss + mc_coef · MC loss.
    assert torch.allclose(kept["loss_task"], 2.0 * kept["lm_loss"] + kept["mc_loss"])
    assert torch.allclose(kept["loss"], 0.75 * kept["loss_task"] + 0.25 * kept["loss_kd"])
    assert "mc_loss" not in dropped and torch.allclose(dropped["loss_task"], 2.0 * dropped["lm_loss"])
    assert torch.allclose(kept["lm_loss"], dropped["lm_loss"]) and torch.allclose(kept["loss_kd"], dropped["loss_kd"])
    assert (kept["loss"] - dropped["loss"]).item() == pytest.approx(0.75 * kept["mc_loss"].item(), rel=1e-5)
    # The MC head trains with the student: it is this module's parameter, and the loss reaches it.
    task = DialogModule(module.model, eval_candidates=5, hits_at=[1], generate_on=[], bertscore=None)
    module = Distill(task, teacher, spec, alpha=0.25, beta=0.0)
    assert any(p is task.mc_head.weight for p in module.parameters())
    module.losses(train)["loss"].backward()
    assert task.mc_head.weight.grad is not None and task.mc_head.weight.grad.abs().sum() > 0
    # Validation and test score candidates as the dialog module does: each context once, packed.
    module.eval()
    outputs = module.eval_outputs(test)
    assert isinstance(outputs, CandidateScores)
    assert torch.equal(outputs.scores, score_candidates(module.model, test, 5).scores)


# -- the teacher cache ---------------------------------------------------------------------------------------
def _lm_examples(n=12, vocab=200):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, vocab, (int(torch.randint(5, 16, (1,), generator=g)),), generator=g) for _ in range(n)]


def _collate(examples, pad=0):
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)], mask[i, : len(e)] = e, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("case", ["sequence_pkd", "lm_topk_pkd"])
def test_cache_round_trips_to_the_same_losses_as_on_the_fly(case, tmp_path):
    if case == "sequence_pkd":
        teacher, student = _tiny("tiny_bert", 4), _tiny("tiny_bert", 2)
        texts = [f"review number {i} " + "good " * (i % 5) for i in range(10)]
        examples = [{k: v[0] for k, v in dict(tiny_tokenizer("tiny_bert")([t], return_tensors="pt")).items()}
                    for t in texts]
        for i, e in enumerate(examples):
            e["label"] = i % 2

        def collate(rows):
            batch = dict(tiny_tokenizer("tiny_bert").pad([{k: v for k, v in r.items() if k != "label"} for r in rows],
                                                     return_tensors="pt"))
            return {**batch, "labels": torch.tensor([r["label"] for r in rows])}

        spec = TargetSpec(level="sequence", pool="first", teacher_layers=(2,), student_layers=(1,), temperature=2.0)
    else:
        teacher, student = _tiny("tiny_gpt2", 4, "causal_lm"), _tiny("tiny_gpt2", 2, "causal_lm")
        examples = _lm_examples()
        collate = _collate
        spec = TargetSpec(level="token", teacher_layers=(2,), student_layers=(1,), top_k=8, temperature=2.0)
    directory = tmp_path / "cache"
    tc.build(directory, lambda: (collate(examples[i : i + 4]) for i in range(0, len(examples), 4)),
             lambda b: teacher_targets(teacher, b, spec), spec, meta={})
    assert tc.is_complete(directory) and not list(tmp_path.glob(".cache.partial*"))
    cache = tc.TeacherCache(directory, spec)
    # Other batches, other order, other padding width: looked up by content.
    order = [7, 2, 9, 0, 5, 11 % len(examples), 3]
    for start in (0, 3):
        batch = collate([examples[i] for i in order[start : start + 4]])
        cached, live = cache.targets(batch), teacher_targets(teacher, batch, spec)
        assert cached.present().keys() == live.present().keys()
        for name, value in live.present().items():
            if name == "top_indices":  # ties may order differently; compare where attended
                mask = batch["attention_mask"].bool()
                assert torch.equal(cached.top_indices[mask], value[mask])
            else:
                keep = batch["attention_mask"].bool() if spec.level == "token" else slice(None)
                assert torch.allclose(cached.present()[name][keep], value[keep], atol=1e-5), name
        with torch.no_grad():
            out = student(**batch, output_hidden_states=True)
        a = loss_parts(out, cached, batch, spec, 0.5, 10.0)
        b = loss_parts(out, live, batch, spec, 0.5, 10.0)
        for part in a:
            assert torch.allclose(a[part], b[part], atol=1e-5), part
    unseen = {**examples[1], "input_ids": examples[1]["input_ids"].flip(0)} if case == "sequence_pkd" else \
        examples[1].flip(0)
    with pytest.raises(SqueezeError, match="no entry for a training example"):
        cache.targets(collate([examples[0], unseen]))


# -- real runs --------------------------------------------------------------------------------------------------
def _rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A finished squeeze run: a 4-layer tiny BERT fine-tuned a few steps on rotten_tomatoes."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    overrides = FAST + QUIET + ["model=tiny_bert", "model.config.num_hidden_layers=4", "optimizer.lr=3e-3",
                        "trainer.max_steps=8", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    record = run.train(compose_cfg("train", overrides, run_dir))
    assert record["status"] == "ok", record["error"]
    return run_dir


def _distil(run_dir: Path, name: str, teacher, *extra: str, task: str = "rotten_tomatoes", model: str = "tiny_bert"):
    SPIES.clear()
    overrides = [*fast(task), f"model={model}", f"task={task}", f"compress={name}",
                 f"compress.{name}._target_=test_distillation.Spy", *SHORT, *QUIET, *extra]
    if teacher is not None:
        overrides.append(f"compress.{name}.teacher={teacher}")
    record = run.train(compose_cfg("train", overrides, run_dir))
    assert record["status"] == "ok", record["error"]
    return record, SPIES[-1]


@pytest.fixture(scope="module")
def pkd_run(teacher_run, tmp_path_factory):
    """pkd from the finished teacher run into a 2-layer student, the teacher run on the fly."""
    run_dir = tmp_path_factory.mktemp("pkd") / "run"
    # The live teacher (the cache, on by default for classification, drops it once built: tested below).
    record, spy = _distil(run_dir, "pkd", teacher_run, "compress.pkd.student.layers=2", "compress.pkd.teacher_cache=false",
                          "checkpoint.keep_after_success=all")  # its checkpoint is read below
    return run_dir, record, spy


def test_pkd_from_a_finished_run_trains_a_smaller_student_and_leaves_the_teacher_alone(teacher_run, pkd_run):
    tmp_path, record, spy = pkd_run
    summary = read_result(tmp_path)["compress"]["pkd"]
    teacher = spy._module.teacher
    # The teacher: frozen, gradient-free, and bit-for-bit the finished run's model.
    saved_teacher = formats.load(teacher_run / "model", "sequence_classification")
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    state = teacher.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved_teacher.state_dict().items())
    # Each loss part is logged and they add up as the objective says.
    rows = _rows(tmp_path)
    assert len(rows) == 4
    for r in rows:
        alpha, beta = summary["alpha"], summary["beta"]
        expected = (1 - alpha) * r["train/loss_task"] + alpha * r["train/loss_kd"] + beta * r["train/loss_hidden"]
        assert math.isclose(r["train/loss"], expected, rel_tol=1e-4), r
        assert r["train/loss_kd"] > 0 and r["train/loss_hidden"] > 0
    # The summary and the record: teacher and student sizes, the settings.
    assert summary["teacher"]["layers"] == 4 and summary["student"]["layers"] == 2
    assert summary["student"]["kept_layers"] == [1, 2] and summary["layer_pairs"] == [[2, 1]]
    assert summary["student"]["params"] == record["params"] < summary["teacher"]["params"]
    assert summary["teacher"]["checkpoint_bytes"] > record["checkpoint_bytes"]
    defaults = OmegaConf.load(CONF / "compress" / "pkd.yaml").pkd
    assert (summary["alpha"], summary["temperature"], summary["beta"], summary["strategy"]) == \
        (defaults.alpha, defaults.temperature, defaults.beta, defaults.strategy) and summary["beta"] > 0
    assert set(record["metrics"]) == {"test/accuracy", "test/f1", "test/precision", "test/recall", "test/loss"}
    # The teacher is in no Lightning checkpoint; the saved student reloads with plain transformers.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    student_keys = {f"model.{k}" for k in spy._module.model.state_dict()}
    assert set(ckpt["state_dict"]) == student_keys
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert reloaded.config.num_hidden_layers == 2


def _kl(teacher, student, batches, T=1.0) -> float:
    with torch.no_grad():
        return sum(float(kd_loss(student(**b).logits, teacher(**b).logits, T)) for b in batches) / len(batches)


def test_kd_student_moves_towards_its_teacher(teacher_run, tmp_path):
    _distil(tmp_path, "kd", teacher_run, "compress.kd.student.layers=1", "compress.kd.alpha=1.0",
            "compress.kd.temperature=1.0", "optimizer.lr=3e-3", "trainer.max_steps=8")
    teacher = formats.load(teacher_run / "model", "sequence_classification").eval()
    before = cut_layers(teacher, [0]).eval()
    after = formats.load(tmp_path / "model", "sequence_classification").eval()
    cfg = compose_cfg("train", [*fast("rotten_tomatoes"), "model=tiny_bert"], tmp_path / "data")
    data = instantiate(cfg.task.data, tokenizer=tiny_tokenizer("tiny_bert"), seed=cfg.seed, _convert_="all")
    data.setup()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in data.val_dataloader()]
    kl_before, kl_after = _kl(teacher, before, batches), _kl(teacher, after, batches)
    assert kl_before > 1e-4, kl_before  # the 1-layer cut really differs from the teacher
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)


def test_cached_teacher_trains_exactly_like_the_live_one_and_is_reused(teacher_run, pkd_run, tmp_path):
    common = ["compress.pkd.student.layers=2", f"compress.pkd.cache_dir={tmp_path / 'cache'}"]
    _, built = _distil(tmp_path / "built", "pkd", teacher_run, *common, "compress.pkd.teacher_cache=true")
    _, reused = _distil(tmp_path / "reused", "pkd", teacher_run, *common, "compress.pkd.teacher_cache=true")
    assert built.summary()["teacher_cache"]["reused"] is False and reused.summary()["teacher_cache"]["reused"] is True
    assert built.summary()["teacher_cache"]["dir"] == reused.summary()["teacher_cache"]["dir"]
    assert reused._module.teacher is None  # the cache stands in for the teacher
    live, cached = _rows(pkd_run[0]), _rows(tmp_path / "reused")
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached):
        for key in ("train/loss", "train/loss_task", "train/loss_kd", "train/loss_hidden"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-7), (key, a[key], b[key])


def test_language_model_distils_its_own_first_layers_with_a_top_k_cache(tmp_path):
    record, spy = _distil(tmp_path, "pkd", None, "model.config.num_hidden_layers=4", "compress.pkd.student.layers=2",
                          "compress.pkd.strategy=last", "compress.pkd.teacher_cache=true",
                          f"compress.pkd.cache_dir={tmp_path / 'cache'}", "compress.pkd.top_k=16",
                          task="austen", model="tiny_llama")
    summary = spy.summary()
    assert summary["layer_pairs"] == [[3, 1]] and summary["top_k"] == 16
    meta = json.loads((Path(summary["teacher_cache"]["dir"]) / "meta.json").read_text())
    assert meta["arrays"] == ["hidden", "top_indices", "top_logprobs"] and meta["rows"] > 0
    assert all(r["train/loss_kd"] > 0 and r["train/loss_hidden"] > 0 for r in _rows(tmp_path))
    assert "test/perplexity" in record["metrics"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.model_type == "llama"


def test_pkd_on_opt_distils_alternate_layers_and_pools_the_last_real_token(tmp_path):
    record, spy = _distil(tmp_path, "pkd", None, "model.config.num_hidden_layers=4", "compress.pkd.student.layers=2",
                          "compress.pkd.student.init=alternate", model="tiny_opt")
    summary = spy.summary()
    assert summary["student"]["kept_layers"] == [1, 3] and summary["teacher"]["layers"] == 4
    assert spy.spec.pool == "last"  # OPT is a decoder: its sequence head reads the last real token
    assert all(r["train/loss_kd"] > 0 and r["train/loss_hidden"] > 0 for r in _rows(tmp_path))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.model_type == "opt"
    # The saved student is the model that was tested: evaluate.py reproduces the run's metrics.
    evaluated = run.evaluate(compose_cfg("eval", [*fast("rotten_tomatoes"), "model=tiny_opt", f"ckpt={tmp_path}",
                                                  "trainer.limit_test_batches=1", *QUIET], tmp_path / "eval"))
    assert evaluated["status"] == "ok", evaluated["error"]
    for key, value in record["metrics"].items():
        assert evaluated["metrics"][key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.slow  # the suite's budget: tests/test_baselines.py sweeps none, dq, kd (teacher=auto) and rows
def test_sweep_over_none_kd_pkd_completes(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", ["-m", "compress=none,kd,pkd", "model=tiny_bert", "model.config.num_hidden_layers=4",
                                *fast("rotten_tomatoes"), *SHORT, *QUIET, "trainer.max_steps=2",
                                f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cells = {read_result(d)["choices"]["compress"]: read_result(d) for d in sweep.iterdir() if d.is_dir()}
    assert set(cells) == {"none", "kd", "pkd"}
    assert all(c["status"] == "ok" for c in cells.values()), {k: c["error"] for k, c in cells.items()}
    for name in ("kd", "pkd"):
        assert cells[name]["compress"][name]["student"]["layers"] == 2
        assert cells[name]["params"] < cells["none"]["params"]
    assert cells["pkd"]["compress"]["pkd"]["layer_pairs"] == [[2, 1]]
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == [
        "0_tiny_bert_rotten_tomatoes_none", "1_tiny_bert_rotten_tomatoes_kd", "2_tiny_bert_rotten_tomatoes_pkd"]


# -- bad input: one clear line each ------------------------------------------------------------------------------
def _prepare(tmp_path, **settings):
    model, tokenizer = _tiny("tiny_bert", 4), tiny_tokenizer("tiny_bert")
    return Distillation(**settings).prepare_model(model, tokenizer)


def test_student_from_the_configured_model(tmp_path):
    teacher = _tiny("tiny_bert", 4)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer("tiny_bert").save_pretrained(tmp_path / "teacher")
    model = _tiny("tiny_bert", 2)
    kd = Distillation(teacher=str(tmp_path / "teacher"), beta=1.0, student={"from": "model"})
    assert kd.prepare_model(model, tiny_tokenizer("tiny_bert")) is model
    summary = kd.summary()
    student = summary["student"]
    assert (student["from"], student["layers"], student["kept_layers"]) == ("model", 2, None)
    assert student["params"] < summary["teacher"]["params"]
    assert summary["teacher"]["layers"] == 4 and summary["layer_pairs"] == [[2, 1]]
    cut = Distillation(teacher=str(tmp_path / "teacher"), student={"from": "model", "layers": 1, "init": "skip"})
    assert cut.prepare_model(_tiny("tiny_bert", 2), tiny_tokenizer("tiny_bert")).config.num_hidden_layers == 1
    assert cut.summary()["student"]["kept_layers"] == [2]


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    gpt2 = _tiny("tiny_gpt2", 2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer("tiny_gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SqueezeError, match="uses another tokenizer than the run's model"):
        _prepare(tmp_path, teacher=str(tmp_path / "gpt2"))


@pytest.mark.parametrize("settings, message", [
    ({"teacher": "/nonexistent/run"}, "teacher=/nonexistent/run does not exist"),
    ({"student": {"layers": 6}}, "student.layers=6 is more than the teacher's 4 layers"),
    ({"beta": 1.0, "strategy": [2, 9], "student": {"layers": 2}}, "teacher layer 9 is out of range"),
    ({"beta": 1.0, "student": {"layers": 1}}, "has no layer below its top to match"),
    ({"alpha": 1.5}, r"alpha=1.5 must be in \[0, 1\]"),
    ({"student": {"layer": 2}}, "student.layer is not a student setting"),
])
def test_bad_settings_are_refused_with_one_line(tmp_path, settings, message):
    with pytest.raises(SqueezeError, match=message) as error:
        _prepare(tmp_path, **settings)
    assert "\n" not in str(error.value)


def test_run_without_a_saved_model_is_a_missing_teacher(tmp_path):
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "result.json").write_text(json.dumps({"status": "failed", "config": {}}))
    with pytest.raises(SqueezeError, match="has no saved model .* the run failed"):
        _prepare(tmp_path, teacher=str(tmp_path / "failed"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SqueezeError, match="the teacher checkpoint is missing"):
        _prepare(tmp_path, teacher=str(tmp_path / "empty"))


def test_missing_teacher_fails_the_run_before_training(tmp_path):
    cfg = compose_cfg("train", [*fast("rotten_tomatoes"), *QUIET, "model=tiny_bert", "compress=kd",
                                f"compress.kd.teacher={tmp_path}/nope"], tmp_path / "run")
    with pytest.raises(SqueezeError, match=f"teacher={tmp_path}/nope does not exist"):
        run.train(cfg)
    record = read_result(tmp_path / "run")
    assert record["status"] == "failed" and record["train_seconds"] is None


def test_the_teacher_cache_is_on_by_default_where_its_targets_are_exact():
    assert Distillation(head="sequence_classification").teacher_cache is True
    assert Distillation(head="token_classification").teacher_cache is True
    assert Distillation(head="causal_lm").teacher_cache is False  # top-k targets: an approximation, opt in
    assert Distillation(head="sequence_classification", teacher_cache=False).teacher_cache is False
    with pytest.raises(SqueezeError, match="teacher_cache='yes'"):
        Distillation(teacher_cache="yes")


# -- MiniLM's self-attention transfer ---------------------------------------------------------------------------
def test_attention_loss_is_the_kl_of_each_head_averaged_over_real_queries():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    key_mask = torch.where(mask[:, None, None, :].bool(), 0.0, -1e9)
    teacher = torch.softmax(torch.randn(2, 3, 4, 4) + key_mask, -1)
    student = torch.softmax(torch.randn(2, 3, 4, 4) + key_mask, -1)
    expected, count = 0.0, 0
    for b in range(2):
        for q in range(4):
            if mask[b, q]:
                heads = [F.kl_div(student[b, h, q].clamp_min(1e-12).log(), teacher[b, h, q], reduction="sum")
                         for h in range(3)]
                expected, count = expected + sum(heads) / 3, count + 1
    assert torch.allclose(attention_loss(student, teacher, mask), expected / count, atol=1e-5)
    assert attention_loss(teacher, teacher, mask).abs() < 1e-6


@pytest.mark.parametrize("name, dropout", [("tiny_bert", "attention_probs_dropout_prob"), ("tiny_gpt2", "attn_pdrop"),
                                           ("tiny_llama", "attention_dropout"), ("tiny_opt", "attention_dropout")])
def test_attention_transfer_reads_undropped_distributions_and_restores_the_kernel(name, dropout):
    model, tokenizer = build_tiny(name, "sequence_classification", LABELS, layers=4, **{dropout: 0.5})
    kind = model.config._attn_implementation
    kd = Distillation(attention=1.0, student={"layers": 4})  # the student is the whole teacher: zero loss
    assert kd.teacher_cache is False  # the cache holds no attention maps
    student = kd.prepare_model(model, tokenizer)
    assert kd.spec.attention and student.config._attn_implementation == "eager"
    batch = {**text_batch(tokenizer), "labels": torch.tensor([1, 0, 1])}
    teacher = kd._teacher
    with torch.no_grad():
        parts = loss_parts(student.eval()(**batch, output_attentions=True), teacher_targets(teacher, batch, kd.spec),
                           batch, kd.spec, alpha=0.5, beta=0.0, gamma=1.0)
        assert parts["loss_attention"].abs() < 1e-5
        # In training the last layer's attention rows stay probability distributions (its dropout is off).
        last = student.train()(**batch, output_attentions=True).attentions[-1]
    real = batch["attention_mask"].bool()
    assert torch.allclose(last.sum(-1).transpose(1, 2)[real], torch.ones(()), atol=1e-5)
    assert kd.finalize(student).config._attn_implementation == kind


def test_attention_transfer_refuses_the_cache_and_other_head_counts(tmp_path):
    with pytest.raises(SqueezeError, match="teacher cache does not hold"):
        Distillation(attention=1.0, teacher_cache=True)
    with pytest.raises(SqueezeError, match="attention=-1.0 must be 0 or more"):
        Distillation(attention=-1.0)
    teacher = _tiny("tiny_bert", 4)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer("tiny_bert").save_pretrained(tmp_path / "teacher")
    other = build_tiny("tiny_bert", "sequence_classification", LABELS, layers=2, num_attention_heads=1)[0]
    kd = Distillation(teacher=str(tmp_path / "teacher"), attention=1.0, student={"from": "model"})
    with pytest.raises(SqueezeError, match="compares heads one to one"):
        kd.prepare_model(other, tiny_tokenizer("tiny_bert"))


def test_attention_transfer_trains_with_its_logged_part(teacher_run, tmp_path):
    record, spy = _distil(tmp_path, "kd", teacher_run, "compress.kd.student.layers=2", "compress.kd.attention=2.0")
    rows = _rows(tmp_path)
    assert len(rows) == 4
    for r in rows:
        expected = 0.5 * r["train/loss_task"] + 0.5 * r["train/loss_kd"] + 2.0 * r["train/loss_attention"]
        assert math.isclose(r["train/loss"], expected, rel_tol=1e-4), r
        assert r["train/loss_attention"] > 0
    summary = read_result(tmp_path)["compress"]["kd"]
    assert summary["attention"] == 2.0 and summary["teacher_cache"] is None
    assert spy._module.model.config._attn_implementation != "eager"


def test_alpha_zero_trains_the_student_alone_without_running_the_teacher():
    """The study's reference row (compress.kd.alpha=0: the cut student on the task alone) costs no teacher."""
    from squeeze.compress.distillation import Distill
    from squeeze.tasks.classification import SequenceClassification

    class Unreachable(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the teacher ran")

    student = _tiny("tiny_bert", layers=2)
    batch = {**text_batch(tiny_tokenizer("tiny_bert")), "labels": torch.tensor([1, 0, 1])}
    module = Distill(SequenceClassification(student), Unreachable(), TargetSpec(), alpha=0.0, beta=0.0)
    parts = module.losses(batch)
    assert set(parts) == {"loss", "loss_task"}
    assert torch.allclose(parts["loss"], student(**batch).loss)
    module.alpha = 0.5  # any teacher term runs it
    with pytest.raises(AssertionError, match="the teacher ran"):
        module.losses(batch)
