"""compress=imp: schedules as pure functions, masks per granularity and architecture, masks that hold
through AdamW, rewinding, the adaptive schedule, resume mid-schedule, and real runs whose sparse
model evaluate.py reloads."""

from __future__ import annotations

import csv
import itertools
import math
import signal
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import FAMILIES, FAST, build_tiny, compose_cfg, read_result, tiny_spec

from squeeze import run
from squeeze.arch import adapter_for
from squeeze import formats
from squeeze.run.build import chain as build_chain
from squeeze.compress.pruning import (
    IterativeMagnitudePruning,
    adaptive_should_prune,
    cubic_sparsity,
    fixed_sparsity,
    magnitude_masks,
    mask_sparsity,
    select_weights,
    stage_sparsity,
    stages_to_target,
)
from squeeze.errors import Interrupted, SqueezeError

TINY = FAMILIES



def pruning_events(sparsity_at, last_step: int) -> list[tuple[int, float]]:
    """The (step, sparsity) pairs at which a step schedule raises the sparsity, up to `last_step`."""
    events, level = [], 0.0
    for step in range(last_step + 1):
        s = sparsity_at(step)
        if s > level + 1e-9:
            events.append((step, s))
            level = s
    return events


def _monotone(levels):
    return all(b >= a for a, b in itertools.pairwise(levels))


# -- schedules -----------------------------------------------------------------------------------------
def test_fixed_schedule_prunes_a_share_of_the_remaining_weights_until_the_target():
    def at(step):
        return fixed_sparsity(step, target=0.7, fraction=0.2, frequency=10, start=5)

    levels = [at(s) for s in range(200)]
    assert set(levels[:15]) == {0.0} and _monotone(levels) and levels[-1] == 0.7
    events = pruning_events(at, 199)
    # 1 - 0.8^n first reaches 0.7 at n = 6 (0.738 is capped to the target).
    assert [step for step, _ in events] == [15, 25, 35, 45, 55, 65] and stages_to_target(0.7, 0.2) == 6
    remaining = [1.0] + [1 - s for _, s in events]
    assert all(math.isclose(b / a, 0.8) for a, b in itertools.pairwise(remaining[:-1]))
    assert events[-1][1] == 0.7 and max(levels) == 0.7


def test_cubic_schedule_is_zhu_and_gupta():
    def at(step):
        return cubic_sparsity(step, target=0.7, start=10, end=70, frequency=10)

    levels = [at(s) for s in range(100)]
    assert set(levels[:20]) == {0.0} and _monotone(levels) and set(levels[70:]) == {0.7}
    events = pruning_events(at, 99)
    assert [step for step, _ in events] == [20, 30, 40, 50, 60, 70]
    assert math.isclose(events[0][1], 0.7 * (1 - (5 / 6) ** 3))
    increments = [b - a for (_, a), (_, b) in zip([(0, 0.0)] + events, events)]
    assert all(b < a for a, b in itertools.pairwise(increments))  # fast first, slow at the end
    # An end off the frequency grid still ends exactly there; start == end is one-shot pruning.
    assert [s for s, _ in pruning_events(lambda s: cubic_sparsity(s, 0.5, 0, 25, 10), 40)] == [10, 20, 25]
    assert pruning_events(lambda s: cubic_sparsity(s, 0.5, 0, 0, 10), 5) == [(0, 0.5)]


def test_adaptive_stages_and_decision():
    stages = [stage_sparsity(n, 0.7, 0.5) for n in range(5)]
    assert stages == [0.0, 0.5, 0.7, 0.7, 0.7] and stages_to_target(0.7, 0.5) == 2
    assert adaptive_should_prune(0.4, threshold=0.5, level=0.0, target=0.7)
    assert not adaptive_should_prune(0.5, threshold=0.5, level=0.0, target=0.7)  # strictly below
    assert not adaptive_should_prune(float("nan"), threshold=0.5, level=0.0, target=0.7)
    assert not adaptive_should_prune(0.1, threshold=0.5, level=0.7, target=0.7)  # target reached


