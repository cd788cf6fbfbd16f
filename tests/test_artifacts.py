"""squeeze.artifacts: every kind of model reference resolves to one answer, every bad one is refused
with one line that names the fix. Runs are made by hand (result.json + model/ + checkpoints/) from a
tiny random-init GPT-2, so no training is needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, fast

from squeeze import artifacts, assets, run
from squeeze.assets import AssetMissingError
from squeeze import formats
from squeeze.errors import SqueezeError
from squeeze.measure.speculative import check_draft, load_draft
from squeeze.record import read_record

HUB_ID = "someone/tiny-model"


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model("tiny_gpt2", "causal_lm")


def save_model(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def save_ckpt(model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def make_run(tmp_path: Path, tiny, name="run", status="ok", head="causal_lm", model=True, ckpt=True) -> Path:
    """A squeeze run directory as a run leaves it (the parts the resolver reads)."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    record = {"status": status, "choices": {"model": "tiny_gpt2", "compress": "imp"},
              "config": {"model": {"name": "tiny_gpt2", "kind": "decoder"}, "task": {"head": head}}}
    (run_dir / "result.json").write_text(json.dumps(record))
    if model:
        save_model(*tiny, run_dir / "model")
    if ckpt:
        save_ckpt(tiny[0], run_dir / "checkpoints" / "last.ckpt")
    return run_dir


# -- every kind --------------------------------------------------------------------------------------
def test_a_run_directory_gives_its_model_checkpoint_and_record(tmp_path, tiny):
    run_dir = make_run(tmp_path, tiny)
    found = artifacts.resolve(str(run_dir), "ckpt")
    assert found.kind == artifacts.RUN and found.run_dir == run_dir
    assert found.model_dir == run_dir / "model" and found.checkpoint == run_dir / "checkpoints" / "last.ckpt"
    assert (found.model_name, found.model_kind, found.head, found.model_type) == ("tiny_gpt2", "decoder", "causal_lm",
                                                                                  "gpt2")
    assert found.model_config == {"name": "tiny_gpt2", "kind": "decoder"}
    assert found.choices["compress"] == "imp" and found.location == str(run_dir / "model")
    # What it points at is the saved model itself.
    loaded = formats.load(found.model_dir, "causal_lm")
    assert all(torch.equal(v, tiny[0].state_dict()[k]) for k, v in loaded.state_dict().items())
    assert artifacts.resume_checkpoint(str(run_dir)) == run_dir / "checkpoints" / "last.ckpt"


def test_a_model_directory_a_ckpt_file_and_an_asset(tmp_path, tiny):
    model_dir = save_model(*tiny, tmp_path / "saved")
    found = artifacts.resolve(str(model_dir), "draft")
    assert (found.kind, found.model_dir, found.model_type, found.record, found.checkpoint) == \
           (artifacts.MODEL_DIR, model_dir, "gpt2", None, None)
    assert found.model_config is None and found.head is None

    ckpt = save_ckpt(tiny[0], tmp_path / "x" / "epoch=1.ckpt")
    found = artifacts.resolve(str(ckpt), "ckpt")
    assert (found.kind, found.checkpoint, found.model_dir) == (artifacts.CKPT, ckpt, None)
    assert artifacts.resume_checkpoint(str(ckpt)) == ckpt

    found = artifacts.resolve("minilm", "teacher")
    assert (found.kind, found.model_dir, found.model_type) == (artifacts.ASSET, assets.locate("minilm"), "bert")
    assert found.location == str(assets.locate("minilm"))


