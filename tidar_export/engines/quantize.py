"""`tidar-export quantize`: quantized artifacts (docs/QUANTIZATION.md).

    tidar-export quantize ARTIFACT -o QUANTIZED --precision int8|fp8|int4|int8-wo [--calibration FILE]

Two families, both calibrated on the real inputs of greedy TiDAR *and* AR decodes of the
calibration prompts (the fp32 artifact in ONNX Runtime; a reservoir keeps at most `samples`
inputs per graph):

- int8 / fp8 (E4M3): explicit Q/DQ on both inputs of every linear layer's MatMul (q/k/v/o,
  gate/up/down; in the ort target's graphs q/k/v and gate/up are one MatMul each, whose output
  columns are the parts' columns, so per-channel scales carry over). Weights per output channel, activations per tensor, symmetric (zero point 0,
  TensorRT's requirement). ONE set of parameters per artifact: an activation's scale belongs to
  its tensor role (the linear layer reading it, a module path that is the same in the three
  graphs) and is calibrated over the inputs of prefill, step and ar_step together, so the AR
  rows inside the TiDAR step see exactly the quantizer `--mode ar` sees. Ranges: max |x|
  (default) or a percentile of |x|; scale = range / 127 (int8) or / 448 (E4M3's largest value).
- int4 / int8-wo: weight-only, block-wise along the input dimension (blocks of 32/64/128),
  symmetric; RTN or an AWQ-style per-channel scale search (s = mean|x|^alpha, alpha picked per
  layer group on calibration rows, 1/s folded into the RMSNorm weight / up_proj / v_proj before
  it; in the ort target's fused gate_up / qkv weights, into their up / v columns). The embedding table and LM head are quantized too (they are a third of the demo model).
  Lowered per target: `ort` -> com.microsoft MatMulNBits (GatherBlockQuantized for the
  embedding); TensorRT targets -> block-quantized INT4 DequantizeLinear on the weights (opset
  21+: trt-10.15; refused for trt-10.3, whose parser reads opsets up to 20).

The three graphs share one `weights.bin` (export.WeightFile: a quantized weight used by several
graphs is stored once); the manifest says `precision: <p>` and names `<kind>.<p>.onnx`;
`quantization.json` beside it records the recipe. Graph inputs and outputs keep their dtypes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tidar_export.errors import TiDARError
from tidar_runtime.paths import confined
from tidar_runtime.manifest import GRAPH_KINDS, Manifest, load_manifest

QUANTIZER_VERSION = "3"  # 2: shared activation scales, own Q/DQ writer, weight-only int4 / int8;
# 3: quantization.json records the V-cache scales of AWQ's v_proj folds (value_cache_scales)
PRECISIONS = ("int8", "fp8", "int4", "int8-wo")
INT8_METHODS = ("minmax", "percentile")  # activation range calibration for int8 / fp8
DEFAULT_INT8_METHOD = "minmax"  # equal to percentile within noise on the demo model, and cheaper (docs/QUANTIZATION.md)
DEFAULT_PERCENTILE = 99.999
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "calibration" / "prompts.txt"
PROMPT_SEPARATOR = "# %%"  # a line of its own before each prompt of a calibration text file
FP8_MIN_OPSET = 19  # DequantizeLinear takes float8 inputs from opset 19 on
SIDECAR = "quantization.json"
# Scopes whose MatMuls stay unquantized: the LM head (its error reaches every logit that the
# verification compares) -- node names are module paths (docs/EXPORT.md).
EXCLUDED_SCOPES = ("/lm_head/", "/adapter/")  # and a draft adapter's small MatMuls: kept float


# --------------------------------------------------------------------------- calibration prompts


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a calibration text file: each follows a line holding only `# %%`."""
    path = Path(path)
    if not path.is_file():
        raise TiDARError(f"calibration prompt file not found: {path}")
    prompts, current = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == PROMPT_SEPARATOR:
            if current is not None and "".join(current).strip():
                prompts.append("\n".join(current).strip("\n") + "\n")
            current = []
        elif current is not None:
            current.append(line)
    if current is not None and "".join(current).strip():
        prompts.append("\n".join(current).strip("\n") + "\n")
    if not prompts:
        raise TiDARError(f"{path}: no prompts (each prompt follows a line holding only {PROMPT_SEPARATOR!r})")
    return prompts


def tokenize_prompts(artifact_dir: Path, manifest: Manifest, texts: Sequence[str]) -> list[list[int]]:
    from tidar_export.train.data import load_tokenizer

    file = manifest.tokenizer.get("file")
    if not file:
        raise TiDARError(f"{artifact_dir} has no tokenizer: calibrate it with token-id prompts "
                         "(quantize_artifact(..., prompts=[[ids], ...]))")
    tok = load_tokenizer(artifact_dir / file)
    return [enc.ids for enc in tok.encode_batch(list(texts), add_special_tokens=False)]


# --------------------------------------------------------------------------- calibration inputs