# -- settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    ({"target": 1.0}, "compress.imp.target=1.0 must be a sparsity strictly between 0 and 1"),
    ({"target": 0}, "compress.imp.target=0 must be a sparsity strictly between 0 and 1"),
    ({"frequency": 0}, "compress.imp.frequency=0 must be a whole number of steps"),
    ({"schedule": "linear"}, "compress.imp.schedule='linear' is not one of fixed, cubic, adaptive"),
    ({"granularity": "block"}, "compress.imp.granularity='block' is not one of global, layer, row"),
    ({"schedule": "fixed", "fraction": 1.5}, "compress.imp.fraction=1.5 must be strictly between 0 and 1"),
    ({"schedule": "adaptive"}, "compress.imp.threshold=None must be a number for schedule=adaptive"),
    ({"end_step": 5, "start_step": 10}, "compress.imp.end_step=5 must be a step number ≥ start_step"),
    ({"rewind_step": 50}, "compress.imp.rewind_step=50 comes after the first pruning step \\(10\\)"),
    ({"include": ["attn("]}, "compress.imp.include='attn\\(' is not a valid regular expression"),
    ({"recovery": 1.0}, "compress.imp.recovery=1.0 must be a share in \\[0, 1\\)"),
])
def test_bad_settings_fail_with_one_line(settings, message):
    with pytest.raises(SqueezeError, match=message) as error:
        IterativeMagnitudePruning(**settings)
    assert "\n" not in str(error.value)


def _squeeze_error(error: BaseException) -> SqueezeError | None:
    # Hydra's instantiate wraps what a _target_ raises; the SqueezeError is the cause.
    while error is not None and not isinstance(error, SqueezeError):
        error = error.__cause__
    return error


def test_the_config_path_users_type(tmp_path):
    cfg = compose_cfg("train", ["compress=imp", "compress.imp.target=1.5"], tmp_path)
    with pytest.raises(Exception) as error:
        build_chain(cfg.compress)
    assert "compress.imp.target=1.5 must be" in str(_squeeze_error(error.value))
    cfg = compose_cfg("train", ["compress=imp", "compress.imp.target=0.5", "compress.imp.schedule=fixed"], tmp_path)
    (imp,) = build_chain(cfg.compress)
    assert imp.name == "imp" and imp.target == 0.5 and imp.include is None and imp.exclude is None
    assert imp.test_best_checkpoint and imp.recovery == 0.3  # the best validation after the last event
    # null patterns are the family's, filled in when the model is seen, and recorded as used.
    imp.prepare_model(build_tiny("tiny_gpt2")[0], None)
    assert imp.include == [r"attn|mlp"] and imp.exclude == [r"wte|wpe|ln_"]
    assert imp.summary()["include"] == [r"attn|mlp"] and imp.summary()["exclude"] == [r"wte|wpe|ln_"]


def _defaults(model_or_name):
    """The family's default patterns: what compress=imp prunes when include/exclude are null."""
    if isinstance(model_or_name, str):  # a conf/model name
        model_or_name = tiny_spec(model_or_name).model_type()
    adapter = adapter_for(model_or_name)
    return [adapter.prune_include], [adapter.prune_exclude]


def test_a_pattern_that_matches_nothing_is_named(tmp_path):
    model = build_tiny("tiny_gpt2")[0]
    with pytest.raises(SqueezeError, match="pattern 'q_proj' matches no weight matrix of GPT2ForSequenceClassification"):
        IterativeMagnitudePruning(include=["attn", "q_proj"]).prepare_model(model, None)
    with pytest.raises(SqueezeError, match="pattern 'wte' matches no weight matrix"):  # excluded: embeddings
        IterativeMagnitudePruning(include=["wte"]).prepare_model(model, None)


# -- what is pruned ------------------------------------------------------------------------------------
# Per layer: BERT q,k,v,attention.output,intermediate,output; GPT-2 c_attn,attn.c_proj,c_fc,mlp.c_proj;
# Llama q,k,v,o,gate,up,down; OPT q,k,v,out_proj,fc1,fc2. GPT-2's are Conv1D (stored transposed), the others nn.Linear.
EXPECTED = {"tiny_bert": (12, 0), "tiny_gpt2": (8, 8), "tiny_llama": (14, 0), "tiny_opt": (12, 0)}


@pytest.mark.parametrize("name", TINY)
def test_default_patterns_select_attention_and_mlp_matrices(name, tmp_path):
    weights, transposed = select_weights(build_tiny(name)[0], *_defaults(name))
    assert (len(weights), len(transposed)) == EXPECTED[name]
    assert not any(k in n.lower() for n in weights for k in ("embed", "wte", "wpe", "norm", "ln_", "head", "score"))


