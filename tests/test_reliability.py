"""Bad input to every command: one `error: ...` line and exit status 1, or a correct result;
nothing outside the named output written, deleted or read (docs/RELIABILITY.md).

One tiny checkpoint and one artifact exported from it are built per module; each case copies
what it breaks. The 13 kinds of bad input of docs/RELIABILITY.md each have a table or a test
below (kind N in the comments). Commands run in-process through tidar_export.cli.main.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import random_model
from tidar_export.cli import main
from tidar_export.export.artifact import WEIGHTS_FILE, export_artifact
from tidar_export.model.checkpoint import save_checkpoint
from tidar_runtime import fileio
from tidar_runtime.errors import TiDARError
from tidar_runtime.manifest import load_manifest

MAX_SEQ_LEN = 48
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = save_checkpoint(random_model(seed=5), tmp_path_factory.mktemp("ckpt") / "tiny")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def art(ckpt, tmp_path_factory) -> Path:
    return export_artifact(ckpt, tmp_path_factory.mktemp("art") / "art", max_seq_len=MAX_SEQ_LEN)


def tree(folder: Path) -> dict:
    """Every path under `folder` with its size and mtime: what a command may not have changed."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def one_line_error(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 1, (rc, captured.out[-500:], err[-500:])
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def copy_art(art: Path, tmp_path: Path, name: str = "bad") -> Path:
    dst = tmp_path / name
    shutil.copytree(art, dst)
    return dst


def edit_manifest(folder: Path, change) -> Path:
    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    return folder


# --------------------------------------------------------------------------- kind 1: data loss


def test_init_refuses_a_folder_of_other_files_and_keeps_them(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    err = one_line_error(capsys, ["init", "-o", out])
    assert "is not a checkpoint folder written by tidar-export" in err and "--force" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["init", "import", "export"])
def test_output_that_is_a_file_is_refused(command, ckpt, tmp_path, capsys):
    victim = tmp_path / "notes.txt"
    victim.write_text("keep")
    argv = {"init": ["init"], "import": ["import", ckpt], "export": ["export", ckpt]}[command]
    err = one_line_error(capsys, argv + ["-o", victim, "--force"])  # not even with --force
    assert "exists and is not a folder" in err and victim.read_text() == "keep"


def test_import_refuses_the_parent_of_its_source(ckpt, tmp_path, capsys):
    parent = tmp_path / "models"
    src = parent / "src"
    shutil.copytree(ckpt, src)
    before = tree(parent)
    err = one_line_error(capsys, ["import", src, "-o", parent, "--force"])
    assert "holds the input" in err and tree(parent) == before


def test_init_refuses_the_working_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, ["init", "-o", ".", "--force"])
    assert "working directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # no `..old.*` folder either


def test_export_refuses_a_folder_whose_manifest_is_not_ours(ckpt, tmp_path, capsys):
    ext = tmp_path / "extension"
    ext.mkdir()
    (ext / "manifest.json").write_text(json.dumps({"manifest_version": 3, "name": "an extension"}))
    (ext / "background.js").write_text("// code")
    before = tree(tmp_path)
    err = one_line_error(capsys, ["export", ckpt, "-o", ext])
    assert "not an artifact directory" in err and tree(tmp_path) == before


