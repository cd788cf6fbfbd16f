"""Issue 23: mistakes in settings stop before anything loads, with one line that names the closest valid name
(compressor names and settings, in a run and in a sweep; Hydra's own keys; optimizer values); a user's CSV with
string labels, a header-only CSV and a local model directory work or say what is wrong; and checkpoint files are
read as data, so one whose unpickling would run code is refused unless trust_checkpoint=true."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from squeeze import config, models, run
from squeeze.hardware import checkpointing, safe_load
from squeeze.config import (check_before_loading, check_compressor_config, check_compressor_setting,
                            check_optimizer, error_line, lenient_settings)
from squeeze.errors import SqueezeError
from squeeze.run.sweep import check_settings
from squeeze.tasks.sources import load_splits

from conftest import CONF, build_tiny, compose_cfg, fast, read_result, run_cli


def _one_line_exit_2(done) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    return errors[0]


# -- compressor names and settings ----------------------------------------------------------------------
@pytest.mark.parametrize("name, path, message", [
    ("ipm", ["target"], "compress.ipm: no compressor 'ipm'; did you mean 'imp'? (compressors: awq, dq, "),
    ("imp", ["targte"], "compress.imp.targte: imp has no setting 'targte'; did you mean 'target'?"),
    ("kd", ["student", "layer"], "compress.kd.student.layer: kd has no setting 'student.layer'; did you mean "
                                 "'student.layers'?"),
    ("qat", ["zzz"], "compress.qat.zzz: qat has no setting 'zzz' (settings: label, bits, "),
    # a subclass's constructor with **kwargs would take any name: sparsegpt names each of its base's settings
    ("sparsegpt", ["alocation"], "compress.sparsegpt.alocation: sparsegpt has no setting 'alocation'; did you mean "
                                 "'allocation'?"),
])
def test_a_misspelt_compressor_or_setting_names_the_closest_one(name, path, message):
    with pytest.raises(SqueezeError) as refused:
        check_compressor_setting(name, path)
    assert str(refused.value).startswith(message)


def test_every_setting_a_compressor_takes_is_accepted():
    check_compressor_setting("imp", ["target"])
    check_compressor_setting("kd", ["student", "layers"])
    check_compressor_setting("smoothquant", ["label"])  # the report's label: every compressor has it
    check_compressor_setting("kd", ["beta"])  # a parameter of its class that its YAML does not list
    check_compressor_setting("pkd", ["teacher_best_of", "optimizer.lr"])  # a value, not a nested setting


def test_a_run_refuses_settings_of_a_compressor_it_does_not_use(tmp_path):
    cfg = compose_cfg("train", lenient_settings(["model=tiny_bert", "compress=imp", "compress.dq.label=DQ"]), tmp_path)
    with pytest.raises(SqueezeError, match=r"^compress\.dq\.label: this run's chain \(compress=imp\) does not use "
                                           r"dq; add it \(compress=\[imp,dq\]\) or drop the setting$"):
        check_before_loading(cfg)
    cfg = compose_cfg("eval", lenient_settings(["model=tiny_bert", "compress=dq", "compress.dq.bitz=8"]), tmp_path)
    with pytest.raises(SqueezeError, match="^compress.dq.bitz: dq has no setting 'bitz'; did you mean 'bits'"):
        check_before_loading(cfg)  # evaluate.py's config, the same checks
    check_compressor_config(compose_cfg("train", lenient_settings(["compress=[imp,dq]", "compress.imp.target=0.3",
                                                                   "compress.dq.label=DQ"]), tmp_path).compress)


def test_the_cli_stops_on_a_misspelt_compressor_before_anything_loads(tmp_path):
    done = run_cli("train.py", ["model=tiny_bert", "compress=imp", "compress.ipm.target=0.3",
                                f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    line = _one_line_exit_2(done)
    assert line.startswith("error: compress.ipm: no compressor 'ipm'; did you mean 'imp'?")
    assert not (tmp_path / "run" / "result.json").exists()  # nothing started


# -- in a sweep -------------------------------------------------------------------------------------------
def test_a_sweep_keeps_a_setting_for_the_cells_that_use_it_and_says_which():
    jobs = [["compress=none", "++compress.imp.target=0.3", "seed=0"], ["compress=imp", "++compress.imp.target=0.3",
                                                                       "seed=0"]]
    cells, notes = check_settings(jobs, default=[])
    assert cells == [["compress=none", "seed=0"], ["compress=imp", "++compress.imp.target=0.3", "seed=0"]]
    assert notes == ["compress.imp.target applies to cells 1 (their chain has imp), not to cells 0 (none)"]
    # A setting every cell keeps (a preset row's own) is no news.
    assert check_settings([["compress=dq", "++compress.dq.label=DQ"]], default=[])[1] == []


def test_a_sweep_stops_before_its_first_cell_on_a_setting_no_cell_uses_or_a_misspelt_one():
    jobs = [["compress=none", "++compress.dq.label=DQ"], ["compress=imp", "++compress.dq.label=DQ"]]
    with pytest.raises(SqueezeError, match=r"^compress\.dq\.label: no cell of this sweep uses dq \(compress=none,imp\); "
                                           r"add it to a chain \(e\.g\. compress=\[imp,dq\]\) or drop the setting$"):
        check_settings(jobs, default=[])
    with pytest.raises(SqueezeError, match="^compress.ipm: no compressor 'ipm'; did you mean 'imp'"):
        check_settings([["compress=imp", "++compress.ipm.target=0.3"]], default=[])
    with pytest.raises(SqueezeError, match="^compress.imp.targte: imp has no setting 'targte'; did you mean 'target'"):
        check_settings([["compress=none", "++compress.imp.targte=0.3"], ["compress=imp", "++compress.imp.targte=0.3"]],
                       default=[])
    # A compressor the command line defines itself has no YAML to check against.
    check_settings([["++compress.mine._target_=x.Y", "++compress.mine.knob=1"]], default=["mine"])


# -- Hydra's own errors ---------------------------------------------------------------------------------
def _composition_error(overrides: list[str]) -> BaseException:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(Exception) as failed:
            compose("train", overrides=overrides)
    return failed.value


def test_hydra_composition_errors_become_one_line_with_the_closest_name():
    assert error_line(_composition_error(["trainer.max_step=5"])) == (
        "Could not override 'trainer.max_step': Key 'max_step' is not in struct (did you mean 'trainer.max_steps'?); "
        "to append to your config use +trainer.max_step=5")
    line = error_line(_composition_error(["compress=ipm"]))
    assert line.startswith("In 'train': Could not find 'compress/ipm'; did you mean 'imp'? (options in 'compress': awq, dq,")
    assert "\n" not in line and "search path" not in line


def test_a_misspelt_top_level_key_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    done = run_cli("train.py", ["model=tiny_bert", "trainer.max_step=5", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path)
    line = _one_line_exit_2(done)
    assert "trainer.max_step" in line and "did you mean 'trainer.max_steps'?" in line
    assert not (tmp_path / "run").exists()


def test_hydra_raises_to_the_entry_point_only_until_the_job_starts(monkeypatch, capsys):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py", "model.name_or_path=./dir"])
    seen = {}

    def main():
        seen["before"] = os.environ.get("HYDRA_FULL_ERROR")
        config.runs_started()
        seen["in the job"] = os.environ.get("HYDRA_FULL_ERROR")
        raise SqueezeError("refused")

    with pytest.raises(SystemExit) as stopped:
        config.run_entry(main)
    assert stopped.value.code == 2 and capsys.readouterr().err == "error: refused\n"
    assert seen == {"before": "1", "in the job": None}
    assert sys.argv[1:] == ["model.name_or_path=./dir", "model=local"]  # a local directory without model=


# -- optimizer and scheduler ----------------------------------------------------------------------------
def test_optimizer_values_torch_refuses_are_one_line_naming_the_setting(tmp_path):
    cfg = compose_cfg("train", ["model=tiny_bert", "optimizer.lr=-1"], tmp_path)
    with pytest.raises(SqueezeError, match=r"^optimizer\.lr=-1: torch\.optim\.AdamW refuses it \(Invalid learning rate"):
        check_optimizer(cfg.optimizer, cfg.scheduler)
    cfg = compose_cfg("train", ["model=tiny_bert", "+optimizer.betass=[0.9,0.99]"], tmp_path)
    with pytest.raises(SqueezeError, match="^optimizer.betass: torch.optim.AdamW has no setting 'betass'; did you mean "
                                           "'betas'"):
        check_optimizer(cfg.optimizer, cfg.scheduler)
    cfg = compose_cfg("train", ["model=tiny_bert", "scheduler.warmup_ratio=abc"], tmp_path)
    with pytest.raises(SqueezeError, match="^scheduler"):
        check_optimizer(cfg.optimizer, cfg.scheduler)
    cfg = compose_cfg("train", ["model=tiny_bert"], tmp_path)
    check_optimizer(cfg.optimizer, cfg.scheduler)  # the defaults pass


# -- data -----------------------------------------------------------------------------------------------
def test_a_header_only_csv_says_it_has_no_rows(tmp_path):
    data = tmp_path / "empty.csv"
    data.write_text("text,label\n")
    with pytest.raises(SqueezeError) as refused:
        load_splits("csv", data_files={"train": [str(data)]})
    assert str(refused.value).startswith(f"data file {data} (split 'train') has no rows (only a header)")
    assert "network" not in str(refused.value)


def test_string_labels_of_a_users_csv_become_sorted_class_ids(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"review number {i},{'pos' if i % 3 else 'neg'}\n" for i in range(40)))
    cfg = compose_cfg("train", ["model=tiny_bert", "task=rotten_tomatoes", f"task.data.data_files.train={data}",
                                *fast("rotten_tomatoes"), "trainer.max_steps=2", "perf=null"], tmp_path / "run")
    record = run.train(cfg)
    assert record["status"] == "ok"
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["label2id"] == {"neg": 0, "pos": 1}


# -- a local model directory ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("local") / "my-model"
    model, tokenizer = build_tiny("tiny_gpt2", head="causal_lm")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("chosen", [[], ["model=minilm"], ["model=tiny_bert"], ["model=gpt2"]])
def test_a_local_model_directory_is_the_model_whatever_model_says(tmp_path, model_dir, chosen):
    cfg = compose_cfg("train", lenient_settings([*chosen, f"model.name_or_path={model_dir}"]), tmp_path)
    check_before_loading(cfg)
    spec = instantiate(cfg.model, _convert_="all")
    assert isinstance(spec, models.Pretrained)
    assert (spec.name, spec.kind, spec.name_or_path, spec.model_type()) == ("my-model", "decoder", str(model_dir),
                                                                             "gpt2")


def test_a_run_trains_a_local_model_directory_given_without_model(tmp_path, model_dir):
    cfg = compose_cfg("train", lenient_settings([f"model.name_or_path={model_dir}", "task=austen", *fast("austen"),
                                                 "trainer.max_steps=2", "perf=null"]), tmp_path)
    check_before_loading(cfg)
    record = run.train(cfg)
    assert record["status"] == "ok" and record["config"]["model"]["kind"] is None
    with pytest.raises(SqueezeError, match="^model directory ./nowhere does not exist; check model.name_or_path"):
        check_before_loading(compose_cfg("train", lenient_settings(["model.name_or_path=./nowhere"]), tmp_path))


# -- checkpoints are data -------------------------------------------------------------------------------
class _TouchOnLoad:
    """Unpickled, it calls pathlib.Path(path).touch(): what any code run by a checkpoint could do."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