@pytest.mark.parametrize("granularity", ["global", "layer", "row"])
@pytest.mark.parametrize("name", TINY)
def test_target_sparsity_is_reached_exactly(name, granularity, tmp_path):
    weights, transposed = select_weights(build_tiny(name)[0], *_defaults(name))
    masks = magnitude_masks(weights, 0.7, granularity, None, transposed)
    pruned = {n: int((~m).sum()) for n, m in masks.items()}
    total = sum(w.numel() for w in weights.values())
    if granularity == "global":
        assert sum(pruned.values()) == round(0.7 * total)
        # The kept weights are the largest: every kept |w| ≥ every pruned |w|.
        kept = torch.cat([w.detach().abs()[m] for w, m in zip(weights.values(), masks.values())])
        gone = torch.cat([w.detach().abs()[~m] for w, m in zip(weights.values(), masks.values())])
        assert kept.min() >= gone.max()
    elif granularity == "layer":
        assert all(pruned[n] == round(0.7 * w.numel()) for n, w in weights.items())
    else:
        for n, m in masks.items():
            rows = m.t() if n in transposed else m  # one row per output unit
            assert ((~rows).sum(1) == round(0.7 * rows.shape[1])).all()
    # Raising the level keeps what was pruned pruned.
    more = magnitude_masks(weights, 0.8, granularity, masks, transposed)
    assert all(not (more[n] & ~masks[n]).any() for n in masks) and mask_sparsity(more) > mask_sparsity(masks)


# -- during training (the callback's hooks, driven by hand) --------------------------------------------
def _trainer(optimizer, step=0, total=1000):
    # Validation every 2 of 100 batches an epoch (what an adaptive plan reads); no checkpoint callbacks.
    return SimpleNamespace(global_step=step, optimizers=[optimizer], loggers=[], estimated_stepping_batches=total,
                           sanity_checking=False, callback_metrics={}, checkpoint_callbacks=[], ckpt_path=None,
                           enable_validation=True, val_check_batch=2, num_training_batches=100,
                           check_val_every_n_epoch=1, accumulate_grad_batches=1)


def _optimizer(model, **kwargs):
    # Only the matrices being pruned: the (large, dense) embeddings would just slow the test down.
    weights, _ = select_weights(model, *_defaults(model))
    return torch.optim.AdamW(weights.values(), **kwargs)


def _train(model, imp, optimizer, trainer, steps, check=None, at_start=None):
    ids = torch.randint(0, 500, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        imp.on_train_batch_start(trainer, None, None, 0)  # a cut due at step k falls here, after k's validation
        if at_start:
            at_start()
        model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        imp.on_before_optimizer_step(trainer, None, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        trainer.global_step += 1
        if check:
            check()  # before the masks are re-applied: what the optimizer step alone did
        imp.on_train_batch_end(trainer, None, None, None, 0)


@pytest.mark.parametrize("name, schedule", [("tiny_gpt2", {"schedule": "cubic", "end_step": 5}),
                                            ("tiny_llama", {"schedule": "fixed", "fraction": 0.6})])
def test_pruned_weights_stay_zero_through_adamw_with_weight_decay(name, schedule, tmp_path):
    model = build_tiny(name)[0]
    imp = IterativeMagnitudePruning(target=0.6, frequency=5, **schedule)  # both: 0.6 at step 5
    optimizer = _optimizer(model, lr=1e-2, weight_decay=0.1)
    trainer = _trainer(optimizer)
    imp.on_train_start(trainer, SimpleNamespace(model=model))
    _train(model, imp, optimizer, trainer, 5)  # dense steps first: every entry has Adam moments
    imp.on_train_batch_start(trainer, None, None, 0)  # the next batch starts with the cut due at step 5
    assert imp.level == 0.6 and imp.events[0]["step"] == 5
    pruned = {n: ~m.clone() for n, m in imp.masks.items()}
    before = {n: p.detach().clone() for n, p in imp._weights.items()}

    def still_zero():
        for n, p in imp._weights.items():
            assert (p[pruned[n]] == 0).all(), n
            state = optimizer.state[p]
            assert (state["exp_avg"][pruned[n]] == 0).all() and (state["exp_avg_sq"][pruned[n]] == 0).all()

    _train(model, imp, optimizer, trainer, 20, check=still_zero)
    moved = [not torch.equal(p[~pruned[n]], before[n][~pruned[n]]) for n, p in imp._weights.items()]
    assert all(moved)  # the survivors did train
    assert mask_sparsity(imp.masks) == pytest.approx(0.6, abs=1e-4)


@pytest.mark.parametrize("rewind_step", [0, 2])
def test_rewinding_restores_the_recorded_values(rewind_step, tmp_path):
    model = build_tiny("tiny_gpt2")[0]
    imp = IterativeMagnitudePruning(target=0.5, schedule="cubic", end_step=6, frequency=3, rewind_step=rewind_step)
    optimizer = _optimizer(model, lr=1e-2)
    trainer = _trainer(optimizer)
    imp.on_train_start(trainer, SimpleNamespace(model=model))
    recorded = {}

    def record():
        if trainer.global_step == rewind_step or (rewind_step == 0 and not recorded):
            recorded.update({n: p.detach().clone() for n, p in imp._weights.items()})

    if rewind_step == 0:
        record()
    def rewound():  # right after the cut due at step 3 or 6: survivors are back at their step-k values
        if trainer.global_step in (3, 6):
            for n, p in imp._weights.items():
                m = imp.masks[n]
                assert torch.equal(p[m], recorded[n][m]) and (p[~m] == 0).all()

    for _ in range(7):
        _train(model, imp, optimizer, trainer, 1, check=record, at_start=rewound)
    assert [e["step"] for e in imp.events] == [3, 6]
    # Without rewinding the survivors keep their trained values.
    plain = build_tiny("tiny_gpt2")[0]
    imp = IterativeMagnitudePruning(target=0.5, schedule="cubic", end_step=6, frequency=3)
    optimizer = _optimizer(plain, lr=1e-2)
    trainer = _trainer(optimizer)
    imp.on_train_start(trainer, SimpleNamespace(model=plain))
    _train(plain, imp, optimizer, trainer, 3)
    imp.on_train_batch_start(trainer, None, None, 0)  # the cut due at step 3
    n = next(iter(imp._weights))
    assert not torch.equal(imp._weights[n][imp.masks[n]], recorded[n][imp.masks[n]])


def test_adaptive_prunes_only_at_validations_under_the_threshold(tmp_path):
    model = build_tiny("tiny_llama")[0]
    imp = IterativeMagnitudePruning(target=0.7, schedule="adaptive", fraction=0.5, threshold=1.0)
    trainer = _trainer(_optimizer(model))
    imp.on_train_start(trainer, SimpleNamespace(model=model))
    assert imp.level == 0.0  # nothing before a validation
    trainer.sanity_checking = True
    trainer.callback_metrics = {"val/loss": torch.tensor(0.1)}
    imp.on_validation_end(trainer, None)
    assert imp.level == 0.0  # the sanity check is no validation of the model
    trainer.sanity_checking = False
    levels = []
    for loss in (1.2, 0.8, 1.1, 0.9, 0.5):
        trainer.callback_metrics = {"val/loss": torch.tensor(loss)}
        imp.on_validation_end(trainer, None)
        assert round(mask_sparsity(imp.masks), 3) == (levels[-1] if levels else 0.0)  # not at that validation
        imp.on_train_batch_start(trainer, None, None, 0)  # but before the next step
        levels.append(round(mask_sparsity(imp.masks), 3))
    assert levels == [0.0, 0.5, 0.5, 0.7, 0.7]
    assert imp.stage == 2 and imp.summary()["reached_target"]


# -- real runs -------------------------------------------------------------------------------------------
RUN = FAST + ["trainer.limit_val_batches=1", "trainer.limit_test_batches=2", "task=rotten_tomatoes"]


def _csv_sparsity(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["compress/sparsity"])) for r in csv.DictReader(f) if r.get("compress/sparsity")]


