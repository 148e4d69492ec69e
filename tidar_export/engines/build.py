"""Engine builder: one TensorRT engine per graph of an exported artifact (docs/TENSORRT.md).

Two layers, so that everything but the TensorRT call itself is testable without TensorRT:

- `build_settings(manifest, artifact_dir, ...)` -> `BuildSettings`: pure. Which ONNX file each
  graph is built from, its optimization profile as plain (min, opt, max) shape tuples, the
  builder flags, timing cache, optimization level, hardware/version compatibility, weight
  streaming. Every user error is a one-line TiDARError here, before TensorRT is touched.
- `build_engines(settings)`: builds with Polygraphy's loaders (`NetworkFromOnnxPath` with a
  strongly typed network, `CreateConfig`, `EngineBytesFromNetwork`), writes each engine to a
  temp file, and only when all three are built renames them into place and rewrites the
  manifest (atomically) with the engine file and its `engine_info`.

Precision: networks are strongly typed, so precision comes from the ONNX tensor types (fp32,
fp16, bf16: the dtype the artifact was exported with) and from explicit Q/DQ nodes (int8,
fp8: the Q/DQ graphs of an artifact written by `tidar-export quantize`, docs/QUANTIZATION.md;
int4: its weight-only graphs, block-quantized INT4 DequantizeLinear on the weights, float
activations). No precision builder flag is set: on a strongly typed network the types alone
decide (TensorRT 11 builds only strongly typed networks and has dropped those flags).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tidar_export.errors import TiDARError, first_line
from tidar_runtime.backends.trt import Platform, device_platform, import_tensorrt
from tidar_runtime.fileio import usual_mode
from tidar_runtime.contract import (FLOAT_PRECISIONS, GRAPH_KINDS, PAST_PREFIX, PRECISIONS, float_precision)
from tidar_runtime.contract import QUANTIZED_PRECISIONS as QUANTIZED  # need an artifact of `tidar-export quantize`
from tidar_runtime.contract import WEIGHT_ONLY_PRECISIONS as WEIGHT_ONLY
from tidar_runtime.manifest import Manifest, load_manifest

# What TensorRT documents for INT4 weights ("Quantization Schemes" of its developer guide): per-block
# scales with a block size of 64 or 128 along one of the last two dimensions (tidar_graphs' target
# table: Target.int4_block_sizes), and INT4 for weights only. The ONNX form, an INT4 initializer and
# DequantizeLinear's block_size, is opset 21.
TRT_INT4_MIN_OPSET = 21
HARDWARE_COMPAT = ("ampere+",)
# Prefill profile: the prompt length TensorRT tunes its tactics for. Prefill runs once per
# request and its cost is dominated by long prompts, where GEMMs are efficient for any row
# count above a few hundred; short prompts are cheap whatever the tactic. 512 tokens is a
# typical chat/code prompt (docs/TENSORRT.md); `--prefill-opt-len` overrides it.
DEFAULT_PREFILL_OPT_LEN = 512
Shape = tuple[int, ...]


@dataclass(frozen=True)
class GraphBuild:
    kind: str  # "prefill" | "step" | "ar_step"
    onnx: str  # ONNX file the engine is built from, relative to the artifact directory
    engine: str  # engine file written, relative to the artifact directory ("step.engine")
    profile: dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shapes


@dataclass(frozen=True)
class BuildSettings:
    artifact_dir: Path
    precision: str  # what the engines compute in: the ONNX dtype, or int8/fp8 via Q/DQ graphs
    graphs: tuple[GraphBuild, ...]  # one engine each, in build order
    flags: tuple[str, ...]  # TensorRT BuilderFlag names that are set; never a precision flag
    strongly_typed: bool = True  # precision from the ONNX types (NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    timing_cache: Path | None = None  # tactic timing cache read and updated (None: shared temp file)
    optimization_level: int | None = None  # builder_optimization_level 0..5 (None: TensorRT's default, 3)
    hardware_compat: str | None = None  # "ampere+": HardwareCompatibilityLevel.AMPERE_PLUS
    version_compat: bool = False  # BuilderFlag.VERSION_COMPATIBLE (lean runtime embedded in the plan)
    weight_streaming: bool = False  # BuilderFlag.WEIGHT_STREAMING (budget chosen at load time)
    tf32: bool = False  # BuilderFlag.TF32 for float32 math (off: fp32 engines match ONNX Runtime)

    def graph(self, kind: str) -> GraphBuild:
        return next(g for g in self.graphs if g.kind == kind)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["artifact_dir"] = str(self.artifact_dir)
        d["timing_cache"] = None if self.timing_cache is None else str(self.timing_cache)
        return json.dumps(d, indent=2)


def base_precision(manifest: Manifest) -> str:
    """The float dtype the artifact's graphs were exported with (its KV cache dtype)."""
    kv = next((t.dtype for t in manifest.graphs["step"].inputs if t.name.startswith(PAST_PREFIX + ".")), None)
    if float_precision(kv) is None:
        raise TiDARError(f"the artifact's step graph has KV cache dtype {kv!r}; expected one of "
                         f"{', '.join(FLOAT_PRECISIONS.values())}")
    return float_precision(kv)


