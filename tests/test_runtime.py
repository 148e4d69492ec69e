"""The thin runtime over exported artifacts (docs/RUNTIME.md): backends, loop, CLI, demo.

Three artifacts, each exported once per module (tracing is the slow part):
- tiny:  the tiny preset, random weights, b = 4, max_seq_len 48, max_batch 3;
- small: an 8-token vocabulary, random weights, b = 3, max_batch 2 (exact sampling distribution);
- demo:  the embedded demo model (trained: it accepts drafts) at its shipped decode setting
         (demo_model/demo_setting.json), written by `tidar-export demo`.
A random model rejects nearly every draft, so partial acceptance is exercised on the demo model.
"""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest

from tests.conftest import random_model
from tests.fake_trt import FakeCuda
from tests.test_decode_sampling import N_NEW, PROMPT, chi_square_pvalue, exact_ar_distribution
from tidar_export.model.checkpoint import save_checkpoint
from tidar_export.cli import main
from tidar_export.bench.demo import (SETTING_FILE, STAMP_FILE, stale_reason, checkpoint_digest, cost_line,
                               demo_model_path, demo_setting)
from tidar_export.export.artifact import export_artifact
from tidar_export.model.reference import TorchBackend
from tidar_runtime import (
    SamplingParams,
    generate_ar,
    generate_ar_batch,
    generate_tidar,
    generate_tidar_batch,
    text_pieces,
)
from tidar_runtime.backends.ort import OrtBackend
from tidar_runtime.backends.ort_cuda import OrtCudaBackend
from tidar_runtime.errors import TiDARError

TINY_LEN, TINY_BATCH, TINY_B = 48, 3, 4
PROMPTS = [[7], [5, 17, 42, 9, 100, 7], list(range(30, 55))]  # 25 tokens: hits cache_full first at b = 4
SMALL_V, SMALL_B = 8, 3
DEMO_PROMPTS = ["def read_config(path):\n", "    if not os.path.isdir(path):\n"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint, artifact) of the tiny preset."""
    ckpt = save_checkpoint(random_model(seed=3), tmp_path_factory.mktemp("tiny") / "ckpt")
    art = export_artifact(ckpt, ckpt.parent / "art", block_size=TINY_B, max_seq_len=TINY_LEN, max_batch=TINY_BATCH)
    return ckpt, art


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model, checkpoint, artifact) with an 8-token vocabulary (the model of test_decode_sampling)."""
    model = random_model(seed=3, vocab_size=SMALL_V, mask_token_id=SMALL_V - 1, hidden_size=32,
                         intermediate_size=64, num_layers=1, head_dim=8)
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("small") / "ckpt")
    art = export_artifact(ckpt, ckpt.parent / "art", block_size=SMALL_B, max_seq_len=32, max_batch=2)
    return model, ckpt, art


def _run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`tidar-export demo --json` run twice on one cache directory: (dir, first, second) results."""
    art = tmp_path_factory.mktemp("demo") / "cache"
    runs = [_run_cli(["demo", "--artifact-dir", art, "--json", "--max-new-tokens", 16]) for _ in range(2)]
    return art, runs


# ------------------------------------------------------------------------------ equality


def _reference(ckpt, art, prompts, max_new, stop=()):
    """AR greedy of each prompt alone, by the torch reference model under the artifact's settings."""
    return [generate_ar(TorchBackend.from_artifact(art, ckpt), p, max_new, stop_tokens=stop) for p in prompts]


def test_ort_batch_equals_ar_and_torch_rows_finish_independently(tiny):
    """ORT TiDAR == ORT AR == torch, batch of 3 prompts of different lengths; one row ends on a
    stop token, one on the cache, one on max_new_tokens, each at its own step."""
    ckpt, art = tiny
    ort = OrtBackend(art)
    max_new = 16
    free = _reference(ckpt, art, PROMPTS, max_new)
    stop = free[0].tokens[5]
    ref = _reference(ckpt, art, PROMPTS, max_new, stop=[stop])
    td = generate_tidar_batch(ort, PROMPTS, max_new, stop_tokens=[stop])
    ar = generate_ar_batch(ort, PROMPTS, max_new, stop_tokens=[stop])
    torch_td = generate_tidar_batch(TorchBackend.from_artifact(art, ckpt), PROMPTS, max_new, stop_tokens=[stop])
    assert [r.tokens for r in ar] == [r.tokens for r in ref]
    for i, (t, r) in enumerate(zip(td, ref)):
        if t.finish_reason == "cache_full":  # a TiDAR step needs q_len free slots, AR only one
            assert 0 < len(t.tokens) < len(r.tokens) and t.tokens == r.tokens[: len(t.tokens)], i
        else:
            assert (t.tokens, t.finish_reason) == (r.tokens, r.finish_reason), i
    assert [(r.tokens, r.finish_reason, r.stats.accepted) for r in torch_td] == \
           [(r.tokens, r.finish_reason, r.stats.accepted) for r in td]
    assert td[0].finish_reason == "stop" and td[2].finish_reason == "cache_full"
    assert {r.finish_reason for r in td} == {"stop", "cache_full", "length"}