@pytest.mark.parametrize("name, settings", [
    # 8 steps: the events end by step 5, the last 3 train at the target
    ("tiny_gpt2", ["compress.imp.schedule=cubic", "compress.imp.end_step=5", "compress.imp.frequency=2"]),
    ("tiny_opt", ["compress.imp.schedule=cubic", "compress.imp.end_step=5", "compress.imp.frequency=2"]),
    # adaptive: validation every 2 steps, each under the (generous) threshold until the target is reached
    ("tiny_bert", ["compress.imp.schedule=adaptive", "compress.imp.fraction=0.5", "compress.imp.threshold=100",
                   "compress.imp.granularity=row", "trainer.val_check_interval=2"]),
])
def test_a_run_reaches_the_target_and_evaluate_reloads_the_sparse_model(name, settings, tmp_path):
    overrides = [*RUN, f"model={name}", "compress=imp", "compress.imp.target=0.7", "trainer.max_steps=8", *settings]
    record = run.train(compose_cfg("train", overrides, tmp_path))
    assert record["status"] == "ok", record["error"]
    saved = read_result(tmp_path)
    imp = saved["compress"]["imp"]
    assert imp["sparsity"] == pytest.approx(0.7, abs=0.005) and imp["reached_target"]
    assert len(imp["layer_sparsity"]) == EXPECTED[name][0]
    if imp["granularity"] == "row":  # every matrix at the target; global lets them differ
        assert all(s == pytest.approx(0.7, abs=0.01) for s in imp["layer_sparsity"].values())
    else:
        assert all(0 < s < 1 for s in imp["layer_sparsity"].values())
    assert saved["nonzero_params"] <= saved["params"] - round(0.69 * imp["pruned_params"])
    # Logged at each pruning step, as recorded; the last one is the target.
    logged = _csv_sparsity(tmp_path)
    assert [s for s, _ in logged] == [e["step"] for e in imp["events"]] and len(logged) >= 2
    assert logged[-1][1] == pytest.approx(0.7, abs=0.005)
    # No event in the last 30% of the 8 steps: the tested model trained 3 or more steps at the target.
    assert imp["deadline_step"] == 5 and imp["events"][-1]["step"] <= 5
    assert imp["steps_after_last_event"] == 8 - imp["events"][-1]["step"] >= 3
    # The model directory is the sparse format, with no dense copy, and evaluate.py reads it.
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert formats.sparse.SPARSE_FILE in files and "model.safetensors" not in files
    eval_dir = tmp_path / "eval"
    # model= named: the committed run._load_checkpoint reloads the tokenizer with model='s class.
    evaluated = run.evaluate(compose_cfg("eval", [*RUN, f"model={name}", f"ckpt={tmp_path}"], eval_dir))
    assert evaluated["status"] == "ok", evaluated["error"]
    assert evaluated["choices"]["compress"] == "imp"
    for key, value in record["metrics"].items():
        assert evaluated["metrics"][key] == pytest.approx(value, abs=1e-6)
    assert evaluated["checkpoint_bytes"] == saved["checkpoint_bytes"]
    assert evaluated["nonzero_params"] == saved["nonzero_params"]