def weight_only_block_size(manifest: Manifest, artifact_dir: Path) -> int | None:
    """The block size of a weight-only artifact, from the recipe `tidar-export quantize` wrote
    beside it (quantization.json); None when there is no readable recipe."""
    from tidar_export.quantize.artifact import SIDECAR

    try:
        recipe = json.loads((Path(artifact_dir) / SIDECAR).read_text())
    except (OSError, ValueError):
        return None
    block = recipe.get("block_size") if isinstance(recipe, dict) else None
    return block if isinstance(block, int) else None


def check_weight_only(manifest: Manifest, artifact_dir: Path) -> None:
    """Refuse, in one line and before TensorRT is touched, a weight-only artifact TensorRT cannot
    parse or has no kernels for: the lowering `tidar-export quantize` chose is the target's."""
    precision, target = manifest.precision, manifest.target
    if target == "ort":
        raise TiDARError(
            f"{artifact_dir} holds {precision} weights as ONNX Runtime's com.microsoft MatMulNBits (target ort), which "
            f"TensorRT's ONNX parser does not read: export for trt-10.15 and quantize that with --precision int4")
    if precision != "int4":  # `quantize` writes int8-wo for target ort only
        raise TiDARError(f"{artifact_dir}: {precision} is lowered for target ort only; TensorRT's block-quantized "
                         f"weights are INT4: quantize a trt-10.15 artifact with --precision int4")
    opset = manifest.versions.get("opsets", {}).get("ai.onnx")
    if target == "trt-10.3" or (opset is not None and opset < TRT_INT4_MIN_OPSET):
        why = (f"the trt-10.3 graphs are opset {opset} and TensorRT 10.3's ONNX parser reads opsets 9..20"
               if target == "trt-10.3" else f"the {target} graphs are opset {opset}")
        raise TiDARError(
            f"{artifact_dir}: int4 weight-only engines need block-quantized INT4 DequantizeLinear (ONNX opset >= "
            f"{TRT_INT4_MIN_OPSET}); {why}: export for trt-10.15 and quantize that")
    import tidar_graphs

    blocks = " or ".join(map(str, tidar_graphs.get_target(target).int4_block_sizes))
    block = weight_only_block_size(manifest, artifact_dir)
    if block is None:
        raise TiDARError(f"{artifact_dir}: no readable quantization.json, so the int4 block size is unknown "
                         f"(TensorRT takes blocks of {blocks}): re-quantize it")
    if block not in tidar_graphs.get_target(target).int4_block_sizes:
        raise TiDARError(
            f"{artifact_dir}: int4 blocks of {block}, and TensorRT's INT4 weights take per-block scales with blocks of "
            f"{blocks} only: re-quantize with --block-size {blocks}")


