"""The draft adapter (tidar_export.model.adapter): it acts on mask rows only, so the AR rows, the
AR step graph and every greedy decode stay the base model's, in torch and in the exported graphs."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from tests.conftest import random_model, with_random_adapter
from tidar_export.cli import main
from tidar_export.errors import TiDARError
from tidar_export.export.artifact import export_artifact
from tidar_export.quantize import quantized_nodes
from tidar_export.export.check import check_artifact
from tidar_export.model import masks
from tidar_export.model.adapter import PROJECTIONS, AdapterConfig, attach, parse_layers, parse_projections, read_adapter
from tidar_export.model.checkpoint import load_checkpoint, save_checkpoint
from tidar_export.model.reference import TorchBackend
from tidar_runtime import generate_ar_batch, generate_tidar_batch
from tidar_runtime.backends.ort import OrtBackend
from tidar_runtime.manifest import load_manifest

MAX_SEQ_LEN = 96
PROMPTS = [[5, 17, 42, 9, 100, 7], list(range(30, 45))]


def step_inputs(model, b=4):
    L, B = 7, 2
    keys, values = model.new_cache(B, 32)
    for t in keys + values:
        t.normal_()
    q = 2 * b
    ids = torch.randint(0, model.cfg.vocab_size, (B, q))
    pos = torch.full((B,), L)[:, None] + masks.step_offsets(b, [1])
    return ids, pos, masks.step_mask(b, [1]), keys, values, torch.full((B,), L)


def test_ar_rows_bitwise_unchanged_mask_rows_changed():
    base, adapted = random_model(seed=4), with_random_adapter(random_model(seed=4), layers=())
    ids, pos, mask, k, v, L = step_inputs(base)
    want, _, _ = base(ids, pos, mask, k, v, L, kv_update="slice", draft_rows=4)
    got, _, _ = adapted(ids, pos, mask, k, v, L, kv_update="slice", draft_rows=4)
    assert torch.equal(got[:, :4], want[:, :4])  # the drafts (AR rows): the very same values
    assert not torch.allclose(got[:, 4:], want[:, 4:], atol=1e-3)  # the proposal block: adapted
    none, _, _ = adapted(ids, pos, mask, k, v, L, kv_update="slice")  # draft_rows 0: no adapter anywhere
    assert torch.equal(none, want)


def test_tidar_greedy_equals_base_greedy_with_an_adapter():
    base = random_model(seed=5)
    adapted = with_random_adapter(random_model(seed=5), layers=(0, 1))
    ar = generate_ar_batch(TorchBackend(base, MAX_SEQ_LEN, 1, max_batch=2), PROMPTS, 30)
    for b, rs in ((4, None), (3, [1, 2])):
        got = generate_tidar_batch(TorchBackend(adapted, MAX_SEQ_LEN, b, rs, max_batch=2), PROMPTS, 30)
        plain = generate_tidar_batch(TorchBackend(base, MAX_SEQ_LEN, b, rs, max_batch=2), PROMPTS, 30)
        for g, p, a in zip(got, plain, ar):
            assert g.tokens == p.tokens == a.tokens and len(g.tokens) == 30
    assert any(g.stats.accepted != p.stats.accepted for g, p in zip(got, plain))  # the drafts did change


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(base checkpoint, the same with a random adapter beside its config.json). Three layers, the
    adapter on the last two: more layers than the exporter's two-layer template, whose repetition
    must not drop the adapter."""
    from tokenizers import Tokenizer, models

    out = []
    for name, model in (("base", random_model(seed=3, num_layers=3)),
                        ("adapted", with_random_adapter(random_model(seed=3, num_layers=3), layers=(1, 2)))):
        folder = save_checkpoint(model, tmp_path_factory.mktemp(name) / "ckpt")
        Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
        out.append(folder)
    return out


def test_adapter_files_round_trip(checkpoints):
    base, adapted = checkpoints
    assert not (base / "adapter.json").exists()
    acfg, tensors = read_adapter(adapted)
    assert acfg.layers == (1, 2) and acfg.rank == 2
    model = load_checkpoint(adapted)
    assert model.adapter is not None and torch.equal(model.adapter.tensors()["layers.1.q_proj.lora_B"],
                                                     tensors["layers.1.q_proj.lora_B"])
    state = load_checkpoint(base).state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if not k.startswith("adapter."))


