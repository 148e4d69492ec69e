"""`tidar-export compare`: the same inputs through torch, ONNX Runtime and TensorRT (docs/QUANTIZATION.md).

    tidar-export compare ARTIFACT_DIR --checkpoint CKPT [--graphs prefill,step] [--localize] [--no-trt]

Per graph, one set of inputs (a prompt for the prefill; drafts, per-row cache lengths and a
random cache for the step graphs) runs through every runner that exists here:
- `torch`: the reference model's own forward (as `check` runs it), a Polygraphy runner;
- `onnxrt`: the artifact's ONNX graph in ONNX Runtime (CPU), Polygraphy's OnnxrtRunner;
- `tensorrt`: the artifact's engine (when it was built) or an engine built from the graph,
  Polygraphy's TrtRunner -- only where tensorrt and a GPU exist.
Polygraphy's Comparator runs them and its SimpleCompareFunc checks `logits` and every
`present.*` against per-output tolerances (elementwise |a - b| <= atol + rtol * |b|, b the
first runner). `token_ids` is checked with `check`'s rule: equal, except at a near tie.
An AWQ artifact whose o_proj scale s is folded into v_proj keeps V / s in its cache
(quantization.json `value_cache_scales`): its runners are fed past V / s and their present V
is multiplied by s, so that a cache means the same to every runner.

On a failure (or with `--localize`) the graphs are run again with intermediate outputs marked
(the embedding, each decoder layer's attention and MLP outputs and residual stream, the final
norm: the tensor that leaves each module's node-name scope, e.g. `/model/layers.2/mlp/`) and
torch forward hooks on the same modules; the report names the first module, in execution
order, whose output differs by more than its tolerance: where the outputs first diverge.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tidar_export.export import check
from tidar_export.errors import TiDARError
from tidar_runtime.contract import CACHE_LEN, INPUT_IDS, LOGITS, PAST_PREFIX, PRESENT_PREFIX, TOKEN_IDS, ids_input
from tidar_runtime.manifest import GRAPH_KINDS, Manifest, load_manifest

# (atol, rtol) per precision and output family. fp32/fp16/bf16 are check.py's; the others are
# quantized graphs against the fp32 torch model (docs/QUANTIZATION.md, "Comparing runtimes").
# int8/fp8: a first setting. int4/int8-wo: measured on compare's own inputs (ONNX Runtime CPU
# vs torch) for the demo model (max_seq_len 256; int4 AWQ blocks 32/128, RTN 128, tables kept
# or not, trt-10.15 blocks 64/128; int8-wo AWQ 32, RTN 128) and a tiny random model (std
# 1/sqrt(fan_in), ort and trt-10.15). Largest atol needed at rtol 0.1, demo / tiny: int4 logits
# 3.31 / 1.92, present 1.26 / 1.22; int8-wo logits 0.23 / 0.13, present 0.065 / 0.067.
TOLERANCES = {
    **check.TOLERANCES,
    "int8": {"logits": (1.0, 0.1), "present": (0.5, 0.1)},
    "fp8": {"logits": (2.0, 0.2), "present": (1.0, 0.2)},
    "int4": {"logits": (5.0, 0.1), "present": (2.0, 0.1)},
    "int8-wo": {"logits": (0.5, 0.1), "present": (0.2, 0.1)},
}
# Intermediate tensors: max |a - b| relative to max |b| of the tensor, per precision (they only
# localize a failure). Measured maxima, demo / tiny: int4 0.46 / 0.73, int8-wo 0.021 / 0.041.
HIDDEN_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": 0.1, "fp8": 0.2, "int4": 0.75,
                    "int8-wo": 0.08}


@dataclass
class Divergence:
    """One marked intermediate tensor, compared between two runners."""

    module: str  # "/model/layers.2/mlp"
    tensor: str  # the ONNX tensor that leaves that scope
    max_abs: float
    scale: float  # max |reference| of the tensor
    ok: bool

    @property
    def rel(self) -> float:
        return self.max_abs / max(self.scale, 1e-12)


@dataclass
class GraphComparison:
    kind: str
    case: str
    runners: list[str]
    results: list = field(default_factory=list)  # check.OutputResult per runner pair and output
    layers: dict[tuple[str, str], list[Divergence]] = field(default_factory=dict)  # per runner pair
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def first_divergence(self, pair: tuple[str, str]) -> Divergence | None:
        return next((d for d in self.layers.get(pair, []) if not d.ok), None)


# --------------------------------------------------------------------------- marked tensors


def module_scopes(num_layers: int) -> list[tuple[str, str]]:
    """(ONNX node-name scope, torch module path) in execution order."""
    scopes = [("/model/embed_tokens", "model.embed_tokens")]
    for i in range(num_layers):
        scopes += [(f"/model/layers.{i}/self_attn", f"model.layers.{i}.self_attn"),
                   (f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp"),
                   (f"/model/layers.{i}", f"model.layers.{i}")]
    scopes.append(("/model/norm", "model.norm"))
    return scopes


def scope_outputs(model, scopes: list[str]) -> dict[str, str | None]:
    """For each scope, the one tensor produced inside it and consumed by a scoped node outside it
    (graph outputs excluded); None when there is not exactly one. Nodes without a scope (Q/DQ
    nodes that a quantizer inserted) are transparent."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    inferred = onnx.shape_inference.infer_shapes(model)  # shape computations (int64) are not activations
    is_float = {v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)
                if v.type.tensor_type.elem_type in floats}
    graph_outputs = {o.name for o in model.graph.output}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    # Unscoped nodes (QuantizeLinear -> DequantizeLinear chains) are followed to their consumers.
    node_outputs = {n.name: list(n.output) for n in model.graph.node}

    def scoped_consumers(tensor: str, depth: int = 0) -> list[str]:
        out = []
        for c in consumers.get(tensor, []):
            if c.startswith("/"):
                out.append(c)
            elif depth < 4:
                for o in node_outputs.get(c, []):
                    out += scoped_consumers(o, depth + 1)
        return out

    found = {}
    for scope in scopes:
        prefix = scope + "/"
        leaving = [t for t, p in producer.items() if p.startswith(prefix) and t not in graph_outputs and t in is_float
                   and any(not c.startswith(prefix) for c in scoped_consumers(t))]
        found[scope] = leaving[0] if len(leaving) == 1 else None
    return found