def _onnx_files(manifest: Manifest, artifact_dir: Path, precision: str) -> dict[str, str]:
    """The ONNX file of each graph. fp32/fp16/bf16: the artifact's own graphs, whose dtype must be
    the one asked for. int8/fp8/int4: a quantized artifact (`tidar-export quantize`), whose graphs
    are the explicit Q/DQ or weight-only graphs; an unquantized artifact is refused with the
    command to run."""
    files = {kind: manifest.graphs[kind].file for kind in GRAPH_KINDS}
    if manifest.precision in QUANTIZED:
        kind = "weight-only" if manifest.precision in WEIGHT_ONLY else "Q/DQ"
        if precision != manifest.precision:
            raise TiDARError(
                f"--precision {precision}: {artifact_dir} holds {manifest.precision} {kind} graphs, and strongly "
                f"typed engines compute what the graphs say; build it with --precision {manifest.precision}, or "
                f"build the artifact it was quantized from")
        if manifest.precision in WEIGHT_ONLY:
            check_weight_only(manifest, artifact_dir)
        return files
    base = base_precision(manifest)
    if precision in QUANTIZED:
        kind = "weight-only quantized" if precision in WEIGHT_ONLY else "explicitly quantized (Q/DQ)"
        raise TiDARError(
            f"--precision {precision}: the graphs of {artifact_dir} are {base}; {precision} engines are built from "
            f"{kind} graphs: run `tidar-export quantize {artifact_dir} -o QUANTIZED_DIR "
            f"--precision {precision}` and build QUANTIZED_DIR")
    if precision != base:
        raise TiDARError(
            f"--precision {precision}: the artifact's graphs are {base}, and strongly typed engines take "
            f"their precision from the ONNX types; re-export with --dtype {precision} (or build with "
            f"--precision {base})")
    return files


def _dim_range(name: str | int, manifest: Manifest, prefill_opt_len: int) -> tuple[int, int, int]:
    """(min, opt, max) of one named dimension; fixed dims give min = opt = max."""
    if isinstance(name, int):
        return name, name, name
    value = manifest.dims.get(name)
    if value is not None:
        return value, value, value
    if name == "prefill_batch":
        # The runtime prefills one row per call; larger batches are allowed up to max_batch.
        return 1, 1, manifest.max_batch
    if name == "prompt_len":
        # Every prompt a TiDAR decode accepts: P + b <= max_seq_len (docs/DECISIONS.md).
        hi = manifest.max_seq_len - manifest.block_size
        if hi < 1:
            raise TiDARError(f"max_seq_len {manifest.max_seq_len} leaves no room for a prompt before the "
                             f"{manifest.block_size} mask slots of the prefill")
        return 1, max(1, min(prefill_opt_len, hi)), hi
    raise TiDARError(f"the manifest's dimension {name!r} is dynamic and has no profile range")


def graph_profile(manifest: Manifest, kind: str, prefill_opt_len: int = DEFAULT_PREFILL_OPT_LEN
                  ) -> dict[str, tuple[Shape, Shape, Shape]]:
    """The optimization profile of one graph: every input's (min, opt, max) shape."""
    profile = {}
    for t in manifest.graphs[kind].inputs:
        ranges = [_dim_range(d, manifest, prefill_opt_len) for d in t.shape]
        profile[t.name] = tuple(tuple(r[i] for r in ranges) for i in range(3))
    return profile