def test_single_row_in_a_batch_artifact_equals_the_batch(tiny):
    ckpt, art = tiny
    ort = OrtBackend(art)
    batch = generate_tidar_batch(ort, PROMPTS[:2], 12)
    alone = [generate_tidar(ort, p, 12) for p in PROMPTS[:2]]
    assert [r.tokens for r in batch] == [r.tokens for r in alone]


def test_small_vocab_greedy_equals_ar(small):
    """b = 3, batch 2, sparse-free dense proposals: ORT TiDAR == ORT AR == torch TiDAR."""
    model, ckpt, art = small
    ort = OrtBackend(art)
    prompts = [[1, 2, 3], [4, 0, 5, 6, 2, 1, 1]]
    td = generate_tidar_batch(ort, prompts, 14)
    assert [r.tokens for r in td] == [r.tokens for r in generate_ar_batch(ort, prompts, 14)]
    assert [r.tokens for r in td] == [
        r.tokens for r in generate_tidar_batch(TorchBackend.from_artifact(art, ckpt), prompts, 14)]
    assert all(len(r.tokens) == 14 and r.finish_reason == "length" for r in td)


def test_demo_model_partial_acceptance_equals_ar_and_torch(demo):
    """The trained demo model accepts some drafts and rejects others; TiDAR still equals AR."""
    from tokenizers import Tokenizer

    art = demo[0]
    tok = Tokenizer.from_file(str(art / "tokenizer.json"))
    ort, ref = OrtBackend(art), TorchBackend.from_artifact(art, demo_model_path())
    ks = []
    for text in DEMO_PROMPTS:
        ids = tok.encode(text).ids
        td = generate_tidar(ort, ids, 40)
        assert td.tokens == generate_ar(ort, ids, 40).tokens == generate_tidar(ref, ids, 40).tokens
        ks += td.stats.accepted
    b = ort.block_size
    assert any(k > 1 for k in ks) and any(k < b for k in ks), ks


# ------------------------------------------------------------------------------ sampling