@contextlib.contextmanager
def marked_graph(path: Path, tensors: list[str]):
    """A copy of the graph at `path` with `tensors` added as graph outputs.

    The copy is a hidden temp file beside the original, removed on exit: its external weight
    references must resolve inside the same directory (ONNX Runtime refuses a path that
    escapes the model's directory, symlinks included), and the weights are not copied.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    for t in tensors:
        if t not in have:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))  # type from inference
    fd, tmp = tempfile.mkstemp(prefix=f".compare.{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


# --------------------------------------------------------------------------- runners


def _base_runner():
    from polygraphy.backend.base import BaseRunner

    return BaseRunner


def torch_runner(model, manifest: Manifest, kind: str, marks: dict[str, str]):
    """A Polygraphy runner over the reference model; `marks` maps ONNX tensor -> torch module path
    whose forward output is returned under the tensor's name."""
    import torch

    from tidar_export.model.reference import reference_outputs

    class TorchRunner(_base_runner()):
        def __init__(self):
            super().__init__(name="torch", prefix="torch-runner")

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata

            meta = TensorMetadata()
            for t in manifest.graphs[kind].inputs:
                meta.add(t.name, np.dtype(t.dtype) if t.dtype != "bfloat16" else np.float32,
                         [d if isinstance(d, int) else manifest.dims.get(d) or -1 for d in t.shape])
            return meta

        def infer_impl(self, feed_dict):
            captured, handles = {}, []
            modules = dict(model.named_modules())
            for tensor, path in marks.items():
                def hook(_m, _inp, out, tensor=tensor):
                    captured[tensor] = (out[0] if isinstance(out, tuple) else out).detach().float().numpy()
                handles.append(modules[path].register_forward_hook(hook))
            t0 = time.perf_counter()
            try:
                feeds = {k: torch.from_numpy(np.asarray(v)) for k, v in feed_dict.items()}
                dtype = next(p.dtype for p in model.parameters())
                feeds = {k: v.to(dtype) if v.is_floating_point() else v for k, v in feeds.items()}
                out = reference_outputs(model, manifest, kind, feeds)
            finally:
                for h in handles:
                    h.remove()
            self.inference_time = time.perf_counter() - t0
            return OrderedDict(list(out.items()) + list(captured.items()))

    return TorchRunner()