class _Reservoir:
    """At most `size` items, a uniform sample of everything offered (Algorithm R, seeded)."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.items, self.seen = size, rng, [], 0

    def offer(self, make: Callable[[], dict]) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(make())
            return
        j = int(self.rng.integers(0, self.seen))
        if j < self.size:
            self.items[j] = make()  # `make` copies the cache only when the sample is kept


class RecordingBackend:
    """Wraps an OrtBackend; records the inputs of every graph pass for calibration.

    The step graphs' inputs include the KV cache as it stood before the pass (the backend's
    `cache` arrays), so the calibration sees realistic caches, not random ones.
    """

    def __init__(self, backend, samples: int, seed: int = 0):
        self.backend = backend
        rng = np.random.default_rng(seed)
        self.records = {kind: _Reservoir(samples, rng) for kind in GRAPH_KINDS}

    def __getattr__(self, name):  # block_size, proposals, max_len, max_batch, mask_token_id
        return getattr(self.backend, name)

    def _cached(self, kind: str, feeds: dict) -> None:
        past = dict(zip(self.backend.past_names, self.backend.cache))
        self.records[kind].offer(lambda: {**{k: np.array(v) for k, v in feeds.items()},
                                          **{k: v.copy() for k, v in past.items()}})

    def _prompt(self, prompt) -> None:
        self.records["prefill"].offer(lambda: {"input_ids": np.asarray(prompt, np.int64)[None].copy()})

    def prefill(self, row, prompt, want_logits):
        self._prompt(prompt)
        return self.backend.prefill(row, prompt, want_logits)

    def ar_prefill(self, row, prompt, want_logits):
        self._prompt(prompt)
        return self.backend.ar_prefill(row, prompt, want_logits)

    def step(self, drafts, cache_len, want_logits):
        self._cached("step", {"draft_ids": drafts, "cache_len": cache_len})
        return self.backend.step(drafts, cache_len, want_logits)

    def ar_step(self, tokens, cache_len, want_logits):
        self._cached("ar_step", {"input_ids": tokens, "cache_len": cache_len})
        return self.backend.ar_step(tokens, cache_len, want_logits)


def fit_prompts(prompts: Sequence[Sequence[int]], manifest: Manifest, max_new_tokens: int) -> list[list[int]]:
    """Prompts cut (from the left) so that prefill, `max_new_tokens` and one step fit the cache."""
    room = manifest.max_seq_len - manifest.step_len - max_new_tokens
    if room < 1:
        raise TiDARError(f"max_seq_len {manifest.max_seq_len} leaves no room for a prompt with "
                         f"{max_new_tokens} new tokens and a step of {manifest.step_len}")
    out = [list(map(int, p))[-room:] for p in prompts if len(p)]
    if not out:
        raise TiDARError("no non-empty calibration prompt")
    return out


def collect_calibration_inputs(artifact_dir: Path, prompts: Sequence[Sequence[int]], *, samples: int = 64,
                               max_new_tokens: int = 48, seed: int = 0, log=None) -> dict[str, list[dict]]:
    """Real inputs of every graph, from greedy TiDAR and AR decodes of `prompts` on the artifact."""
    from tidar_runtime import SamplingParams, generate_ar, generate_tidar
    from tidar_runtime.backends.ort import OrtBackend

    log = log or (lambda msg: None)
    backend = OrtBackend(artifact_dir)
    manifest = backend.manifest
    recorder = RecordingBackend(backend, samples, seed)
    prompts = fit_prompts(prompts, manifest, max_new_tokens)
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        generate_tidar(recorder, prompt, max_new_tokens, SamplingParams())
        generate_ar(recorder, prompt, max_new_tokens, SamplingParams())
        if (i + 1) % 10 == 0 or i + 1 == len(prompts):
            log(f"calibration decodes: {i + 1}/{len(prompts)} prompts ({time.perf_counter() - t0:.1f}s)")
    return {kind: r.items for kind, r in recorder.records.items()}


# --------------------------------------------------------------------------- graph anatomy


@dataclasses.dataclass(frozen=True)
class Linear:
    """One linear layer of a graph: MatMul(x, W) with W an [in, out] initializer."""

    node: str  # the MatMul's name: a module path, the same in prefill, step and ar_step
    weight: str
    act: str  # the activation input's tensor name in this graph (differs between graphs)


def linear_layers(model) -> list[Linear]:
    """The MatMuls to quantize: a 2-D weight initializer as second input, LM head excluded."""
    inits = {t.name: t for t in model.graph.initializer}
    return [Linear(n.name, n.input[1], n.input[0]) for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and not any(s in n.name for s in EXCLUDED_SCOPES)]


def quantized_nodes(model) -> list[str]:
    return [lin.node for lin in linear_layers(model)]


def activation_roles(linears: Sequence[Linear]) -> dict[str, str]:
    """Activation tensor -> its role: the first (by name) linear layer reading it. One tensor
    read by q, k and v gets one role; the role names agree across the three graphs, the tensor
    names do not."""
    consumers: dict[str, list[str]] = {}
    for lin in linears:
        consumers.setdefault(lin.act, []).append(lin.node)
    return {act: min(nodes) for act, nodes in consumers.items()}


@dataclasses.dataclass
class TableUse:
    """The embedding lookup and the LM head of a graph, and the table(s) they read."""

    gather: object | None  # NodeProto: Gather(table [V, K], ids)
    head: object | None  # NodeProto: the LM head MatMul(x, W [K, V])
    table: str | None  # the [V, K] initializer the Gather reads
    head_weight: str | None  # [K, V] initializer of an untied head, or None when it is Transpose(table)
    head_table: str | None  # [V, K] initializer behind the head's Transpose (tied: == table)


def table_use(model) -> TableUse:
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
                   and len(inits[n.input[0]].dims) == 2 and "embed_tokens" in n.name), None)
    head = next((n for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith("/lm_head/")), None)
    head_weight = head_table = None
    if head is not None:
        w = head.input[1]
        if w in inits and len(inits[w].dims) == 2:
            head_weight = w
        elif w in producer and producer[w].op_type == "Transpose" and producer[w].input[0] in inits:
            head_table = producer[w].input[0]
    return TableUse(gather, head, gather.input[0] if gather is not None else None, head_weight, head_table)


def _array(model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _replace_initializer(model, name: str, array: np.ndarray) -> None:
    from onnx import numpy_helper

    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(t).dtype), name))


def _drop_unused(model) -> None:
    """Remove nodes whose outputs nobody reads and initializers no node reads."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _insert_before(model, plan: dict[str, list]) -> None:
    """Rebuild the node list with plan[node name] emitted right before that node (topological
    order kept: the new nodes read only initializers and tensors made before it)."""
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for n in nodes:
        model.graph.node.extend(plan.get(n.name, []))
        model.graph.node.append(n)


# --------------------------------------------------------------------------- calibration statistics


@dataclasses.dataclass
class ActStats:
    """What the calibration keeps of one activation role, over every graph and decode mode."""

    amax: float = 0.0
    abs_sum: np.ndarray | None = None  # per input channel, for the AWQ search
    count: int = 0
    rows: list = dataclasses.field(default_factory=list)  # a row sample, for the AWQ search
    hist: np.ndarray | None = None  # of |x| over [0, amax], for percentile ranges

    def percentile_amax(self, percentile: float) -> float:
        if self.hist is None or not self.hist.sum():
            return self.amax
        cdf = np.cumsum(self.hist) / self.hist.sum()
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return float(self.amax * min(len(self.hist), i + 1) / len(self.hist))