class StopAt(L.Callback):
    """Stops the run as a SIGTERM would, before optimizer step `step` + 1 (the step-`step` checkpoint is on disk)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Interrupted(signal.SIGTERM, step=self.step)


def test_resuming_mid_schedule_gives_the_masks_of_an_uninterrupted_run(tmp_path):
    # One training example and a constant learning rate: both runs see exactly the same steps, so any
    # difference comes from what the checkpoint did (not) carry: masks, schedule state, rewind values.
    common = [*FAST, "model=tiny_llama", "task=rotten_tomatoes", "task.data.max_examples.train=1",
              "task.data.batch_size=1", "scheduler=null", "optimizer.lr=1e-2", "trainer.max_epochs=100",
              "trainer.limit_val_batches=0", "trainer.limit_test_batches=1", "trainer.max_steps=10",
              "checkpoint.every_n_steps=1", "checkpoint.every_minutes=null", "compress=imp",
              "compress.imp.target=0.6", "compress.imp.end_step=6", "compress.imp.frequency=2",
              "compress.imp.rewind_step=1"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run.train(compose_cfg("train", common, whole))["status"] == "ok"
    with pytest.raises(SystemExit):  # interrupted after step 4 (squeeze.run.guard: status "interrupted")
        run.train(compose_cfg("train", [*common, "+callbacks.stop._target_=test_pruning.StopAt",
                                        "+callbacks.stop.step=4"], parts))
    assert read_result(parts)["status"] == "interrupted"
    resumed = run.train(compose_cfg("train", [*common, "ckpt_path=last"], parts))
    assert resumed["status"] == "ok", resumed["error"]
    assert resumed["resumed_from"]["step"] == 4
    assert [e["step"] for e in resumed["compress"]["imp"]["events"]] == [2, 4, 6]
    # The rows before the resume are kept and the resumed run pruned only the remaining stage (once).
    assert [step for step, _ in _csv_sparsity(parts)] == [2, 4, 6]
    a = formats.load(whole / "model", "sequence_classification")
    b = formats.load(parts / "model", "sequence_classification")
    weights_a, _ = select_weights(a, *_defaults(a))
    weights_b, _ = select_weights(b, *_defaults(b))
    for n, p in weights_a.items():
        assert torch.equal(p == 0, weights_b[n] == 0), n
        torch.testing.assert_close(p, weights_b[n])
    summary = read_result(whole)["compress"]["imp"]
    assert summary["sparsity"] == resumed["compress"]["imp"]["sparsity"]
    # No validation at all (limit_val_batches=0): the last weights are tested, and the record says so.
    assert summary["steps_after_last_event"] == resumed["compress"]["imp"]["steps_after_last_event"] == 4
    assert summary["validations_after_last_event"] == 0 and read_result(whole)["validation"] is None


def test_fixed_steps_of_the_original_weights_reach_90_percent_in_nine_events():
    from squeeze.compress.pruning import fixed_sparsity, stages_to_target

    at = [fixed_sparsity(step, 0.9, 0.1, 10, 0, "original") for step in (0, 10, 50, 90, 100)]
    assert [round(x, 6) for x in at] == [0.0, 0.1, 0.5, 0.9, 0.9]
    assert stages_to_target(0.9, 0.1, "original") == 9
    assert stages_to_target(0.9, 0.1, "remaining") == 22  # 1 - 0.9^22 ≥ 0.9: the remaining-share schedule
    with pytest.raises(SqueezeError, match="compress.imp.step_of='start'"):
        IterativeMagnitudePruning(schedule="fixed", step_of="start")


def test_end_step_null_reaches_the_target_at_70_percent_of_the_run():
    imp = IterativeMagnitudePruning(target=0.5)  # the defaults: cubic, end_step null, recovery 0.3
    imp.plan_for(100)
    assert imp.end_step == imp.deadline == 70 and imp.sparsity_at(70) == 0.5 and imp.sparsity_at(69) < 0.5
    short = IterativeMagnitudePruning(target=0.5)
    short.plan_for(6)
    assert short.end_step == 4 and short.sparsity_at(4) == 0.5
    with pytest.raises(SqueezeError, match="needs a run of known length"):
        IterativeMagnitudePruning().plan_for(math.inf)


def test_a_six_step_run_with_the_defaults_is_pruned(tmp_path):
    # Before end_step null, the default end_step 70 left a 6-step run at 0% sparsity.
    cfg = compose_cfg("train", ["model=tiny_bert", "task=rotten_tomatoes", "compress=imp", "trainer.max_steps=6",
                                *FAST, "perf=null"], tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    assert abs(record["sparsity"] - 0.7) < 0.01
    assert record["compress"]["imp"]["schedule"]["end_step"] == 4


# -- recovery: no event in the last `recovery` share of the run, and the tested model is the one after it ------
def test_the_deadline_leaves_the_last_30_percent_of_the_steps_and_at_least_one():
    from squeeze.compress import pruning_deadline
    from squeeze.compress.pruning import first_validation

    assert [pruning_deadline(t, 0.3) for t in (100, 10, 8, 6, 2, 1)] == [70, 7, 5, 4, 1, 0]
    assert pruning_deadline(10, 0.0) == 9  # always at least one step after the last event
    # Lightning's validation rules: every 4 batches of a 10-batch epoch; at its end; every 2nd epoch; across epochs
    assert first_validation(4, 10, 1) == 4 and first_validation(math.inf, 10, 1) == 10
    assert first_validation(10, 10, 2) == 20 and first_validation(25, 10, None) == 25
    assert first_validation(4, 10, 1, accumulate=2) == 2 and first_validation(None, 10, 1) is None


REFUSED = FAST + ["model=tiny_bert", "task=rotten_tomatoes", "perf=null", "trainer.limit_val_batches=1",
                  "compress=imp", "compress.imp.target=0.75"]


@pytest.mark.parametrize("settings, message", [
    # the target on the last step of 8 (the observed failure): events must end by step 5
    (["compress.imp.schedule=cubic", "compress.imp.end_step=8", "compress.imp.frequency=2"],
     r"reaches its target at step 8, but this run's last 3 of 8 optimizer steps are kept to recover "
     r"\(compress.imp.recovery=0.3\), so pruning ends by step 5; set compress.imp.end_step ≤ 5"),
    # half, then a quarter: 2 events every 2 steps end at step 4, after step 3 of 5
    (["trainer.max_steps=5", "compress.imp.schedule=fixed", "compress.imp.fraction=0.5",
      "compress.imp.frequency=2"],
     r"reaches its target at step 4 \(2 events every 2 steps from step 0\), but .* pruning ends by step 3; lower "
     r"compress.imp.frequency to ≤ 1, or train ≥ 6 steps"),
    # 8 batches an epoch validated only at its end: after step 5, so adaptive could never prune
    (["compress.imp.schedule=adaptive", "compress.imp.fraction=0.5", "compress.imp.threshold=100"],
     r"schedule=adaptive prunes at validations, and this run first validates after step 8, but .* pruning ends "
     r"by step 5; validate more often"),
])
def test_a_schedule_with_no_recovery_is_refused_before_training(settings, message, tmp_path):
    with pytest.raises(SqueezeError, match=message) as error:
        run.train(compose_cfg("train", [*REFUSED, "trainer.max_steps=8", *settings], tmp_path))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists() and not (tmp_path / "model").exists()


def test_a_rewind_belongs_to_its_event_and_none_comes_after_the_deadline(tmp_path):
    model = build_tiny("tiny_gpt2")[0]
    # 10 steps: events every 3 steps (half, then a quarter more) end at step 6, before the deadline (7).
    imp = IterativeMagnitudePruning(target=0.75, schedule="fixed", fraction=0.5, frequency=3, rewind_step=0)
    optimizer = _optimizer(model, lr=1e-2)
    trainer = _trainer(optimizer, total=10)
    imp.on_train_start(trainer, SimpleNamespace(model=model))
    pretrained = {n: p.detach().clone() for n, p in imp._weights.items()}
    rewound = []

    def at_pretrained():  # the survivors are back at their pretrained values
        return all(torch.equal(p[imp.masks[n]], pretrained[n][imp.masks[n]]) for n, p in imp._weights.items())

    def note_rewind():  # at a batch start: right after a cut due at this step, if one was
        if trainer.global_step > 0 and at_pretrained():
            rewound.append(trainer.global_step)

    for _ in range(10):
        _train(model, imp, optimizer, trainer, 1, at_start=note_rewind)
    assert imp.deadline == 7 and [e["step"] for e in imp.events] == [3, 6] and rewound == [3, 6]
    imp.on_train_end(trainer, None)
    assert imp.summary()["steps_after_last_event"] == 4
    # adaptive: a validation inside the recovery window chooses no stage, so nothing is pruned or rewound there
    model = build_tiny("tiny_gpt2")[0]
    adaptive = IterativeMagnitudePruning(target=0.75, schedule="adaptive", fraction=0.5, threshold=10.0, rewind_step=0)
    trainer = _trainer(_optimizer(model), total=10)
    adaptive.on_train_start(trainer, SimpleNamespace(model=model))
    trainer.callback_metrics = {"val/loss": torch.tensor(0.1)}
    for step in (7, 8):
        trainer.global_step = step
        adaptive.on_validation_end(trainer, None)
        adaptive.on_train_batch_start(trainer, None, None, 0)
    assert [e["step"] for e in adaptive.events] == [7]  # the validation at the deadline prunes, the next does not


def _state(ckpt) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def _val_losses(run_dir) -> list[tuple[int, float]]:
    """(optimizer steps before the validation, val/loss): Lightning logs a validation at step k - 1 of metrics.csv."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(int(r["step"]) + 1, float(r["val/loss"])) for r in csv.DictReader(f) if r.get("val/loss")]


