"""The C++ runtime (cpp/) against the Python runtime: the same artifact, the same token ids.

`bash cpp/build.sh BUILD_DIR` builds and unit-tests it; these tests run its `tidar-generate` and
service example from TIDAR_CPP_BUILD (.ci/run sets it) over two exported artifacts and compare
with `tidar-export generate --json` (one prompt) and the Python batch API (several prompts):
token ids, finish reasons, forwards, T/NFE and the accepted histogram, greedy and seeded sampling.
- tiny: the tiny preset, random weights, b = 3 with every proposal block, batch 3, 32 slots;
- demo: the embedded demo model (trained: it accepts drafts), b = 3 with the sparse set {1, 3},
  batch 2, 64 slots (its step graph updates the cache by slices, its AR step in place).
Without TIDAR_CPP_BUILD the module skips (a local run without the C++ build).
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import random_model, with_random_adapter
from tidar_export.bench.demo import demo_model_path
from tidar_export.cli import main
from tidar_export.export.artifact import export_artifact
from tidar_export.model.checkpoint import save_checkpoint
from tidar_runtime import SamplingParams, generate_ar_batch, generate_tidar_batch
from tidar_runtime.backends.ort import OrtBackend
from tidar_runtime.stats import summarize

BUILD = os.environ.get("TIDAR_CPP_BUILD")
pytestmark = pytest.mark.skipif(not BUILD, reason="TIDAR_CPP_BUILD is not set: run `bash cpp/build.sh DIR` and "
                                                   "set it to DIR (.ci/run does)")
COMPARED = ("token_ids", "new_tokens", "finish_reason", "forwards", "tokens_per_forward", "accepted_histogram")
DEMO_PROMPT = [200, 316, 327, 371, 64, 265, 745, 64]  # "\ndef _get_report_" in the demo tokenizer


def _tool(name: str) -> Path:
    path = Path(BUILD) / name
    assert path.is_file(), f"{path} is missing: TIDAR_CPP_BUILD must be a folder cpp/build.sh built"
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = save_checkpoint(random_model(seed=5), tmp_path_factory.mktemp("cpp-tiny") / "ckpt")
    return export_artifact(ckpt, ckpt.parent / "art", block_size=3, max_seq_len=32, max_batch=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpp-demo") / "art"
    return export_artifact(demo_model_path(), out, block_size=3, proposals=[1, 3], max_seq_len=64, max_batch=2)


def _cpp(art, *args, prompts=()) -> list[dict]:
    """tidar-generate --json over `prompts` (one --prompt-ids each): one report per row."""
    argv = [str(_tool("tidar-generate")), str(art), "--json", *map(str, args)]
    for p in prompts:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def _python_cli(art, *args, prompt) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["generate", str(art), "--json", "--prompt-ids", ",".join(map(str, prompt)), *map(str, args)])
    assert rc == 0, err.getvalue()
    return json.loads(out.getvalue())


def _same(cpp: dict, py: dict) -> None:
    assert set(cpp) == set(py)
    assert {k: cpp[k] for k in COMPARED} == {k: py[k] for k in COMPARED}


@pytest.mark.parametrize("mode", ["tidar", "ar"])
@pytest.mark.parametrize("sampling", [[], ["--temperature", 0.8, "--top-k", 20, "--top-p", 0.9, "--seed", 7],
                                      ["--temperature", 1.0, "--seed", 2**64 - 1]], ids=["greedy", "topk-topp", "t1"])
def test_one_prompt_equals_the_python_cli(tiny, demo, mode, sampling):
    for art, prompt in ((tiny, [5, 17, 42, 9]), (demo, DEMO_PROMPT)):
        args = ["--mode", mode, "--max-new-tokens", 24, *sampling]
        [cpp] = _cpp(art, *args, prompts=[prompt])
        _same(cpp, _python_cli(art, *args, prompt=prompt))
        assert cpp["new_tokens"] > 8


def test_demo_accepts_drafts_and_rows_finish_on_stop_ids_and_a_full_cache(demo):
    """The trained demo model accepts drafts (k = 3 through the sparse block 3, k = 2 through block 1);
    a batch of two rows: one stops on a stop id, the other fills its 64-slot cache."""
    long_prompt = list(range(300, 346))  # 46 tokens: 64 slots leave room for two steps of 9
    free = _cpp(demo, "--max-new-tokens", 60, prompts=[DEMO_PROMPT, long_prompt])
    assert set(free[0]["accepted_histogram"]) > {"1", "2"} and free[0]["tokens_per_forward"] > 1.2, free
    stop = next(t for t in free[0]["token_ids"][5:] if t not in free[1]["token_ids"])
    for mode, params in (("tidar", SamplingParams()), ("ar", SamplingParams(0.7, 30, 0.95, 3))):
        args = ["--mode", mode, "--max-new-tokens", 60, "--stop-ids", stop]
        if not params.greedy:
            args += ["--temperature", params.temperature, "--top-k", params.top_k, "--top-p", params.top_p,
                     "--seed", params.seed]
        cpp = _cpp(demo, *args, prompts=[DEMO_PROMPT, long_prompt])
        run = generate_tidar_batch if mode == "tidar" else generate_ar_batch
        py = run(OrtBackend(demo), [DEMO_PROMPT, long_prompt], 60, params, [stop])
        for c, p in zip(cpp, py):
            assert {k: c[k] for k in COMPARED} == {k: ({**summarize(p), "token_ids": p.tokens})[k] for k in COMPARED}
        if mode == "tidar":
            assert [c["finish_reason"] for c in cpp] == ["stop", "cache_full"]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(1.0, 0, 0.95, 11)], ids=["greedy", "sampled"])
def test_batch_of_three_equals_the_python_batch(tiny, params):
    prompts = [[7], [5, 17, 42, 9, 100, 7], list(range(30, 50))]  # the 20-token row fills the cache first
    args = [] if params.greedy else ["--temperature", params.temperature, "--top-p", params.top_p, "--seed", params.seed]
    for mode, run in (("tidar", generate_tidar_batch), ("ar", generate_ar_batch)):
        cpp = _cpp(tiny, "--mode", mode, "--max-new-tokens", 16, *args, prompts=prompts)
        py = run(OrtBackend(tiny), prompts, 16, params)
        assert [c["token_ids"] for c in cpp] == [r.tokens for r in py]
        assert [c["finish_reason"] for c in cpp] == [r.finish_reason for r in py]
        assert [c["accepted_histogram"] for c in cpp] == [summarize(r)["accepted_histogram"] for r in py]
        assert cpp[2]["finish_reason"] == "cache_full"


def test_an_adapter_artifact_decodes_as_python_and_keeps_the_base_greedy_output(tmp_path):
    """A draft adapter lives inside the prefill and step graphs (the AR step graph has none): the C++
    tool decodes an adapter artifact as the Python runtime does, greedy and sampled, and its greedy
    TiDAR output is the base model's greedy AR output, token for token."""
    base_ckpt = save_checkpoint(random_model(seed=5), tmp_path / "base")
    base = export_artifact(base_ckpt, tmp_path / "base-art", block_size=3, max_seq_len=64, max_batch=2)
    ckpt = save_checkpoint(with_random_adapter(random_model(seed=5), layers=(0, 1)), tmp_path / "adapted")
    art = export_artifact(ckpt, tmp_path / "art", block_size=3, max_seq_len=64, max_batch=2)
    assert json.loads((art / "manifest.json").read_text())["adapter"]["layers"] == [0, 1]
    prompts = [[5, 17, 42, 9], list(range(30, 45))]
    for sampling in ([], ["--temperature", 0.8, "--top-k", 20, "--seed", 7]):
        for prompt in prompts:
            args = ["--max-new-tokens", 24, *sampling]
            [cpp] = _cpp(art, *args, prompts=[prompt])
            _same(cpp, _python_cli(art, *args, prompt=prompt))
    adapted = _cpp(art, "--max-new-tokens", 24, prompts=prompts)
    plain = _cpp(base, "--max-new-tokens", 24, prompts=prompts)
    ar = _cpp(base, "--mode", "ar", "--max-new-tokens", 24, prompts=prompts)
    assert [r["token_ids"] for r in adapted] == [r["token_ids"] for r in ar]
    assert all(r["new_tokens"] == 24 for r in adapted)
    assert [r["accepted_histogram"] for r in adapted] != [r["accepted_histogram"] for r in plain]  # other drafts