HIST_BINS = 2048
AWQ_ROWS = 1024  # activation rows kept per role for the AWQ loss


def _probe_session(model, tensors: Sequence[str]):
    """An ORT session over `model` with `tensors` added as outputs (1 thread, quiet)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def activation_stats(graphs: dict[str, object], feeds: dict[str, list[dict]], *, rows: bool = False,
                     histogram: bool = False, seed: int = 0) -> dict[str, ActStats]:
    """Per activation role, merged over the three graphs: max |x|, and optionally the per-channel
    mean |x| and a row sample (AWQ) or a histogram of |x| (percentile ranges, a second pass)."""
    rng = np.random.default_rng(seed)
    stats: dict[str, ActStats] = {}
    sessions = {}
    for kind, model in graphs.items():
        roles = activation_roles(linear_layers(model))
        if not roles or not feeds.get(kind):
            continue
        names = list(roles)
        sessions[kind] = (_probe_session(model, names), names, roles)
    total_rows: dict[str, int] = {}
    for kind, (sess, names, roles) in sessions.items():
        for feed in feeds[kind]:
            for name, x in zip(names, sess.run(names, feed)):
                x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
                s = stats.setdefault(roles[name], ActStats())
                s.amax = max(s.amax, float(np.abs(x).max()))
                if rows:
                    a = np.abs(x).sum(0, dtype=np.float64)
                    s.abs_sum = a if s.abs_sum is None else s.abs_sum + a
                    s.count += len(x)
                    seen = total_rows.get(roles[name], 0)
                    for r in x:  # reservoir over rows
                        seen += 1
                        if len(s.rows) < AWQ_ROWS:
                            s.rows.append(r.copy())
                        else:
                            j = int(rng.integers(0, seen))
                            if j < AWQ_ROWS:
                                s.rows[j] = r.copy()
                    total_rows[roles[name]] = seen
    if histogram:
        for kind, (sess, names, roles) in sessions.items():
            for feed in feeds[kind]:
                for name, x in zip(names, sess.run(names, feed)):
                    s = stats[roles[name]]
                    h, _ = np.histogram(np.abs(x), bins=HIST_BINS, range=(0.0, s.amax or 1.0))
                    s.hist = h if s.hist is None else s.hist + h
    return stats


# --------------------------------------------------------------------------- int8 / fp8 Q/DQ (weights and activations)

QMAX = {"int8": 127.0, "fp8": 448.0}  # symmetric ranges: int8 [-127, 127]; E4M3FN's largest finite value


def _to_qtype(x: np.ndarray, precision: str) -> np.ndarray:
    if precision == "int8":
        return np.clip(np.rint(x), -127, 127).astype(np.int8)
    import ml_dtypes

    return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)  # round to nearest even


def _tensor(name: str, array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)


def _zeros(shape, precision: str) -> np.ndarray:
    import ml_dtypes

    return np.zeros(shape, np.int8 if precision == "int8" else ml_dtypes.float8_e4m3fn)


def activation_scales(stats: dict[str, ActStats], precision: str, method: str, percentile: float) -> dict[str, float]:
    """One scale per activation role (symmetric, per tensor), shared by every graph."""
    out = {}
    for role, s in stats.items():
        amax = s.percentile_amax(percentile) if method == "percentile" else s.amax
        out[role] = float(np.float32(amax / QMAX[precision])) if amax > 0 else 1.0  # as the graphs store it
    return out


def qdq_graph(model, scales: dict[str, float], precision: str) -> int:
    """Q/DQ on both inputs of every linear layer: activations per tensor with the shared scale of
    their role, weights per output channel (symmetric, zero point 0). Returns the MatMuls done."""
    from onnx import helper

    linears = linear_layers(model)
    roles = activation_roles(linears)
    missing = sorted({roles[lin.act] for lin in linears} - set(scales))
    if missing:
        raise TiDARError(f"no calibrated activation range for {missing[0]} (it saw no calibration input)")
    plan: dict[str, list] = {}
    done_acts: dict[str, str] = {}
    new_inits = []
    by_name = {n.name: n for n in model.graph.node}
    for lin in linears:
        w = _array(model, lin.weight)
        fdt = w.dtype
        nodes = plan.setdefault(lin.node, [])
        if lin.act not in done_acts:
            role = roles[lin.act]
            s, z = f"{role}/input_scale", f"{role}/input_zero_point"
            new_inits += [_tensor(s, np.array(scales[role], fdt)), _tensor(z, _zeros((), precision))]
            q, dq = f"{role}/input_quantized", f"{role}/input_dequantized"
            nodes += [helper.make_node("QuantizeLinear", [lin.act, s, z], [q], name=f"{role}/input_QuantizeLinear"),
                      helper.make_node("DequantizeLinear", [q, s, z], [dq], name=f"{role}/input_DequantizeLinear")]
            done_acts[lin.act] = dq
        amax = np.abs(w.astype(np.float32)).max(axis=0)
        ws = np.where(amax > 0, amax / QMAX[precision], 1.0).astype(np.float32)
        qw = _to_qtype(w.astype(np.float32) / ws, precision)
        qn, sn, zn = f"{lin.weight}_quantized", f"{lin.weight}_scale", f"{lin.weight}_zero_point"
        if not any(t.name == qn for t in new_inits):
            new_inits += [_tensor(qn, qw), _tensor(sn, ws.astype(fdt)), _tensor(zn, _zeros(ws.shape, precision))]
        dqw = f"{lin.weight}_dequantized"
        if not any(n.output[0] == dqw for ns in plan.values() for n in ns):
            nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dqw], axis=1,
                                          name=f"{lin.node}/weight_DequantizeLinear"))
        mm = by_name[lin.node]
        mm.input[0], mm.input[1] = done_acts[lin.act], dqw
    model.graph.initializer.extend(new_inits)
    _insert_before(model, plan)
    _drop_unused(model)
    return len(linears)


# --------------------------------------------------------------------------- weight-only (int4 / int8), block-wise

WEIGHT_ONLY_BITS = {"int4": 4, "int8-wo": 8}
BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
WO_METHODS = ("awq", "rtn")
AWQ_ALPHAS = tuple(i / 10 for i in range(11))  # alpha 0 is RTN: the search never does worse on its sample
BLOCK_DQ_MIN_OPSET = 21  # DequantizeLinear's block_size attribute and the INT4 type


def block_quantize(wt: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantization of `wt` [N, K] along K (blocks of `block`, the last one
    zero-padded): integer codes [N, ceil(K / block) * block] in [-qmax, qmax] and scales
    [N, ceil(K / block)] (float32), qmax = 2**(bits-1) - 1."""
    n, k = wt.shape
    kb = -(-k // block)
    padded = np.zeros((n, kb * block), np.float32)
    padded[:, :k] = wt
    blocks = padded.reshape(n, kb, block)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(blocks).max(-1)
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales[..., None]), -qmax, qmax).astype(np.int8)
    return codes.reshape(n, kb * block), scales


