"""The training recipe (docs/ALGORITHM.md section 2), resume, the eval command, and the shipped demo model.

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
from tidar_export.errors import TiDARError
from tidar_export.train.evaluate import agreement
from tidar_export.train.trainer import (TrainSettings, ar_batch, losses, make_rollout_pool, rollout_batch, self_targets,
                                 soft_targets, tidar_batch, train)

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


# -------------------------------------------------------------- layout (docs/ALGORITHM.md section 2)


@pytest.mark.parametrize("S,b", [(8, 2), (8, 4), (12, 3)])
def test_tidar_batch_matches_the_algorithm(S, b):
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


# ------------------------------------------------------------------------------ draft targets


def _ce(logits, labels):
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(
        labels.shape)


def _tidar_forward(model, rows: int, seed: int, S: int, b: int = 4, **loss_kw):
    """Random windows x [rows, S+1], `losses` on them in TiDAR mode, and the labels and logits
    of the same forward recomputed here: (x, (total, ce_ar, ce_diff), labels, logits)."""
    torch.manual_seed(seed)
    x = torch.randint(2, model.cfg.vocab_size, (rows, S + 1))
    out = losses(model, x, "tidar", b, **loss_kw)
    ids, pos, mask, labels = tidar_batch(x, b, model.cfg.mask_token_id)
    logits, _, _ = model(ids, pos, mask)
    return x, out, labels, logits


def test_self_target_is_the_ar_argmax_of_the_previous_position(tiny_model):
    S = 8
    x, (total, ce_ar, ce_diff), labels, logits = _tidar_forward(tiny_model, 3, 1, S, draft_target="self")
    want = self_targets(logits[:, :S], x)
    for row in range(3):  # slot j learns argmax(AR logits at j-1); slot 0 keeps x_0
        assert want[row, 0] == x[row, 0]
        for j in range(1, S):
            assert want[row, j] == logits[row, j - 1].argmax()
    assert not torch.equal(want, labels[:, S:])  # a random model's argmax is not the data
    torch.testing.assert_close(ce_diff, _ce(logits[:, S:], want).mean())
    torch.testing.assert_close(ce_ar, _ce(logits[:, :S], labels[:, :S]).mean())  # the AR term is unchanged
    torch.testing.assert_close(total, (ce_ar + ce_diff) / 2)
    assert not want.requires_grad  # a label (detached): no gradient flows through the AR rows' argmax


def test_soft_target_is_the_ar_distribution_of_the_previous_position(tiny_model):
    S = 8
    x, (total, ce_ar, ce_diff), _, logits = _tidar_forward(tiny_model, 2, 2, S, draft_target="soft")
    want = soft_targets(logits[:, :S], x)
    assert want.shape == (2, S, tiny_model.cfg.vocab_size) and not want.requires_grad
    torch.testing.assert_close(want[:, 1:], logits[:, : S - 1].softmax(-1))  # slot j: the AR row j-1's softmax
    assert torch.equal(want[:, 0].argmax(-1), x[:, 0]) and torch.equal(want[:, 0].sum(-1), torch.ones(2))
    assert torch.equal(want.argmax(-1)[:, 1:], self_targets(logits[:, :S], x)[:, 1:])  # its argmax: the self label
    # the loss: cross-entropy against those probabilities, i.e. KL(p_AR || q_slot) plus the AR rows' entropy
    q = logits[:, S:].log_softmax(-1)
    torch.testing.assert_close(ce_diff, -(want * q).sum(-1).mean())
    torch.testing.assert_close(total, (ce_ar + ce_diff) / 2)


def test_ar_term_skips_generated_labels(tiny_model):
    S = 8
    real_len = torch.tensor([3, S + 1])  # row 0: x_0..x_2 real, x_3.. generated; row 1 all real
    x, (_, ce_ar, ce_diff), labels, logits = _tidar_forward(tiny_model, 2, 2, S, draft_target="rollout",
                                                            real_len=real_len)
    ce = _ce(logits[:, :S], labels[:, :S])  # AR label i is x_{i+1}: real iff i + 1 < real_len
    kept = torch.cat([ce[0, :2], ce[1]])
    torch.testing.assert_close(ce_ar, kept.mean())
    torch.testing.assert_close(ce_diff, _ce(logits[:, S:], self_targets(logits[:, :S], x)).mean())


def test_rollout_pool_rows_are_the_models_greedy_continuations(tiny_model):
    S = 16
    s = TrainSettings(draft_target="rollout", seq_len=S, block_size=4, batch_size=4, rollout_pool=5,
                      rollout_prefix_min=2, rollout_prefix_max=9, rollout_frac=0.5)
    stream = torch.randint(2, tiny_model.cfg.vocab_size, (200,))
    windows, real_len = make_rollout_pool(tiny_model, stream, 7, s)
    assert windows.shape == (5, S + 1) and real_len.shape == (5,)
    assert all(2 <= int(P) <= 9 for P in real_len)
    again = make_rollout_pool(tiny_model, stream, 7, s)  # a pure function of (weights, seed, step)
    assert torch.equal(again[0], windows) and torch.equal(again[1], real_len)
    with torch.no_grad():
        logits, _, _ = tiny_model(windows[:, :S], torch.arange(S)[None].expand(5, -1), torch.ones(S, S).tril().bool())
    for row, P in zip(range(5), real_len.tolist()):
        text = "," + "".join(f"{int(t)}," for t in stream.tolist())  # the prefix is a window of the stream
        assert "," + "".join(f"{int(t)}," for t in windows[row, :P].tolist()) in text
        for i in range(P - 1, S):  # every token after the prefix is the AR argmax of what precedes it
            assert windows[row, i + 1] == logits[row, i].argmax(), (row, i)
    x = torch.randint(2, 50, (4, S + 1))
    mixed, lens = rollout_batch(x, (windows, real_len), 3, s)
    assert s.rollout_rows() == 2 and torch.equal(mixed[2:], x[2:]) and lens[2:].tolist() == [S + 1, S + 1]
    for row in range(2):  # the first rollout_rows() rows come from the pool, with their prefix lengths
        n = next(n for n in range(5) if torch.equal(windows[n], mixed[row]))
        assert lens[row] == real_len[n]


def test_rollout_training_resumes_bit_for_bit(corpus, tmp_path):
    # the pool is regenerated at steps 0 and 4; resuming at 3 needs the saved pool of step 0
    s = _settings(corpus, steps=6, draft_target="rollout", rollout_every=4, rollout_pool=3,
                  rollout_prefix_min=2, rollout_prefix_max=8)
    straight = train(s, tmp_path / "a", log_every=1, progress=False, log=_quiet)
    train(s, tmp_path / "b", stop_at=3, log_every=1, progress=False, log=_quiet)
    assert "rollout.windows" in load_file(str(tmp_path / "b" / "train_state.safetensors"))
    resumed = train(s, tmp_path / "b", resume=True, log_every=1, progress=False, log=_quiet)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("tok_s", "elapsed_s", "cpu_s")} for r in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(straight["history"])
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["history"][-1]["ce_diff"] < straight["history"][0]["ce_diff"]


def test_draft_target_settings_are_checked():
    with pytest.raises(TiDARError, match="unknown --draft-target"):
        TrainSettings(draft_target="teacher")
    with pytest.raises(TiDARError, match="needs --mode tidar"):
        TrainSettings(mode="ar", draft_target="self")
    with pytest.raises(TiDARError, match="rollout prefix"):
        TrainSettings(draft_target="rollout", seq_len=16, block_size=4, rollout_prefix_max=16)
    assert TrainSettings(draft_target="rollout", batch_size=8, rollout_frac=0.25).rollout_rows() == 2
    assert TrainSettings(draft_target="self").rollout_rows() == 0


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
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("tok_s", "elapsed_s", "cpu_s")} for r in h]  # noqa: E731
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
        assert len(r["acceptance_by_slot"]) == int(b) - 1 and r["acceptance_by_slot"][0] is not None


def test_eval_reference_agreement(corpus, tmp_path, capsys):
    a = train(_settings(corpus, steps=6), tmp_path / "a", progress=False, log=_quiet)
    train(_settings(corpus, steps=6, seed=1), tmp_path / "b", progress=False, log=_quiet)
    common = ["--corpus", str(corpus), "--block-sizes", "2", "--num-prompts", "2", "--prompt-len", "8",
              "--max-new-tokens", "10", "--seq-len", "16", "--max-eval-tokens", "32"]
    assert main(["eval", str(tmp_path / "a"), "--reference", str(tmp_path / "a"), *common]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["reference"] == "a" and a["step"] == 6
    assert same["decode"]["reference"] == {"prompts_equal": 2, "prompts": 2, "token_agreement": 1.0}
    assert main(["eval", str(tmp_path / "a"), "--reference", str(tmp_path / "b"), *common]) == 0
    other = json.loads(capsys.readouterr().out)["decode"]["reference"]
    assert other["prompts"] == 2 and other["token_agreement"] < 1.0  # another seed: other greedy text


def test_agreement_counts_the_prefix_before_the_first_divergence():
    got = agreement([[1, 2, 3, 4], [5, 6], [7]], [[1, 2, 9, 4], [5, 6], [8, 9]])
    assert got == {"prompts_equal": 1, "prompts": 3, "token_agreement": round(4 / 8, 4)}


def test_cpu_budget_stops_saves_and_resumes(corpus, tmp_path):
    s = _settings(corpus, steps=1000)
    first = train(s, tmp_path / "run", log_every=1000, save_every=1000, progress=False, log=_quiet, cpu_budget=0.5)
    assert 0 < first["step"] < 1000 and first["cpu_s"] >= 0.5
    saved = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert saved["step"] == first["step"] and saved["cpu_s"] == first["cpu_s"]
    assert saved["history"][-1]["step"] == first["step"]  # the stop writes its log record
    again = train(s, tmp_path / "run", resume=True, progress=False, log=_quiet, cpu_budget=0.5)
    assert again["step"] == first["step"]  # the budget counts over resumes: nothing left
    more = train(s, tmp_path / "run", resume=True, progress=False, log=_quiet, cpu_budget=1.0)
    assert first["step"] < more["step"] < 1000 and more["cpu_s"] >= 1.0


def test_acceptance_by_slot_from_the_histogram():
    from tidar_export.train.evaluate import acceptance_by_slot

    # 10 steps at b = 4: 4 emitted 1 token, 3 emitted 2, 2 emitted 3, 1 emitted all 4
    assert acceptance_by_slot({1: 4, 2: 3, 3: 2, 4: 1}, 4) == [0.6, 0.5, 0.3333]
    assert acceptance_by_slot({1: 5}, 3) == [0.0, None]


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
    assert "--cpu-budget must be > 0" in _error_line(
        capsys, ["train", "-o", str(tmp_path / "run"), "--resume", "--cpu-budget", "0"])
    assert "missing" in _error_line(
        capsys, ["eval", str(tmp_path / "run"), "--corpus", str(corpus), "--reference", str(tmp_path / "missing")])
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
