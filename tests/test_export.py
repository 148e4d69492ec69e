"""Export to ONNX (prefill, step, ar_step) and the artifact checker (docs/EXPORT.md).

One artifact per target is exported once per module (tracing is the slow part) and shared:
- ort:        dense proposals, kv_update "slice"
- trt-10.3:   sparse proposals {1, 3}, kv_update "slice"
- trt-10.15:  dense proposals, kv_update "inplace" (the cache write is in the graph)
all with max_batch 2 (per-row cache lengths) on the tiny random model.
"""

import json
import shutil

import onnx
import pytest

from tests.conftest import random_model
from tidar_export.export.check import ArtifactCheckError, check_artifact, format_table
from tidar_export.model.checkpoint import load_checkpoint, save_checkpoint
from tidar_export.cli import main
from tidar_export.errors import TiDARError
from tidar_export.export.artifact import WEIGHTS_FILE, export_artifact
from tidar_export.model.reference import TorchBackend
from tidar_runtime import SamplingParams, generate_ar_batch, generate_tidar_batch
from tidar_runtime.backends.ort import OrtBackend
from tidar_runtime.manifest import load_manifest

TARGETS = ["ort", "trt-10.3", "trt-10.15"]
OPTIONS = {"ort": {}, "trt-10.3": {"proposals": [1, 3]}, "trt-10.15": {}}
MAX_SEQ_LEN, MAX_BATCH = 96, 2
PROMPTS = [[5, 17, 42, 9, 100, 7], list(range(30, 45))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models

    folder = save_checkpoint(random_model(seed=3), tmp_path_factory.mktemp("ckpt") / "tiny")
    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def artifacts(checkpoint, tmp_path_factory):
    """target -> artifact directory, exported on first use."""
    made = {}

    def get(target):
        if target not in made:
            out = tmp_path_factory.mktemp(f"artifact-{target}") / "art"
            made[target] = export_artifact(checkpoint, out, target=target, max_seq_len=MAX_SEQ_LEN,
                                           max_batch=MAX_BATCH, **OPTIONS[target])
        return made[target]

    return get


@pytest.mark.parametrize("target", TARGETS)
def test_artifact_passes_checker(artifacts, checkpoint, target):
    """Target checks (tidar_graphs) and ORT against torch per output: prompt lengths 1..P_max,
    batch 1 and 2, per-row cache lengths from 0 to max_seq_len - q_len."""
    report = check_artifact(artifacts(target), checkpoint)
    assert report.failures == [], format_table(report.results)
    graphs = {r.graph for r in report.results}
    assert graphs == {"prefill", "step", "ar_step"}
    cases = {(r.graph, r.case) for r in report.results}
    assert any("batch=1 prompt_len=1" in c for g, c in cases if g == "prefill")
    assert any("batch=2" in c for g, c in cases if g == "prefill")
    assert len({c for g, c in cases if g == "step"}) >= 4  # zeros, max, random, spread per row
    outputs = {r.output for r in report.results if r.graph == "step"}
    assert {"token_ids", "logits", "present.0.key", "present.1.value"} <= outputs


@pytest.mark.parametrize("target", TARGETS)
def test_manifest_and_bindings(artifacts, checkpoint, target):
    art = artifacts(target)
    m = load_manifest(art)
    cfg = load_checkpoint(checkpoint).cfg
    b, rs = m.block_size, m.proposals
    assert m.target == target and m.max_batch == MAX_BATCH and m.max_seq_len == MAX_SEQ_LEN
    kv_update = "inplace" if target == "trt-10.15" else "slice"
    assert m.graphs["step"].kv_update == kv_update and m.graphs["prefill"].kv_update is None
    assert m.graphs["ar_step"].kv_update == ("inplace" if target != "trt-10.3" and m.export["ar_step"] == "gqa"
                                             else kv_update)
    assert rs == OPTIONS[target].get("proposals", list(range(1, b + 1)))
    assert m.dims["q_len"] == b * (1 + len(rs)) and m.dims["n_out"] == b + len(rs) * (b - 1)
    assert m.dims["prompt_len"] is None and m.dims["batch"] == MAX_BATCH
    n = cfg.num_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    step = m.graphs["step"]
    assert [t.name for t in step.inputs] == ["draft_ids", "cache_len", *past]  # no mask input: it is a constant
    assert [t.name for t in step.outputs] == ["token_ids", "logits", *present]
    assert [t.name for t in m.graphs["ar_step"].inputs] == ["input_ids", "cache_len", *past]
    assert [t.name for t in m.graphs["prefill"].inputs] == ["input_ids"]
    assert step.input("past_key_values.0.key").shape == ["batch", "kv_heads", "max_seq_len", "head_dim"]
    new_len = "max_seq_len" if kv_update == "inplace" else "q_len"
    assert step.output("present.0.key").shape == ["batch", "kv_heads", new_len, "head_dim"]
    assert step.output("token_ids").shape == ["batch", "n_out"]
    assert len(step.rows) == m.dims["n_out"] and step.rows[:b] == [{"ar": i} for i in range(b)]
    assert step.rows[b:] == [{"block": r, "slot": t} for r in rs for t in range(1, b)]
    text = (art / "manifest.json").read_text()  # each fact once: no size or option recorded twice
    assert text.count('"block_size":') == 1 and text.count('"mask_token_id":') == 1 and '"max_batch"' not in text
    assert m.tokenizer["file"] == "tokenizer.json" and (art / "tokenizer.json").is_file()
    assert m.versions["export_opset"] == 18 and m.versions["opsets"]["ai.onnx"] >= 18
    assert sorted(p.name for p in art.iterdir()) == sorted(
        ["manifest.json", "prefill.onnx", "step.onnx", "ar_step.onnx", WEIGHTS_FILE, "tokenizer.json"])


def test_one_weight_file_written_once(artifacts, checkpoint):
    """All graphs point into weights.bin, a weight shared by the graphs sits at one offset, and
    the file holds about one copy of the parameters."""
    art = artifacts("ort")
    refs = {}
    for kind in ("prefill", "step", "ar_step"):
        proto = onnx.load(str(art / f"{kind}.onnx"), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external, kind
        for t in external:
            info = {e.key: e.value for e in t.external_data}
            assert info["location"] == WEIGHTS_FILE
            refs.setdefault(t.name, set()).add((info["offset"], info["length"]))
    assert all(len(places) == 1 for places in refs.values()), refs
    assert "model.embed_tokens.weight" in refs and "model.layers.0.mlp.up_proj.weight.T" in refs
    # the ort graphs read one fused q/k/v weight per layer (graphs.fusions.fuse_projections); its
    # parts are not stored beside it
    assert "model.layers.0.self_attn.qkv_proj.weight.T" in refs
    assert not [n for n in refs if any(f".self_attn.{p}_proj." in n for p in "qkv")], sorted(refs)
    param_bytes = load_checkpoint(checkpoint).cfg.num_params() * 4
    assert param_bytes * 0.9 < (art / WEIGHTS_FILE).stat().st_size < param_bytes * 1.2


@pytest.mark.parametrize("target", TARGETS)
def test_fusions_in_exported_graphs(artifacts, checkpoint, target):
    """The graphs `export` writes (not wrappers traced in test_graphs) carry their target's
    lowering: fused Attention / RotaryEmbedding / RMSNormalization for ort and trt-10.15 (and the
    in-place TensorScatter cache write in trt-10.15's cached graphs), everything decomposed for
    trt-10.3 (JetPack 6's parser has none of those ops). The ort target's AR step is one
    GroupQueryAttention per layer instead, with the rotation and the cache write inside it, and
    the ort graphs compute q/k/v with one MatMul per layer."""
    from collections import Counter

    layers = load_checkpoint(checkpoint).cfg.num_layers
    art = artifacts(target)
    fused = target != "trt-10.3"
    for kind in ("prefill", "step", "ar_step"):
        proto = onnx.load(str(art / f"{kind}.onnx"), load_external_data=False)
        ops = Counter(n.op_type for n in proto.graph.node)
        weights = {t.name for t in proto.graph.initializer}
        linear = sum(n.op_type == "MatMul" and n.input[1] in weights for n in proto.graph.node)
        # q/k/v: one MatMul per layer for ort (and its Split, except where the AR step's
        # GroupQueryAttention reads the packed output), three elsewhere; + o, gate, up, down, LM head
        assert linear == (5 if target == "ort" else 7) * layers + 1, (target, kind, ops)
        if target == "ort" and kind == "ar_step":
            assert ops["GroupQueryAttention"] == layers, ops
            assert ops["Attention"] == ops["RotaryEmbedding"] == ops["TensorScatter"] == ops["Concat"] == 0, ops
            assert ops["RMSNormalization"] == 2 * layers + 1, ops
            assert ops["Split"] == 0, ops
            continue
        assert ops["Split"] == (layers if target == "ort" else 0), (target, kind, ops)
        assert ops["Attention"] == (layers if fused else 0), (target, kind, ops)
        assert ops["Softmax"] == (0 if fused else layers), (target, kind, ops)
        assert ops["RotaryEmbedding"] == (2 * layers if fused else 0), (target, kind, ops)  # q and k
        assert ops["RMSNormalization"] == (2 * layers + 1 if fused else 0), (target, kind, ops)  # + final norm
        inplace = target == "trt-10.15" and kind != "prefill"
        assert ops["TensorScatter"] == (2 * layers if inplace else 0), (target, kind, ops)  # K and V


def test_check_command_ok(artifacts, capsys):
    assert main(["check", str(artifacts("ort"))]) == 0
    out = capsys.readouterr().out
    assert "numeric comparison skipped" in out and out.rstrip().endswith("target checks passed")


def test_no_machine_paths_in_artifact(artifacts, checkpoint):
    art = artifacts("ort")
    for f in art.iterdir():
        if f.name == WEIGHTS_FILE:
            continue
        data = f.read_bytes()
        for path in (str(checkpoint), str(art.parent), "stack_trace", 'File "'):
            assert path.encode() not in data, (f.name, path)


@pytest.mark.parametrize("target", TARGETS)
def test_ort_greedy_decode_equals_torch(artifacts, checkpoint, target):
    """A whole batched decode through ORT sessions (token ids only) equals the torch reference
    token for token, TiDAR and AR, with per-row lengths."""
    art = artifacts(target)
    model = load_checkpoint(checkpoint)
    ort_backend = OrtBackend(art)
    torch_backend = TorchBackend(model, MAX_SEQ_LEN, ort_backend.block_size, ort_backend.proposals, MAX_BATCH)
    got = generate_tidar_batch(ort_backend, PROMPTS, 30)
    want = generate_tidar_batch(torch_backend, PROMPTS, 30)
    ar = generate_ar_batch(OrtBackend(art), PROMPTS, 30)
    for g, w, a in zip(got, want, ar):
        assert g.tokens == w.tokens == a.tokens and len(g.tokens) == 30
        assert g.stats.accepted == w.stats.accepted


def test_ort_sampling_decode_equals_torch(artifacts, checkpoint):
    """The sampling path fetches the logits rows; with the same seed ORT and torch sample alike."""
    art = artifacts("ort")
    params = SamplingParams(temperature=0.8, top_k=20, seed=7)
    model = load_checkpoint(checkpoint)
    got = generate_tidar_batch(OrtBackend(art), PROMPTS, 20, params)
    want = generate_tidar_batch(TorchBackend(model, MAX_SEQ_LEN, max_batch=MAX_BATCH), PROMPTS, 20, params)
    assert [g.tokens for g in got] == [w.tokens for w in want]


# --------------------------------------------------------------------------- broken artifacts


@pytest.fixture
def copy_of(artifacts, tmp_path):
    def make():
        dst = tmp_path / "copy"
        shutil.copytree(artifacts("ort"), dst)
        return dst

    return make


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_truncated_graph(copy_of, capsys):
    art = copy_of()
    data = (art / "step.onnx").read_bytes()
    (art / "step.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(TiDARError, match="step.onnx has .* bytes.*truncated"):
        load_manifest(art)
    with pytest.raises(TiDARError, match="truncated"):
        OrtBackend(art)
    assert "truncated" in _one_line_error(capsys, ["check", str(art)])


def test_corrupt_graph_same_size(copy_of, capsys):
    art = copy_of()
    data = bytearray((art / "prefill.onnx").read_bytes())
    data[:64] = b"\xff" * 64
    (art / "prefill.onnx").write_bytes(bytes(data))
    with pytest.raises(TiDARError, match="prefill.onnx: not a readable ONNX graph"):
        check_artifact(art)
    assert "corrupt" in _one_line_error(capsys, ["check", str(art)])


def test_missing_or_truncated_weights(copy_of, capsys):
    art = copy_of()
    weights = art / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(TiDARError, match="weights.bin has .* bytes.*truncated"):
        load_manifest(art)
    weights.unlink()
    with pytest.raises(TiDARError, match="weight file weights.bin named by the manifest is missing"):
        OrtBackend(art)
    assert "missing" in _one_line_error(capsys, ["check", str(art)])


def test_manifest_of_another_version(copy_of, capsys):
    """An artifact of an older format version: a one-line error that says to re-export it."""
    art = copy_of()
    d = json.loads((art / "manifest.json").read_text())
    d["version"] = 1
    (art / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(TiDARError, match="manifest version 1 is not supported.*re-export"):
        OrtBackend(art)
    assert "version 1" in _one_line_error(capsys, ["check", str(art)])
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(TiDARError, match="invalid JSON"):
        load_manifest(art)


def test_wrong_weights_fail_numerics_with_every_output_listed(copy_of, tmp_path, capsys):
    """The checker catches numerics: the artifact against another model of the same shape fails
    every float output, and the error lists each one."""
    art = copy_of()
    other = save_checkpoint(random_model(seed=11), tmp_path / "other")
    with pytest.raises(ArtifactCheckError) as info:
        check_artifact(art, other).raise_for_failures()
    failures = info.value.failures
    assert any(f.startswith("step [") and f.split("] ")[1].startswith("logits:") for f in failures)
    assert any("present.1.value" in f for f in failures) and any(f.startswith("ar_step") for f in failures)
    assert len(failures) == str(info.value).count("; ") + 1
    err = _one_line_error(capsys, ["check", str(art), "--checkpoint", str(other)])
    assert f"{len(failures)} check(s) failed" in err


# --------------------------------------------------------------------------- export errors


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if name in p.name)


def test_unsupported_architecture_leaves_nothing(tmp_path, capsys):
    ckpt = tmp_path / "gpt2"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "out" / "art"
    with pytest.raises(TiDARError, match="unsupported architecture 'GPT2LMHeadModel'"):
        export_artifact(ckpt, out)
    assert not out.exists() and (not out.parent.exists() or _leftovers(out.parent, "art") == [])
    assert "unsupported architecture" in _one_line_error(capsys, ["export", str(ckpt), "-o", str(out)])


@pytest.mark.parametrize("options, message", [
    ({"target": "trt-9"}, "unknown target 'trt-9'"),
    ({"precision": "int4"}, "unknown dtype 'int4'"),
    ({"max_seq_len": 10}, "max_seq_len 10 is too small"),
    ({"max_seq_len": 4096}, "exceeds the checkpoint's max_position_embeddings"),
    ({"proposals": [2, 3]}, "must contain block 1"),
    ({"max_batch": 0}, "max_batch must be >= 1"),
])
def test_invalid_options(checkpoint, tmp_path, options, message):
    out = tmp_path / "art"
    with pytest.raises(TiDARError, match=message):
        export_artifact(checkpoint, out, **options)
    assert _leftovers(tmp_path, "art") == []


def test_refuses_to_replace_a_non_artifact_directory(checkpoint, tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(TiDARError, match="not an artifact directory"):
        export_artifact(checkpoint, out)
    assert (out / "precious.txt").read_text() == "keep me"


def test_failure_mid_export_keeps_the_old_artifact_and_no_temp(artifacts, checkpoint, tmp_path, monkeypatch):
    import tidar_graphs

    out = tmp_path / "art"
    shutil.copytree(artifacts("ort"), out)
    before = sorted(p.name for p in out.iterdir())

    def failing_lower(model, target, *form):
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(tidar_graphs, "lower", failing_lower)
    with pytest.raises(RuntimeError, match="lowering failed"):
        export_artifact(checkpoint, out, max_seq_len=MAX_SEQ_LEN, builder="trace")
    assert sorted(p.name for p in out.iterdir()) == before
    assert _leftovers(tmp_path, "art") == ["art"]  # no ".art.*" temp directory left
    assert (out / WEIGHTS_FILE).read_bytes() == (artifacts("ort") / WEIGHTS_FILE).read_bytes()


def test_replace_dir_replaces_an_artifact_without_leftovers(tmp_path):
    from tidar_runtime.fileio import replace_dir

    new, out = tmp_path / ".art.tmp", tmp_path / "art"
    new.mkdir()
    (new / "manifest.json").write_text("new")
    out.mkdir()
    (out / "manifest.json").write_text("old")
    replace_dir(new, out)
    assert (out / "manifest.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_ar_step_kind_in_the_plan():
    """The ort AR step is GroupQueryAttention ("inplace") for head sizes that are multiples of 16,
    unless --ar-step attention asks for the step's Attention op (what int8/fp8 artifacts need);
    the step is "slice" either way, and an unknown kind is a one-line error."""
    from tidar_export.export.plan import make_plan

    cfg = random_model(head_dim=16).cfg
    assert make_plan(cfg).kv_update_of("ar_step") == "inplace"
    plan = make_plan(cfg, ar_step="attention")
    assert plan.kv_update_of("ar_step") == plan.kv_update_of("step") == "slice"
    assert make_plan(random_model(head_dim=8).cfg).kv_update_of("ar_step") == "slice"
    assert make_plan(cfg, target="trt-10.3").kv_update_of("ar_step") == "slice"
    with pytest.raises(TiDARError, match="unknown --ar-step 'fast'"):
        make_plan(cfg, ar_step="fast")


def test_manifest_schema_is_the_contracts_and_checks_manifests(artifacts):
    """runtime/manifest.schema.json is what tidar_runtime.schema makes from the contract's tables;
    an exported manifest follows it, and a manifest with a fact of the wrong kind does not."""
    from importlib.resources import files

    from jsonschema import Draft202012Validator

    from tidar_runtime.schema import SCHEMA_FILE, schema_text

    shipped = files("tidar_runtime").joinpath(SCHEMA_FILE).read_text()
    assert shipped == schema_text(), "regenerate it: python -m tidar_runtime.schema > runtime/manifest.schema.json"
    validator = Draft202012Validator(json.loads(shipped))
    d = json.loads((artifacts("ort") / "manifest.json").read_text())
    assert list(validator.iter_errors(d)) == []
    d["graphs"]["step"]["kv_update"] = "copy"
    d["dims"]["block_size"] = "4"
    d["export"]["precision"] = "int3"
    assert len(list(validator.iter_errors(d))) == 3
