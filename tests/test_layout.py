"""The adapter wall (../ARCHITECTURE.md): outside squeeze/arch/ no code decides anything from a model class's
name, a module name or a config field that one family happens to have; it asks the family adapter.

The checker reads the code's syntax tree, not its text, so comments, docstrings and error messages that
name a class (e.g. "GPT-2's Conv1D") are not guesses. Left alone on purpose: isinstance/type checks
against torch's generic nn.Linear / nn.Embedding / nn.Dropout and squeeze's own classes; config fields
every transformers config answers (num_hidden_layers, hidden_size: a family that names them otherwise maps
them through its attribute_map); class-name comparisons on things that are not model parts (a logger, an
exception, an OmegaConf container).

Also the task wall: task code lives in squeeze/tasks/, one module per task kind, and every conf/task YAML
names classes there that follow the contract squeeze/tasks/__init__.py lists.

And the parts (../ARCHITECTURE.md's target layout): `ls squeeze/` shows a folder per part and only the cross-cutting
modules beside them; the run recipe reads top to bottom in a few screenfuls; only the entry points, the sweeper and
squeeze.run.cell read HydraConfig; the sweeper's schema registers with its plugin; a record written before a
`_target_` moved reads as today's code."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "squeeze"
TASK_YAMLS = sorted((ROOT / "conf" / "task").glob("*.yaml"))
ADAPTERS = PACKAGE / "arch"

# A class name that is a model part: what a `type(m).__name__` test would be guessing at.
MODEL_PART = re.compile(r"Attention|Norm|Embedding|MLP|Conv1D|Linear|Dropout|Block|Layer|Decoder|Encoder|Model|"
                        r"Pretrained|For[A-Z]|Head")
# Config fields under one family's own name (GPT-2's n_*, DistilBERT's n_layers/n_heads, OPT's ffn_dim), and
# max_position_embeddings, which not every family has (the adapter's max_positions answers).
FAMILY_FIELDS = {"n_positions", "n_ctx", "n_layer", "n_layers", "n_embd", "n_head", "n_heads", "n_inner", "ffn_dim",
                 "max_position_embeddings"}
# Module and attribute names that exist in some families only.
FAMILY_MODULES = {"norm", "ln", "ln_", "ln_f", "ln_1", "ln_2", "wte", "wpe", "embed_tokens", "embed_positions",
                  "final_layer_norm", "self_attn_layer_norm", "input_layernorm", "post_attention_layernorm",
                  "c_attn", "c_proj", "c_fc", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj",
                  "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "q_lin", "k_lin", "v_lin", "out_lin",
                  "attn_dropout", "attention_dropout", "resid_dropout"}
# As attributes, two of those are generic: a tensor's .norm() and the adapters' own o_proj(layer).
FAMILY_ATTRIBUTES = FAMILY_FIELDS | FAMILY_MODULES - {"norm", "o_proj"}


def _strings(node: ast.AST) -> list[str]:
    """The string constants of a node that is a string or a tuple/list/set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def _is_class_name(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "__name__"


def guesses(source: str, filename: str = "<string>") -> list[str]:
    """Every family guess in `source`, as `file:line: what`."""
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    fstring_parts = set()
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):  # an f-string's text is a message, never a name looked up
            fstring_parts.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            words = [s for o in operands for s in _strings(o)]
            if any(map(_is_class_name, operands)) and any(MODEL_PART.search(w) for w in words):
                flag(node, f"a class name compared with {words}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and _is_class_name(node.func.value)):
            words = [s for a in node.args for s in _strings(a)]
            if any(MODEL_PART.search(w) for w in words):
                flag(node, f"a class name's {node.func.attr}({words})")
        elif isinstance(node, ast.Name) and node.id == "Conv1D":
            flag(node, "GPT-2's Conv1D (squeeze.arch.linear answers Linear-or-Conv1D questions)")
        elif isinstance(node, ast.alias) and node.name.rpartition(".")[2] == "Conv1D":
            found.append(f"{filename}: imports GPT-2's Conv1D")
        elif isinstance(node, ast.Attribute) and node.attr in FAMILY_ATTRIBUTES:
            flag(node, f"the family-specific attribute .{node.attr}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in fstring_parts
              and node.value in FAMILY_FIELDS | FAMILY_MODULES):
            flag(node, f"the family-specific name {node.value!r}")
    return found


def test_no_family_guesses_outside_the_adapters():
    found = [g for path in sorted(PACKAGE.rglob("*.py")) if ADAPTERS not in path.parents
             for g in guesses(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not found, "ask the family adapter (squeeze/arch/) instead:\n" + "\n".join(found)


def test_the_checker_finds_planted_guesses():
    planted = '''
from transformers.pytorch_utils import Conv1D
if "Attention" in type(module).__name__ or type(m).__name__.endswith(("LayerNorm", "RMSNorm")):
    limit = config.n_positions or getattr(config, "max_position_embeddings")
if "norm" in child_name or child_name.startswith("ln"):
    model.transformer.wte = None
'''
    found = guesses(planted)
    assert len(found) == 8, found
    for what in ("Conv1D", "compared with ['Attention']", "endswith", ".n_positions", "'max_position_embeddings'",
                 "'norm'", "'ln'", ".wte"):
        assert any(what in g for g in found), what


def test_the_checker_leaves_generic_code_alone():
    generic = '''
"""GPT-2's Conv1D stores its weight [in, out]; a norm layer."""
if __name__ == "__main__":
    pass
if type(logger).__name__ == "WandbLogger" or type(e).__name__ == "InstantiationException":
    raise SqueezeError(f"{type(module).__name__} has no norm; see ln_f")
layers, width = config.num_hidden_layers, config.hidden_size
keep = isinstance(child, (nn.Embedding, nn.Dropout, nn.Linear)) and x.norm() > 0 and adapter.o_proj(layer)
'''
    assert guesses(generic) == []


def test_task_code_lives_in_squeeze_tasks():
    flat = [name for name in ("data.py", "modules.py", "metrics.py", "dialog") if (PACKAGE / name).exists()]
    assert not flat, f"task code belongs in squeeze/tasks/ (one module per task kind), not squeeze/{flat}"


def _located(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", TASK_YAMLS, ids=lambda p: p.stem)
def test_task_yaml_targets_follow_the_task_contract(path):
    from squeeze.tasks.base import FineTune, TaskData

    task = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert {"name", "head", "monitor", "monitor_mode", "module", "data"} <= set(task), sorted(task)
    for part, base in (("module", FineTune), ("data", TaskData)):
        target = task[part]["_target_"]
        assert target.startswith("squeeze.tasks."), f"{path.name}: {part} {target} is outside squeeze/tasks/"
        assert issubclass(_located(target), base), f"{path.name}: {target} does not subclass {base.__name__}"


# -- the parts ---------------------------------------------------------------------------------------------
PARTS = {"arch", "assets", "compress", "export", "formats", "hardware", "measure", "report", "run", "tasks"}
# Beside the parts, only what every part uses: a model reference's meaning and loader, settings and resolvers,
# errors, model specs (their _target_ squeeze.models.* is in every record), the result record (written by the
# run, read by the report, the measurements and the loader), and the `python -m squeeze.recommend` and
# `python -m squeeze.plan` entry points.
TOP_LEVEL = {"__init__.py", "artifacts.py", "config.py", "errors.py", "models.py", "record.py", "recommend.py",
             "plan.py"}
RECIPE = PACKAGE / "run" / "recipe.py"
# Who may read HydraConfig: the entry points, the sweeper's plugin and the one module that hands its values on.
HYDRA_READERS = {ROOT / "train.py", ROOT / "evaluate.py", ROOT / "hydra_plugins" / "squeeze_sweeper" / "__init__.py",
                 PACKAGE / "run" / "cell.py"}


def test_the_top_level_shows_the_parts():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    folders = {name for name in entries if (PACKAGE / name).is_dir()}
    assert folders == PARTS, f"squeeze/ should hold a folder per part: {sorted(PARTS)}, not {sorted(folders)}"
    flat = sorted(entries - folders - TOP_LEVEL)
    assert not flat, f"{flat} belong in the folder of their part (run/, hardware/, measure/, assets/, ...)"


def test_the_recipe_reads_in_a_few_screenfuls():
    lines = len(RECIPE.read_text(encoding="utf-8").splitlines())
    assert lines <= 250, f"squeeze/run/recipe.py has {lines} lines; move what is not the run's order into its part"


def _reads_hydra_config(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "hydra.core.hydra_config":
            return True
        if isinstance(node, ast.Import) and any(a.name == "hydra.core.hydra_config" for a in node.names):
            return True
        if isinstance(node, (ast.Name, ast.Attribute)) and "HydraConfig" in (getattr(node, "id", None),
                                                                             getattr(node, "attr", None)):
            return True
    return False


def test_only_the_entry_points_the_sweeper_and_the_cell_read_hydra_config():
    code = [*PACKAGE.rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py"), ROOT / "train.py", ROOT / "evaluate.py"]
    readers = {p for p in code if _reads_hydra_config(p.read_text(encoding="utf-8"))}
    extra = sorted(str(p.relative_to(ROOT)) for p in readers - HYDRA_READERS)
    assert not extra, f"{extra} read HydraConfig; take the plain values squeeze.run.cell reads (a Cell) instead"
    assert _reads_hydra_config("from hydra.core.hydra_config import HydraConfig\n")  # the check finds one


def test_compressors_are_built_by_the_run_not_by_squeeze_compress():
    source = (PACKAGE / "compress" / "__init__.py").read_text(encoding="utf-8")
    called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None)
              for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)}
    assert "instantiate" not in called and "import hydra" not in source and "from hydra" not in source


def test_the_sweeper_schema_registers_with_its_plugin_not_with_squeeze():
    code = ("from hydra.core.config_store import ConfigStore\n"
            "def known():\n"
            "    return 'squeeze.yaml' in ConfigStore.instance().repo.get('hydra', {}).get('sweeper', {})\n"
            "import squeeze, squeeze.run.recipe\n"
            "print(known())\n"
            "import hydra_plugins.squeeze_sweeper\n"
            "print(known())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr[-2000:]


def test_moved_targets_name_todays_code():
    from squeeze.record import MOVED_TARGETS

    for old, new in MOVED_TARGETS.items():
        assert callable(_located(new)), new
        module = old.rpartition(".")[0]
        with pytest.raises(ImportError):  # the old module is gone: no shim answers for it
            importlib.import_module(module)
