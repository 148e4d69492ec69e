"""`tidar-export compare` (docs/QUANTIZATION.md, "compare"): torch / ONNX Runtime / TensorRT per
output with Polygraphy's comparator, and the first diverging module when outputs differ."""

from __future__ import annotations

import importlib.util
import json
import shutil

import onnx
import pytest

from tests.conftest import random_model
from tidar_export.model.checkpoint import save_checkpoint
from tidar_export.cli import main
from tidar_export.engines.compare import compare_artifact, format_report, module_scopes, scope_outputs
from tidar_export.export.artifact import export_artifact

pytest.importorskip("polygraphy", reason="compare uses Polygraphy's comparator (pip install polygraphy)")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    ckpt = save_checkpoint(random_model(seed=11), root / "ckpt")
    return ckpt, export_artifact(ckpt, root / "art", max_seq_len=64)


def test_every_module_has_one_marked_tensor(exported):
    _, art = exported
    proto = onnx.load(str(art / "step.onnx"), load_external_data=False)
    scopes = [s for s, _ in module_scopes(2)]
    found = scope_outputs(proto, scopes)
    assert all(found[s] for s in scopes), found
    assert len(set(found.values())) == len(scopes)  # distinct tensors
    producers = {o: n.name for n in proto.graph.node for o in n.output}
    assert producers[found["/model/layers.1/mlp"]] == "/model/layers.1/mlp/down_proj/MatMul"
    assert producers[found["/model/layers.1/self_attn"]] == "/model/layers.1/self_attn/o_proj/MatMul"
    # the fused q/k/v projection (one MatMul, its bias Add and a Split) stays inside the attention's scope
    assert {"/model/layers.1/self_attn/qkv_proj/MatMul", "/model/layers.1/self_attn/qkv_proj/Split"} <= set(
        producers.values())


def test_torch_and_onnxruntime_agree_per_output_and_per_module(exported):
    ckpt, art = exported
    reports = compare_artifact(art, ckpt, use_trt=False, localize=True)
    assert [r.kind for r in reports] == ["prefill", "step", "ar_step"]
    for rep in reports:
        assert rep.ok, format_report([rep])
        outputs = {r.output for r in rep.results}
        assert {"logits", "token_ids", "present.0.key", "present.1.value"} <= outputs
        (layers,) = rep.layers.values()
        assert [d.module for d in layers] == [s for s, _ in module_scopes(2)]
        assert all(d.ok and d.rel < 1e-5 for d in layers)


from tidar_runtime.manifest import file_digest, load_manifest  # noqa: E402


def test_a_corrupted_layer_is_found(exported, tmp_path):
    """Scale the output of layer 1's MLP in the step graph: logits fail, and the localisation
    names /model/layers.1/mlp (layer 0 and the attention of layer 1 still match)."""
    ckpt, src = exported
    art = tmp_path / "bad"
    shutil.copytree(src, art)
    proto = onnx.load(str(art / "step.onnx"), load_external_data=False)
    node = next(n for n in proto.graph.node if n.name == "/model/layers.1/mlp/down_proj/MatMul")
    out = node.output[0]
    node.output[0] = out + "_raw"
    scale = onnx.helper.make_tensor("bug_scale", onnx.TensorProto.FLOAT, [], [1.5])
    proto.graph.initializer.append(scale)
    idx = list(proto.graph.node).index(node)
    proto.graph.node.insert(idx + 1, onnx.helper.make_node("Mul", [out + "_raw", "bug_scale"], [out],
                                                            name="/model/layers.1/mlp/bug/Mul"))
    onnx.save_model(proto, str(art / "step.onnx"))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["graphs"]["step"]["bytes"] = (art / "step.onnx").stat().st_size
    manifest["graphs"]["step"]["digest"] = file_digest(art / "step.onnx")  # a consistent (wrongly built) artifact
    (art / "manifest.json").write_text(json.dumps(manifest))

    (rep,) = compare_artifact(art, ckpt, graphs=("step",), use_trt=False)
    assert not rep.ok and any(r.output == "logits" and not r.ok for r in rep.results)
    first = rep.first_divergence(("torch", "onnxrt"))
    assert first is not None and first.module == "/model/layers.1/mlp", format_report([rep])
    layers = rep.layers[("torch", "onnxrt")]
    assert all(d.ok for d in layers[: [d.module for d in layers].index("/model/layers.1/mlp")])
    assert "first divergence at /model/layers.1/mlp" in format_report([rep])
    assert not [p for p in art.iterdir() if p.name.startswith(".compare.")]  # marked copies removed

    # the command's error: one short line (the worst few failures per output), every failure in a file
    report = tmp_path / "report.txt"
    err = _one_line(main, ["compare", str(art), "--checkpoint", str(ckpt), "--graphs", "step", "--no-trt",
                           "--report", str(report)])
    failed = [r for r in rep.results if not r.ok]
    assert err.count("step [") <= 3 * len({r.output.rsplit(".", 1)[-1] for r in failed}), err
    assert f"every failure and module error in {report}" in err and len(err) < 4000, len(err)
    detail = report.read_text()
    assert "first divergence at /model/layers.1/mlp" in detail
    assert all(r.failure() in detail for r in rep.results if not r.ok)