def build_settings(manifest: Manifest, artifact_dir: str | os.PathLike, *, precision: str | None = None,
                   timing_cache: str | os.PathLike | None = None, optimization_level: int | None = None,
                   hardware_compat: str | None = None, version_compat: bool = False,
                   weight_streaming: bool = False, tf32: bool = False,
                   prefill_opt_len: int = DEFAULT_PREFILL_OPT_LEN) -> BuildSettings:
    """Everything the builder will do, derived from the manifest and the options (no TensorRT)."""
    artifact_dir = Path(artifact_dir)
    missing = [k for k in GRAPH_KINDS if k not in manifest.graphs]
    if missing:
        raise TiDARError(f"{artifact_dir}: the manifest has no {', '.join(missing)} graph")
    precision = precision or (manifest.precision if manifest.precision in QUANTIZED else base_precision(manifest))
    if precision not in PRECISIONS:
        raise TiDARError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if optimization_level is not None and not 0 <= optimization_level <= 5:
        raise TiDARError(f"--builder-optimization-level must be 0..5, got {optimization_level}")
    if hardware_compat is not None and hardware_compat not in HARDWARE_COMPAT:
        raise TiDARError(f"unknown hardware compatibility {hardware_compat!r}: choose {', '.join(HARDWARE_COMPAT)}")
    if prefill_opt_len < 1:
        raise TiDARError(f"--prefill-opt-len must be >= 1, got {prefill_opt_len}")
    if tf32 and precision != "fp32":
        raise TiDARError(f"--tf32 applies to fp32 engines only (this build is {precision})")
    files = _onnx_files(manifest, artifact_dir, precision)
    graphs = tuple(GraphBuild(kind, files[kind], f"{kind}.engine", graph_profile(manifest, kind, prefill_opt_len))
                   for kind in GRAPH_KINDS)
    flags = tuple(name for name, on in (("TF32", tf32), ("VERSION_COMPATIBLE", version_compat),
                                        ("WEIGHT_STREAMING", weight_streaming)) if on)
    return BuildSettings(
        artifact_dir=artifact_dir, precision=precision, graphs=graphs, flags=flags,
        timing_cache=None if timing_cache is None else Path(timing_cache),
        optimization_level=optimization_level, hardware_compat=hardware_compat,
        version_compat=version_compat, weight_streaming=weight_streaming, tf32=tf32,
    )


# --------------------------------------------------------------------------- TensorRT side


def polygraphy_profile(shapes: dict[str, tuple[Shape, Shape, Shape]]):
    """Polygraphy's optimization Profile for (min, opt, max) shapes by input name (`graph_profile`)."""
    from polygraphy.backend.trt import Profile

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    return profile


def polygraphy_loaders(settings: BuildSettings, graph: GraphBuild, trt=None):
    """Polygraphy's (network, config) loaders for one graph; nothing is built until called.

    `trt` (the tensorrt module) is needed only to name a hardware compatibility level.
    """
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath

    hw_level = None
    if settings.hardware_compat == "ampere+":
        hw_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    config = CreateConfig(
        profiles=[polygraphy_profile(graph.profile)],
        tf32=settings.tf32,
        load_timing_cache=None if settings.timing_cache is None else str(settings.timing_cache),
        builder_optimization_level=settings.optimization_level,
        hardware_compatibility_level=hw_level,
        version_compatible=settings.version_compat or None,
        weight_streaming=settings.weight_streaming or None,
    )
    network = NetworkFromOnnxPath(str(settings.artifact_dir / graph.onnx), strongly_typed=settings.strongly_typed)
    return network, config


class PolygraphyCompiler:
    """Builds serialized engines with Polygraphy; needs tensorrt, polygraphy and a GPU."""

    def __init__(self, device: int = 0):
        self.trt = import_tensorrt()
        try:
            import polygraphy.backend.trt  # noqa: F401
        except ImportError:
            raise TiDARError("polygraphy is not installed: pip install polygraphy") from None
        self.device = device

    def platform(self) -> Platform:
        from tidar_runtime.backends import cuda

        api = cuda.load()
        api.set_device(self.device)
        return device_platform(self.trt.__version__, api.device_info(self.device))

    def compile(self, settings: BuildSettings, graph: GraphBuild):
        """The serialized engine (an IHostMemory: a buffer) of one graph."""
        from polygraphy.backend.trt import EngineBytesFromNetwork
        from polygraphy.exception import PolygraphyException

        network, config = polygraphy_loaders(settings, graph, self.trt)
        cache = None if settings.timing_cache is None else str(settings.timing_cache)
        try:
            return EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)()
        except PolygraphyException as e:
            raise TiDARError(f"{graph.kind}: TensorRT could not build {graph.onnx} ({first_line(e)}); "
                             "its log above has the details") from None