def onnxrt_runner(path: Path, inplace: bool = False):
    """Polygraphy's OnnxrtRunner; for an "inplace" graph a runner that binds present.* to the
    past buffers as the runtime does (tidar_runtime.backends.ort.run_graph), since such a graph
    (GroupQueryAttention over a shared buffer) writes only the new slots."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    if not inplace:
        return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name="onnxrt")
    import onnxruntime as ort

    from tidar_runtime.backends.ort import run_graph

    class AliasingOnnxrtRunner(_base_runner()):
        def __init__(self):
            super().__init__(name="onnxrt", prefix="onnxrt-runner")

        def activate_impl(self):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def deactivate_impl(self):
            del self.session

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata

            meta, dtypes = TensorMetadata(), {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                                              "tensor(int64)": np.int64, "tensor(int32)": np.int32}
            for t in self.session.get_inputs():
                meta.add(t.name, dtypes.get(t.type, np.float32), [d if isinstance(d, int) else -1 for d in t.shape])
            return meta

        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            out = run_graph(self.session, {k: np.asarray(v) for k, v in feed_dict.items()}, inplace=True)
            self.inference_time = time.perf_counter() - t0
            return OrderedDict(out)

    return AliasingOnnxrtRunner()


def tensorrt_runner(manifest: Manifest, artifact_dir: Path, kind: str, onnx_path: Path | None, marks: list[str]):
    """Polygraphy's TrtRunner: the built engine, or (for marked outputs, or when none was built)
    an engine built from the graph with the build command's profile (strongly typed)."""
    from polygraphy.backend.trt import (CreateConfig, EngineFromBytes, EngineFromNetwork, ModifyNetworkOutputs,
                                        NetworkFromOnnxPath, TrtRunner)
    from polygraphy.backend.common import BytesFromPath

    from tidar_export.engines.build import graph_profile, polygraphy_profile

    spec = manifest.graphs[kind]
    if spec.engine and not marks:
        return TrtRunner(EngineFromBytes(BytesFromPath(str(artifact_dir / spec.engine))), name="tensorrt")
    profile = polygraphy_profile(graph_profile(manifest, kind))
    network = NetworkFromOnnxPath(str(onnx_path or artifact_dir / spec.file), strongly_typed=True)
    if marks:
        network = ModifyNetworkOutputs(network, outputs=[o.name for o in spec.outputs] + marks)
    return TrtRunner(EngineFromNetwork(network, config=CreateConfig(profiles=[profile])), name="tensorrt")


def value_cache_scales(artifact_dir: Path, manifest: Manifest) -> dict[int, np.ndarray]:
    """Layer -> s ([kv_heads, 1, head_dim]) for an AWQ artifact whose V cache holds V / s (the
    o_proj scale folded into v_proj; quantization.json `value_cache_scales`); {} otherwise."""
    import json

    from tidar_export.quantize.artifact import SIDECAR

    path = artifact_dir / SIDECAR
    if not path.is_file():
        return {}
    recipe = json.loads(path.read_text())
    kv, hd = manifest.num_kv_heads, manifest.head_dim
    return {int(layer): np.asarray(v, np.float32).reshape(kv, 1, hd)
            for layer, v in (recipe.get("value_cache_scales") or {}).items()}


def cache_scaled_runner(inner, scales: dict[int, np.ndarray]):
    """`inner` (a Polygraphy runner over the artifact's graph) seen in the reference model's cache
    units: past V divided by s on the way in, present V multiplied by s on the way out, so the
    same cache means the same thing to every runner (value_cache_scales)."""

    class CacheScaledRunner(_base_runner()):
        def __init__(self):
            super().__init__(name=inner.name, prefix="cache-scaled-runner")

        def activate_impl(self):
            inner.activate()

        def deactivate_impl(self):
            inner.deactivate()

        def get_input_metadata_impl(self):
            return inner.get_input_metadata(use_numpy_dtypes=False)

        def infer_impl(self, feed_dict):
            feeds = OrderedDict(feed_dict)
            for i, sc in scales.items():
                name = f"{PAST_PREFIX}.{i}.value"
                if name in feeds:
                    v = np.asarray(feeds[name])
                    feeds[name] = (v / sc).astype(v.dtype)
            out = OrderedDict((k, np.array(v)) for k, v in inner.infer(feeds, check_inputs=False).items())
            for i, sc in scales.items():
                name = f"{PRESENT_PREFIX}.{i}.value"
                if name in out:
                    out[name] = (out[name] * sc).astype(out[name].dtype)
            self.inference_time = inner.last_inference_time()
            return out

    return CacheScaledRunner()


