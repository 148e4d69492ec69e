"""The training recipe (TIDAR.md 2), resume, the eval command, and the shipped demo model.

Everything here trains tiny models for a few steps on a small generated corpus; nothing
trains the demo model.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tidar_export.train import data
from tidar_export.model.checkpoint import load_checkpoint
from tidar_export.cli import main
from tidar_export.train.trainer import TrainSettings, ar_batch, losses, tidar_batch, train

from .mask_rules import train_mask_entry

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            seq_len=16, block_size=4, batch_size=4, warmup=2, lr=1e-2)


def _code_file(i: int) -> str:
    lines = [f"def function_{i}_{j}(x, y):\n    total = x + y * {j}\n    return total\n\n" for j in range(30)]
    return f"# module {i}\nimport os\n\n" + "".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (root / f"mod_{i:02d}.py").write_text(_code_file(i))
    (root / "notes.txt").write_text("not matched by the pattern")
    return root


def _settings(corpus: Path, **kw) -> TrainSettings:
    return TrainSettings(corpus=str(corpus), **(TINY | kw))


def _quiet(*_):
    pass


# ------------------------------------------------------------------------------ layout (TIDAR.md 2)


@pytest.mark.parametrize("S,b", [(8, 2), (8, 4), (12, 3)])
def test_tidar_batch_matches_tidar_md(S, b):
    M = 1
    x = torch.arange(100, 100 + 2 * (S + 1)).view(2, S + 1)  # distinct tokens, 2 rows
    ids, pos, mask, labels = tidar_batch(x, b, M)
    assert ids.shape == labels.shape == pos.shape == (2, 2 * S) and mask.shape == (2 * S, 2 * S)
    for row in range(2):
        for i in range(S):  # clean half: x_i, position i, label x_{i+1} (shifted)
            assert ids[row, i] == x[row, i] and pos[row, i] == i and labels[row, i] == x[row, i + 1]
        for j in range(S):  # mask half: all M (full mask), position j, label x_j (NOT shifted)
            assert ids[row, S + j] == M and pos[row, S + j] == j and labels[row, S + j] == x[row, j]
    for q in range(2 * S):
        for k in range(2 * S):
            assert bool(mask[q, k]) == train_mask_entry(q, k, S, b), (q, k)


def test_ar_batch_is_plain_next_token():
    x = torch.arange(10, 19)[None]  # S = 8
    ids, pos, mask, labels = ar_batch(x)
    assert ids.tolist() == [list(range(10, 18))] and labels.tolist() == [list(range(11, 19))]
    assert pos.tolist() == [list(range(8))] and torch.equal(mask, torch.ones(8, 8, dtype=torch.bool).tril())


def test_loss_is_a_weighted_mean_of_both_terms(tiny_model):
    torch.manual_seed(0)
    x = torch.randint(2, tiny_model.cfg.vocab_size, (2, 9))
    S, a = 8, 0.5
    total, ce_ar, ce_diff = losses(tiny_model, x, "tidar", 4, ar_weight=a)
    ids, pos, mask, labels = tidar_batch(x, 4, tiny_model.cfg.mask_token_id)
    logits, _, _ = tiny_model(ids, pos, mask)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 2 * S)
    torch.testing.assert_close(ce_ar, ce[:, :S].mean())
    torch.testing.assert_close(ce_diff, ce[:, S:].mean())
    torch.testing.assert_close(total, (a * ce[:, :S].mean() + ce[:, S:].mean()) / (1 + a))
    ar_total, ar_ce, none = losses(tiny_model, x, "ar", 4)
    assert none is None and torch.equal(ar_total, ar_ce)


# ------------------------------------------------------------------------------ training


def test_few_steps_lower_both_terms(corpus, tmp_path):
    final = train(_settings(corpus, steps=30), tmp_path / "run", log_every=5, save_every=100, progress=False,
                  log=_quiet)
    first, last = final["history"][0], final["history"][-1]
    assert last["ce_ar"] < first["ce_ar"] - 0.5 and last["ce_diff"] < first["ce_diff"] - 0.5
    # the run folder is a checkpoint in the importer's format, with the tokenizer's special tokens
    model = load_checkpoint(tmp_path / "run")
    tok = data.load_tokenizer(tmp_path / "run")
    assert model.cfg.mask_token_id == tok.token_to_id(data.MASK_TOKEN)
    assert model.cfg.eos_token_id == tok.token_to_id(data.EOS_TOKEN)
    assert model.cfg.block_size == 4


def test_ar_mode_trains_the_next_token_loss_only(corpus, tmp_path):
    final = train(_settings(corpus, mode="ar", steps=10), tmp_path / "ar", log_every=5, progress=False, log=_quiet)
    assert all(h["ce_diff"] is None for h in final["history"])
    assert final["history"][-1]["ce_ar"] < final["history"][0]["ce_ar"]


def test_resume_equals_straight_training(corpus, tmp_path):
    s = _settings(corpus, steps=6)
    straight = train(s, tmp_path / "a", log_every=1, progress=False, log=_quiet)
    half = train(s, tmp_path / "b", stop_at=3, log_every=1, progress=False, log=_quiet)
    assert half["step"] == 3
    resumed = train(s, tmp_path / "b", resume=True, log_every=1, progress=False, log=_quiet)
    assert resumed["step"] == straight["step"] == 6
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("tok_s", "elapsed_s")} for r in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_continue_from_an_ar_checkpoint(corpus, tmp_path):
    train(_settings(corpus, mode="ar", steps=2), tmp_path / "base", progress=False, log=_quiet)
    base = load_checkpoint(tmp_path / "base")
    s = _settings(corpus, steps=1, lr=1e-12, warmup=0, init_from=str(tmp_path / "base"), block_size=8)
    train(s, tmp_path / "cont", progress=False, log=_quiet)
    cont = load_checkpoint(tmp_path / "cont")
    assert cont.cfg.block_size == 8 and cont.cfg.mask_token_id == base.cfg.mask_token_id
    for (name, p), q in zip(base.state_dict().items(), cont.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_run_folder_loads_in_transformers(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    train(_settings(corpus, steps=2), tmp_path / "run", progress=False, log=_quiet)
    ours = load_checkpoint(tmp_path / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run")
    ids = torch.tensor([hf_tok.encode("def f(x):\n    return x\n")])
    with torch.no_grad():
        want = hf(ids).logits
        got, _, _ = ours(ids, torch.arange(ids.shape[1])[None], torch.ones(ids.shape[1], ids.shape[1]).tril().bool())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ eval command


def test_eval_command_reports_its_fields(corpus, tmp_path, capsys):
    train(_settings(corpus, steps=20), tmp_path / "run", progress=False, log=_quiet)
    rc = main(["eval", str(tmp_path / "run"), "--corpus", str(corpus), "--block-sizes", "2,4",
               "--num-prompts", "2", "--prompt-len", "8", "--max-new-tokens", "12", "--seq-len", "16",
               "-o", str(tmp_path / "report.json")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["corpus"]["heldout_files"] == 1 and report["eval_tokens"] > 0
    assert 0 < report["ar_loss"] < 10 and 0 <= report["next_token_acc"] <= 1 and "diff_loss" in report
    dec = report["decode"]
    assert set(dec["tidar"]) == {"2", "4"} and dec["tidar_equals_ar"] is True
    for b, r in dec["tidar"].items():
        assert 1.0 <= r["tokens_per_forward"] <= int(b) and r["equals_ar"] and r["forwards"] > 0


# ------------------------------------------------------------------------------ user errors


def _error_line(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_user_errors_are_one_line(corpus, tmp_path, capsys):
    tiny = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate-size", "64",
            "--vocab-size", "300", "--seq-len", "16", "--block-size", "4", "--batch-size", "2", "--steps", "1"]
    assert "corpus folder not found" in _error_line(
        capsys, ["train", "-o", str(tmp_path / "x"), "--corpus", str(tmp_path / "missing")] + tiny)
    assert "multiple of --block-size" in _error_line(
        capsys, ["train", "-o", str(tmp_path / "x"), "--corpus", str(corpus)] + tiny + ["--seq-len", "10"])
    assert "no training state" in _error_line(capsys, ["train", "-o", str(tmp_path), "--resume"])
    assert main(["train", "-o", str(tmp_path / "run"), "--corpus", str(corpus)] + tiny) == 0
    capsys.readouterr()
    assert "--resume" in _error_line(capsys, ["train", "-o", str(tmp_path / "run"), "--corpus", str(corpus)] + tiny)
    assert "differs from the saved run" in _error_line(
        capsys, ["train", "-o", str(tmp_path / "run"), "--resume", "--lr", "0.5"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_text("")
    assert "readable UTF-8 files" in _error_line(capsys, ["eval", str(tmp_path / "run"), "--corpus", str(empty)])
    (tmp_path / "run" / "tokenizer.json").unlink()
    assert "no tokenizer.json" in _error_line(capsys, ["eval", str(tmp_path / "run"), "--corpus", str(corpus)])


# ------------------------------------------------------------------------------ the shipped demo model


def test_demo_model_decodes_and_tidar_equals_ar():
    from tidar_export.bench.demo import demo_model_path
    from tidar_export.model.reference import TorchBackend
    from tidar_runtime import generate_ar, generate_tidar

    path = demo_model_path()
    if not (path / "model.safetensors").is_file():
        pytest.skip("the demo model is not shipped in this checkout")
    model = load_checkpoint(path)
    tok = data.load_tokenizer(path)
    prompt = tok.encode("import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n").ids
    ar = generate_ar(TorchBackend(model, 256, block_size=8), prompt, 48)
    tidar = generate_tidar(TorchBackend(model, 256, block_size=8), prompt, 48)
    assert tidar.tokens == ar.tokens and len(ar.tokens) == 48
    assert tidar.stats.tokens_per_forward > 1.0  # a trained model accepts drafts