def engine_info(settings: BuildSettings, graph: GraphBuild, platform: Platform, nbytes: int,
                seconds: float) -> dict:
    """What a runtime needs to know about an engine before deserializing it (manifest)."""
    return {
        "tensorrt": platform.tensorrt,
        "gpu": platform.gpu,
        "compute_capability": platform.compute_capability,
        # The build platform: an engine runs only where these are the same (check_engine_compat).
        "os": platform.os,
        "cpu_arch": platform.cpu_arch,
        "integrated_gpu": platform.integrated_gpu,
        "hardware_compat": settings.hardware_compat,
        "version_compatible": settings.version_compat,
        "weight_streaming": settings.weight_streaming,
        "precision": settings.precision,
        "onnx": graph.onnx,
        "strongly_typed": settings.strongly_typed,
        "flags": list(settings.flags),
        "builder_optimization_level": settings.optimization_level,
        "profile": {name: [list(s) for s in shapes] for name, shapes in graph.profile.items()},
        "bytes": nbytes,
        "build_s": round(seconds, 1),
    }


def _write_temp(directory: Path, name: str, blob) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, usual_mode())  # mkstemp creates owner-only files; engines get the usual modes
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def attention_warnings(manifest: Manifest, directory: Path) -> list[str]:
    """`tidar_export.export.check.attention_warnings` over the artifact's graphs (structure only)."""
    from tidar_export.export.check import attention_warnings as warnings_for, load_graph

    if manifest.target != "trt-10.15":
        return []
    return warnings_for(manifest, {k: load_graph(directory, spec, manifest) for k, spec in manifest.graphs.items()})


def build_engines(settings: BuildSettings, log: Callable[[str], None] = print, compiler=None) -> Manifest:
    """Build every engine, then move them into place and update the manifest.

    `compiler` (default: PolygraphyCompiler) has `platform() -> Platform` and
    `compile(settings, graph) -> buffer`. Engines are written to temp files first; a failure
    removes them and leaves the artifact as it was.
    """
    compiler = compiler or PolygraphyCompiler()
    directory = settings.artifact_dir
    manifest = load_manifest(directory)
    platform = compiler.platform()
    if settings.hardware_compat and platform.integrated_gpu:
        raise TiDARError(f"--hardware-compat {settings.hardware_compat}: TensorRT does not support hardware "
                         f"compatibility on JetPack (this is an integrated GPU, {platform.gpu}); build without it")
    log(f"TensorRT {platform.tensorrt} on {platform.gpu} (compute capability {platform.compute_capability}, "
        f"{platform.os}/{platform.cpu_arch}, {'integrated' if platform.integrated_gpu else 'discrete'} GPU), "
        f"{settings.precision}" + (f", flags {', '.join(settings.flags)}" if settings.flags else ""))
    for line in attention_warnings(manifest, directory):
        log(f"warning: {line}")
    built: list[tuple[GraphBuild, Path, dict]] = []
    with tempfile.TemporaryDirectory(prefix="tidar-build.") as scratch:
        if settings.timing_cache is None:  # the three graphs share most tactics: share one cache
            settings = dataclasses.replace(settings, timing_cache=Path(scratch) / "timing.cache")
        try:
            for graph in settings.graphs:
                log(f"{graph.kind}: building {graph.engine} from {graph.onnx} ...")
                t0 = time.perf_counter()
                tmp = _write_temp(directory, graph.engine, compiler.compile(settings, graph))
                seconds = time.perf_counter() - t0
                nbytes = tmp.stat().st_size
                built.append((graph, tmp, engine_info(settings, graph, platform, nbytes, seconds)))
                log(f"{graph.kind}: {nbytes / 2**20:.1f} MiB in {seconds:.1f}s")
            for graph, tmp, info in built:
                os.replace(tmp, directory / graph.engine)
                spec = manifest.graphs[graph.kind]
                spec.engine, spec.engine_info = graph.engine, info
        except BaseException:
            for _, tmp, _ in built:
                tmp.unlink(missing_ok=True)
            raise
    manifest.versions["tensorrt"] = platform.tensorrt
    manifest.save(directory)
    return manifest


# --------------------------------------------------------------------------- command line
