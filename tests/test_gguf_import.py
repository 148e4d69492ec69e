"""`tidar-export import FILE.gguf`: parity with transformers reading the same file.

Each file is written here with the gguf package's writer (tests/gguf_files.py): a tiny Llama,
Qwen2 or Qwen3 whose tensors use every supported GGUF type (MIXED_TYPES), the Llama q/k rows
in llama.cpp's order, a byte-level BPE tokenizer and a chat template. The imported checkpoint
must give the logits transformers gives for the same file (its GGUF reader is an independent
dequantizer), encode text to the same ids as transformers' GGUF tokenizer, and keep the chat
template, the end-of-turn ids and the Q4_0/Q4_1 block scales; what is not supported is one line.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.gguf_files import CHATML, EOS, HEADS, IM_END, MASK, MIXED_TYPES, VOCAB, permute_rows, write_gguf
from tidar_export import cli
from tidar_export.model import masks
from tidar_export.model.checkpoint import load_checkpoint
from tidar_runtime.tokenizer import load_tokenizer

T = 16
ATOL = 1e-4  # float32 noise; measured 0.0 (bitwise equal) on all three architectures


def run_cli(*argv: str) -> int:
    return cli.main(list(argv))


def import_file(tmp_path, name="m.gguf", *extra_args, **write_kwargs):
    """(gguf path, imported checkpoint folder, the weights written)."""
    path = tmp_path / name
    weights = write_gguf(path, **write_kwargs)
    out = tmp_path / "ckpt"
    assert run_cli("import", str(path), "-o", str(out), "--mask-token-id", str(MASK), "--block-size", "3",
                   *extra_args) == 0
    return path, out, weights


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    B, n = ids.shape
    with torch.no_grad():
        return model(ids, torch.arange(n)[None].expand(B, n), masks.causal_mask(n))[0]


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", False), ("qwen3", True)])
def test_logits_equal_transformers(tmp_path, arch, tied):
    path, out, weights = import_file(tmp_path, arch=arch, tied=tied)
    model = load_checkpoint(out)
    cfg = model.cfg
    assert (cfg.arch, cfg.block_size, cfg.mask_token_id, cfg.vocab_size) == (arch, 3, MASK, VOCAB)
    assert cfg.tie_word_embeddings == tied and cfg.rope_theta == 50000.0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits.detach()
    diff = (logits(model, ids) - ref).abs().max().item()
    print(f"{arch}: max|diff| {diff:.3g} at max|logit| {ref.abs().max().item():.1f}")
    assert diff < ATOL

    # Tensors written from exact values come back exactly, in HF row order.
    state = model.state_dict()
    assert torch.equal(state["model.layers.1.self_attn.v_proj.weight"], torch.from_numpy(weights["blk.1.attn_v.weight"]))
    q = torch.from_numpy(weights["blk.1.attn_q.weight"]).to(torch.bfloat16).float()
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], q)  # BF16, and the Llama row order undone
    if arch == "llama":  # the comparison sees the row order: llama.cpp's order left in place is far off
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.copy_(permute_rows(layer.self_attn.q_proj.weight, HEADS))
        assert (logits(model, ids) - ref).abs().max().item() > 1e-2


def test_source_records_and_block_scales(tmp_path):
    _, out, weights = import_file(tmp_path)
    source = json.loads((out / "gguf_source.json").read_text())
    types = source["tensor_types"]
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_0"
    assert types["model.layers.0.self_attn.k_proj.weight"] == "Q4_1"
    assert types["model.layers.0.mlp.up_proj.weight"] == "Q6_K"
    assert types["model.norm.weight"] == "F32"
    assert source["blocks"] == "gguf_blocks.safetensors"
    blocks = load_file(str(out / source["blocks"]))
    state = load_file(str(out / "model.safetensors"))
    # The scales give back each block's 4-bit values exactly, in the checkpoint's row order.
    for name, kind in (("model.layers.0.self_attn.q_proj.weight", "Q4_0"),
                       ("model.layers.0.self_attn.k_proj.weight", "Q4_1"),
                       ("model.layers.1.mlp.gate_proj.weight", "Q4_1")):
        w = state[name].reshape(state[name].shape[0], -1, 32)
        scale = blocks[f"{name}.scales"].float()[..., None]
        if kind == "Q4_0":
            q = w / scale + 8
        else:
            q = (w - blocks[f"{name}.mins"].float()[..., None]) / scale
            assert f"{name}.mins" in blocks
        assert (q - q.round()).abs().max().item() < 1e-3
        assert q.round().min() >= 0 and q.round().max() <= 15
    assert not any(k.startswith("model.layers.0.self_attn.v_proj") for k in blocks)  # Q8_0: not recorded


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "qwen2", "llama-bpe"])
def test_tokenizer_equals_transformers(tmp_path, pre):
    path, out, _ = import_file(tmp_path, pre=pre, add_bos=pre == "llama-bpe")
    ours = load_tokenizer(out)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the cat sat on the mat", "  in the\n\nthe  a 12345 x", "<|im_start|>user\nhi<|im_end|>\n",
                 "Émigré naïve — ünïcode 🤖", "a\tb   c\r\nd"]:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert (ours.encode("the").ids[0] == EOS) == (pre == "llama-bpe")  # add_bos_token is honoured
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>"


def test_chat_template_and_end_of_turn(tmp_path):
    _, out, _ = import_file(tmp_path, eot=IM_END)
    assert (out / "chat_template.jinja").read_text() == CHATML
    hf = json.loads((out / "config.json").read_text())
    assert hf["eos_token_id"] == [EOS, IM_END]  # the list is kept whole
    assert load_checkpoint(out).cfg.eos_token_id == [EOS, IM_END]


def test_no_template_no_file(tmp_path):
    _, out, _ = import_file(tmp_path, template=None)
    assert not (out / "chat_template.jinja").exists()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == EOS


@pytest.mark.parametrize("kwargs,message", [
    (dict(types={**MIXED_TYPES, "blk.0.attn_q": "Q5_0"}), "tensor blk.0.attn_q.weight has type Q5_0: supported are"),
    (dict(tokenizer_model="llama"), "unsupported GGUF tokenizer model 'llama'"),
    (dict(pre="deepseek-llm"), "unsupported GGUF pre-tokenizer 'deepseek-llm'"),
    (dict(extra={"rope_freqs.weight": np.ones(32, np.float32)}), "unsupported RoPE scaling"),
    (dict(extra={"blk.0.ffn_gate_exps.weight": np.ones((4, 256), np.float32)}),
     "1 checkpoint tensors are not supported by the llama model, first blk.0.ffn_gate_exps.weight"),
    (dict(drop=("blk.1.ffn_up.weight",)), "1 tensors missing from the checkpoint, first model.layers.1.mlp.up_proj"),
])
def test_unsupported_is_one_line(tmp_path, capsys, kwargs, message):
    path = tmp_path / "m.gguf"
    write_gguf(path, **kwargs)
    out = tmp_path / "ckpt"
    assert run_cli("import", str(path), "-o", str(out), "--mask-token-id", str(MASK)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # nothing half-written


def test_unsupported_architecture_and_bad_files(tmp_path, capsys):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    truncated = tmp_path / "t.gguf"
    write_gguf(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    for f, message in ((path, "unsupported GGUF architecture 'phi3': supported are llama, qwen2, qwen3"),
                       (not_gguf, "not a GGUF file"), (truncated, "cannot read GGUF")):
        assert run_cli("import", str(f), "-o", str(tmp_path / "out"), "--mask-token-id", "1") == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    # no mask token id: a GGUF file has no TiDAR settings
    write_gguf(tmp_path / "m.gguf")
    assert run_cli("import", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "out")) == 1
    assert "pass --mask-token-id" in capsys.readouterr().err