def test_a_hub_id_uses_the_local_hf_cache_or_is_left_to_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    found = artifacts.resolve(HUB_ID, "teacher")  # touches no network: the caller's from_pretrained downloads
    assert (found.kind, found.model_dir, found.location) == (artifacts.HUB, None, HUB_ID)
    # In the local HF cache: its snapshot directory, readable offline.
    snapshot = tmp_path / "hf" / "models--someone--tiny-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "hf" / "models--someone--tiny-model" / "refs").mkdir()
    (tmp_path / "hf" / "models--someone--tiny-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    found = artifacts.resolve(HUB_ID, "teacher")
    assert (found.kind, found.model_dir, found.model_type) == (artifacts.HUB, snapshot, "llama")


def test_a_run_recorded_before_model_kind_was_named_reads_as_today(tmp_path, tiny):
    run_dir = make_run(tmp_path, tiny)
    record = json.loads((run_dir / "result.json").read_text())
    record["config"]["model"] = {"name": "tiny_gpt2", "family": "decoder"}  # model.kind's old name
    (run_dir / "result.json").write_text(json.dumps(record))
    found = artifacts.resolve(str(run_dir), "ckpt")
    assert found.model_config == {"name": "tiny_gpt2", "kind": "decoder"} and found.model_kind == "decoder"



def test_a_run_recorded_before_its_targets_moved_reads_with_todays(tmp_path, tiny):
    run_dir = make_run(tmp_path, tiny)
    record = json.loads((run_dir / "result.json").read_text())
    record["config"].update({  # where these lived when such a run was written
        "task": {"data": {"_target_": "squeeze.data.LanguageModelingData"},
                 "module": {"_target_": "squeeze.modules.CausalLM"}},
        "scheduler": {"_target_": "squeeze.modules.linear_warmup_decay", "_partial_": True},
        "callbacks": {"energy": {"_target_": "squeeze.energy.EnergyMeter"},
                      "resume": {"_target_": "squeeze.resume.ResumeCheckpoint"}},
        "logger": {"csv": {"_target_": "squeeze.resume.CSVLogger"}},
        "trainer": {"strategy": {"_target_": "squeeze.sharding.fsdp"},
                    "plugins": [{"_target_": "squeeze.resume.AtomicCheckpointIO"}]}})
    (run_dir / "result.json").write_text(json.dumps(record))
    config = read_record(run_dir)["config"]
    assert config["task"] == {"data": {"_target_": "squeeze.tasks.lm.LanguageModelingData"},
                              "module": {"_target_": "squeeze.tasks.lm.CausalLM"}}
    assert config["scheduler"]["_target_"] == "squeeze.tasks.base.linear_warmup_decay"
    assert config["callbacks"]["energy"]["_target_"] == "squeeze.measure.energy.EnergyMeter"
    assert config["callbacks"]["resume"]["_target_"] == "squeeze.hardware.checkpointing.ResumeCheckpoint"
    assert config["logger"]["csv"]["_target_"] == "squeeze.hardware.checkpointing.CSVLogger"
    assert config["trainer"]["strategy"]["_target_"] == "squeeze.hardware.sharding.fsdp"
    assert config["trainer"]["plugins"] == [{"_target_": "squeeze.hardware.checkpointing.AtomicCheckpointIO"}]
    assert artifacts.resolve(str(run_dir), "ckpt").record["config"] == config  # what evaluate.py reads

# -- the one loader ---------------------------------------------------------------------------------
def test_the_loader_gives_the_model_and_its_prepared_tokenizer(tmp_path, tiny):
    model, tokenizer = tiny
    run_dir = make_run(tmp_path, tiny)
    for reference in (run_dir, run_dir / "model"):
        loaded, loaded_tokenizer = artifacts.load(artifacts.resolve(str(reference)), "causal_lm")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
        assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab() and loaded_tokenizer.pad_token is not None
    ckpt = artifacts.resolve(str(run_dir / "checkpoints" / "last.ckpt"), "ckpt")
    with pytest.raises(SqueezeError, match=r"holds weights but not the model; give a squeeze run directory"):
        artifacts.load(ckpt, "causal_lm", "ckpt")
    broken = save_model(*tiny, tmp_path / "broken")
    (broken / "model.safetensors").unlink()  # config.json without weights
    with pytest.raises(SqueezeError, match=f"teacher={broken}: {broken} could not be loaded") as error:
        artifacts.load(artifacts.resolve(str(broken), "teacher"), "causal_lm", "teacher")
    assert "\n" not in str(error.value)


# -- every error ------------------------------------------------------------------------------------
def _refused(reference, message, **kwargs):
    with pytest.raises(SqueezeError, match=message) as error:
        artifacts.resolve(str(reference), **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_missing_paths_and_files_that_are_no_checkpoint(tmp_path):
    _refused(tmp_path / "nope", f"ckpt={tmp_path}/nope does not exist; give a squeeze run directory", what="ckpt")
    _refused("outputs/minilm/rotten_tomatoes/x", "does not exist", what="ckpt")
    _refused("gone.ckpt", "gone.ckpt does not exist", what="ckpt")
    # Where no hub id is taken, a name that is nothing local is a missing path, not a hub id.
    _refused("runs/x", "ckpt=runs/x does not exist; give a squeeze run directory", what="ckpt",
             accept=(artifacts.RUN, artifacts.MODEL_DIR, artifacts.CKPT))
    (tmp_path / "weights.bin").write_bytes(b"0")
    _refused(tmp_path / "weights.bin", r"is a file but not a Lightning checkpoint \(.ckpt\)", what="ckpt")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path / "empty", r"neither a squeeze run directory \(result.json \+ model/\) nor a saved model "
                                 r"directory \(config.json\): the teacher checkpoint is missing", what="teacher")


def test_a_run_without_a_model_names_what_is_left(tmp_path, tiny):
    failed = make_run(tmp_path, tiny, "failed", status="failed", model=False)
    message = _refused(failed, "teacher run .* has no saved model .* the run failed", what="teacher")
    assert f"evaluate.py ckpt={failed}/checkpoints/last.ckpt" in message  # the fix: its checkpoint
    # Resuming needs only the checkpoint, which is there.
    assert artifacts.resume_checkpoint(str(failed)) == failed / "checkpoints" / "last.ckpt"
    nothing = make_run(tmp_path, tiny, "killed", status="running", model=False, ckpt=False)
    _refused(nothing, "has no saved model .* did not finish.* no checkpoint either .* train it again", what="ckpt")
    with pytest.raises(SqueezeError, match=r"ckpt_path=.*killed: no checkpoint at .*last.ckpt .*ckpt_path=last"):
        artifacts.resume_checkpoint(str(nothing))
    # A model directory is no checkpoint to resume from.
    with pytest.raises(SqueezeError, match="no checkpoint at"):
        artifacts.resume_checkpoint(str(save_model(*tiny, tmp_path / "saved")))


def test_assets_unknown_missing_or_not_a_model(tmp_path, monkeypatch):
    _refused("minilmm", r"neither a path nor a known asset \(did you mean minilm\?\)", what="teacher")
    _refused("gpt2_tokenizer", "holds a tokenizer or data, not a model", what="teacher")
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(AssetMissingError, match="python -m squeeze.assets fetch minilm"):
        artifacts.resolve("minilm", "teacher")


def test_a_hub_id_offline_names_the_offline_choices(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = _refused(HUB_ID, f"teacher={HUB_ID} was taken as a hub id .*HF_HUB_OFFLINE is set", what="teacher")
    assert "offline model asset (fetched: minilm, smollm2; python -m squeeze.assets list)" in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    found = artifacts.resolve(HUB_ID, "teacher")
    error = artifacts.load_error(found, OSError("We couldn't connect to 'https://huggingface.co'\nmore"), "teacher")
    assert "was taken as a hub id" in str(error) and "couldn't connect" in str(error) and "\n" not in str(error)


def test_kinds_a_caller_does_not_take_and_runs_of_another_head(tmp_path, tiny):
    ckpt = save_ckpt(tiny[0], tmp_path / "last.ckpt")
    _refused(ckpt, r"draft=.* is a Lightning checkpoint file \(.ckpt\), which draft= does not take; give a squeeze "
                   r"run directory or a saved model directory", what="draft",
             accept=(artifacts.RUN, artifacts.MODEL_DIR))
    _refused("minilm", "is an offline asset name, which ckpt= does not take", what="ckpt",
             accept=(artifacts.RUN, artifacts.MODEL_DIR, artifacts.CKPT))
    classifier = make_run(tmp_path, tiny, "classifier", head="sequence_classification")
    with pytest.raises(SqueezeError, match="teacher run .* was trained with a sequence_classification head but a "
                                           "causal_lm model is needed"):
        artifacts.require_head(artifacts.resolve(str(classifier), "teacher"), "causal_lm", "teacher")
    artifacts.require_head(artifacts.resolve(str(classifier)), "sequence_classification")


# -- the callers -----------------------------------------------------------------------------------
def test_drafts_resolve_through_the_resolver(tmp_path, tiny):
    model, tokenizer = tiny
    run_dir = make_run(tmp_path, tiny)
    draft = load_draft(str(run_dir), model, tokenizer)
    assert draft.config.num_hidden_layers == 2 and draft is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in draft.state_dict().items())
    classifier = make_run(tmp_path, tiny, "classifier", head="sequence_classification")
    with pytest.raises(SqueezeError, match="draft run .* was trained with a sequence_classification head"):
        check_draft(str(classifier), model, tokenizer)
    with pytest.raises(SqueezeError, match=r"draft=.*nope does not exist; give a layer count"):
        check_draft(str(tmp_path / "nope"), model, tokenizer)


def test_evaluate_refuses_a_run_without_a_model_before_loading_anything(tmp_path, tiny):
    failed = make_run(tmp_path, tiny, "failed", status="failed", model=False)
    cfg = compose_cfg("eval", [*fast("austen"), "task=austen", f"ckpt={failed}"], tmp_path / "eval")
    with pytest.raises(SqueezeError, match=f"ckpt run {failed} has no saved model .*evaluate.py ckpt={failed}/"
                                           "checkpoints/last.ckpt"):
        run.evaluate(cfg)
    cfg = compose_cfg("train", [*fast("austen"), "task=austen", "model=tiny_gpt2", f"ckpt_path={tmp_path}/gone"],
                      tmp_path / "train")
    with pytest.raises(SqueezeError, match=f"ckpt_path={tmp_path}/gone does not exist; give a .ckpt file"):
        run.train(cfg)