def test_force_replaces_a_foreign_folder_and_our_own_output_is_replaced_without_it(tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    assert main(["init", "-o", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert main(["init", "-o", str(out), "--seed", "1"]) == 0  # ours: replaced, no --force needed
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_an_artifact_with_a_user_file_inside_is_not_replaced(art, ckpt, tmp_path, capsys):
    out = copy_art(art, tmp_path, "art")
    (out / "my-notes.md").write_text("mine")
    err = one_line_error(capsys, ["export", ckpt, "-o", out, "--max-seq-len", MAX_SEQ_LEN])
    assert "--force" in err and (out / "my-notes.md").read_text() == "mine"


# ------------------------------------------------------- kinds 2, 3: confined names, read and write


def _outside(tmp_path: Path) -> Path:
    victim = tmp_path / "VICTIM.txt"
    victim.write_text("secret")
    return victim


CONFINEMENT = [  # (what to set in the manifest, the message)
    ("graph ../", lambda d, v: d["graphs"]["step"].__setitem__("file", "../VICTIM.txt"), "points outside"),
    ("graph absolute", lambda d, v: d["graphs"]["prefill"].__setitem__("file", str(v)), "points outside"),
    ("engine absolute", lambda d, v: d["graphs"]["step"].__setitem__("engine", str(v)), "points outside"),
    ("weights ../", lambda d, v: d["weights"].__setitem__("file", "../../VICTIM.txt"), "points outside"),
    ("tokenizer ../", lambda d, v: d["tokenizer"].__setitem__("file", "../../VICTIM.txt"), "points outside"),
    ("backslash", lambda d, v: d["graphs"]["step"].__setitem__("file", "..\\VICTIM.txt"), "not a plain file name"),
    ("not a string", lambda d, v: d["weights"].__setitem__("file", ["weights.bin"]), "expected a file name"),
]


@pytest.mark.parametrize("case", CONFINEMENT, ids=[c[0] for c in CONFINEMENT])
@pytest.mark.parametrize("command", ["generate", "check", "quantize"])
def test_manifest_names_are_confined(case, command, art, tmp_path, capsys):
    _, change, message = case
    victim = _outside(tmp_path)
    bad = edit_manifest(copy_art(art, tmp_path), lambda d: change(d, victim))
    argv = {"generate": ["generate", bad, "--prompt-ids", "1,2"], "check": ["check", bad],
            "quantize": ["quantize", bad, "-o", tmp_path / "q"]}[command]
    before = tree(tmp_path)
    err = one_line_error(capsys, argv)
    assert message in err and "bytes" not in err  # no size of any outside file is revealed
    assert tree(tmp_path) == before and victim.read_text() == "secret"


def test_symlink_out_of_the_artifact_is_refused(art, tmp_path, capsys):
    bad = copy_art(art, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(bad / "step.onnx", outside)
    (bad / "step.onnx").unlink()
    (bad / "step.onnx").symlink_to(outside)
    assert "resolves outside" in one_line_error(capsys, ["generate", bad, "--prompt-ids", "1"])


def test_quantize_never_writes_through_the_tokenizer_name(art, tmp_path, capsys):
    """The original hole: tokenizer.file "../../VICTIM.txt" made quantize overwrite that file."""
    victim = _outside(tmp_path)
    bad = copy_art(art, tmp_path / "a" / "b")
    edit_manifest(bad, lambda d: d["tokenizer"].__setitem__("file", "../../VICTIM.txt"))
    err = one_line_error(capsys, ["quantize", bad, "-o", tmp_path / "a" / "q"])
    assert "tokenizer.file" in err and victim.read_text() == "secret" and not (tmp_path / "a" / "q").exists()


def _sharded(ckpt: Path, tmp_path: Path, shard: str) -> Path:
    folder = tmp_path / "sharded"
    shutil.copytree(ckpt, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(folder / "model-00001-of-00001.safetensors"), "pt") as f:
        names = list(f.keys())
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names}
    weight_map[names[0]] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shard, message", [("../outside.safetensors", "points outside"),
                                            ("/etc/hostname", "points outside"),
                                            ("link.safetensors", "resolves outside")])
def test_checkpoint_shard_names_are_confined(ckpt, tmp_path, capsys, shard, message):
    folder = _sharded(ckpt, tmp_path, shard)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "model-00001-of-00001.safetensors", outside)
    (folder / "link.safetensors").symlink_to(outside)
    assert message in one_line_error(capsys, ["decode", folder, "--prompt-ids", "1,2", "--max-new-tokens", "2"])
    assert message in one_line_error(capsys, ["import", folder, "-o", tmp_path / "imported"])


def test_paths_module_accepts_plain_names(tmp_path):
    from tidar_runtime.paths import confined

    assert confined(tmp_path, "sub/step.onnx", "x") == tmp_path / "sub" / "step.onnx"
    for bad in ("", "a/../b", "/abs", "a//b", "~/x", "a\0b"):
        with pytest.raises(TiDARError):
            confined(tmp_path, bad, "x")