def block_dequantize(codes: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    n, kp = codes.shape
    block = kp // scales.shape[1]
    return (codes.reshape(n, -1, block).astype(np.float32) * scales[..., None]).reshape(n, kp)[:, :k]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, Kp] -> unsigned, packed low nibble first (bits 4) as MatMulNBits/GatherBlockQuantized
    read them (zero point 2**(bits-1), their default)."""
    u = (codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    return u if bits == 8 else (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


@dataclasses.dataclass
class AwqGroup:
    role: str  # the activation role the group's linear layers read
    linears: list[str]  # their MatMul names
    # where 1/s goes: ("gamma", init) | ("columns", weight, (start, stop)) | ("v_proj", weight, (start, stop));
    # None: RTN. The column range is the part of `weight` (and of its bias) that is divided: all of
    # up_proj / v_proj, or the up / v columns inside a fused gate_up / qkv weight.
    fold: tuple | None
    alpha: float = 0.0
    scales: np.ndarray | None = None


def unshare_weights(model) -> int:
    """Give every extra MatMul / RMSNormalization / bias Add that reads the same weight
    initializer a copy of its own (named `{weight}@{node}`), so that folding an AWQ scale into
    one layer's weight or bias leaves the others alone. The exporter merges identical
    initializers: every RMSNorm weight (all ones) and every bias (zeros) of a fresh model becomes
    one tensor read by all of them. Node names are the same in the three graphs, so each graph
    gets the same names. Returns the copies made."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list] = {}  # initializer -> [(node, input index)]
    for n in model.graph.node:
        slots = [1] if n.op_type in ("MatMul", "RMSNormalization") else [0, 1] if n.op_type == "Add" else []
        for i in slots:
            if i < len(n.input) and n.input[i] in inits and (n.op_type != "Add" or len(inits[n.input[i]].dims) == 1):
                readers.setdefault(n.input[i], []).append((n, i))
    copies = 0
    for name, uses in readers.items():
        for n, i in sorted(uses, key=lambda u: u[0].name)[1:]:
            twin = TensorProto()
            twin.CopyFrom(inits[name])
            twin.name = f"{name}@{n.name}"
            model.graph.initializer.append(twin)
            n.input[i] = twin.name
            copies += 1
    return copies


def output_bias(model, weight: str) -> str | None:
    """The bias initializer added to the output of the MatMul that reads `weight` (Qwen2's
    q/k/v biases), or None."""
    inits = {t.name: t for t in model.graph.initializer}
    mm = next((n for n in model.graph.node if n.op_type == "MatMul" and n.input[1:] == [weight]), None)
    if mm is None:
        return None
    for n in model.graph.node:
        if n.op_type == "Add" and mm.output[0] in n.input:
            other = [i for i in n.input if i != mm.output[0]]
            if other and other[0] in inits and len(inits[other[0]].dims) == 1:
                return other[0]
    return None


def output_columns(model) -> dict[str, tuple[str, int, int]]:
    """Tensor -> (weight, start, stop): the output columns start..stop-1 of a linear layer's
    weight that a tensor holds. The MatMul's output (and its bias Add's) holds all of them; each
    output of a Split along the last axis of it holds its part (`tidar_graphs.fusions.fuse_projections`
    packs q/k/v and gate/up into one MatMul and splits its output)."""
    inits = {t.name: t for t in model.graph.initializer}
    cols: dict[str, tuple[str, int, int]] = {}
    for lin in linear_layers(model):
        mm = next(n for n in model.graph.node if n.name == lin.node)
        cols[mm.output[0]] = (lin.weight, 0, int(inits[lin.weight].dims[1]))
        bias = output_bias(model, lin.weight)
        for n in model.graph.node:
            if bias is not None and n.op_type == "Add" and mm.output[0] in n.input and bias in n.input:
                cols[n.output[0]] = cols[mm.output[0]]
    for n in model.graph.node:
        if n.op_type != "Split" or not n.input or n.input[0] not in cols or len(n.input) < 2 or n.input[1] not in inits:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if axis not in (-1, 2):  # the [B, T, N] projections: the last axis
            continue
        weight, start, _ = cols[n.input[0]]
        for out, width in zip(n.output, _array(model, n.input[1]).tolist()):
            cols[out] = (weight, start, start + int(width))
            start += int(width)
    return cols