def _copy(art, tmp_path) -> Path:
    out = tmp_path / "art"
    shutil.copytree(art, out)
    return out


def _errors(art, *args) -> tuple[str, str]:
    """The error line of each tool, same arguments."""
    res = subprocess.run([str(_tool("tidar-generate")), str(art), "--prompt-ids", "1,2", *map(str, args)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stdout == ""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(["generate", str(art), "--prompt-ids", "1,2", *map(str, args)])
    assert rc == 1
    return res.stderr.strip(), err.getvalue().strip()


def test_errors_are_the_python_lines(tiny, tmp_path):
    art = _copy(tiny, tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    cases = [
        lambda m: m.update(version=1),  # an artifact of format version 1: says re-export
        lambda m: m["dims"].update(batch=0),
        lambda m: m["graphs"]["ar_step"].update(kv_update=None),
        lambda m: m["tokenizer"].update(eos_token_id=[1, 256]),
        lambda m: m["graphs"]["step"].update(file="../step.onnx"),
        lambda m: m["graphs"]["step"].update(digest="0" * 32),
        lambda m: m["graphs"]["step"]["outputs"].pop(0),
    ]
    for i, change in enumerate(cases):
        m = json.loads(json.dumps(manifest))
        change(m)
        (art / "manifest.json").write_text(json.dumps(m))
        cpp, py = _errors(art)
        assert cpp == py and cpp.startswith("error: ") and "\n" not in cpp, i
    (art / "manifest.json").write_text(json.dumps(manifest))
    for args in (["--temperature", "-1"], ["--top-p", "0"], ["--max-new-tokens", "0"], ["--mode", "ar", "--top-k", "-1"]):
        cpp, py = _errors(art, *args)
        assert cpp == py, args
    cpp, py = _errors(tmp_path / "nowhere")
    assert cpp == py == f"error: artifact directory not found: {tmp_path / 'nowhere'}"
    big = subprocess.run([str(_tool("tidar-generate")), str(art), "--prompt-ids", "1,999999"], capture_output=True,
                         text=True, timeout=60)
    assert big.returncode == 1 and big.stderr.strip() == "error: prompt token id 999999 is outside the vocabulary (0..255)"


@pytest.mark.parametrize("backend", ["ort-cuda", "trt"])
def test_device_backends_decode_as_the_cpu_backend_or_say_why_not(tiny, backend):
    """Where this build and machine have them (CUDA and a GPU; TensorRT and built engines), the device
    backends decode what the CPU backend decodes; elsewhere one line says why, exit status 1."""
    prompt = [5, 17, 42, 9]
    argv = [str(_tool("tidar-generate")), str(tiny), "--json", "--max-new-tokens", "8", "--prompt-ids", "5,17,42,9"]
    res = subprocess.run(argv + ["--backend", backend], capture_output=True, text=True, timeout=120)
    if res.returncode == 0:
        assert json.loads(res.stdout)["token_ids"] == _cpp(tiny, "--max-new-tokens", 8, prompts=[prompt])[0]["token_ids"]
    else:
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr


def test_an_eos_list_stops_on_every_id(tiny, tmp_path):
    """A manifest whose eos_token_id is a list: without --stop-ids, the C++ tool stops where
    `tidar-export generate` does, on the first generated token that is any of the ids."""
    prompt = [5, 17, 42, 9]
    [free] = _cpp(tiny, "--max-new-tokens", 16, "--stop-ids", "", prompts=[prompt])  # no stop ids
    tokens = free["token_ids"]
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])  # a first appearance, not at the start
    unused = next(t for t in range(256) if t not in tokens)
    art = _copy(tiny, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["tokenizer"]["eos_token_id"] = [unused, tokens[k]]
    (art / "manifest.json").write_text(json.dumps(m))
    for mode in ("tidar", "ar"):
        [cpp] = _cpp(art, "--mode", mode, "--max-new-tokens", 16, prompts=[prompt])
        _same(cpp, _python_cli(art, "--mode", mode, "--max-new-tokens", 16, prompt=prompt))
        if mode == "tidar":
            assert cpp["token_ids"] == tokens[:k] and cpp["finish_reason"] == "stop"


def test_service_example_links_the_library(demo):
    """The minimal service (cpp/examples/service.cpp) answers a prompt as the Python runtime does."""
    res = subprocess.run([str(_tool("tidar-service-example")), str(demo)], input=",".join(map(str, DEMO_PROMPT)) + "\n",
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    want = generate_tidar_batch(OrtBackend(demo), [DEMO_PROMPT], 32, stop_tokens=[0])[0]
    assert res.stdout.split("(")[0].split() == [str(t) for t in want.tokens]