def test_ort_sampling_has_the_ar_distribution(small):
    """Chi-square of TiDAR sampling over ONNX Runtime against the exact AR distribution
    (the method of test_decode_sampling, whose power against wrong rules is tested there)."""
    model, _, art = small
    ort = OrtBackend(art)
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    runs, counts, ks = 1200, {}, []
    for seed in range(runs // 2):  # two rows per call; row i draws from the stream seeded [seed, i]
        for res in generate_tidar_batch(ort, [PROMPT, PROMPT], N_NEW,
                                        SamplingParams(params.temperature, params.top_k, params.top_p, seed)):
            counts[tuple(res.tokens)] = counts.get(tuple(res.tokens), 0) + 1
            ks += res.stats.accepted
    assert chi_square_pvalue(counts, exact_ar_distribution(model, params), runs) > 1e-3
    assert min(ks) == 1 and max(ks) >= 2  # drafts both accepted and rejected


def test_ort_sampling_equals_torch_for_the_same_seed(small):
    """Same logits (to ~1e-6) and the same generator stream: the same samples, row by row."""
    model, ckpt, art = small
    ort, ref = OrtBackend(art), TorchBackend.from_artifact(art, ckpt)
    prompts = [[1, 2, 3], [4, 0, 5]]
    for seed in range(8):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        got = generate_tidar_batch(ort, prompts, 10, params)
        want = generate_tidar_batch(ref, prompts, 10, params)
        assert [r.tokens for r in got] == [r.tokens for r in want]
        assert [r.tokens for r in generate_ar_batch(ort, prompts, 10, params)] == \
               [r.tokens for r in generate_ar_batch(ref, prompts, 10, params)]


# ------------------------------------------------------------------------------ ORT CUDA path


def test_ort_cuda_buffer_logic_over_host_memory(tiny):
    """OrtCudaBackend's buffers, bindings, K/V copies and single synchronization, run with the CPU
    provider on a stand-in CUDA API whose device memory is host memory."""
    _, art = tiny
    cuda = FakeCuda()
    dev = OrtCudaBackend(art, ort_device="cpu", cuda_api=cuda)
    allocations = len(cuda.memory["device"]) + len(cuda.memory["host"])
    ort = OrtBackend(art)
    syncs = cuda.syncs
    td = generate_tidar_batch(dev, PROMPTS, 16)
    passes = len(PROMPTS) + max(r.stats.forwards for r in td)  # prefills + steps
    assert cuda.syncs - syncs == passes  # one host synchronization per pass
    assert [r.tokens for r in td] == [r.tokens for r in generate_tidar_batch(ort, PROMPTS, 16)]
    assert [r.tokens for r in generate_ar_batch(dev, PROMPTS, 16)] == \
           [r.tokens for r in generate_ar_batch(ort, PROMPTS, 16)]
    params = SamplingParams(temperature=1.0, seed=5)
    assert [r.tokens for r in generate_tidar_batch(dev, PROMPTS, 8, params)] == \
           [r.tokens for r in generate_tidar_batch(ort, PROMPTS, 8, params)]
    assert len(cuda.memory["device"]) + len(cuda.memory["host"]) == allocations  # nothing allocated per pass
    dev.close()
    assert cuda.memory == {"device": {}, "host": {}}
    with pytest.raises(TiDARError, match="closed"):
        dev.step(np.zeros((TINY_BATCH, TINY_B), np.int64), np.zeros(TINY_BATCH, np.int64), False)


def test_ort_cuda_on_a_gpu(tiny):
    ort_module = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort_module.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a GPU (this onnxruntime has no CUDA provider)")
    _, art = tiny
    with OrtCudaBackend(art) as dev:
        assert [r.tokens for r in generate_tidar_batch(dev, PROMPTS, 16)] == \
               [r.tokens for r in generate_tidar_batch(OrtBackend(art), PROMPTS, 16)]


# ------------------------------------------------------------------------------ CLI


def _error_line(rc, out, err) -> str:
    assert rc == 1 and out == "", (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_generate_json(tiny):
    ckpt, art = tiny
    ref = _reference(ckpt, art, [PROMPTS[1]], 10)[0].tokens
    for mode, backend in [("tidar", "ort"), ("ar", "ort"), ("tidar", "torch")]:
        extra = ["--checkpoint", ckpt] if backend == "torch" else []
        rc, out, _ = _run_cli(["generate", art, "--prompt-ids", "5,17,42,9,100,7", "--mode", mode,
                               "--backend", backend, "--max-new-tokens", 10, "--json", *extra])
        assert rc == 0
        report = json.loads(out)
        assert report["token_ids"] == ref and report["mode"] == mode and report["backend"] == backend
        assert report["finish_reason"] == "length" and report["new_tokens"] == 10
        assert report["forwards"] >= 1 and report["tokens_per_forward"] >= 1.0
        assert report["tokens_per_s"] > 0 and set(report["step_ms"]) == {"p50", "p90", "p99"}
        assert sum(report["accepted_histogram"].values()) == report["forwards"]
        assert "text" in report  # None: the tiny artifact has no tokenizer


def test_generate_text_stream_and_sampling(demo):
    art = demo[0]
    rc, out, err = _run_cli(["generate", art, "--prompt", "def main():\n", "--max-new-tokens", 12, "--json"])
    report = json.loads(out)
    rc2, streamed, err2 = _run_cli(["generate", art, "--prompt", "def main():\n", "--max-new-tokens", 12,
                                    "--stream"])
    assert rc == rc2 == 0 and streamed == report["text"] + "\n" and "tokens/forward" in err2
    sampled = [json.loads(_run_cli(["generate", art, "--prompt", "x = ", "--max-new-tokens", 8, "--temperature",
                                    0.9, "--top-k", 20, "--top-p", 0.9, "--seed", s, "--json"])[1])["token_ids"]
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # seeded: reproducible


def test_text_pieces_hold_back_split_characters():
    """Pieces decoded from the whole row; a UTF-8 sequence split over tokens waits for its end."""
    vocab = {1: b"a", 2: "\u00e9".encode()[:1], 3: "\u00e9".encode()[1:], 4: b"b"}

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")

    def pieces():  # scripted (row, tokens) pieces, as the loop yields them
        yield 0, [1]
        yield 1, [4]  # another row: ignored
        yield 0, [2]  # the first byte of a two-byte character: held back
        yield 0, [3]
        yield 0, [4]
        return []

    from tidar_runtime.loop import Stream

    assert list(text_pieces(Stream(pieces()), decode)) == ["a", "\u00e9", "b"]


def test_bad_inputs_are_one_line_errors(tiny, tmp_path):
    ckpt, art = tiny
    ids = ",".join(str(i) for i in range(TINY_LEN - TINY_B + 1))  # P + b = 49 > 48 slots
    line = _error_line(*_run_cli(["generate", art, "--prompt-ids", ids]))
    assert "does not fit the KV cache of 48 slots" in line
    line = _error_line(*_run_cli(["generate", art, "--prompt-ids", ",".join(["3"] * 49), "--mode", "ar"]))
    assert "does not fit the KV cache" in line

    old = tmp_path / "old"
    shutil.copytree(art, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"] = 99
    (old / "manifest.json").write_text(json.dumps(manifest))
    for backend in ("ort", "torch"):
        assert "manifest version 99 is not supported" in _error_line(
            *_run_cli(["generate", old, "--prompt-ids", "1,2", "--backend", backend]))

    assert "unknown backend 'tpu'" in _error_line(*_run_cli(["generate", art, "--prompt-ids", "1", "--backend", "tpu"]))
    assert "pass --checkpoint DIR" in _error_line(*_run_cli(["generate", art, "--prompt-ids", "1", "--backend", "torch"]))
    assert "is not the model of this artifact" in _error_line(
        *_run_cli(["generate", art, "--prompt-ids", "1", "--backend", "torch", "--checkpoint", demo_model_path()]))
    assert "only by --backend torch" in _error_line(
        *_run_cli(["generate", art, "--prompt-ids", "1", "--checkpoint", ckpt]))
    assert "no tokenizer.json" in _error_line(*_run_cli(["generate", art, "--prompt", "hello"]))
    assert "--top-p" in _error_line(*_run_cli(["generate", art, "--prompt-ids", "1", "--top-p", "0"]))
    assert "artifact directory not found" in _error_line(*_run_cli(["generate", tmp_path / "nope", "--prompt-ids", "1"]))


def test_gpu_backends_without_a_gpu_are_one_line_errors(tiny):
    import onnxruntime

    _, art = tiny
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    assert "needs onnxruntime-gpu and a GPU" in _error_line(
        *_run_cli(["generate", art, "--prompt-ids", "1", "--backend", "ort-cuda"]))
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        assert "TensorRT is not installed" in _error_line(
            *_run_cli(["generate", art, "--prompt-ids", "1", "--backend", "trt"]))
    with pytest.raises(TiDARError, match="no TensorRT engine|TensorRT is not installed"):
        from tidar_runtime.backends.select import open_backend

        open_backend("trt", art)


# ------------------------------------------------------------------------------ demo


def test_demo_runs_end_to_end_and_reuses_its_artifact(demo):
    art, ((rc1, out1, err1), (rc2, out2, err2)) = demo
    assert rc1 == rc2 == 0, err1 + err2
    first, second = json.loads(out1), json.loads(out2)
    assert first["exported"] and not second["exported"]
    assert "exporting the demo model" in err1 and "reusing the demo artifact" in err2
    for report in (first, second):
        assert report["all_equal"] and len(report["prompts"]) >= 3
        for row in report["prompts"]:
            assert row["ar_token_ids"] == row["tidar_token_ids"] and row["ar_text"] == row["tidar_text"]
            assert 1.0 <= row["tokens_per_forward"] <= report["model"]["block_size"]
        assert report["speed_ratio"] > 0 and report["tokens_per_forward"] >= 1.0
    assert [r["tidar_token_ids"] for r in first["prompts"]] == [r["tidar_token_ids"] for r in second["prompts"]]
    assert "/" not in json.dumps(json.loads((art / STAMP_FILE).read_text()))  # no machine paths in the stamp
    # it decodes at the shipped setting and reports the step-cost arithmetic
    want = demo_setting()
    for report in (first, second):
        st = report["setting"]
        assert (st["block_size"], st["proposals"]) == (want["block_size"], want["proposals"])
        assert st["width"] == st["block_size"] * (1 + len(st["proposals"]))
        assert report["step_ms_p50"] > 0 and report["ar_step_ms_p50"] > 0 and report["repeats"] >= 1
        assert report["step_cost_ratio"] == pytest.approx(report["step_ms_p50"] / report["ar_step_ms_p50"], rel=0.01, abs=2e-3)
        assert report["projected_speedup"] == pytest.approx(
            report["tokens_per_forward"] / report["step_cost_ratio"], rel=0.01, abs=2e-3)


def test_demo_text_report_has_outputs_equality_speed_and_the_cost_line(demo):
    rc, out, err = _run_cli(["demo", "--artifact-dir", demo[0], "--max-new-tokens", 8, "--repeats", 1])
    assert rc == 0, err
    assert out.count("--- AR (") == out.count("--- TiDAR (") == out.count("identical token for token: yes") >= 3
    summary, cost = out.strip().splitlines()[-2:]
    assert summary.startswith("TiDAR == AR on all") and "tokens/s TiDAR / AR = " in summary
    assert cost.startswith("step cost here: a width-") and "x the AR step" in cost and "projected" in cost


def test_demo_cost_line_says_where_width_stops_being_free():
    report = {"setting": {"block_size": 2, "proposals": [1], "width": 4}, "tokens_per_forward": 1.5,
              "step_cost_ratio": 1.25, "step_ms_p50": 0.5, "ar_step_ms_p50": 0.4, "projected_speedup": 1.2,
              "speed_ratio": 1.1}
    line = cost_line(report)
    assert "width-4 step (b = 2, proposals {1}) costs 1.25x the AR step (0.5 / 0.4 ms)" in line
    assert "TiDAR wins here while T/NFE 1.50 > 1.25" in line and "= 1.20x, measured 1.1x" in line
    slow = report | {"step_cost_ratio": 3.0, "projected_speedup": 0.5, "speed_ratio": 0.45}
    assert "TiDAR loses here while T/NFE 1.50 <= 3.00" in cost_line(slow)


def test_demo_setting_is_read_from_the_model_folder(tmp_path):
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    shutil.copy2(demo_model_path() / "config.json", ckpt / "config.json")
    b0 = json.loads((ckpt / "config.json").read_text())["tidar"]["block_size"]
    assert demo_setting(ckpt) == {"block_size": b0, "proposals": list(range(1, b0 + 1)),
                                  "source": "checkpoint default"}
    (ckpt / SETTING_FILE).write_text(json.dumps({"block_size": 3, "proposals": [1], "tuned_on": "x"}))
    assert demo_setting(ckpt) == {"block_size": 3, "proposals": [1], "source": SETTING_FILE, "mode": "tidar"}
    (ckpt / SETTING_FILE).write_text(json.dumps({"block_size": 2, "proposals": [1], "mode": "ar"}))
    assert demo_setting(ckpt)["mode"] == "ar"  # tuning found no TiDAR setting faster than AR
    (ckpt / SETTING_FILE).write_text(json.dumps({"block_size": 3, "proposals": [2]}))
    with pytest.raises(TiDARError, match="unreadable decode setting"):
        demo_setting(ckpt)


def test_demo_artifact_of_another_setting_is_stale(demo):
    art = demo[0]
    digest = checkpoint_digest(demo_model_path())
    have = demo_setting()
    other = {"block_size": have["block_size"] + 1, "proposals": [1]}
    assert "manifest differs" in stale_reason(art, demo_model_path(), digest, other)
    assert stale_reason(art, demo_model_path(), digest, have) is None


def test_demo_cache_is_invalidated_by_another_checkpoint(demo):
    art = demo[0]
    digest = checkpoint_digest(demo_model_path())
    assert stale_reason(art, demo_model_path(), digest) is None
    assert "another demo checkpoint" in stale_reason(art, demo_model_path(), "0" * 32)


def test_demo_exits_nonzero_when_outputs_differ(demo, monkeypatch):
    """A loop that drops a token in TiDAR mode must make the demo fail."""
    import tidar_runtime

    real = tidar_runtime.generate_tidar

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        res.tokens = res.tokens[1:]
        return res

    monkeypatch.setattr(tidar_runtime, "generate_tidar", broken)
    rc, out, err = _run_cli(["demo", "--artifact-dir", demo[0], "--max-new-tokens", 6])
    assert rc == 1 and "differs from AR output" in err.strip().splitlines()[-1]