def _one_line(main, argv) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 1
    err = buf.getvalue().strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli(exported, capsys, tmp_path):
    ckpt, art = exported
    assert main(["compare", str(art), "--checkpoint", str(ckpt), "--graphs", "ar_step", "--no-trt"]) == 0
    assert "ok: " in capsys.readouterr().out
    for argv, text in ((["compare", str(art), "--no-trt"], "needs two runners"),
                       (["compare", str(art), "--graphs", "decode", "--no-trt"], "unknown graph 'decode'"),
                       (["compare", str(tmp_path / "none"), "--no-trt"], "artifact directory not found")):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and text in err, err


# --------------------------------------------------------------------------- weight-only artifacts


@pytest.fixture(scope="module")
def weight_only(tmp_path_factory):
    """(checkpoint, get(target, precision, **quantize kwargs) -> artifact) on a tiny random model
    with weights of std 1/sqrt(fan_in), half conftest's: at 2/sqrt(fan_in) its sharp attention
    turns 4-bit weight noise into logit errors as large as the logits themselves, far from a
    trained model's (the demo model's int4 errors set the tolerances, engines/compare.py)."""
    import numpy as np
    import torch

    from tidar_export.quantize import quantize_artifact

    root = tmp_path_factory.mktemp("weight-only")
    model = random_model(seed=11)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    ckpt = save_checkpoint(model, root / "ckpt")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, 256, size=int(rng.integers(4, 20))).tolist() for _ in range(6)]
    made = {}

    def get(target: str, precision: str, **kwargs):
        if target not in made:
            made[target] = export_artifact(ckpt, root / target, target=target, max_seq_len=64)
        key = (target, precision, tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = quantize_artifact(made[target], root / f"{target}-{precision}-{len(made)}", precision,
                                          prompts=prompts, samples=16, max_new_tokens=16, **kwargs)
        return made[key]

    return ckpt, get


@pytest.mark.parametrize("target, precision, kwargs", [
    ("ort", "int8-wo", {"method": "awq"}),  # MatMulNBits, GatherBlockQuantized, a V cache holding V / s
    ("trt-10.15", "int4", {"method": "rtn", "block_size": 64}),  # block-quantized INT4 DequantizeLinear
])
def test_weight_only_artifact_compares_ok(weight_only, target, precision, kwargs):
    ckpt, get = weight_only
    reports = compare_artifact(get(target, precision, **kwargs), ckpt, use_trt=False, localize=True)
    for rep in reports:
        assert rep.ok, format_report([rep])
        assert {"logits", "token_ids", "present.0.value"} <= {r.output for r in rep.results}
        (layers,) = rep.layers.values()
        assert len(layers) == len(module_scopes(2))  # every module found through the weight-only ops
        if precision == "int8-wo":
            assert all(d.ok for d in layers), format_report([rep], verbose=True)


def test_awq_value_cache_is_compared_in_the_reference_units(weight_only, monkeypatch):
    """AWQ folds o_proj's scale into v_proj, so the artifact's V cache holds V / s: compare feeds
    it past V / s and reads present V * s. Without that its present.*.value fail (and, in the
    step graphs, what a misread cache feeds on)."""
    from tidar_export.engines import compare

    ckpt, get = weight_only
    art = get("ort", "int8-wo", method="awq")
    assert compare.value_cache_scales(art, load_manifest(art))
    logs = []
    assert all(rep.ok for rep in compare_artifact(art, ckpt, use_trt=False, log=logs.append))
    assert any("V cache holds V / s" in line for line in logs)
    monkeypatch.setattr(compare, "value_cache_scales", lambda *_: {})
    reports = compare_artifact(art, ckpt, use_trt=False)
    failed = {r.output for rep in reports for r in rep.results if not r.ok}
    assert {"present.0.value", "present.1.value"} <= failed, failed


@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed (needs NVIDIA's package index and a GPU)")
def test_tensorrt_agrees_with_torch_and_onnxruntime(exported):
    ckpt, art = exported
    reports = compare_artifact(art, ckpt, use_trt=True, localize=True)
    for rep in reports:
        assert rep.runners == ["torch", "onnxrt", "tensorrt"]
        assert rep.ok, format_report([rep])
        assert ("onnxrt", "tensorrt") in rep.layers