@contextlib.contextmanager
def _quiet_polygraphy():
    """Polygraphy logs every runner's inputs and outputs at INFO: keep its warnings and errors."""
    from polygraphy.logger import G_LOGGER

    before = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.WARNING
    try:
        yield
    finally:
        G_LOGGER.module_severity = before


def has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


# --------------------------------------------------------------------------- inputs


def compare_inputs(manifest: Manifest, kind: str, seed: int = 0) -> tuple[str, OrderedDict]:
    """One typical case: a prompt of min(2b + 3, max) tokens; every row at its own cache length."""
    rng = np.random.default_rng(seed)
    S, b, B, V = manifest.max_seq_len, manifest.block_size, manifest.max_batch, manifest.vocab_size
    spec = manifest.graphs[kind]
    if kind == "prefill":
        P = min(2 * b + 3, S - b)
        return f"batch=1 prompt_len={P}", OrderedDict({INPUT_IDS: rng.integers(0, V, (1, P)).astype(np.int64)})
    T = manifest.step_len if kind == "step" else 1
    lengths = rng.integers(1, S - T + 1, size=B).astype(np.int64)
    feeds = OrderedDict()
    feeds[ids_input(kind)] = rng.integers(0, V, (B, b if kind == "step" else 1))
    feeds[CACHE_LEN] = lengths
    for t in spec.inputs:
        if t.name.startswith(PAST_PREFIX + "."):
            shape = [d if isinstance(d, int) else manifest.dims[d] for d in t.shape]
            dtype = np.float16 if t.dtype == "float16" else np.float32
            feeds[t.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return f"batch={B} cache_len={lengths.tolist()}", feeds


def _precision(manifest: Manifest) -> str:
    if manifest.precision not in TOLERANCES:
        raise TiDARError(f"compare has no tolerances for precision {manifest.precision!r}")
    return manifest.precision


def reference_model(checkpoint, manifest: Manifest):
    """The torch model in the dtype of the artifact's graph I/O (fp32 for quantized graphs)."""
    from tidar_export.engines.build import base_precision
    from tidar_export.export.tracing import torch_dtype
    from tidar_export.model.reference import load_artifact_model

    base = base_precision(manifest)
    if base == "bf16":
        raise TiDARError("compare cannot feed bfloat16 caches from numpy (ONNX Runtime CPU has no bf16 kernels "
                         "either); compare the fp32 or fp16 artifact")
    return load_artifact_model(checkpoint, manifest, torch_dtype(base))


# --------------------------------------------------------------------------- comparing


def _polygraphy_compare(run_results, outputs: list[str], precision: str, pairs, case: str, kind: str,
                        names: list[str]) -> list:
    """Polygraphy's SimpleCompareFunc on logits and present.*, check's tie rule on token_ids."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    tol = TOLERANCES[precision]
    family = lambda n: "logits" if n == LOGITS else "present"  # noqa: E731
    floats = [n for n in outputs if n != TOKEN_IDS]
    func = SimpleCompareFunc(
        atol={"": tol["present"][0], **{n: tol[family(n)][0] for n in floats}},
        rtol={"": tol["present"][1], **{n: tol[family(n)][1] for n in floats}},
        check_error_stat="elemwise",
        find_output_func=lambda name, index, result: [name] if name in floats else [],
    )
    index = {n: i for i, n in enumerate(names)}
    with _quiet_polygraphy():
        accuracy = Comparator.compare_accuracy(run_results, compare_func=func,
                                               comparisons=[(index[a], index[b]) for b, a in pairs])
    results = []
    for (ref, other) in pairs:
        per_output = accuracy[0][(other, ref)][0]  # iteration 0 of `other` against the reference
        pair = f"{other} vs {ref}"
        for name in floats:
            r = per_output[name]
            atol, rtol = tol[family(name)]
            res = check.OutputResult(kind, f"{case} {pair}", name, float(r.max_absdiff), float(r.mean_absdiff),
                                     float(r.max_reldiff), float(r.mean_reldiff), f"atol={atol:.0e} rtol={rtol:.0e}",
                                     bool(r))
            if not res.ok:
                res.detail = f"outside {res.tolerance} (max abs {res.max_abs:.3g}, max rel {res.max_rel:.3g})"
            results.append(res)
        ref_out, other_out = run_results[ref][0], run_results[other][0]
        if TOKEN_IDS in outputs:
            res = check.compare_tokens(kind, f"{case} {pair}", np.asarray(other_out[TOKEN_IDS]),
                                        np.asarray(ref_out[TOKEN_IDS]), np.asarray(ref_out[LOGITS], np.float64),
                                        *tol["logits"])
            results.append(res)
    return results


def _divergences(run_results, marks: list[tuple[str, str]], pair, precision: str) -> list[Divergence]:
    ref, other = pair
    a, b = run_results[other][0], run_results[ref][0]
    out = []
    for scope, tensor in marks:
        if tensor not in a or tensor not in b:
            continue
        x, y = np.asarray(a[tensor], np.float64), np.asarray(b[tensor], np.float64)
        if x.shape != y.shape:
            out.append(Divergence(scope, tensor, float("nan"), 0.0, False))
            continue
        scale = float(np.abs(y).max()) if y.size else 0.0
        diff = float(np.abs(x - y).max()) if y.size else 0.0
        d = Divergence(scope, tensor, diff, scale, True)
        d.ok = bool(d.rel <= HIDDEN_TOLERANCE[precision])  # NaN fails
        out.append(d)
    return out


def compare_graph(artifact_dir: Path, manifest: Manifest, kind: str, model=None, *, use_trt: bool = True,
                  localize: bool = False, seed: int = 0) -> GraphComparison:
    """Torch / ONNX Runtime / TensorRT on one set of inputs of one graph; see the module doc."""
    from polygraphy.comparator import Comparator

    precision = _precision(manifest)
    spec = manifest.graphs[kind]
    case, feeds = compare_inputs(manifest, kind, seed)
    outputs = [o.name for o in spec.outputs]
    names = (["torch"] if model is not None else []) + ["onnxrt"] + (["tensorrt"] if use_trt else [])
    if len(names) < 2:
        raise TiDARError("compare needs two runners: pass --checkpoint (torch) or run where TensorRT exists")
    report = GraphComparison(kind, case, names)
    v_scales = value_cache_scales(artifact_dir, manifest)
    own = (lambda r: cache_scaled_runner(r, v_scales)) if v_scales else (lambda r: r)  # noqa: E731
    pairs = [(names[0], n) for n in names[1:]] + ([("onnxrt", "tensorrt")] if len(names) == 3 else [])

    def run(marks: list[tuple[str, str]]):
        tensors = [t for _, t in marks]
        graph = marked_graph(artifact_dir / spec.file, tensors) if tensors else contextlib.nullcontext(
            artifact_dir / spec.file)
        with graph as path:
            runners = []
            if model is not None:
                torch_paths = dict(module_scopes(manifest.num_layers))
                runners.append(torch_runner(model, manifest, kind, {t: torch_paths[s] for s, t in marks}))
            runners.append(own(onnxrt_runner(path, spec.kv_update == "inplace")))
            if use_trt:
                runners.append(own(tensorrt_runner(manifest, artifact_dir, kind, path if tensors else None, tensors)))
            with _quiet_polygraphy():
                return Comparator.run(runners, data_loader=[feeds])

    report.results = _polygraphy_compare(run([]), outputs, precision, pairs, case, kind, names)
    if localize or not report.ok:
        import onnx

        proto = onnx.load(str(artifact_dir / spec.file), load_external_data=False)
        scopes = module_scopes(manifest.num_layers)
        found = scope_outputs(proto, [s for s, _ in scopes])
        marks = [(s, found[s]) for s, _ in scopes if found[s] is not None]
        missing = [s for s, _ in scopes if found[s] is None]
        if missing:
            report.notes.append(f"no single output tensor found for {', '.join(missing)} (not marked)")
        marked = run(marks)
        for pair in pairs:
            report.layers[pair] = _divergences(marked, marks, pair, precision)
    return report


def compare_artifact(artifact_dir: str | os.PathLike, checkpoint=None, *, graphs=GRAPH_KINDS, use_trt=None,
                     localize: bool = False, seed: int = 0, log=None) -> list[GraphComparison]:
    artifact_dir = Path(artifact_dir)
    log = log or (lambda msg: None)
    manifest = load_manifest(artifact_dir)
    unknown = [g for g in graphs if g not in manifest.graphs]
    if unknown:
        raise TiDARError(f"unknown graph {unknown[0]!r}: the artifact has {', '.join(manifest.graphs)}")
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise TiDARError("compare uses Polygraphy's comparator: pip install polygraphy") from None
    if use_trt is None:
        use_trt = has_tensorrt()
    model = reference_model(checkpoint, manifest) if checkpoint is not None else None
    v_scales = value_cache_scales(artifact_dir, manifest)
    if v_scales:
        log(f"AWQ artifact: its V cache holds V / s in layers {', '.join(map(str, sorted(v_scales)))}; the caches "
            f"of its runners are scaled to the reference's units on the way in and out")
    reports = []
    for kind in graphs:
        t0 = time.perf_counter()
        rep = compare_graph(artifact_dir, manifest, kind, model, use_trt=use_trt, localize=localize, seed=seed)
        log(f"{kind}: {' / '.join(rep.runners)} on {rep.case}: {'ok' if rep.ok else 'FAILED'} "
            f"({time.perf_counter() - t0:.1f}s)")
        reports.append(rep)
    return reports


FAILURES_SHOWN = 3  # failures per output in the one-line error; every one goes to the report file
FAILURE_CHARS = 200  # characters of one failure in the one-line error


def _output_family(name: str) -> str:
    """present.7.key -> present.*.key: the layers of one cache output count as one output."""
    parts = name.split(".")
    return f"{parts[0]}.*.{parts[-1]}" if name.startswith(PRESENT_PREFIX + ".") and len(parts) == 3 else name


def failures(reports: list[GraphComparison]) -> list[str]:
    """Every failure: one line per failing comparison, then where each runner pair first diverges."""
    lines = [r.failure() for rep in reports for r in rep.results if not r.ok]
    for rep in reports:
        for pair in rep.layers:
            d = rep.first_divergence(pair)
            if d is not None and not rep.ok:
                lines.append(f"{rep.kind} {pair[1]} vs {pair[0]} first diverges at {d.module}")
    return lines


def worst_failures(reports: list[GraphComparison], limit: int = FAILURES_SHOWN) -> list[str]:
    """Per graph and output, the `limit` failures of largest max abs error (cut to FAILURE_CHARS),
    and how many more there are; then where each runner pair first diverges."""
    groups: dict[tuple[str, str], list] = {}
    for rep in reports:
        for r in rep.results:
            if not r.ok:
                groups.setdefault((r.graph, _output_family(r.output)), []).append(r)
    lines = []
    for (graph, output), rs in groups.items():
        rs.sort(key=lambda r: -r.max_abs if r.max_abs == r.max_abs else float("-inf"))
        lines += [r.failure()[:FAILURE_CHARS] for r in rs[:limit]]
        if len(rs) > limit:
            lines.append(f"{graph} {output}: {len(rs) - limit} more")
    return lines + [line for line in failures(reports) if " first diverges at " in line]


def format_report(reports: list[GraphComparison], verbose: bool = False) -> str:
    lines = [check.format_table([r for rep in reports for r in rep.results], verbose)]
    for rep in reports:
        for pair, layers in rep.layers.items():
            ref, other = pair
            first = rep.first_divergence(pair)
            where = (f"first divergence at {first.module} (tensor {first.tensor}): max abs {first.max_abs:.3g}, "
                     f"{first.rel:.2e} of its scale" if first else "no marked module exceeds its tolerance")
            lines.append(f"{rep.kind} {other} vs {ref}: {where}")
            if verbose or first:
                for d in layers:
                    lines.append(f"  {d.module:<32} {d.tensor:<28} max abs {d.max_abs:.3e}  rel {d.rel:.2e}  "
                                 f"{'ok' if d.ok else 'DIVERGED'}")
        lines += [f"{rep.kind}: note: {n}" for n in rep.notes]
    return "\n".join(lines)