def awq_groups(model, manifest_model: dict) -> list[AwqGroup]:
    """The linear layers grouped by the activation they read, with the op that can absorb 1/s:
    the RMSNorm (or Mul) weight before q/k/v and gate/up, the up_proj output columns before
    down_proj (silu(gate) * up is linear in up), the v_proj output columns before o_proj
    (attention is linear in V; one scale per kv-head channel, shared by its query heads). With
    fused projections the up and v columns are those parts of the gate_up and qkv weights."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    linears = linear_layers(model)
    by_node = {lin.node: lin for lin in linears}
    cols = output_columns(model)
    heads, kv = manifest_model.get("num_heads"), manifest_model.get("num_kv_heads")
    roles = activation_roles(linears)
    groups = []
    for act, role in sorted(roles.items(), key=lambda kv: kv[1]):
        members = sorted(lin.node for lin in linears if lin.act == act)
        k = inits[by_node[members[0]].weight].dims[0]
        p = producer.get(act)
        fold = None
        if p is not None and p.op_type in ("RMSNormalization", "SimplifiedLayerNormalization", "Mul"):
            gammas = [i for i in p.input[1:] if i in inits and list(inits[i].dims) == [k]]
            if p.op_type != "Mul" and len(p.input) > 1 and p.input[1] in inits and list(inits[p.input[1]].dims) == [k]:
                fold = ("gamma", p.input[1])
            elif p.op_type == "Mul" and gammas:
                fold = ("gamma", gammas[0])
            elif p.op_type == "Mul":
                ups = [cols[i] for i in p.input if i in cols]
                if len(ups) == 1 and ups[0][2] - ups[0][1] == k:
                    fold = ("columns", ups[0][0], ups[0][1:])
        if fold is None and "/self_attn/o_proj/" in role and heads and kv:
            hd = k // heads
            v = by_node.get(role.replace("/o_proj/", "/v_proj/"))
            qkv = by_node.get(role.replace("/o_proj/", "/qkv_proj/"))
            if v is not None:
                fold = ("v_proj", v.weight, (0, kv * hd))
            elif qkv is not None and inits[qkv.weight].dims[1] == (heads + 2 * kv) * hd:
                fold = ("v_proj", qkv.weight, ((heads + kv) * hd, (heads + 2 * kv) * hd))  # q | k | v columns
        groups.append(AwqGroup(role, members, fold))
    return groups


def awq_search(model, groups: list[AwqGroup], stats: dict[str, ActStats], bits: int, block: int,
               manifest_model: dict) -> None:
    """Per group, the activation-aware scales s = mean|x|^alpha (normalized), alpha chosen on a
    grid to minimize || X W - X diag(1/s) Q(diag(s) W) ||^2 summed over the group's layers,
    X = the calibration rows of the role (AWQ's search, without its clipping step)."""
    heads, kv = manifest_model.get("num_heads"), manifest_model.get("num_kv_heads")
    by_node = {lin.node: lin for lin in linear_layers(model)}
    for g in groups:
        s = stats.get(g.role)
        if g.fold is None or s is None or not s.rows:
            continue
        x = np.stack(s.rows).astype(np.float32)
        mean = (s.abs_sum / max(1, s.count)).astype(np.float64)
        if g.fold[0] == "v_proj":  # one scale per v channel: average over the query heads sharing it
            hd = len(mean) // heads
            mean = np.repeat(mean.reshape(kv, heads // kv, hd).mean(1), heads // kv, axis=0).reshape(-1)
        weights = [_array(model, by_node[m].weight).astype(np.float32) for m in g.linears]
        refs = [x @ w for w in weights]
        best = None
        for alpha in AWQ_ALPHAS:
            sc = np.maximum(mean, 1e-8) ** alpha
            sc = (sc / np.sqrt(sc.max() * sc.min())).astype(np.float32)
            loss = 0.0
            for w, ref in zip(weights, refs):
                codes, scales = block_quantize((w * sc[:, None]).T, bits, block)
                w_hat = block_dequantize(codes, scales, w.shape[0]).T / sc[:, None]
                loss += float(((x @ w_hat - ref) ** 2).sum())
            if best is None or loss < best[0] - 1e-12 * abs(loss):
                best = (loss, alpha, sc)
        _, g.alpha, g.scales = best
        if g.alpha == 0.0:
            g.scales = None


def awq_folded_weights(model, groups: list[AwqGroup], manifest_model: dict) -> dict[str, np.ndarray]:
    """The float initializers after the AWQ scales are applied (identical for the three graphs):
    W <- diag(s) W for each group's layers, 1/s folded into the op before them."""
    heads, kv = manifest_model.get("num_heads"), manifest_model.get("num_kv_heads")
    by_node = {lin.node: lin for lin in linear_layers(model)}
    out: dict[str, np.ndarray] = {}

    def get(name):
        return out[name] if name in out else _array(model, name).astype(np.float32)

    for g in groups:
        if g.scales is None:
            continue
        for m in g.linears:
            w = by_node[m].weight
            out[w] = get(w) * g.scales[:, None]
        kind, target = g.fold[:2]
        if kind == "gamma":
            out[target] = get(target) / g.scales
            continue
        if kind == "columns":
            s = g.scales
        else:  # v_proj columns: the kv-head channel behind each o_proj input channel
            hd = len(g.scales) // heads
            s = g.scales.reshape(heads, hd)[:: heads // kv].reshape(-1)
        start, stop = g.fold[2]
        if stop - start != len(s):
            raise TiDARError(f"AWQ: {len(s)} scales for columns {start}..{stop - 1} of {target}")
        w = get(target).copy()
        w[:, start:stop] /= s[None, :]
        out[target] = w
        bias = output_bias(model, target)  # the output channels divided by s carry their bias along
        if bias is not None:
            b = get(bias).copy()
            b[start:stop] /= s
            out[bias] = b
    return out


def value_cache_scales(groups: list[AwqGroup], manifest_model: dict) -> dict[str, list[float]]:
    """Per layer (its index as a string), the per-channel factor s that an o_proj group's fold
    divides v_proj's output columns by, in the cache's channel order ([kv_heads * head_dim],
    kv-head major): the artifact's V cache holds V / s, so a comparison against the unfolded
    model must scale caches by it (engines.compare). Layers without such a fold are absent."""
    heads, kv = manifest_model.get("num_heads"), manifest_model.get("num_kv_heads")
    out = {}
    for g in groups:
        if g.scales is None or g.fold is None or g.fold[0] != "v_proj":
            continue
        layer = g.role.split("/model/layers.", 1)[1].split("/", 1)[0]
        hd = len(g.scales) // heads
        out[layer] = [float(v) for v in g.scales.reshape(heads, hd)[:: heads // kv].reshape(-1)]
    return out


def weight_only_graph(model, precision: str, block: int, target: str, tables: bool, accuracy_level: int,
                      overrides: dict[str, np.ndarray]) -> dict:
    """Weight-only block quantization of every linear layer (and, with `tables`, of the embedding
    table and the LM head), lowered for `target`: `ort` -> com.microsoft MatMulNBits (and
    GatherBlockQuantized for the embedding); TensorRT targets -> block-quantized INT4
    DequantizeLinear (opset 21+) on the weights, feeding the MatMul / Gather."""
    from onnx import helper

    bits = WEIGHT_ONLY_BITS[precision]
    for name, array in overrides.items():
        _replace_initializer(model, name, array)
    linears = linear_layers(model)
    by_name = {n.name: n for n in model.graph.node}
    plan: dict[str, list] = {}
    new_inits, made = [], set()
    ort_target = target == "ort"
    if ort_target and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    def matmul_nbits(node, w_kn: np.ndarray, key: str):
        k, n = w_kn.shape
        codes, scales = block_quantize(w_kn.T, bits, block)
        b, sn = f"{key}_nbits", f"{key}_nbits_scale"
        if b not in made:
            new_inits.extend([_tensor(b, _pack(codes, bits).reshape(n, -1, block * bits // 8)),
                              _tensor(sn, scales.astype(w_kn.dtype))])
            made.add(b)
        new = helper.make_node("MatMulNBits", [node.input[0], b, sn], list(node.output), name=node.name,
                               domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                               accuracy_level=accuracy_level)
        node.CopyFrom(new)

    def block_dq(consumer: str, w: np.ndarray, axis: int, key: str) -> str:
        """DequantizeLinear(int4 codes of w, block scales) along `axis` (the reduction axis)."""
        wk = w if axis == 1 else w.T  # [rows, K]
        codes, scales = block_quantize(wk, bits, block)
        codes = codes[:, : wk.shape[1]]
        qn, sn, out = f"{key}_quantized", f"{key}_scale", f"{key}_dequantized"
        if qn not in made:
            import ml_dtypes

            c = codes if axis == 1 else codes.T
            s = scales if axis == 1 else scales.T
            new_inits.extend([_tensor(qn, c.astype(ml_dtypes.int4)), _tensor(sn, s.astype(w.dtype))])
            made.add(qn)
            plan.setdefault(consumer, []).append(
                helper.make_node("DequantizeLinear", [qn, sn], [out], axis=axis, block_size=block,
                                 name=f"{key}_DequantizeLinear"))
        return out

    for lin in linears:
        w = _array(model, lin.weight)
        node = by_name[lin.node]
        if ort_target:
            matmul_nbits(node, w, lin.weight)
        else:
            node.input[1] = block_dq(lin.node, w, 0, lin.weight)
    done = {"nodes": len(linears), "tables": []}
    use = table_use(model)
    if tables:
        if use.head is not None and (use.head_weight or use.head_table):
            w_kn = _array(model, use.head_weight) if use.head_weight else _array(model, use.head_table).T
            key = use.head_weight or f"{use.head_table}.T"
            if ort_target:
                matmul_nbits(use.head, np.ascontiguousarray(w_kn), key)
            else:
                use.head.input[1] = block_dq(use.head.name, np.ascontiguousarray(w_kn), 0, key)
            done["tables"].append("lm_head")
        # The embedding lookup: MatMulNBits' sibling GatherBlockQuantized on ort. TensorRT documents
        # INT4 weights for the GEMM path (the DequantizeLinear before a MatMul), not for a Gather,
        # and nothing here can check that its parser takes one: the table stays float there.
        if use.gather is not None and ort_target:
            table = _array(model, use.table)
            v, k = table.shape
            codes, scales = block_quantize(table, bits, block)
            d, sn = f"{use.table}_gbq", f"{use.table}_gbq_scale"
            new_inits.extend([_tensor(d, _pack(codes, bits)[:, : k * bits // 8].copy()),
                              _tensor(sn, scales.astype(table.dtype))])
            use.gather.CopyFrom(helper.make_node(
                "GatherBlockQuantized", [d, use.gather.input[1], sn], list(use.gather.output), name=use.gather.name,
                domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=block, bits=bits))
            done["tables"].append("embedding")
    model.graph.initializer.extend(new_inits)
    _insert_before(model, plan)
    _drop_unused(model)
    return done


def externalize_packed(weights, model) -> None:
    """Move the 4-bit initializers into weights.bin as the packed bytes ONNX stores (the generic
    `externalize_proto` writes numpy's one-byte-per-element view of them)."""
    import onnx

    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) and t.raw_data:
            weights.point_at(t, *weights.add(t.data_type, tuple(t.dims), np.frombuffer(t.raw_data, np.uint8)))


def keep_bias_adds_unfused(model) -> int:
    """Give the bias of every `Add(quantized MatMul, bias)` the shape [1, 1, N] (was [N]).

    Workaround: ONNX Runtime 1.32 (graph optimization level EXTENDED or ALL) fuses MatMul + 1-D
    bias Add into Gemm with reshapes, then moves the Q/DQ pair across the new Reshape and builds
    an invalid node: "Node (gemm_input_reshape_arg_q) Op (QuantizeLinear) [TypeInferenceError]
    output_dtype INT8 does not match y_zero_point type UINT8" at session load (Qwen2's q/k/v
    biases). The fusion needs a bias Gemm can take; a 3-D one broadcasts the same and is left
    alone. Returns the number of biases reshaped.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "MatMul" and dequantized & set(n.input)}
    count = 0
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        for a, b in ((0, 1), (1, 0)):
            t = inits.get(n.input[b])
            if n.input[a] in quantized and t is not None and len(t.dims) == 1:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(1, 1, -1), t.name))
                count += 1
    return count


# --------------------------------------------------------------------------- the artifact


def _fingerprint(prompts: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(np.asarray(p, np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def default_method(precision: str) -> str:
    return "awq" if precision in WEIGHT_ONLY_BITS else DEFAULT_INT8_METHOD


def _check_request(manifest: Manifest, artifact: Path, precision: str, method: str, block: int) -> None:
    if precision not in PRECISIONS:
        raise TiDARError(f"unknown quantized precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    methods = WO_METHODS if precision in WEIGHT_ONLY_BITS else INT8_METHODS
    if method not in methods:
        raise TiDARError(f"--method {method} does not apply to {precision}: choose one of {', '.join(methods)}")
    if manifest.precision in PRECISIONS:
        raise TiDARError(f"{artifact} is already quantized ({manifest.precision}); quantize the artifact it came from")
    opset = manifest.versions.get("opsets", {}).get("ai.onnx")
    if precision == "fp8" and opset is not None and opset < FP8_MIN_OPSET:
        raise TiDARError(f"fp8 needs ONNX opset >= {FP8_MIN_OPSET} (float8 DequantizeLinear); the {manifest.target} "
                         f"graphs of {artifact} are opset {opset}: export for target ort or trt-10.15")
    if precision in WEIGHT_ONLY_BITS:
        if block not in BLOCK_SIZES:
            raise TiDARError(f"--block-size {block}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if manifest.target != "ort":
            if precision != "int4":
                raise TiDARError(f"{precision} is lowered for target ort only (MatMulNBits); TensorRT's block-quantized "
                                 f"weights are INT4: use --precision int4 for {manifest.target}")
            if opset is not None and opset < BLOCK_DQ_MIN_OPSET:
                raise TiDARError(f"int4 weight-only needs block-quantized DequantizeLinear (opset >= {BLOCK_DQ_MIN_OPSET}); "
                                 f"the {manifest.target} graphs of {artifact} are opset {opset} and its ONNX parser "
                                 f"reads opsets up to 20: export for target trt-10.15 (or ort)")


def quantize_graph(kind: str, model, precision: str, *, scales=None, block: int = DEFAULT_BLOCK_SIZE,
                   target: str = "ort", tables: bool = True, accuracy_level: int = 0, overrides=None) -> dict:
    """Quantize one graph in place with the artifact's shared parameters; returns what was done."""
    if not linear_layers(model):
        raise TiDARError(f"{kind}: no linear-layer MatMul with a weight initializer to quantize")
    if precision in WEIGHT_ONLY_BITS:
        return weight_only_graph(model, precision, block, target, tables, accuracy_level, overrides or {})
    n = qdq_graph(model, scales, precision)
    keep_bias_adds_unfused(model)
    return {"nodes": n}


def quantize_artifact(artifact: str | os.PathLike, output: str | os.PathLike, precision: str = "int8", *,
                      calibration: str | os.PathLike | None = None, prompts: Sequence[Sequence[int]] | None = None,
                      samples: int = 64, max_new_tokens: int = 48, method: str | None = None,
                      percentile: float = DEFAULT_PERCENTILE, block_size: int = DEFAULT_BLOCK_SIZE,
                      quantize_tables: bool = True, accuracy_level: int = 0, seed: int = 0,
                      feeds: dict[str, list[dict]] | None = None, log=None, force: bool = False) -> Path:
    """Write a quantized artifact at `output` from the fp32/fp16 artifact `artifact` (atomically).

    int8 / fp8: Q/DQ on activations and weights, one activation scale per tensor role shared by
    the three graphs. int4 / int8-wo: weight-only, block-wise (`block_size`), RTN or AWQ-style
    scales (`method`), embedding and LM head too unless `quantize_tables` is False.
    Calibration prompts: `prompts` (token ids) if given, else the text file `calibration`
    (default: calibration/prompts.txt) tokenized with the artifact's tokenizer. `feeds`: the
    graph inputs `collect_calibration_inputs` recorded for these prompts, to reuse them.
    """
    import onnx
    import onnxruntime

    import tidar_export
    from tidar_export.export.artifact import WEIGHTS_FILE, prepare_output, staged_artifact

    log = log or (lambda msg: None)
    artifact, output = Path(artifact), Path(output)
    method = method or default_method(precision)
    if samples < 1 or max_new_tokens < 1:
        raise TiDARError("--samples and --max-new-tokens must be >= 1")
    if not 50.0 < percentile <= 100.0:
        raise TiDARError(f"--percentile must be in (50, 100], got {percentile}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise TiDARError(f"--accuracy-level must be 0..4 (MatMulNBits), got {accuracy_level}")
    manifest = load_manifest(artifact)
    _check_request(manifest, artifact, precision, method, block_size)
    if artifact.resolve() == output.resolve():
        raise TiDARError("the quantized artifact must go to another directory than its source (-o)")
    output = prepare_output(output, force, inputs=[artifact])
    if precision in WEIGHT_ONLY_BITS and manifest.target != "ort":
        from tidar_export.engines.build import TRT_INT4_BLOCK_SIZES

        if block_size not in TRT_INT4_BLOCK_SIZES:
            log(f"warning: blocks of {block_size} run in ONNX Runtime, but `tidar-export build` refuses them: "
                f"TensorRT's INT4 weights take blocks of {' or '.join(map(str, TRT_INT4_BLOCK_SIZES))}")
    if precision in QMAX and manifest.target == "ort" and manifest.kv_update_of("ar_step") != manifest.kv_update:
        # measured on the demo model: int8 TiDAR == own AR 23/24 with this AR step, 24/24 without
        log(f"warning: the AR step of {artifact} is GroupQueryAttention, whose rounding differs from the step's "
            f"Attention op; with {precision} activations TiDAR may then differ from --mode ar at near ties: "
            f"export with --ar-step attention for an {precision} artifact whose TiDAR equals its AR")
    needs_calibration = precision in QMAX or method == "awq"
    source = None
    if needs_calibration:
        if prompts is None:
            calibration = Path(calibration) if calibration is not None else DEFAULT_CALIBRATION
            prompts = tokenize_prompts(artifact, manifest, read_prompt_file(calibration))
            source = calibration.name
        else:
            source = "token ids"
        log(f"calibrating {precision} ({method}) on {len(prompts)} prompts from {source} "
            f"(up to {samples} inputs per graph, {max_new_tokens} new tokens per decode, TiDAR and AR)")
        if feeds is None:
            feeds = collect_calibration_inputs(artifact, prompts, samples=samples, max_new_tokens=max_new_tokens,
                                               seed=seed, log=log)
    t0 = time.perf_counter()
    graphs = {kind: onnx.load(str(artifact / manifest.graphs[kind].file)) for kind in GRAPH_KINDS}
    scales, overrides, awq = None, {}, []
    if precision in QMAX:
        stats = activation_stats(graphs, feeds, histogram=method == "percentile", seed=seed)
        scales = activation_scales(stats, precision, method, percentile)
        log(f"{len(scales)} activation ranges from {sum(len(f) for f in feeds.values())} graph inputs of both "
            f"modes in {time.perf_counter() - t0:.1f}s, shared by the three graphs")
    elif method == "awq":
        stats = activation_stats(graphs, feeds, rows=True, seed=seed)
        for model in graphs.values():  # before the groups: a fold must change one layer only
            unshare_weights(model)
        awq = awq_groups(graphs["step"], manifest.model)
        awq_search(graphs["step"], awq, stats, WEIGHT_ONLY_BITS[precision], block_size, manifest.model)
        overrides = awq_folded_weights(graphs["step"], awq, manifest.model)
        log(f"AWQ scales for {sum(g.scales is not None for g in awq)}/{len(awq)} layer groups in "
            f"{time.perf_counter() - t0:.1f}s (alphas {[g.alpha for g in awq]})")

    with staged_artifact(output, force) as (tmp, weights):
        new = dataclasses.replace(manifest, graphs={}, precision=precision, versions=dict(manifest.versions))
        done = {}
        for kind in GRAPH_KINDS:
            spec, model = manifest.graphs[kind], graphs[kind]
            done[kind] = quantize_graph(kind, model, precision, scales=scales, block=block_size,
                                        target=manifest.target, tables=quantize_tables,
                                        accuracy_level=accuracy_level, overrides=overrides)
            externalize_packed(weights, model)
            weights.externalize_proto(model)
            name = f"{kind}.{precision}.onnx"
            onnx.save_model(model, str(tmp / name))
            new.graphs[kind] = dataclasses.replace(spec, file=name, bytes=(tmp / name).stat().st_size,
                                                   engine=None, engine_info={})
            log(f"{kind}: {done[kind]['nodes']} MatMuls quantized to {precision}")
        weights.close()
        new.weights = {"file": WEIGHTS_FILE, "bytes": weights.size}
        new.versions.pop("tensorrt", None)
        new.versions["quantizer"] = f"tidar_export.quantize {QUANTIZER_VERSION} (onnxruntime {onnxruntime.__version__})"
        new.versions["tidar_export"] = tidar_export.__version__
        if manifest.tokenizer.get("file"):  # a name load_manifest confined to the artifact; the same name in tmp
            name = manifest.tokenizer["file"]
            shutil.copyfile(confined(artifact, name, f"{artifact}: tokenizer file"),
                            confined(tmp, name, f"{output}: tokenizer file"))
        recipe = {"precision": precision, "source_precision": manifest.precision, "quantizer": new.versions["quantizer"],
                  "method": method + (f" {percentile}" if method == "percentile" else ""), "graphs": done}
        if precision in QMAX:
            recipe.update({
                "format": "QDQ", "weights": "per output channel, symmetric, zero point 0",
                "activations": "per tensor, symmetric, zero point 0; one scale per tensor role, shared by "
                               "prefill, step and ar_step",
                "quantized_ops": "MatMul of every linear layer (LM head excluded)",
                "activation_scales": {role: scales[role] for role in sorted(scales)}})
        else:
            recipe.update({
                "format": "MatMulNBits" if manifest.target == "ort" else "block-quantized DequantizeLinear",
                "weights": f"{WEIGHT_ONLY_BITS[precision]}-bit, blocks of {block_size} along the input dim, "
                           f"symmetric (zero point 0)", "block_size": block_size,
                "activations": "not quantized" + (f" (MatMulNBits accuracy_level {accuracy_level})"
                                                  if manifest.target == "ort" else ""),
                "quantized_ops": "MatMul of every linear layer" + (
                    ("" if not quantize_tables else ", LM head and embedding" if manifest.target == "ort"
                     else ", LM head (the embedding lookup stays float: TensorRT documents INT4 weights for GEMMs)")),
                "awq": {g.role: g.alpha for g in awq},
                # the V cache of this artifact holds V / s in these layers (AWQ's o_proj fold)
                "value_cache_scales": value_cache_scales(awq, manifest.model)})
        if needs_calibration:
            recipe["calibration"] = {"source": source, "prompts": len(prompts), "fingerprint": _fingerprint(prompts),
                                     "max_new_tokens": max_new_tokens, "samples_per_graph": samples, "seed": seed,
                                     "modes": ["tidar", "ar"]}
        (tmp / SIDECAR).write_text(json.dumps(recipe, indent=2) + "\n")
        new.save(tmp)
    return output


# --------------------------------------------------------------------------- measuring a quantized artifact


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Greedy token agreement: the tokens `other` decodes before its first difference from
    `reference`, over all the reference's tokens (after a difference the texts diverge, and
    position-wise matches would mean nothing)."""
    total = sum(len(r) for r in reference)
    return sum(common_prefix(r, o) for r, o in zip(reference, other)) / max(1, total)


def teacher_forced(backend, windows: Sequence[Sequence[int]]) -> tuple[float, list[list[int]]]:
    """The AR mode fed the true tokens: the prefill graph on the first token of each window, then
    the ar_step graph one token at a time. Returns the mean next-token cross-entropy (nats) and,
    per window, the argmax at every position (what greedy decoding would pick there)."""
    total, count, picks = 0.0, 0, []
    for w in windows:
        w = np.asarray(w, np.int64)
        if len(w) + 1 > backend.max_len:
            raise TiDARError(f"window of {len(w)} tokens does not fit the cache of {backend.max_len} slots")
        logits = backend.ar_prefill(0, w[:1], True).logits[0, 0]
        tokens = np.zeros((backend.max_batch, 1), np.int64)
        cache_len = np.zeros(backend.max_batch, np.int64)
        row = []
        for t in range(1, len(w)):
            z = logits.astype(np.float64)
            total += float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[w[t]])
            count += 1
            row.append(int(z.argmax()))
            tokens[0, 0], cache_len[0] = w[t], t
            logits = backend.ar_step(tokens, cache_len, True).logits[0, 0]
        picks.append(row)
    return total / max(1, count), picks


def teacher_forced_ar_loss(backend, windows: Sequence[Sequence[int]]) -> float:
    """Mean next-token cross-entropy (nats) of the AR mode over `windows` (see teacher_forced)."""
    return teacher_forced(backend, windows)[0]


def token_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
    """Fraction of positions where two runs pick the same token (same inputs at every position)."""
    pairs = [(a, b) for r, o in zip(reference, other) for a, b in zip(r, o)]
    return sum(a == b for a, b in pairs) / max(1, len(pairs))


# --------------------------------------------------------------------------- command line
