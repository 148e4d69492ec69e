"""TensorRT side (docs/TENSORRT.md): builder settings, the engine build, the TensorRT backend.

Verified here without TensorRT: the build settings derived from a manifest (profiles, flags,
which ONNX file per precision), the CLI's one-line errors, the compatibility check, the
build's file and manifest handling (over a stand-in compiler), and TrtBackend's buffer, KV
and CUDA-graph logic over stand-ins for TensorRT and CUDA (tests/fake_trt.py) that execute
the exported ONNX graphs in ONNX Runtime. The real engine build and decode at the end run
only where TensorRT and a GPU exist.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import random_model
from tests.fake_trt import FAKE_PLATFORM, FakeCompiler, FakeCuda, fake_tensorrt
from tidar_export.engines.build import DEFAULT_PREFILL_OPT_LEN, build_engines, build_settings, polygraphy_loaders
from tidar_export.cli import main
from tidar_export.errors import TiDARError
from tidar_runtime import SamplingParams, generate_ar_batch, generate_tidar_batch
from tidar_runtime.backends.trt import Platform, TrtBackend, check_engine_compat, plan_weight_streaming
from tidar_runtime.contract import TensorSpec
from tidar_runtime.manifest import Manifest, load_manifest, new_manifest

# ONNX Runtime warns on every TensorScatter it cannot run in place (the trt-10.15 graphs): quiet it.
__import__("onnxruntime").set_default_logger_severity(3)
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_POLYGRAPHY = importlib.util.find_spec("polygraphy") is not None
B, KV, HD, LAYERS, VOCAB, S, BLOCK = 2, 2, 16, 2, 256, 64, 4


# --------------------------------------------------------------------------- a manifest by hand


def _kv(prefix: str, dtype: str, shape: list) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.{i}.{kv}", dtype, list(shape)) for i in range(LAYERS) for kv in ("key", "value")]


def make_manifest(dtype: str = "float32", kv_update: str = "slice", max_seq_len: int = S) -> Manifest:
    """The manifest an export of the tiny model would write (tidar_runtime.manifest.new_manifest, the
    export's own construction; shapes per docs/EXPORT.md)."""
    config = {"arch": "qwen2", "vocab_size": VOCAB, "num_layers": LAYERS, "num_heads": 4, "num_kv_heads": KV,
              "head_dim": HD, "block_size": BLOCK, "mask_token_id": 0, "bos_token_id": None, "eos_token_id": None}
    return new_manifest(config, target="trt-10.3", precision={"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype],
                        block_size=BLOCK, proposals=[1, 2, 3, 4], max_seq_len=max_seq_len, max_batch=B, mask_token_id=0,
                        ar_step="attention", graph_files={k: f"{k}.onnx" for k in ("prefill", "step", "ar_step")},
                        kv_updates={"prefill": None, "step": kv_update, "ar_step": kv_update}, kv_dtype=dtype)


@pytest.fixture
def artifact_dir(tmp_path):
    """A manifest and placeholder graph files: enough for everything that does not parse ONNX."""
    m = make_manifest()
    for g in m.graphs.values():
        (tmp_path / g.file).write_bytes(b"onnx placeholder")
    m.save(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- build settings


def test_prefill_profile_spans_every_prompt_a_decode_accepts(tmp_path):
    s = build_settings(make_manifest(), tmp_path)
    lo, opt, hi = s.graph("prefill").profile["input_ids"]
    assert lo == (1, 1)  # one row, one token
    assert hi == (B, S - BLOCK)  # every prompt with P + b <= max_seq_len, up to max_batch rows
    assert opt == (1, min(DEFAULT_PREFILL_OPT_LEN, S - BLOCK))  # the runtime prefills one row at a time
    assert list(s.graph("prefill").profile) == ["input_ids"]


def test_prefill_opt_len_is_an_option_capped_at_the_max(tmp_path):
    m = make_manifest(max_seq_len=4096)
    assert build_settings(m, tmp_path).graph("prefill").profile["input_ids"][1] == (1, DEFAULT_PREFILL_OPT_LEN)
    assert build_settings(m, tmp_path, prefill_opt_len=100).graph("prefill").profile["input_ids"][1] == (1, 100)
    assert build_settings(m, tmp_path, prefill_opt_len=10**6).graph("prefill").profile["input_ids"][1] == (1, 4092)


@pytest.mark.parametrize("kind, first, width", [("step", "draft_ids", BLOCK), ("ar_step", "input_ids", 1)])
def test_step_profiles_are_static(tmp_path, kind, first, width):
    profile = build_settings(make_manifest(), tmp_path).graph(kind).profile
    assert set(profile) == {first, "cache_len"} | {t.name for t in _kv("past_key_values", "float32", [])}
    for name, (lo, opt, hi) in profile.items():
        assert lo == opt == hi, name
    assert profile[first][0] == (B, width)
    assert profile["cache_len"][0] == (B,)
    assert profile["past_key_values.1.value"][0] == (B, KV, S, HD)


def test_engines_and_onnx_files(tmp_path):
    s = build_settings(make_manifest(), tmp_path)
    assert [(g.kind, g.onnx, g.engine) for g in s.graphs] == [
        ("prefill", "prefill.onnx", "prefill.engine"), ("step", "step.onnx", "step.engine"),
        ("ar_step", "ar_step.onnx", "ar_step.engine")]
    assert s.precision == "fp32" and s.strongly_typed


@pytest.mark.parametrize("options, flags", [
    ({}, ()),
    ({"tf32": True}, ("TF32",)),
    ({"version_compat": True}, ("VERSION_COMPATIBLE",)),
    ({"weight_streaming": True}, ("WEIGHT_STREAMING",)),
    ({"version_compat": True, "weight_streaming": True, "tf32": True},
     ("TF32", "VERSION_COMPATIBLE", "WEIGHT_STREAMING")),
    ({"hardware_compat": "ampere+", "optimization_level": 5}, ()),  # config properties, not flags
])
def test_flags_per_option(tmp_path, options, flags):
    s = build_settings(make_manifest(), tmp_path, **options)
    assert s.flags == flags
    assert s.hardware_compat == options.get("hardware_compat")
    assert s.optimization_level == options.get("optimization_level")
    assert s.version_compat == options.get("version_compat", False)
    assert s.weight_streaming == options.get("weight_streaming", False)


def quantized_manifest(precision: str) -> Manifest:
    """The manifest `tidar-export quantize` writes: float I/O, Q/DQ graphs `<kind>.<precision>.onnx`."""
    m = make_manifest("float32")
    m.export["precision"] = precision
    for g in m.graphs.values():
        g.file = f"{g.kind}.{precision}.onnx"
    return m


@pytest.mark.parametrize("dtype, precision", [("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16"),
                                              ("float32", "int8"), ("float32", "fp8")])
def test_precision_never_sets_a_precision_flag(tmp_path, dtype, precision):
    """Strongly typed: precision comes from the ONNX types and Q/DQ nodes, not from builder flags."""
    quantized = precision in ("int8", "fp8")
    m = quantized_manifest(precision) if quantized else make_manifest(dtype)
    s = build_settings(m, tmp_path, precision=precision, timing_cache=tmp_path / "t.cache")
    assert s.precision == precision and s.strongly_typed
    assert not {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4"} & set(s.flags)
    assert s.graph("step").onnx == (f"step.{precision}.onnx" if quantized else "step.onnx")
    assert s.timing_cache == tmp_path / "t.cache"


def test_default_precision_is_the_exported_dtype(tmp_path):
    assert build_settings(make_manifest("bfloat16"), tmp_path).precision == "bf16"


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_default_precision_of_a_quantized_artifact_is_its_own(tmp_path, precision):
    s = build_settings(quantized_manifest(precision), tmp_path)
    assert s.precision == precision
    assert [g.onnx for g in s.graphs] == [f"{k}.{precision}.onnx" for k in ("prefill", "step", "ar_step")]


def test_precision_other_than_the_exported_dtype_is_refused(tmp_path):
    with pytest.raises(TiDARError, match=r"graphs are fp32.*re-export with --dtype fp16"):
        build_settings(make_manifest("float32"), tmp_path, precision="fp16")


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_precision_needs_a_quantized_artifact(tmp_path, precision):
    with pytest.raises(TiDARError) as e:
        build_settings(make_manifest("float16"), tmp_path, precision=precision)
    msg = str(e.value)
    assert "\n" not in msg and "graphs of" in msg and "are fp16" in msg
    assert f"tidar-export quantize {tmp_path} -o QUANTIZED_DIR --precision {precision}" in msg


@pytest.mark.parametrize("have, asked", [("int8", "fp32"), ("int8", "fp8"), ("fp8", "int8"), ("fp8", "fp16")])
def test_quantized_artifact_builds_only_its_precision(tmp_path, have, asked):
    with pytest.raises(TiDARError, match=f"holds {have} Q/DQ graphs.*--precision {have}"):
        build_settings(quantized_manifest(have), tmp_path, precision=asked)


def weight_only_manifest(precision: str = "int4", target: str = "trt-10.15", opset: int = 24) -> Manifest:
    """The manifest `tidar-export quantize --precision int4|int8-wo` writes for `target`."""
    m = quantized_manifest(precision)
    m.export["target"], m.versions = target, {"opsets": {"ai.onnx": opset}}
    return m


def _recipe(directory, block: int | None) -> None:
    """quantization.json as `tidar-export quantize` writes it (the field the build reads)."""
    recipe = {"precision": "int4", "format": "block-quantized DequantizeLinear"}
    if block is not None:
        recipe["block_size"] = block
    (directory / "quantization.json").write_text(json.dumps(recipe))


@pytest.mark.parametrize("block", [64, 128])
def test_int4_weight_only_builds_from_trt_10_15_graphs(tmp_path, block):
    """Strongly typed: the INT4 weights and their block DequantizeLinear decide; no INT4 flag."""
    _recipe(tmp_path, block)
    s = build_settings(weight_only_manifest(), tmp_path)
    assert s.precision == "int4" and s.strongly_typed and not s.flags
    assert [g.onnx for g in s.graphs] == [f"{k}.int4.onnx" for k in ("prefill", "step", "ar_step")]
    assert build_settings(weight_only_manifest(), tmp_path, precision="int4").precision == "int4"


@pytest.mark.parametrize("manifest, block, message", [
    (weight_only_manifest(), 32, "blocks of 32, and TensorRT's INT4 weights take per-block scales with blocks of "
                                 "64 or 128 only: re-quantize with --block-size 64 or 128"),
    (weight_only_manifest(), None, "int4 block size is unknown"),
    (weight_only_manifest(target="trt-10.3", opset=18), 64, "opset >= 21); the trt-10.3 graphs are opset 18 and "
                                                            "TensorRT 10.3's ONNX parser reads opsets 9..20"),
    (weight_only_manifest(target="ort", opset=23), 64, "MatMulNBits (target ort), which TensorRT's ONNX parser"),
    (weight_only_manifest("int8-wo", target="ort", opset=23), 64, "holds int8-wo weights as ONNX Runtime's"),
    (weight_only_manifest("int8-wo"), 64, "int8-wo is lowered for target ort only"),
])
def test_weight_only_artifacts_tensorrt_cannot_take_are_refused(tmp_path, manifest, block, message):
    _recipe(tmp_path, block)
    with pytest.raises(TiDARError) as e:
        build_settings(manifest, tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("have, asked", [("int4", "fp32"), ("int4", "int8"), ("int8-wo", "int4")])
def test_weight_only_artifact_builds_only_its_precision(tmp_path, have, asked):
    _recipe(tmp_path, 64)
    with pytest.raises(TiDARError, match=f"holds {have} weight-only graphs.*--precision {have}"):
        build_settings(weight_only_manifest(have), tmp_path, precision=asked)


def test_weight_only_precision_needs_a_quantized_artifact(tmp_path):
    with pytest.raises(TiDARError, match=r"are fp32; int4 engines are built from weight-only quantized graphs: "
                                         r"run `tidar-export quantize .* --precision int4`"):
        build_settings(make_manifest("float32"), tmp_path, precision="int4")


@pytest.mark.parametrize("options, message", [
    ({"optimization_level": 6}, "0..5"),
    ({"hardware_compat": "turing+"}, "hardware compatibility"),
    ({"precision": "int2"}, "unknown precision"),
    ({"tf32": True, "precision": "fp16"}, "fp32 engines only"),
    ({"prefill_opt_len": 0}, "prefill-opt-len"),
])
def test_invalid_options(tmp_path, options, message):
    m = make_manifest("float16" if options.get("precision") == "fp16" else "float32")
    with pytest.raises(TiDARError, match=message):
        build_settings(m, tmp_path, **options)


def test_settings_are_json(tmp_path):
    d = json.loads(build_settings(make_manifest(), tmp_path).to_json())
    assert d["graphs"][0]["profile"]["input_ids"] == [[1, 1], [1, S - BLOCK], [B, S - BLOCK]]


@pytest.mark.skipif(not HAS_POLYGRAPHY, reason="polygraphy is not installed (pip install polygraphy)")
def test_polygraphy_loaders_carry_the_settings(tmp_path):
    """Polygraphy's loaders are plain objects until called: check what they would build."""
    s = build_settings(make_manifest(), tmp_path, optimization_level=4, version_compat=True, weight_streaming=True,
                       timing_cache=tmp_path / "t.cache")
    network, config = polygraphy_loaders(s, s.graph("prefill"))
    assert network.strongly_typed and network.path == str(tmp_path / "prefill.onnx")
    (profile,) = config.profiles
    assert tuple(profile["input_ids"]) == s.graph("prefill").profile["input_ids"]
    assert config.builder_optimization_level == 4 and config.version_compatible and config.weight_streaming
    assert config.timing_cache_path == str(tmp_path / "t.cache")
    assert not (config.fp16 or config.bf16 or config.int8 or config.fp8 or config.tf32)
    _, config = polygraphy_loaders(s, s.graph("step"))
    lo, opt, hi = config.profiles[0]["past_key_values.0.key"]
    assert tuple(lo) == tuple(opt) == tuple(hi) == (B, KV, S, HD)


# --------------------------------------------------------------------------- command line


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: this checks the message shown without it")
def test_cli_build_without_tensorrt(artifact_dir, capsys):
    err = _one_line_error(capsys, ["build", str(artifact_dir)])
    assert "TensorRT is not installed: pip install tensorrt" in err
    assert not list(artifact_dir.glob("*.engine")) and not list(artifact_dir.glob(".*"))


def test_cli_build_dry_run_needs_no_tensorrt(artifact_dir, capsys):
    assert main(["build", str(artifact_dir), "--dry-run", "--version-compat", "--prefill-opt-len", "32"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["flags"] == ["VERSION_COMPATIBLE"] and d["precision"] == "fp32"
    assert d["graphs"][0]["profile"]["input_ids"][1] == [1, 32]


def test_cli_build_user_errors_are_one_line(artifact_dir, tmp_path, capsys):
    err = _one_line_error(capsys, ["build", str(artifact_dir), "--precision", "int8"])
    assert "explicitly quantized (Q/DQ) graphs: run `tidar-export quantize" in err
    int4 = tmp_path / "int4"
    int4.mkdir()
    m = weight_only_manifest()
    for g in m.graphs.values():
        (int4 / g.file).write_bytes(b"onnx placeholder")
    m.save(int4)
    _recipe(int4, 32)
    assert "blocks of 64 or 128 only" in _one_line_error(capsys, ["build", str(int4), "--dry-run"])
    assert "artifact directory not found" in _one_line_error(capsys, ["build", str(tmp_path / "x"), "--dry-run"])
    assert "0..5" in _one_line_error(capsys, ["build", str(artifact_dir), "--builder-optimization-level", "9"])


# --------------------------------------------------------------------------- engine compatibility


INFO = {"tensorrt": "10.3.0.26", "compute_capability": "8.7", "gpu": "Orin", "version_compatible": False,
        "hardware_compat": None, "os": "linux", "cpu_arch": "aarch64", "integrated_gpu": True}  # a Jetson Orin build


def orin(trt: str, gpu: str = "Orin", cc: str = "8.7") -> Platform:
    return Platform(trt, gpu, cc, "linux", "aarch64", True)


def x86(trt: str, gpu: str, cc: str) -> Platform:
    return Platform(trt, gpu, cc, "linux", "x86_64", False)


def test_compat_same_platform_passes():
    check_engine_compat("step", INFO, orin("10.3.0.26"))
    check_engine_compat("step", INFO, orin("10.3.0", "Jetson AGX Orin"))  # JetPack's version string


@pytest.mark.parametrize("running", [orin("10.15.1.29"), orin("10.3.1.2"), orin("10.3.0.26", "Thor", "11.0")])
def test_compat_mismatch_names_both_sides(running):
    with pytest.raises(TiDARError) as e:
        check_engine_compat("step", INFO, running)
    msg = str(e.value)
    assert "\n" not in msg and "tidar-export build" in msg
    for part in ("TensorRT 10.3.0.26", "compute capability 8.7", f"TensorRT {running.tensorrt}",
                 f"compute capability {running.compute_capability}", running.gpu):
        assert part in msg


def test_compat_version_compatible_runs_on_later_tensorrt_only():
    info = {**INFO, "version_compatible": True}
    check_engine_compat("step", info, orin("10.15.1.29"))
    check_engine_compat("step", info, orin("11.4.0.106"))
    with pytest.raises(TiDARError, match="version-compatible"):
        check_engine_compat("step", info, orin("10.2.0.19"))


X86_INFO = {**INFO, "gpu": "NVIDIA H100", "compute_capability": "9.0", "cpu_arch": "x86_64", "integrated_gpu": False}


def test_compat_ampere_plus_runs_on_any_discrete_ampere_or_newer():
    info = {**X86_INFO, "hardware_compat": "ampere+"}
    for cc in ("8.0", "8.6", "8.9", "9.0", "12.0"):
        check_engine_compat("step", info, x86("10.3.0.26", "gpu", cc))
    with pytest.raises(TiDARError, match=r"\(ampere\+\)"):
        check_engine_compat("step", info, x86("10.3.0.26", "T4", "7.5"))


def test_compat_an_x86_ampere_plus_engine_is_refused_on_a_jetson():
    """Compute capability 8.7 >= 8.0, but hardware compatibility is unsupported on JetPack and
    the engine was built for another CPU and kind of GPU: refused before deserializing."""
    with pytest.raises(TiDARError) as e:
        check_engine_compat("step", {**X86_INFO, "hardware_compat": "ampere+"}, orin("10.3.0.26"))
    msg = str(e.value)
    assert "\n" not in msg and "linux/x86_64 with a discrete GPU" in msg and "linux/aarch64 with an integrated GPU" in msg


@pytest.mark.parametrize("field, value", [("cpu_arch", "x86_64"), ("os", "windows"), ("integrated_gpu", False)])
def test_compat_other_build_platform_is_refused(field, value):
    with pytest.raises(TiDARError, match="do not move between platforms") as e:
        check_engine_compat("prefill", {**INFO, field: value}, orin("10.3.0.26"))
    assert "\n" not in str(e.value)


def test_compat_ampere_plus_is_refused_on_jetpack_even_from_a_jetson():
    with pytest.raises(TiDARError, match="not support on JetPack"):
        check_engine_compat("step", {**INFO, "hardware_compat": "ampere+"}, orin("10.3.0.26"))


def test_compat_without_engine_info_is_refused():
    with pytest.raises(TiDARError, match="rebuild"):
        check_engine_compat("prefill", {}, FAKE_PLATFORM)
    no_platform = {k: v for k, v in INFO.items() if k not in ("os", "cpu_arch", "integrated_gpu")}
    with pytest.raises(TiDARError, match="no build platform"):
        check_engine_compat("prefill", no_platform, orin("10.3.0.26"))


# --------------------------------------------------------------------------- runtime without TensorRT


def test_runtime_imports_without_tensorrt_or_torch():
    code = ("import sys, tidar_runtime.backends.trt, tidar_runtime.backends.cuda; "
            "assert 'tensorrt' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: this checks the error shown without it")
def test_trt_backend_without_tensorrt(artifact_dir):
    with pytest.raises(TiDARError, match="TensorRT is not installed: pip install tensorrt"):
        TrtBackend(artifact_dir)


# --------------------------------------------------------------------------- build_engines (stand-in compiler)


def test_build_writes_engines_and_manifest(artifact_dir):
    settings = build_settings(load_manifest(artifact_dir), artifact_dir, version_compat=True)
    logs = []
    build_engines(settings, log=logs.append, compiler=FakeCompiler())
    m = load_manifest(artifact_dir)
    for kind in ("prefill", "step", "ar_step"):
        g = m.graphs[kind]
        assert g.engine == f"{kind}.engine" and (artifact_dir / g.engine).is_file()
        info = g.engine_info
        assert (info["tensorrt"], info["gpu"], info["compute_capability"]) == (
            FAKE_PLATFORM.tensorrt, FAKE_PLATFORM.gpu, FAKE_PLATFORM.compute_capability)
        assert (info["os"], info["cpu_arch"], info["integrated_gpu"]) == (
            FAKE_PLATFORM.os, FAKE_PLATFORM.cpu_arch, FAKE_PLATFORM.integrated_gpu)
        assert info["version_compatible"] and info["flags"] == ["VERSION_COMPATIBLE"] and info["precision"] == "fp32"
        assert info["bytes"] == (artifact_dir / g.engine).stat().st_size
        assert info["profile"]["cache_len" if kind != "prefill" else "input_ids"][2] == (
            [B] if kind != "prefill" else [B, S - BLOCK])
    assert m.versions["tensorrt"] == FAKE_PLATFORM.tensorrt
    assert sum(kind in line for line in logs for kind in ("prefill:", "step:", "ar_step:")) >= 6  # progress per graph
    assert not [p.name for p in artifact_dir.iterdir() if p.name.startswith(".")]  # no temp files or dirs


def test_hardware_compat_build_is_refused_on_a_jetson(artifact_dir):
    before = (artifact_dir / "manifest.json").read_text()
    settings = build_settings(load_manifest(artifact_dir), artifact_dir, hardware_compat="ampere+")
    compiler = FakeCompiler(platform=orin("10.3.0.26"))
    with pytest.raises(TiDARError, match="hardware compatibility on JetPack"):
        build_engines(settings, log=lambda _: None, compiler=compiler)
    assert compiler.compiled == [] and (artifact_dir / "manifest.json").read_text() == before


def test_failed_build_leaves_the_artifact_as_it_was(artifact_dir):
    before = (artifact_dir / "manifest.json").read_text()
    settings = build_settings(load_manifest(artifact_dir), artifact_dir)
    compiler = FakeCompiler(fail_on="step")
    with pytest.raises(RuntimeError, match="simulated"):
        build_engines(settings, log=lambda _: None, compiler=compiler)
    assert compiler.compiled == ["prefill"]
    assert (artifact_dir / "manifest.json").read_text() == before
    assert sorted(p.name for p in artifact_dir.iterdir()) == sorted(
        ["manifest.json", "prefill.onnx", "step.onnx", "ar_step.onnx"])


# --------------------------------------------------------------------------- TrtBackend over stand-ins

MAX_SEQ_LEN, MAX_BATCH = 64, 2
PROMPTS = [[5, 17, 42, 9, 100, 7], list(range(30, 41))]
NEW = 16  # tokens per decode: the longest prompt plus NEW plus one step fit the cache
TARGETS = {"trt-10.3": {"proposals": [1, 3]}, "trt-10.15": {}}  # kv_update "slice" and "inplace"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """target -> (checkpoint, artifact) on the tiny random model, exported on first use."""
    from tidar_export.model.checkpoint import save_checkpoint
    from tidar_export.export.artifact import export_artifact

    ckpt = save_checkpoint(random_model(seed=5), tmp_path_factory.mktemp("ckpt") / "tiny")
    made = {}

    def get(target):
        if target not in made:
            out = tmp_path_factory.mktemp(f"trt-{target}") / "art"
            made[target] = export_artifact(ckpt, out, target=target, max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH,
                                           **TARGETS[target])
        return made[target]

    return get


@pytest.fixture
def fake_engines(exported, tmp_path):
    """A copy of an exported artifact with stand-in engines built by build_engines."""
    def make(target, **build_options):
        art = tmp_path / f"{target}-{sum(1 for _ in tmp_path.iterdir())}"
        shutil.copytree(exported(target), art)
        build_engines(build_settings(load_manifest(art), art, **build_options), log=lambda _: None,
                      compiler=FakeCompiler())
        return art
    return make


def _ort_results(art, params=SamplingParams(), max_new=NEW):
    from tidar_runtime.backends.ort import OrtBackend

    return ([r.tokens for r in generate_tidar_batch(OrtBackend(art), PROMPTS, max_new, params)],
            [r.tokens for r in generate_ar_batch(OrtBackend(art), PROMPTS, max_new, params)])


def test_int4_weight_only_engines_decode_like_ort(exported, tmp_path):
    """A trt-10.15 int4 artifact (RTN, blocks of 64) through build_engines and TrtBackend over the
    stand-ins, whose engines run its block-quantized graphs: the same tokens as ONNX Runtime on
    those graphs, TiDAR == AR. (What TensorRT's own INT4 kernels compute needs a GPU.)"""
    from tidar_export.quantize import quantize_artifact

    art = quantize_artifact(exported("trt-10.15"), tmp_path / "int4", "int4", method="rtn", block_size=64)
    build_engines(build_settings(load_manifest(art), art), log=lambda _: None, compiler=FakeCompiler())
    m = load_manifest(art)
    assert {g.engine_info["precision"] for g in m.graphs.values()} == {"int4"}
    assert [g.engine_info["onnx"] for g in m.graphs.values()] == [f"{k}.int4.onnx" for k in m.graphs]
    tidar_ort, ar_ort = _ort_results(art)
    assert tidar_ort == ar_ort
    cuda = FakeCuda()
    backend = TrtBackend(art, trt_module=fake_tensorrt(cuda, aliased=True), cuda_api=cuda)
    assert [r.tokens for r in generate_tidar_batch(backend, PROMPTS, NEW)] == tidar_ort
    assert [r.tokens for r in generate_ar_batch(backend, PROMPTS, NEW)] == ar_ort
    backend.close()
    assert cuda.live_allocations() == 0


@pytest.mark.parametrize("target, aliased, mode", [("trt-10.3", False, "slice"), ("trt-10.15", True, "alias"),
                                                  ("trt-10.15", False, "pingpong")])
def test_backend_decode_equals_ort(fake_engines, target, aliased, mode):
    art = fake_engines(target)
    tidar_ort, ar_ort = _ort_results(art)
    assert tidar_ort == ar_ort  # TiDAR greedy == AR greedy (the oracle)
    cuda = FakeCuda()
    backend = TrtBackend(art, trt_module=fake_tensorrt(cuda, aliased=aliased), cuda_api=cuda)
    assert backend.kv_mode == mode
    syncs = cuda.syncs
    tidar = generate_tidar_batch(backend, PROMPTS, NEW)
    passes = len(PROMPTS) + max(r.stats.forwards for r in tidar)  # prefills + batched steps
    assert cuda.syncs - syncs == passes  # one host synchronization per pass
    assert [r.tokens for r in tidar] == tidar_ort
    assert [r.tokens for r in generate_ar_batch(backend, PROMPTS, NEW)] == ar_ort
    parities = (0, 1) if mode == "pingpong" else (0,)
    assert backend.cuda_graph_status == {(k, p): "captured" for k in ("step", "ar_step") for p in parities}
    assert cuda.launches > 0
    if mode == "slice":
        assert cuda.copies_2d > 0  # new K/V written at each row's L
    backend.close()
    assert cuda.live_allocations() == 0 and not cuda.streams and not cuda.execs
    backend.close()  # idempotent


def test_backend_sampling_equals_ort(fake_engines):
    art = fake_engines("trt-10.15")
    params = SamplingParams(temperature=1.0, seed=7)
    tidar_ort, ar_ort = _ort_results(art, params)
    cuda = FakeCuda()
    with TrtBackend(art, trt_module=fake_tensorrt(cuda), cuda_api=cuda) as backend:
        assert [r.tokens for r in generate_tidar_batch(backend, PROMPTS, NEW, params)] == tidar_ort
        assert [r.tokens for r in generate_ar_batch(backend, PROMPTS, NEW, params)] == ar_ort


def test_backend_without_cuda_graphs(fake_engines):
    art = fake_engines("trt-10.3")
    cuda = FakeCuda()
    with TrtBackend(art, trt_module=fake_tensorrt(cuda, aliased=False), cuda_api=cuda, cuda_graphs=False) as be:
        assert [r.tokens for r in generate_tidar_batch(be, PROMPTS, 12)] == _ort_results(art, max_new=12)[0]
        assert cuda.launches == 0 and be.cuda_graph_status == {}


def test_mismatch_is_refused_before_deserializing(fake_engines):
    art = fake_engines("trt-10.3")
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda, aliased=False, version="10.15.0.1")
    with pytest.raises(TiDARError, match=r"TensorRT 10.15.1.29 .* this machine runs TensorRT 10.15.0.1"):
        TrtBackend(art, trt_module=trt, cuda_api=cuda)
    assert trt.deserialized == 0 and cuda.live_allocations() == 0


def test_truncated_engine_is_refused(fake_engines):
    art = fake_engines("trt-10.3")
    (art / "step.engine").write_bytes((art / "step.engine").read_bytes()[:-3])
    cuda = FakeCuda()
    with pytest.raises(TiDARError, match="truncated"):
        TrtBackend(art, trt_module=fake_tensorrt(cuda, aliased=False), cuda_api=cuda)


def test_artifact_without_engines(exported):
    cuda = FakeCuda()
    with pytest.raises(TiDARError, match="tidar-export build"):
        TrtBackend(exported("trt-10.3"), trt_module=fake_tensorrt(cuda), cuda_api=cuda)


def test_prompt_outside_the_prefill_profile(fake_engines):
    art = fake_engines("trt-10.3")
    cuda = FakeCuda()
    with TrtBackend(art, trt_module=fake_tensorrt(cuda, aliased=False), cuda_api=cuda) as backend:
        too_long = list(range(1, MAX_SEQ_LEN - 2))  # fits the cache for AR, not the TiDAR prefill profile
        with pytest.raises(TiDARError, match=rf"outside the prefill engine's profile \(1..{MAX_SEQ_LEN - 4} tokens\)"):
            generate_ar_batch(backend, [too_long], 2)


def test_tidar_only_backend_skips_the_ar_engine(fake_engines):
    art = fake_engines("trt-10.3")
    cuda = FakeCuda()
    with TrtBackend(art, kinds=("prefill", "step"), trt_module=fake_tensorrt(cuda, aliased=False),
                    cuda_api=cuda) as backend:
        assert [r.tokens for r in generate_tidar_batch(backend, PROMPTS, 8)] == _ort_results(art, max_new=8)[0]
        with pytest.raises(TiDARError, match="ar_step engine was not loaded"):
            generate_ar_batch(backend, PROMPTS, 4)


# --------------------------------------------------------------------------- CUDA helper


def _cuda_state() -> str:
    """"none": no libcudart; "no-device": the library loads but no GPU answers; "gpu"."""
    from tidar_runtime.backends import cuda

    try:
        api = cuda.load()
    except TiDARError:
        return "none"
    try:
        api.set_device(0)
    except cuda.CudaError:
        return "no-device"
    return "gpu"


CUDA_STATE = _cuda_state()


def test_missing_cuda_runtime_is_one_line(monkeypatch, tmp_path):
    from tidar_runtime.backends import cuda

    monkeypatch.setattr(cuda, "_instance", None)
    monkeypatch.setenv("TIDAR_CUDART", str(tmp_path / "libcudart.so.404"))
    with pytest.raises(TiDARError, match="CUDA runtime library was not found.*TIDAR_CUDART"):
        cuda.load()


@pytest.mark.skipif(CUDA_STATE != "no-device", reason="needs libcudart without a usable GPU (this machine: "
                    f"{CUDA_STATE})")
def test_cuda_errors_are_one_line_without_a_gpu():
    """Every symbol the helper binds exists in this libcudart; failures name the call."""
    from tidar_runtime.backends import cuda

    api = cuda.load()
    assert api.runtime_version().count(".") == 1
    with pytest.raises(cuda.CudaError) as e:
        api.malloc(1024)
    assert str(e.value).startswith("cudaMalloc failed: ") and "\n" not in str(e.value)


@pytest.mark.skipif(CUDA_STATE != "gpu", reason=f"needs a CUDA GPU (this machine: {CUDA_STATE})")
def test_cuda_copies_and_graph_replay_on_a_gpu():
    """The helper on real hardware: pinned round trip, strided 2D copy, a captured graph replayed."""
    from tidar_runtime.backends import cuda

    api = cuda.load()
    info = api.device_info(0)
    assert info.name and info.compute_capability.count(".") == 1
    s = api.stream_create()
    h_ptr, d_a, d_b = api.host_alloc(4096), api.malloc(4096), api.malloc(4096)
    try:
        host = cuda.pinned_array(h_ptr, (8, 64), np.int64)
        host[:] = np.arange(512).reshape(8, 64)
        api.memcpy_async(d_a, h_ptr, 4096, cuda.MEMCPY_HOST_TO_DEVICE, s)
        api.memset_async(d_b, 0, 4096, s)
        # rows 2..4 of a [8, 64] int64 matrix: 3 rows of 16 elements from column 8, into [8, 64] at row 1, col 0
        api.memcpy2d_async(d_b + 64 * 8, 64 * 8, d_a + (2 * 64 + 8) * 8, 64 * 8, 16 * 8, 3,
                           cuda.MEMCPY_DEVICE_TO_DEVICE, s)
        api.memcpy_async(h_ptr, d_b, 4096, cuda.MEMCPY_DEVICE_TO_HOST, s)
        api.stream_synchronize(s)
        want = np.zeros((8, 64), np.int64)
        want[1:4, :16] = np.arange(512).reshape(8, 64)[2:5, 8:24]
        np.testing.assert_array_equal(host, want)
        api.begin_capture(s)  # a captured copy runs only when the graph is launched
        api.memcpy_async(d_b, d_a, 4096, cuda.MEMCPY_DEVICE_TO_DEVICE, s)
        graph = api.end_capture(s)
        exe = api.graph_instantiate(graph)
        api.graph_destroy(graph)
        api.memcpy_async(h_ptr, d_b, 4096, cuda.MEMCPY_DEVICE_TO_HOST, s)
        api.stream_synchronize(s)
        np.testing.assert_array_equal(host, want)
        api.graph_launch(exe, s)
        api.memcpy_async(h_ptr, d_b, 4096, cuda.MEMCPY_DEVICE_TO_HOST, s)
        api.stream_synchronize(s)
        np.testing.assert_array_equal(host, np.arange(512).reshape(8, 64))
        api.graph_exec_destroy(exe)
    finally:
        api.free(d_a)
        api.free(d_b)
        api.free_host(h_ptr)
        api.stream_destroy(s)


# --------------------------------------------------------------------------- real TensorRT (GPU machines)


NEEDS_TRT = pytest.mark.skipif(not (HAS_TRT and HAS_POLYGRAPHY and CUDA_STATE == "gpu"),
                               reason="needs TensorRT, Polygraphy and a CUDA GPU (none here: TensorRT cannot be "
                                      "installed on the CPU development machines, docs/ARCHITECTURE.md)")


@NEEDS_TRT
@pytest.mark.parametrize("target", list(TARGETS))
def test_tensorrt_engines_decode_like_ort(exported, tmp_path, target):
    """Build real engines from the tiny artifact; TiDAR greedy == AR greedy == ONNX Runtime tokens."""
    art = tmp_path / target
    shutil.copytree(exported(target), art)
    build_engines(build_settings(load_manifest(art), art, timing_cache=tmp_path / "timing.cache"))
    tidar_ort, ar_ort = _ort_results(art)
    with TrtBackend(art) as backend:
        tidar = [r.tokens for r in generate_tidar_batch(backend, PROMPTS, NEW)]
        ar = [r.tokens for r in generate_ar_batch(backend, PROMPTS, NEW)]
        status = dict(backend.cuda_graph_status)
        mode = backend.kv_mode
    assert tidar == ar == tidar_ort == ar_ort
    assert mode == ("slice" if target == "trt-10.3" else "alias"), f"{mode}: no KVCacheUpdate aliasing reported"
    assert status and all(v == "captured" for v in status.values()), status
    info = load_manifest(art).graphs["step"].engine_info
    assert info["tensorrt"] and info["compute_capability"] and info["strongly_typed"]


@NEEDS_TRT
def test_tensorrt_step_logits_match_ort(exported, tmp_path):
    """Sampling reads the logits back: TensorRT's fp32 step logits agree with ONNX Runtime's."""
    art = tmp_path / "art"
    shutil.copytree(exported("trt-10.15"), art)
    build_engines(build_settings(load_manifest(art), art))
    from tidar_runtime.backends.ort import OrtBackend

    ort_be = OrtBackend(art)
    with TrtBackend(art) as trt_be:
        for be in (ort_be, trt_be):
            be.prefill(0, np.array(PROMPTS[0]), True)
        drafts = np.full((MAX_BATCH, 4), 3, dtype=np.int64)
        cache_len = np.array([len(PROMPTS[0]), 0], dtype=np.int64)
        ref = ort_be.step(drafts, cache_len, True).logits.copy()
        got = trt_be.step(drafts, cache_len, True).logits.copy()
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- weight streaming


def test_budgets_serve_step_first_and_stay_exact_past_int32():
    gib = 2**30
    streamable = {"prefill": 5 * gib, "step": 5 * gib, "ar_step": 5 * gib}
    assert plan_weight_streaming(streamable, 8 * gib) == {"step": 5 * gib, "ar_step": 3 * gib, "prefill": 0}
    assert plan_weight_streaming(streamable, 20 * gib) == streamable  # enough: nothing streams
    assert plan_weight_streaming({"prefill": 3 * gib, "step": 3 * gib}, 3 * gib + 7) == {"step": 3 * gib, "prefill": 7}
    assert plan_weight_streaming(streamable, -1) is None


SCRATCH = 2048  # the stand-in engines' weight-streaming scratch: the headroom must cover it


def _streaming(fake_engines, cuda, budget=None, headroom=SCRATCH, refuse=False, kinds=("prefill", "step", "ar_step")):
    art = fake_engines("trt-10.15", weight_streaming=True)
    trt = fake_tensorrt(cuda, refuse_budgets=refuse)  # its automatic budget fails the test if asked for
    return art, TrtBackend(art, kinds=kinds, weight_streaming_budget=budget, weight_streaming_headroom=headroom,
                           trt_module=trt, cuda_api=cuda)


def test_weight_streaming_budgets_from_free_memory(fake_engines):
    cuda = FakeCuda()
    art, roomy = _streaming(fake_engines, cuda)
    S = roomy.weight_streaming["step"]["streamable"]
    assert S > 0 and all(w == {"streamable": S, "budget": S, "streams": False} for w in roomy.weight_streaming.values())
    assert set(roomy.cuda_graph_status.values()) == set()  # nothing streams: contexts are captured on first use
    plan = roomy.memory_plan
    roomy.close()
    # Room for the buffers, the workspace and 1.5 engines' weights: step keeps all of its
    # weights, ar_step half, the prefill streams everything.
    cuda = FakeCuda(free_bytes=plan["resident_weights"] + plan["buffers"] + plan["workspace"] + SCRATCH + S + S // 2)
    _, be = _streaming(fake_engines, cuda)
    assert {k: w["budget"] for k, w in be.weight_streaming.items()} == {"step": S, "ar_step": S // 2, "prefill": 0}
    assert [k for k, w in be.weight_streaming.items() if w["streams"]] == ["prefill", "ar_step"]
    status = be.cuda_graph_status
    assert "streams weights" in status[("ar_step", 0)] and status[("ar_step", 0)].startswith("eager")
    tidar_ort, ar_ort = _ort_results(art)
    assert [r.tokens for r in generate_tidar_batch(be, PROMPTS, NEW)] == tidar_ort
    assert [r.tokens for r in generate_ar_batch(be, PROMPTS, NEW)] == ar_ort
    assert be.cuda_graph_status[("step", 0)] == "captured"  # not streaming: captured
    assert "streams weights" in be.cuda_graph_status[("ar_step", 0)]  # streaming: never captured
    assert len(cuda.execs) == 1
    be.close()


def test_weight_streaming_needs_room_for_everything_else(fake_engines):
    cuda = FakeCuda(free_bytes=1 << 20, total_bytes=80 << 30)
    with pytest.raises(TiDARError, match=r"not enough GPU memory .* KV cache and buffers .* are free") as e:
        _streaming(fake_engines, cuda, headroom=None)
    assert "\n" not in str(e.value) and cuda.live_allocations() == 0


def test_a_budget_tensorrt_did_not_take_is_an_error(fake_engines):
    cuda = FakeCuda()
    with pytest.raises(TiDARError, match="did not take the weight-streaming budget of 0 bytes"):
        _streaming(fake_engines, cuda, budget=0, refuse=True)
    assert cuda.live_allocations() == 0


def test_given_budgets_are_set_and_capped(fake_engines):
    cuda = FakeCuda()
    _, be = _streaming(fake_engines, cuda, budget={"prefill": 0, "step": 10 << 30}, kinds=("prefill", "step"))
    S = be.weight_streaming["step"]["streamable"]
    assert be.weight_streaming == {"prefill": {"streamable": S, "budget": 0, "streams": True},
                                   "step": {"streamable": S, "budget": S, "streams": False}}
    be.close()
    with pytest.raises(TiDARError, match="must be a byte count"):
        _streaming(fake_engines, FakeCuda(), budget={"step": 5})  # no budget for the prefill


# --------------------------------------------------------------------------- versions and precision risks


@pytest.mark.parametrize("target, opset, ir_version", [("trt-10.3", 18, 10), ("trt-10.15", 24, 12)])
def test_lowered_graphs_declare_the_ir_version_of_their_opset(exported, target, opset, ir_version):
    """ONNX maps opset 23 to IR 11 and opset 24 to IR 12; opset 18 needs IR 8, the tracer writes 10."""
    import onnx
    import onnxruntime as ort

    path = exported(target) / "step.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == opset
    assert proto.ir_version == ir_version
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # ONNX Runtime takes that IR version


def test_check_warns_about_fp32_fused_attention_for_trt_10_15(exported):
    from tidar_export.export.check import attention_warnings, check_artifact

    report = check_artifact(exported("trt-10.15"))  # fp32 graphs with fused Attention
    assert report.ok and len(report.warnings) == 1
    line = report.warnings[0]
    assert "\n" not in line and "non-decomposable IAttention" in line and "--dtype bf16" in line
    assert "prefill 2, step 2, ar_step 2 nodes" in line  # the tiny model: one Attention per layer, 2 layers
    assert check_artifact(exported("trt-10.3")).warnings == []  # decomposed attention: no risk
    m = load_manifest(exported("trt-10.15"))
    for t in m.graphs["step"].inputs:
        if t.name.startswith("past_key_values."):
            t.dtype = "bfloat16"
    assert attention_warnings(m, {"step": None}) == []  # bf16 graphs: what trt-10.15 is meant for