def test_the_tested_model_is_the_best_validation_after_the_last_event_also_when_resumed(tmp_path):
    # 64 examples, 8 a batch: 8 steps an epoch, 10 steps, validated every 2; events at steps 3 and 6 (deadline 7),
    # each at the start of the batch after its step (after the validation at step 6), so validations 8 and 10 see
    # the final sparsity. The checkpoint kept is the one of the highest val/loss
    # (mode max): continuous, and here the denser model's validation at step 4 has the highest of all, so a best
    # kept from before the last event would show.
    common = [*FAST, "model=tiny_gpt2", "task=rotten_tomatoes", "perf=null", "callbacks.energy=null",
              "task.monitor=val/loss", "task.monitor_mode=max", "trainer.max_steps=10", "trainer.max_epochs=100",
              "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
              "checkpoint.every_n_steps=1", "checkpoint.every_minutes=null", "compress=imp",
              "compress.imp.schedule=fixed", "compress.imp.fraction=0.5", "compress.imp.target=0.75",
              "compress.imp.frequency=3", "compress.imp.rewind_step=0", "checkpoint.keep_after_success=best"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run.train(compose_cfg("train", common, whole))["status"] == "ok"
    saved = read_result(whole)
    imp = saved["compress"]["imp"]
    assert [e["step"] for e in imp["events"]] == [3, 6] and imp["deadline_step"] == 7
    assert imp["steps_after_last_event"] == 4 and imp["validations_after_last_event"] == 2
    assert saved["sparsity"] == pytest.approx(0.75, abs=0.005)
    # validation.best: the best of the validations after the last event (not of the denser model's before it)
    losses = _val_losses(whole)
    assert [s for s, _ in losses] == [2, 4, 6, 8, 10]
    after = max(v for s, v in losses if s > 6)
    assert max(v for _, v in losses) > after  # the data this test needs: an earlier, denser "best"
    assert saved["validation"]["best"] == pytest.approx(after, rel=1e-6)
    # ... and that checkpoint (the only best one kept) is the model tested and saved, at the target sparsity
    assert [p.name for p in (whole / "checkpoints").glob("best*.ckpt")] == ["best.ckpt"]
    best = _state(whole / "checkpoints" / "best.ckpt")
    assert best["global_step"] >= 8
    tested = formats.load(whole / "model", "sequence_classification")
    for name, p in tested.named_parameters():
        torch.testing.assert_close(p, best["state_dict"][f"model.{name}"], rtol=0, atol=0)
    weights, _ = select_weights(tested, *_defaults(tested))
    assert mask_sparsity({n: p != 0 for n, p in weights.items()}) == pytest.approx(0.75, abs=0.005)

    # Interrupted mid-epoch between the two events (its best checkpoint then from the validation at step 4), and
    # resumed: the second event forgets that one too, and the run ends where the uninterrupted one did.
    with pytest.raises(SystemExit):
        run.train(compose_cfg("train", [*common, "+callbacks.stop._target_=test_pruning.StopAt",
                                        "+callbacks.stop.step=5"], parts))
    assert _state(parts / "checkpoints" / "best.ckpt")["global_step"] == 4
    resumed = run.train(compose_cfg("train", [*common, "ckpt_path=last"], parts))
    assert resumed["status"] == "ok", resumed["error"]
    assert resumed["resumed_from"]["step"] == 5
    assert resumed["validation"]["best"] == pytest.approx(saved["validation"]["best"], rel=1e-6)
    assert resumed["metrics"] == pytest.approx(saved["metrics"], rel=1e-6, abs=1e-7)
    assert resumed["compress"]["imp"]["steps_after_last_event"] == 4
    assert resumed["compress"]["imp"]["validations_after_last_event"] == 2
    assert _state(parts / "checkpoints" / "best.ckpt")["global_step"] == best["global_step"]


def test_the_offline_presets_pruning_ends_before_their_recovery_window(tmp_path):
    from squeeze.compress.pruning import first_validation
    from squeeze.compress.structured import HeadPruning
    from test_presets import _cells

    checked = 0
    for name in ("best_way_to_squeeze_offline", "nanogpt_compression_offline", "pruning_rates_offline",
                 "gpt2_compression_offline"):
        for cell in _cells(name, tmp_path):
            if not any(o.startswith("compress=") and ("imp" in o or "heads" in o) for o in cell):
                continue
            cfg = compose_cfg("train", cell, tmp_path)
            steps, every = int(cfg.trainer.max_steps), cfg.trainer.val_check_interval
            for compressor in build_chain(cfg.compress):
                if isinstance(compressor, IterativeMagnitudePruning):
                    # every preset validates every k batches of an epoch longer than the run
                    compressor.plan_for(steps, first_validation(every, 10**6, 1))
                    checked += 1
                elif isinstance(compressor, HeadPruning):
                    assert compressor.iterations == 1  # cut before fine-tuning: the whole run recovers
    assert checked >= 6


def test_rounds_of_a_share_of_the_original_weights_leave_a_trajectory_of_validation_and_throughput(tmp_path):
    """The nanoGPT schedule, small: fine-tune 2 steps, then 3 rounds of 10 % of the original weights every 2 steps,
    validated every 2 (the end of each round's retraining): the record holds one point per round, from the dense
    model on, each the last validation before the next cut, with that round's training throughput."""
    overrides = [*FAST, "model=tiny_gpt2", "task=rotten_tomatoes", "perf=null", "callbacks.energy=null",
                 "trainer.max_steps=9", "trainer.max_epochs=100", "trainer.val_check_interval=2",
                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "compress=imp",
                 "compress.imp.schedule=fixed", "compress.imp.fraction=0.1", "compress.imp.step_of=original",
                 "compress.imp.target=0.3", "compress.imp.start_step=0", "compress.imp.frequency=2",
                 "compress.imp.recovery=0.3"]
    assert run.train(compose_cfg("train", overrides, tmp_path))["status"] == "ok"
    imp = read_result(tmp_path)["compress"]["imp"]
    assert [e["step"] for e in imp["events"]] == [2, 4, 6]
    points = imp["trajectory"]
    assert [p["sparsity"] for p in points] == pytest.approx([0.0, 0.1, 0.2, 0.3], abs=0.005)
    losses = dict(_val_losses(tmp_path))
    # dense: the validation at step 2 (before the cut at the end of step 2); each round: its last validation
    assert [p["step"] for p in points] == [2, 4, 6, 8]
    for p in points:
        assert p["val/loss"] == pytest.approx(losses[p["step"]], rel=1e-5)
        assert p["train_tokens_per_s"] > 0
    assert [p.get("pruned_at") for p in points[1:]] == [2, 4, 6]


def test_adaptive_waits_for_its_warm_up_before_the_first_check():
    """The nanoGPT loss-threshold schedule: no stage at validations before start_step, even under the threshold."""
    model = build_tiny("tiny_gpt2")[0]
    imp = IterativeMagnitudePruning(target=0.5, schedule="adaptive", fraction=0.25, threshold=3.2, start_step=5)
    trainer = _trainer(_optimizer(model), total=20)
    imp.on_train_start(trainer, SimpleNamespace(model=model))
    trainer.callback_metrics = {"val/loss": torch.tensor(1.0)}  # under the threshold at every check
    for step in (2, 4, 6):
        trainer.global_step = step
        imp.on_validation_end(trainer, None)
        imp.on_train_batch_start(trainer, None, None, 0)
    assert [e["step"] for e in imp.events] == [6]
    with pytest.raises(SqueezeError, match=r"warms up until step 18 .* pruning ends by step 14"):
        IterativeMagnitudePruning(target=0.5, schedule="adaptive", fraction=0.25, threshold=3.2,
                                  start_step=18).plan_for(20)