# ------------------------------------------------------------------------ kind 4: integrity


def _overwrite_weights(folder: Path, data: bytes) -> None:
    w = folder / WEIGHTS_FILE
    assert len(data) == w.stat().st_size
    w.write_bytes(data)


@pytest.mark.parametrize("fill", ["random", "nan"])
def test_weights_of_the_right_size_but_wrong_content_fail(fill, art, tmp_path, capsys):
    bad = copy_art(art, tmp_path)
    size = (bad / WEIGHTS_FILE).stat().st_size
    data = (np.random.default_rng(0).bytes(size) if fill == "random"
            else np.full(size // 4, np.nan, np.float32).tobytes())
    _overwrite_weights(bad, data)
    for argv in (["generate", bad, "--prompt-ids", "1,2"], ["check", bad], ["bench", bad, "--repeats", "1"]):
        assert "does not match its digest" in one_line_error(capsys, argv)


def test_one_changed_byte_is_caught_by_check(art, tmp_path, capsys):
    """The quick digest on load reads whole files up to 4 MiB (this one); `check` always hashes it all."""
    bad = copy_art(art, tmp_path)
    data = bytearray((bad / WEIGHTS_FILE).read_bytes())
    data[len(data) // 3] ^= 0x01
    _overwrite_weights(bad, bytes(data))
    assert "does not match its digest" in one_line_error(capsys, ["check", bad])


def _other_tokenizer(path: Path, words: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_a_tokenizer_of_another_model_is_refused(art, tmp_path, capsys):
    """The tokenizer has a digest like the graphs (export records it); an artifact without one
    (older exports) still has its tokenizer's vocabulary checked against the manifest."""
    bad = copy_art(art, tmp_path)
    _other_tokenizer(bad / "tokenizer.json", 2)
    for argv in (["generate", bad, "--prompt-ids", "1,2"], ["check", bad]):
        assert "tokenizer.json does not match its digest" in one_line_error(capsys, argv)
    old = copy_art(art, tmp_path, "old")
    edit_manifest(old, lambda d: (d["tokenizer"].pop("blake2b"), d["tokenizer"].pop("vocab_size")))
    vocab = json.loads((old / "manifest.json").read_text())["dims"]["vocab"]
    _other_tokenizer(old / "tokenizer.json", vocab + 5)
    assert f"has a vocabulary of {vocab + 6} tokens" in one_line_error(
        capsys, ["generate", old, "--prompt-ids", "1,2"])


def test_weights_changed_outside_the_sampled_blocks_are_caught_on_the_first_load(art, tmp_path, capsys,
                                                                                 monkeypatch):
    """The whole weights file is hashed on a file's first load; a stamp (tidar_runtime.stamps)
    spares the next loads while the file stays the same, and any write invalidates it. Sampled
    blocks of 1 KiB here, so that this small file has bytes outside them."""
    from tidar_runtime import manifest as manifest_module, stamps

    monkeypatch.setattr(manifest_module, "SAMPLE_BLOCK_BYTES", 1024)
    monkeypatch.setattr(manifest_module, "SAMPLE_BLOCKS", 2)  # the first and the last KiB
    bad = copy_art(art, tmp_path)
    w = bad / WEIGHTS_FILE
    edit_manifest(bad, lambda d: d["weights"].update(sample_blake2b=manifest_module.sample_digest(w)))
    whole = json.loads((bad / "manifest.json").read_text())["weights"]["blake2b"]
    assert not stamps.is_verified(w, whole)
    load_manifest(bad)
    assert stamps.is_verified(w, whole)  # the next load hashes only the sampled blocks
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01  # outside both sampled blocks
    _overwrite_weights(bad, bytes(data))
    assert not stamps.is_verified(w, whole)
    assert "does not match its digest" in one_line_error(capsys, ["generate", bad, "--prompt-ids", "1,2"])


@pytest.mark.parametrize("header,message", [(17 << 20, "header length 17825792"), (1 << 40, "header length")])
def test_safetensors_header_size_is_bounded(header, message, ckpt, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    with open(bad / "model.safetensors", "wb") as f:
        f.write(header.to_bytes(8, "little"))
        if header < 1 << 30:
            f.write(b" " * header)  # a real header of that size: refused before it is parsed
    for argv in (["export", bad, "-o", tmp_path / "a"], ["decode", bad, "--prompt-ids", "1,2"]):
        assert message in one_line_error(capsys, argv)


def test_check_finds_nan_weights_without_digests(art, tmp_path, capsys):
    """An artifact without recorded digests (older exports) still fails check on NaN weights."""
    bad = copy_art(art, tmp_path)
    edit_manifest(bad, lambda d: ([g.pop("digest") for g in d["graphs"].values()],
                                  d["weights"].pop("blake2b"), d["weights"].pop("sample_blake2b")))
    size = (bad / WEIGHTS_FILE).stat().st_size
    _overwrite_weights(bad, np.full(size // 4, np.nan, np.float32).tobytes())
    err = one_line_error(capsys, ["check", bad])
    assert "holds NaN or infinite values" in err and "no digests recorded" in err


def test_sample_digest_reads_a_bounded_amount(tmp_path):
    from tidar_runtime.manifest import SAMPLE_BLOCK_BYTES, SAMPLE_BLOCKS, file_digest, sample_digest

    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(1).bytes(SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES * 2))
    d = sample_digest(big)
    with open(big, "r+b") as f:  # a byte in the first block: caught by the quick digest
        f.write(b"\x00\x01")
    assert sample_digest(big) != d and file_digest(big) != d


@pytest.mark.parametrize("kind, message", [("nan", "holds NaN or infinite values"),
                                           ("int64", "has dtype int64, a floating-point type is expected")])
def test_checkpoint_tensors_must_be_finite_floats(kind, ckpt, tmp_path, capsys, message):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    state = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = state[name].clone()
    if kind == "nan":
        state[name][0, 0] = float("nan")
    else:
        state[name] = state[name].to(torch.int64)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for argv in (["decode", folder, "--prompt-ids", "1"], ["import", folder, "-o", tmp_path / "imp"],
                 ["export", folder, "-o", tmp_path / "exp"]):
        assert message in one_line_error(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# --------------------------------------------------------------- kind 5: manifest values


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _rename(d: dict, kind: str, side: str, old: str, new: str) -> None:
    next(t for t in d["graphs"][kind][side] if t["name"] == old)["name"] = new


MANIFEST_CASES = [
    ("block_size 0", lambda d: d["dims"].__setitem__("block_size", 0), "block_size must be an integer in 1..1024"),
    ("max_seq_len 1e12", lambda d: d["dims"].__setitem__("max_seq_len", 10**12), "max_seq_len must be an integer"),
    ("num_layers 1e8", lambda d: d["dims"].__setitem__("num_layers", 10**8), "dims.num_layers must be"),
    ("num_layers 3", lambda d: d["dims"].__setitem__("num_layers", 3), "lacks the binding 'present.2.key'"),
    ("negative heads", lambda d: d["dims"].__setitem__("kv_heads", -2), "dims.kv_heads must be"),
    ("string vocab", lambda d: d["dims"].__setitem__("vocab", "256"), "dims.vocab must be"),
    ("float batch", lambda d: d["dims"].__setitem__("batch", 1.5), "dims.batch must be"),
    ("bool mask", lambda d: d["export"].__setitem__("mask_token_id", True), "mask_token_id must be"),
    ("proposals", lambda d: d["export"].__setitem__("proposals", [2, 1]), "proposals must be"),
    ("q_len", lambda d: d["dims"].__setitem__("q_len", 3), "dims.q_len must be"),
    ("graphs list", lambda d: d.__setitem__("graphs", []), "graphs must be an object"),
    ("graph missing", lambda d: d["graphs"].pop("ar_step"), "graphs must be an object with exactly"),
    ("renamed binding", lambda d: _rename(d, "step", "inputs", "draft_ids", "drafts"), "lacks the binding 'draft_ids'"),
    ("renamed output", lambda d: _rename(d, "prefill", "outputs", "token_ids", "ids"), "lacks the binding 'token_ids'"),
    ("extra layer", lambda d: _rename(d, "ar_step", "inputs", "past_key_values.1.value", "past_key_values.9.value"),
     "lacks the binding 'past_key_values.1.value'"),
    ("cache shape", lambda d: d["graphs"]["step"]["inputs"][2]["shape"].__setitem__(1, 7), "shape and dtype must be"),
    ("unknown dtype", lambda d: d["graphs"]["step"]["inputs"][0].__setitem__("dtype", "complex128"), "dtype must be"),
    ("rows", lambda d: d["graphs"]["step"]["rows"].reverse(), "graphs.step.rows must be"),
    ("kv_update", lambda d: d["graphs"]["step"].__setitem__("kv_update", "copy"), "kv_update must be one of slice, inplace"),
    ("graph kv_update", lambda d: d["graphs"]["ar_step"].__setitem__("kv_update", "copy"),
     "graphs.ar_step.kv_update must be one of slice, inplace"),
    ("prefill kv_update", lambda d: d["graphs"]["prefill"].__setitem__("kv_update", "slice"),
     "graphs.prefill.kv_update must be null"),
    ("precision", lambda d: d["export"].__setitem__("precision", 8), "precision must be one of"),
    ("unknown field", lambda d: d.__setitem__("surprise", 1), "unknown field 'surprise'"),
    ("missing field", lambda d: d.pop("dims"), "missing field 'dims'"),
    ("eos out of vocab", lambda d: d["tokenizer"].__setitem__("eos_token_id", 10**9), "tokenizer.eos_token_id must be"),
    ("weights bytes", lambda d: d["weights"].__setitem__("bytes", "many"), "weights.bytes must be"),
    ("tuning list", lambda d: d.__setitem__("tuning", []), "tuning must be an object"),
]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_manifest_values_are_validated(case, art, tmp_path, capsys):
    _, change, message = case
    bad = edit_manifest(copy_art(art, tmp_path), change)
    for argv in (["generate", bad, "--prompt-ids", "1,2"], ["check", bad]):
        assert message in one_line_error(capsys, argv)


@pytest.mark.parametrize("text, message", [
    ('{"tuning": ' + _deep(200000) + "}", "nested more than 32 levels"),
    ('{"tuning": ' + _deep(40) + "}", "nested more than 32 levels"),
    ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "invalid JSON"),
])
def test_manifest_json_is_bounded(text, message, art, tmp_path, capsys):
    bad = copy_art(art, tmp_path)
    (bad / "manifest.json").write_text(text, encoding="latin-1")
    assert message in one_line_error(capsys, ["generate", bad, "--prompt-ids", "1"])
    assert message in one_line_error(capsys, ["check", bad])


# ------------------------------------------------------- kinds 6, 7: prompt ids and sampling options


DECODE_CASES = [  # (arguments after the folder, message); each for generate (artifact) and decode (checkpoint)
    (["--prompt-ids=-1,5"], "prompt token id -1 is outside the vocabulary (0..255)"),
    (["--prompt-ids", "256"], "prompt token id 256 is outside the vocabulary"),
    (["--prompt-ids", str(10**20)], "is outside the vocabulary"),
    (["--prompt", "a \udcff b"], "--prompt is not valid UTF-8 text"),
    (["--prompt-ids", "1", "--temperature", "nan"], "--temperature"),
    (["--prompt-ids", "1", "--temperature", "1e-320"], "--temperature"),
    (["--prompt-ids", "1", "--temperature", "-1"], "--temperature"),
    (["--prompt-ids", "1", "--temperature", "inf"], "--temperature"),
    (["--prompt-ids", "1", "--temperature", "0.7", "--seed", "-1"], "--seed"),
    (["--prompt-ids", "1", "--top-p", "nan"], "--top-p"),
    (["--prompt-ids", "1", "--top-k", "-3"], "--top-k"),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
]


@pytest.mark.parametrize("args, message", DECODE_CASES, ids=[" ".join(c[0]) for c in DECODE_CASES])
@pytest.mark.parametrize("command", ["generate", "decode"])
def test_prompt_and_sampling_options(command, args, message, art, ckpt, capsys):
    folder = art if command == "generate" else ckpt
    assert message in one_line_error(capsys, [command, folder, *args])


@pytest.mark.parametrize("max_len", ["-5", "0", str(10**12)])
def test_decode_max_len(max_len, ckpt, capsys):
    assert "--max-len must be in 1..2048" in one_line_error(capsys, ["decode", ckpt, "--prompt-ids", "1",
                                                                     "--max-len", max_len])


def test_valid_sampling_still_decodes(art, capsys):
    assert main(["generate", str(art), "--prompt-ids", "1,2", "--temperature", "0.8", "--seed", "3",
                 "--max-new-tokens", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["token_ids"]) == 4 and all(0 <= t < 256 for t in report["token_ids"])


def test_runtime_token_check_is_shared():
    from tidar_runtime.inputs import check_token_ids

    assert check_token_ids([0, 5, 255], 256).tolist() == [0, 5, 255]
    for bad in ([-1], [256], [1.5], [True], [10**20], "ab"):
        with pytest.raises(TiDARError):
            check_token_ids(bad, 256)


# ------------------------------------------------------------------- kind 8: OS errors


def _read_only(monkeypatch, folder: Path):
    """A read-only file system under `folder` (the tests run as root, where chmod does not stop writes)."""
    real = fileio.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("command", ["init", "import", "export", "train", "quantize", "tune"])
def test_read_only_output_fails_before_the_work(command, ckpt, art, tmp_path, capsys, monkeypatch):
    import tidar_export.model.checkpoint as checkpoint_module

    ro = tmp_path / "ro"
    ro.mkdir()
    tuned = copy_art(art, ro, "art")
    _read_only(monkeypatch, ro)

    def no_work(*a, **k):
        raise AssertionError("the long work started before the output was checked")

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", no_work)
    monkeypatch.setattr("tidar_export.quantize.artifact.collect_calibration_inputs", no_work)
    monkeypatch.setattr("tidar_export.train.data.find_corpus", no_work)
    monkeypatch.setattr("tidar_export.export.variants.Variants.get", no_work)
    argv = {"init": ["init", "-o", ro / "x"], "import": ["import", ckpt, "-o", ro / "x"],
            "export": ["export", ckpt, "-o", ro / "x"], "train": ["train", "-o", ro / "x"],
            "quantize": ["quantize", art, "-o", ro / "x"],
            "tune": ["tune", tuned, "--checkpoint", ckpt, "--block-sizes", "2", "--repeats", "1"]}[command]
    err = one_line_error(capsys, argv)
    assert "cannot write to" in err and "Read-only file system" in err


def test_disk_full_mid_export_is_one_line_and_leaves_nothing(ckpt, art, tmp_path, capsys, monkeypatch):
    out = copy_art(art, tmp_path, "art")
    before = tree(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out.parent / ".art.tidar-tmp/weights.bin"))

    monkeypatch.setattr("tidar_export.export.artifact.WeightFile.add", full)  # whichever builder makes the graphs
    err = one_line_error(capsys, ["export", ckpt, "-o", out, "--max-seq-len", MAX_SEQ_LEN])
    assert "No space left on device" in err
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; covered by the injected EROFS test")
def test_real_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "cannot write to" in one_line_error(capsys, ["init", "-o", ro / "x"])
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------- kind 9: config.json types


CONFIG_CASES = [
    ({"hidden_size": "192"}, "config.json: hidden_size must be a positive integer, got '192'"),
    ({"num_hidden_layers": "six"}, "num_hidden_layers must be a positive integer"),
    ({"num_attention_heads": -4}, "num_attention_heads must be a positive integer"),
    ({"tidar": {"block_size": 2.5, "mask_token_id": 0}}, "tidar.block_size must be an integer, got 2.5"),
    ({"tidar": "yes"}, "'tidar' must be an object"),
    ({"rope_theta": "abc", "rope_parameters": None}, "rope_theta must be a positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "abc"}}, "rope_theta must be a positive number"),
    ({"rope_parameters": "default"}, "rope_parameters must be an object"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a number in (0, 1)"),
    ({"eos_token_id": "end"}, "eos_token_id must be an integer"),
    ({"num_hidden_layers": 10**8}, "num_layers must be an integer in 1..1024"),
    ({"vocab_size": 10**12}, "vocab_size must be an integer in 1..16777216"),
    ({"model_type": ["qwen2"]}, "unsupported architecture"),
]


@pytest.mark.parametrize("change, message", CONFIG_CASES, ids=[next(iter(c[0])) + str(i) for i, c in
                                                                enumerate(CONFIG_CASES)])
def test_config_types_and_bounds(change, message, ckpt, tmp_path, capsys):
    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    hf = json.loads((folder / "config.json").read_text())
    hf.update(change)
    (folder / "config.json").write_text(json.dumps(hf))
    for argv in (["info", folder], ["export", folder, "-o", tmp_path / "a"], ["decode", folder, "--prompt-ids", "1"]):
        assert message in one_line_error(capsys, argv)


def test_config_json_depth_is_bounded(ckpt, tmp_path, capsys):
    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    (folder / "config.json").write_text('{"model_type": "qwen2", "x": ' + _deep(100000) + "}")
    assert "nested more than" in one_line_error(capsys, ["info", folder])


# ------------------------------------------------------------- kind 10: temp folders after kills


def _python(code: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})})


def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path):
    target, systmp = tmp_path / "out" / "art", tmp_path / "systmp"
    systmp.mkdir()
    code = ("import os, signal; from tidar_runtime import fileio; "
            f"fileio.staging_dir({str(target)!r}); "
            "[fileio.make_temp_dir(p) for p in ('tidar-quant.', 'tidar-variants.', 'tidar-tok-')]; "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = _python(code, env={"TMPDIR": str(systmp)})
    assert proc.wait(30) == -signal.SIGKILL
    left_beside = [p.name for p in target.parent.iterdir()]
    left_tmp = sorted(p.name.split(".")[0].split("-")[1] for p in systmp.iterdir())
    assert len(left_beside) == 1 and left_beside[0].startswith(".art.tidar-tmp.") and left_tmp == ["quant", "tok", "variants"]
    live = systmp / f"tidar-quant.{os.getpid()}.{fileio.HOST_TAG}.live"  # a running process's: kept
    live.mkdir()
    (systmp / "tidar-quant.unrelated").mkdir()  # not our pattern: kept
    new = fileio.staging_dir(target)
    for prefix in ("tidar-quant.", "tidar-variants.", "tidar-tok-"):
        fileio.sweep_stale(systmp, prefix)
    assert [p.name for p in target.parent.iterdir()] == [new.name]
    assert sorted(p.name for p in systmp.iterdir()) == sorted([live.name, "tidar-quant.unrelated"])


def test_sigterm_during_a_command_removes_its_temp_folders(tmp_path):
    code = ("import time; from tidar_export import cli; from tidar_runtime import fileio\n"
            "with cli._sigterm_unwinds():\n"
            f"    with fileio.temp_dir('tidar-quant.', {str(tmp_path)!r}) as d:\n"
            f"        s = fileio.staging_dir({str(tmp_path / 'art')!r})\n"
            "        try:\n"
            "            print(d, flush=True); time.sleep(60)\n"
            "        finally:\n"
            "            import shutil; shutil.rmtree(s)\n")
    proc = _python(code)
    line = proc.stdout.readline()
    assert Path(line.strip()).is_dir()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum,line", [(signal.SIGTERM, "terminated (SIGTERM)"),
                                         (signal.SIGINT, "interrupted (Ctrl-C)")])
def test_a_signal_mid_export_keeps_the_old_artifact_and_leaves_nothing(signum, line, art, ckpt, tmp_path):
    """SIGTERM and Ctrl-C: the staging folder removed, the old artifact kept, one line on stderr
    and exit status 143 / 130 (no KeyboardInterrupt traceback)."""
    out = copy_art(art, tmp_path, "art")
    before = tree(out)
    code = f"import sys; from tidar_export.cli import main; sys.exit(main(['export', {str(ckpt)!r}, '-o', {str(out)!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".art.tidar-tmp.") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "export never started staging"
        time.sleep(0.05)
    proc.send_signal(signum)
    assert proc.wait(60) == 128 + signum
    err = proc.stderr.read()
    assert err.strip().splitlines()[-1] == f"tidar-export export: {line}" and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"] and tree(out) == before


# ----------------------------------------------------------- kind 11: concurrent swaps of one folder


def test_concurrent_swaps_never_fail_or_leave_folders(tmp_path):
    target = tmp_path / "out"
    code = ("import sys; from tidar_runtime import fileio\n"
            f"for i in range(75):\n"
            f"    new = fileio.staging_dir({str(target)!r})\n"
            "    (new / 'data.txt').write_text(sys.argv[1] + ':' + str(i) + ':' + 'x' * 1000)\n"
            f"    fileio.publish_dir(new, {str(target)!r})\n"
            "print('ok')\n")
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
             for w in range(4)]
    results = [p.communicate(60) for p in procs]
    assert all(p.returncode == 0 and out.strip() == "ok" for p, (out, _) in zip(procs, results)), results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old or staging folders
    worker, i, pad = (target / "data.txt").read_text().split(":")
    assert worker in "0123" and 0 <= int(i) < 75 and pad == "x" * 1000
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------------- kind 12: argument errors


@pytest.mark.parametrize("argv, message", [
    (["generate", "ART", "--prompt-ids", "a"], "expected comma-separated integers"),
    (["generate", "ART", "--prompt-ids", "1", "--mode", "both"], "invalid choice: 'both'"),
    (["generate", "ART", "--prompt-ids", "1", "--max-new-tokens", "many"], "invalid int value"),
    (["decode", "CKPT", "--prompt-ids", "1", "--temperature", "hot"], "invalid float value"),
    (["export", "CKPT"], "the following arguments are required: -o/--output"),
    (["init", "-o", "x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["no-such-command"], "invalid choice"),
    ([], "the following arguments are required: command"),
])
def test_argument_errors_are_one_line_with_status_1(argv, message, art, ckpt, capsys):
    argv = [{"ART": art, "CKPT": ckpt}.get(a, a) for a in argv]
    err = one_line_error(capsys, argv)
    assert message in err and "usage:" not in err


# ------------------------------------------------------------- kind 13: symlinked -o, permissions


def test_output_through_a_symlink_writes_the_folder_it_names(art, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(["init", "-o", str(link)]) == 0
    capsys.readouterr()
    assert link.is_symlink() and (real / "config.json").is_file()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert "is a symlink to nothing" in one_line_error(capsys, ["init", "-o", dangling])
    to_file = tmp_path / "to-file"
    (tmp_path / "f.txt").write_text("x")
    to_file.symlink_to(tmp_path / "f.txt")
    assert "is a symlink to a file" in one_line_error(capsys, ["quantize", art, "-o", to_file])
    assert (tmp_path / "f.txt").read_text() == "x" and to_file.is_symlink()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(umask, tmp_path, capsys):
    old = os.umask(umask)
    try:
        assert main(["init", "-o", str(tmp_path / "ck")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "ck").iterdir()} == {0o666 & ~umask}


def test_artifact_modes_follow_the_umask(art):
    umask = os.umask(0)
    os.umask(umask)
    assert art.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in art.iterdir()} == {0o666 & ~umask}


# ---------------------------------------------------------------- the good path still works


def test_the_shared_artifact_is_valid_and_sealed(art):
    m = load_manifest(art, verify="full")
    assert m.weights["blake2b"] and m.weights["sample_blake2b"] and all(g.digest for g in m.graphs.values())
