"""Bad checkpoint folders give a TiDARError with a clear one-line message, and the CLI turns it
into one `error: ...` line on stderr with exit status 1 (no traceback).

Each case builds its bad folder from scratch or from a real tiny transformers checkpoint.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tidar_export import cli
from tidar_export.model.checkpoint import load_checkpoint, read_config
from tidar_export.errors import TiDARError

VOCAB = 96


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A valid tiny Qwen2 checkpoint (single file) as transformers writes it; copy before editing."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("ckpt") / "qwen2"
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("ckpt") / "qwen2-sharded"
    Qwen2ForCausalLM(cfg).save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def copy_of(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    hf = json.loads(path.read_text())
    hf.update(changes)
    path.write_text(json.dumps(hf))


def expect_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(TiDARError) as exc:
        fn(*args, **kwargs)
    msg = str(exc.value)
    assert match in msg, msg
    assert "\n" not in msg and msg.strip() == msg and msg, repr(msg)
    return msg


class _RunsOnUnpickle:
    """Unpickling this creates the file at `path`: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- bad folders: each returns (folder, substring of the message) --------------------------


def missing_folder(tmp_path, hf_folder, sharded_folder):
    return tmp_path / "does-not-exist", "checkpoint folder not found"


def no_config(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(hf_folder, tmp_path)
    (folder / "config.json").unlink()
    return folder, "no config.json"


def invalid_json(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(hf_folder, tmp_path)
    (folder / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 96,')
    return folder, "invalid JSON"


def json_not_object(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(hf_folder, tmp_path)
    (folder / "config.json").write_text("[1, 2, 3]")
    return folder, "expected a JSON object"


def config_missing_key(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(hf_folder, tmp_path)
    hf = json.loads((folder / "config.json").read_text())
    del hf["hidden_size"]
    (folder / "config.json").write_text(json.dumps(hf))
    return folder, "'hidden_size'"


def unsupported_arch(tmp_path, hf_folder, sharded_folder):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 96, "n_embd": 64,
        "n_layer": 2, "n_head": 4,
    }))
    return folder, "GPT2LMHeadModel"


def mask_id_out_of_vocab(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(hf_folder, tmp_path)
    edit_config(folder, tidar={"block_size": 4, "mask_token_id": VOCAB})
    return folder, f"mask token id {VOCAB} is outside the vocabulary (size {VOCAB})"


def no_mask_id(tmp_path, hf_folder, sharded_folder):
    return hf_folder, "no mask token id"  # a plain HF folder has no "tidar" key


# Cases whose point is the folder's own "tidar" key: no --mask-token-id flag may override it.
NO_MASK_FLAG = {"mask_id_out_of_vocab", "no_mask_id"}

CONFIG_CASES = [missing_folder, no_config, invalid_json, json_not_object, config_missing_key,
                unsupported_arch, mask_id_out_of_vocab, no_mask_id]


def config_only(tmp_path, hf_folder, sharded_folder):
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(hf_folder / "config.json", folder / "config.json")
    return folder, "no model.safetensors or model.safetensors.index.json"


def shape_mismatch(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(hf_folder, tmp_path)
    edit_config(folder, intermediate_size=160)
    return folder, "mlp.down_proj.weight has shape (64, 128), config implies (64, 160)"


def truncated(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(hf_folder, tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return folder, "model.safetensors: cannot read safetensors"


def garbage(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(hf_folder, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64 + b"this is not a safetensors file")
    return folder, "model.safetensors: cannot read safetensors"


def empty_file(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(hf_folder, tmp_path)
    (folder / "model.safetensors").write_bytes(b"")
    return folder, "model.safetensors: cannot read safetensors"


def missing_shard(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(sharded_folder, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    return folder, f"missing weight shard {victim}"


def bad_index(tmp_path, hf_folder, sharded_folder):
    folder = copy_of(sharded_folder, tmp_path)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return folder, "not a valid safetensors index"


def missing_tensor(tmp_path, hf_folder, sharded_folder):
    from safetensors.torch import load_file, save_file

    folder = copy_of(hf_folder, tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, "1 tensors missing from the checkpoint, first model.layers.1.self_attn.k_proj.bias"


def extra_tensor(tmp_path, hf_folder, sharded_folder):
    # A tensor the model has no place for (here an MLP bias the config does not declare) must
    # not be dropped silently: the loaded model would compute something else.
    from safetensors.torch import load_file, save_file

    folder = copy_of(hf_folder, tmp_path)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.mlp.down_proj.bias"] = torch.ones(64)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, "first model.layers.0.mlp.down_proj.bias"


WEIGHT_CASES = [config_only, shape_mismatch, truncated, garbage, empty_file, missing_shard, bad_index,
                missing_tensor, extra_tensor]


# ---- the library raises TiDARError ----------------------------------------------------------


@pytest.mark.parametrize("make", CONFIG_CASES, ids=lambda f: f.__name__)
def test_bad_config_raises(make, tmp_path, hf_folder, sharded_folder):
    folder, match = make(tmp_path, hf_folder, sharded_folder)
    mask = None if make.__name__ in NO_MASK_FLAG else 0
    expect_error(read_config, folder, mask_token_id=mask, match=match)
    expect_error(load_checkpoint, folder, mask_token_id=mask, match=match)


def test_unsupported_arch_names_architecture(tmp_path, hf_folder, sharded_folder):
    folder, _ = unsupported_arch(tmp_path, hf_folder, sharded_folder)
    msg = expect_error(read_config, folder, mask_token_id=0, match="unsupported architecture 'GPT2LMHeadModel'")
    assert "gpt2" in msg and "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_mask_id_flag_out_of_vocab(hf_folder):
    expect_error(load_checkpoint, hf_folder, mask_token_id=VOCAB, match="outside the vocabulary")
    expect_error(load_checkpoint, hf_folder, mask_token_id=-1, match="outside the vocabulary")
    assert load_checkpoint(hf_folder, mask_token_id=VOCAB - 1).cfg.mask_token_id == VOCAB - 1


@pytest.mark.parametrize("make", WEIGHT_CASES, ids=lambda f: f.__name__)
def test_bad_weights_raise(make, tmp_path, hf_folder, sharded_folder):
    folder, match = make(tmp_path, hf_folder, sharded_folder)
    read_config(folder, mask_token_id=0)  # the config itself is fine: the weights are the problem
    expect_error(load_checkpoint, folder, mask_token_id=0, match=match)


def test_valid_folders_load(hf_folder, sharded_folder):
    # Control for the cases above: the unedited folders load.
    for folder in (hf_folder, sharded_folder):
        assert load_checkpoint(folder, mask_token_id=0).cfg.intermediate_size == 128


def test_pickled_weights_are_never_loaded(tmp_path, hf_folder, monkeypatch):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    shutil.copy(hf_folder / "config.json", folder / "config.json")
    sentinel = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsOnUnpickle(str(sentinel))))

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called on a checkpoint")

    monkeypatch.setattr(torch, "load", no_torch_load)
    msg = expect_error(load_checkpoint, folder, mask_token_id=0, match="safetensors")
    assert "pytorch_model.bin" in msg and "never loaded" in msg
    assert not sentinel.exists()


# ---- the CLI prints one line and returns 1 ------------------------------------------------


def check_cli_error(capsys, argv: list[str], match: str) -> None:
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("error: ") and match in lines[0], lines[0]


@pytest.mark.parametrize("make", CONFIG_CASES, ids=lambda f: f.__name__)
def test_cli_info_bad_config(make, tmp_path, hf_folder, sharded_folder, capsys):
    folder, match = make(tmp_path, hf_folder, sharded_folder)
    argv = ["info", str(folder)] + ([] if make.__name__ in NO_MASK_FLAG else ["--mask-token-id", "0"])
    check_cli_error(capsys, argv, match)


def test_cli_info_mask_flag_out_of_vocab(hf_folder, capsys):
    check_cli_error(capsys, ["info", str(hf_folder), "--mask-token-id", str(VOCAB)], "outside the vocabulary")


@pytest.mark.parametrize("make", WEIGHT_CASES, ids=lambda f: f.__name__)
def test_cli_import_bad_weights(make, tmp_path, hf_folder, sharded_folder, capsys):
    folder, match = make(tmp_path, hf_folder, sharded_folder)
    out = tmp_path / "out"
    check_cli_error(capsys, ["import", str(folder), "-o", str(out), "--mask-token-id", "0"], match)
    assert not out.exists()


def test_cli_info_valid_folder(hf_folder, capsys):
    # Control: the same command on a good folder succeeds and prints the config.
    assert cli.main(["info", str(hf_folder), "--mask-token-id", "5", "--block-size", "3"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["arch"] == "qwen2" and info["mask_token_id"] == 5 and info["block_size"] == 3
    assert err == ""