@pytest.mark.parametrize("target", ["ort", "trt-10.3", "trt-10.15"])  # "slice" and "inplace" cache writes; dense and sparse
def test_exported_adapter_matches_torch_and_keeps_ar_step(checkpoints, tmp_path, target):
    base, adapted = checkpoints
    opts = {"proposals": [1, 3]} if target != "ort" else {}
    art = export_artifact(adapted, tmp_path / "a", target=target, max_seq_len=MAX_SEQ_LEN, max_batch=2, **opts)
    manifest = load_manifest(art)
    assert manifest.adapter["rank"] == 2 and manifest.adapter["params"] > 0
    check_artifact(art, adapted).raise_for_failures()  # every output of every graph == the torch reference
    with pytest.raises(TiDARError, match="draft adapter"):
        check_artifact(art, base)  # the base checkpoint is not this artifact's model
    if target != "ort":
        return
    plain = export_artifact(base, tmp_path / "b", target=target, max_seq_len=MAX_SEQ_LEN, max_batch=2)
    a_step, p_step = (onnx.load(str(d / "ar_step.onnx"), load_external_data=False) for d in (art, plain))
    assert [n.op_type for n in a_step.graph.node] == [n.op_type for n in p_step.graph.node]
    step = onnx.load(str(art / "step.onnx"), load_external_data=False)
    assert len(step.graph.node) > len(onnx.load(str(plain / "step.onnx"), load_external_data=False).graph.node)
    # the adapter's MatMuls carry its module path (quantize keeps them float by that name); the
    # direct builder packs the q/k/v updates into one, as the base projection is packed
    assert {n.name.split("/")[3] for n in step.graph.node if n.name.startswith("/adapter/layers.1/")
            and n.op_type == "MatMul"} >= {"qkv_proj", "down_proj"}
    picked = quantized_nodes(step)
    assert picked and not any("/adapter/" in n for n in picked)  # the base is quantized, the adapter kept float
    # decoding through ORT: TiDAR with the adapter == AR == the adapter-free artifact's TiDAR
    got = generate_tidar_batch(OrtBackend(art), PROMPTS, 30)
    ar = generate_ar_batch(OrtBackend(art), PROMPTS, 30)
    ref = generate_tidar_batch(OrtBackend(plain), PROMPTS, 30)
    for g, a, r in zip(got, ar, ref):
        assert g.tokens == a.tokens == r.tokens
    # the AR step graph's logits equal the adapter-free graph's
    ort_a, ort_p = OrtBackend(art), OrtBackend(plain)
    ort_a.ar_prefill(0, np.array(PROMPTS[1]), False)
    ort_p.ar_prefill(0, np.array(PROMPTS[1]), False)
    la = ort_a.ar_step(np.array([[3], [3]]), np.array([15, 15]), True).logits
    lp = ort_p.ar_step(np.array([[3], [3]]), np.array([15, 15]), True).logits
    assert np.array_equal(la, lp)


def test_train_adapter_freezes_the_base_and_resumes(tmp_path, capsys):
    import tidar_export

    demo = str(Path(tidar_export.__file__).parent / "demo_model")  # the embedded model: it has a tokenizer
    out = tmp_path / "run"
    argv = ["train", "-o", str(out), "--init-from", demo, "--adapter", "--adapter-rank", "2",
            "--adapter-layers", "top1", "--seq-len", "32", "--block-size", "4", "--batch-size", "2",
            "--steps", "4", "--save-every", "2", "--stop-at", "2", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert main(["train", "-o", str(out), "--resume", "--no-progress", "--threads", "1"]) == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 4
    acfg, tensors = read_adapter(out)
    n = load_checkpoint(demo).cfg.num_layers
    assert acfg.layers == (n - 1,) and acfg.rank == 2
    assert tensors[f"layers.{n - 1}.down_proj.lora_B"].abs().sum() > 0  # trained
    trained, demo_model = load_checkpoint(out), load_checkpoint(demo)
    demo_state = demo_model.state_dict()
    assert all(torch.equal(demo_state[k], v) for k, v in trained.state_dict().items() if not k.startswith("adapter."))


def test_demo_unknown_model_is_a_one_line_error(capsys):
    assert main(["demo", "--model", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown --model 'nope'") and "\n" not in err


@pytest.mark.parametrize("projections", [(), ("q_proj", "o_proj", "up_proj")], ids=["offset-only", "subset"])
def test_projection_subsets_act_on_mask_rows_and_export(tmp_path, projections):
    from tokenizers import Tokenizer, models

    base = random_model(seed=6)
    adapted = with_random_adapter(random_model(seed=6), layers=(), projections=projections)
    assert sorted(n for n, _ in adapted.adapter.layers["1"].named_children()) == sorted(projections)
    ids, pos, mask, k, v, L = step_inputs(base)
    want, _, _ = base(ids, pos, mask, k, v, L, kv_update="slice", draft_rows=4)
    got, _, _ = adapted(ids, pos, mask, k, v, L, kv_update="slice", draft_rows=4)
    assert torch.equal(got[:, :4], want[:, :4]) and not torch.allclose(got[:, 4:], want[:, 4:], atol=1e-3)
    folder = save_checkpoint(adapted, tmp_path / "ckpt")
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    assert read_adapter(folder)[0].projections == tuple(projections)
    art = export_artifact(folder, tmp_path / "art", target="ort", max_seq_len=MAX_SEQ_LEN, max_batch=2)
    check_artifact(art, folder).raise_for_failures()  # the graphs' outputs == torch's, adapter included


def test_adapter_config_errors():
    assert parse_projections("all") == PROJECTIONS and parse_projections("none") == ()
    assert parse_projections("up,q,v_proj") == ("q_proj", "v_proj", "up_proj")  # in the model's order
    with pytest.raises(TiDARError, match="adapter-projections"):
        parse_projections("q,attn")
    with pytest.raises(TiDARError, match="embedding offset alone"):
        AdapterConfig(projections=(), embed_offset=False)
    from tidar_export.train.trainer import TrainSettings

    with pytest.raises(TiDARError, match="embedding offset alone"):  # the settings check it before any file is read
        TrainSettings(init_from="ckpt", adapter_rank=4, adapter_projections="none", adapter_embed=False)
    with pytest.raises(TiDARError, match="adapter-projections"):
        TrainSettings(init_from="ckpt", adapter_rank=4, adapter_projections="attn")
    assert parse_layers("top2", 5) == (3, 4) and parse_layers("0-2,4") == (0, 1, 2, 4) and parse_layers("all") == ()
    with pytest.raises(TiDARError, match="adapter-layers"):
        parse_layers("x")
    with pytest.raises(TiDARError, match="rank"):
        AdapterConfig(rank=0)
    with pytest.raises(TiDARError, match="does not exist"):
        attach(random_model(), AdapterConfig(layers=(9,)))