@pytest.fixture
def hostile_ckpt(tmp_path):
    marker = tmp_path / "ran-code-on-load"
    file = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 3, "payload": _TouchOnLoad(marker)}, file)
    torch.load(file, weights_only=False)  # the file does what it says when unpickled as code ...
    assert marker.exists()
    marker.unlink()
    return file, marker


def test_a_checkpoint_that_would_run_code_is_refused_everywhere_squeeze_reads_one(tmp_path, hostile_ckpt):
    file, marker = hostile_ckpt
    with pytest.raises(SqueezeError, match="unpickling it could run any code .*add trust_checkpoint=true"):
        safe_load.load(file)
    with pytest.raises(SqueezeError, match="trust_checkpoint=true"):
        checkpointing.checkpoint_position(file)  # ckpt_path=<file>: read before Lightning resumes
    with pytest.raises(SqueezeError, match="trust_checkpoint=true"):
        checkpointing.AtomicCheckpointIO().load_checkpoint(file)  # Lightning's own resume reads through it
    cfg = compose_cfg("eval", ["model=tiny_bert", "task=rotten_tomatoes", f"ckpt={file}"], tmp_path / "eval")
    with pytest.raises(SqueezeError, match="trust_checkpoint=true"):
        run.evaluate(cfg)
    assert read_result(tmp_path / "eval")["status"] == "failed"
    assert not marker.exists()  # ... but no read of squeeze's ran it
    with safe_load.trusting(True):  # the flag that accepts the risk
        checkpointing.AtomicCheckpointIO().load_checkpoint(file)
    assert marker.exists()


@pytest.mark.parametrize("setting,message", [
    ("task.module.bleu_smoothing=expo", r"^task.module.bleu_smoothing='expo' is not one of \['exp', 'none'\]$"),
    ("task.module.hits_rank=MC", r"^task.module.hits_rank='MC' is not one of \['lm', 'mc'\]$"),
    ("task.module.mc_coef=0", r"^task.module.hits_rank=mc ranks by the MC head, which mc_coef=0 never trains"),
])
def test_a_dialog_modules_choices_are_checked_before_the_model_loads(setting, message, tmp_path):
    overrides = ["model=tiny_gpt2", "task=chatterbot", setting]
    if setting.endswith("mc_coef=0"):
        overrides.append("task.module.hits_rank=mc")
    for kind in ("train", "eval"):
        with pytest.raises(SqueezeError, match=message):
            check_before_loading(compose_cfg(kind, overrides, tmp_path / kind))
    check_before_loading(compose_cfg("train", ["model=tiny_gpt2", "task=chatterbot", "task.module.hits_rank=mc"],
                                     tmp_path / "ok"))
