"""`tidar-export quantize`: explicitly quantized (Q/DQ) INT8 / FP8 artifacts (docs/QUANTIZATION.md).

    tidar-export quantize ARTIFACT -o QUANTIZED --precision int8|fp8 [--calibration FILE]

The recipe, per graph (prefill, step, ar_step):
1. Calibration inputs are the real inputs of a decode: the fp32 artifact runs TiDAR and AR
   greedy decodes of the calibration prompts in ONNX Runtime, and every pass's inputs are
   recorded (prompt ids for the prefill; drafts, cache_len and the KV cache as it stood for the
   step graphs). A reservoir keeps at most `samples` inputs per graph, uniformly over the passes.
2. ONNX Runtime's `quantize_static` writes the graph in QDQ format: QuantizeLinear /
   DequantizeLinear pairs around the inputs of every linear layer's MatMul (q/k/v/o, gate, up,
   down), weights per output channel, activations per tensor, both symmetric (zero point 0, what
   TensorRT requires). The embedding lookup, the LM head, attention, norms and RoPE stay in the
   exported precision (why: docs/QUANTIZATION.md). INT8 activation ranges: MinMax or percentile
   calibration; FP8 (E4M3): ONNX Runtime allows only its Distribution calibrator for float types.
3. The three quantized graphs share one `weights.bin` (export.WeightFile: a quantized weight
   used by several graphs is stored once) in a new artifact whose manifest says `precision:
   int8|fp8` and names `<kind>.int8.onnx` etc.; `quantization.json` beside it records the recipe.
   Graph inputs and outputs keep their dtypes, so every runtime runs it unchanged, and
   `tidar-export build QUANTIZED` builds strongly typed engines from exactly these graphs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tidar_export.errors import TiDARError, first_line
from tidar_runtime import fileio
from tidar_runtime.manifest import GRAPH_KINDS, Manifest, load_manifest
from tidar_runtime.paths import confined

PRECISIONS = ("int8", "fp8")
INT8_METHODS = ("minmax", "percentile")  # activation range calibration for int8
DEFAULT_INT8_METHOD = "minmax"  # equal to percentile within noise on the demo model, and cheaper (docs/QUANTIZATION.md)
DEFAULT_PERCENTILE = 99.999
DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "calibration" / "prompts.txt"
PROMPT_SEPARATOR = "# %%"  # a line of its own before each prompt of a calibration text file
FP8_MIN_OPSET = 19  # DequantizeLinear takes float8 inputs from opset 19 on
SIDECAR = "quantization.json"
# Scopes whose MatMuls stay unquantized: the LM head (its error reaches every logit that the
# verification compares) -- node names are module paths (docs/EXPORT.md).
EXCLUDED_SCOPES = ("/lm_head/",)


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


# --------------------------------------------------------------------------- quantizing one graph


def quantized_nodes(model) -> list[str]:
    """Names of the MatMuls to quantize: a weight initializer as second input, not excluded."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits
            and not any(s in n.name for s in EXCLUDED_SCOPES)]


def same_prompt_length(feeds: list[dict]) -> list[dict]:
    """Prefill samples cut to the shortest prompt (its last tokens). ORT's histogram
    calibrators (Percentile, Distribution) stack every sample of a tensor into one array and fails on varying lengths
    ("ValueError: setting an array element with a sequence ... inhomogeneous shape")."""
    if not feeds or "input_ids" not in feeds[0] or len(feeds[0]) != 1:
        return feeds  # only the prefill has a dynamic dim
    n = min(f["input_ids"].shape[1] for f in feeds)
    return [{"input_ids": f["input_ids"][:, -n:]} for f in feeds]


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


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def quantize_graph(src: Path, dst: Path, feeds: list[dict], precision: str, method: str = DEFAULT_INT8_METHOD,
                   percentile: float = DEFAULT_PERCENTILE) -> dict:
    """Quantize one graph with ONNX Runtime's static quantizer; returns what was done."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    proto = onnx.load(str(src), load_external_data=False)
    nodes = quantized_nodes(proto)
    if not nodes:
        raise TiDARError(f"{src.name}: no linear-layer MatMul with a weight initializer to quantize")
    if not feeds:
        raise TiDARError(f"{src.name}: no calibration inputs were recorded")
    if precision == "fp8":
        qtype, calib, extra = QuantType.QFLOAT8E4M3FN, CalibrationMethod.Distribution, {}
        feeds = same_prompt_length(feeds)
    else:
        qtype = QuantType.QInt8
        calib = CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile
        extra = {"CalibPercentile": percentile} if method == "percentile" else {}
        if method == "percentile":  # a histogram calibrator, like fp8's
            feeds = same_prompt_length(feeds)

    class Reader(_Reader, CalibrationDataReader):
        pass

    options = {
        "ActivationSymmetric": True,  # zero point 0: TensorRT's Q/DQ requirement
        "WeightSymmetric": True,
        # Only the MatMul inputs get Q/DQ. Quantizing the outputs too would put Q/DQ on the new
        # K/V that the graphs return (a quantized cache) and before Reshape/Transpose, where ORT
        # 1.32's QDQ propagation builds an invalid node at session load: "[TypeInferenceError]
        # output_dtype INT8 does not match y_zero_point type UINT8".
        "OpTypesToExcludeOutputQuantization": ["MatMul"],
        **extra,
    }
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs "Please consider to run pre-processing" warnings
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and prints its histogram progress
            quantize_static(str(src), str(dst), Reader(feeds), quant_format=QuantFormat.QDQ,
                            activation_type=qtype, weight_type=qtype, per_channel=True,
                            nodes_to_quantize=nodes, op_types_to_quantize=["MatMul"], calibrate_method=calib,
                            use_external_data_format=True, extra_options=options)
    except (ValueError, RuntimeError, TypeError) as e:
        raise TiDARError(f"{src.name}: ONNX Runtime's quantizer failed ({first_line(e)})") from None
    finally:
        root.setLevel(level)
    return {"nodes": len(nodes), "calibration_samples": len(feeds)}


# --------------------------------------------------------------------------- the artifact


def _fingerprint(prompts: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(np.asarray(p, np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def quantize_artifact(artifact: str | os.PathLike, output: str | os.PathLike, precision: str = "int8", *,
                      calibration: str | os.PathLike | None = None, prompts: Sequence[Sequence[int]] | None = None,
                      samples: int = 64, max_new_tokens: int = 48, method: str = DEFAULT_INT8_METHOD,
                      percentile: float = DEFAULT_PERCENTILE, seed: int = 0, log=None, force: bool = False) -> Path:
    """Write a Q/DQ artifact at `output` from the fp32/fp16 artifact `artifact` (atomically).

    Calibration prompts: `prompts` (token ids) if given, else the text file `calibration`
    (default: calibration/prompts.txt) tokenized with the artifact's tokenizer.
    """
    import onnx
    import onnxruntime

    import tidar_export
    from tidar_export.export.artifact import WEIGHTS_FILE, prepare_output, staged_artifact

    log = log or (lambda msg: None)
    artifact, output = Path(artifact), Path(output)
    if precision not in PRECISIONS:
        raise TiDARError(f"unknown quantized precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if method not in INT8_METHODS:
        raise TiDARError(f"unknown calibration method {method!r}: choose one of {', '.join(INT8_METHODS)}")
    if samples < 1 or max_new_tokens < 1:
        raise TiDARError("--samples and --max-new-tokens must be >= 1")
    if not 50.0 < percentile <= 100.0:
        raise TiDARError(f"--percentile must be in (50, 100], got {percentile}")
    manifest = load_manifest(artifact)
    if manifest.precision in PRECISIONS:
        raise TiDARError(f"{artifact} is already quantized ({manifest.precision}); quantize the artifact it came from")
    opset = manifest.versions.get("opsets", {}).get("ai.onnx")
    if precision == "fp8" and opset is not None and opset < FP8_MIN_OPSET:
        raise TiDARError(f"fp8 needs ONNX opset >= {FP8_MIN_OPSET} (float8 DequantizeLinear); the {manifest.target} "
                         f"graphs of {artifact} are opset {opset}: export for target ort or trt-10.15")
    if artifact.resolve() == output.resolve():
        raise TiDARError("the quantized artifact must go to another directory than its source (-o)")
    output = prepare_output(output, force, inputs=[artifact])
    if prompts is None:
        calibration = Path(calibration) if calibration is not None else DEFAULT_CALIBRATION
        prompts = tokenize_prompts(artifact, manifest, read_prompt_file(calibration))
        source = calibration.name
    else:
        source = "token ids"
    log(f"calibrating {precision} on {len(prompts)} prompts from {source} "
        f"(up to {samples} inputs per graph, {max_new_tokens} new tokens per decode)")
    feeds = collect_calibration_inputs(artifact, prompts, samples=samples, max_new_tokens=max_new_tokens,
                                       seed=seed, log=log)

    with staged_artifact(output, force) as (tmp, weights):
        new = dataclasses.replace(manifest, graphs={}, precision=precision, versions=dict(manifest.versions))
        done = {}
        with fileio.temp_dir("tidar-quant.") as scratch:
            for kind in GRAPH_KINDS:
                t0 = time.perf_counter()
                spec = manifest.graphs[kind]
                raw = Path(scratch) / f"{kind}.onnx"
                done[kind] = quantize_graph(artifact / spec.file, raw, feeds[kind], precision, method, percentile)
                proto = onnx.load(str(raw))  # with its external data, moved into the shared weights.bin
                keep_bias_adds_unfused(proto)
                weights.externalize_proto(proto)
                name = f"{kind}.{precision}.onnx"
                onnx.save_model(proto, str(tmp / name))
                new.graphs[kind] = dataclasses.replace(spec, file=name, bytes=(tmp / name).stat().st_size,
                                                       engine=None, engine_info={})
                log(f"{kind}: {done[kind]['nodes']} MatMuls quantized to {precision} on "
                    f"{done[kind]['calibration_samples']} inputs in {time.perf_counter() - t0:.1f}s")
        weights.close()
        new.weights = {"file": WEIGHTS_FILE, "bytes": weights.size}
        new.versions.pop("tensorrt", None)
        new.versions["quantizer"] = f"onnxruntime.quantization {onnxruntime.__version__}"
        new.versions["tidar_export"] = tidar_export.__version__
        if manifest.tokenizer.get("file"):  # a name load_manifest confined to the artifact; the same name in tmp
            name = manifest.tokenizer["file"]
            shutil.copyfile(confined(artifact, name, f"{artifact}: tokenizer file"),
                            confined(tmp, name, f"{output}: tokenizer file"))
        recipe = {
            "precision": precision,
            "source_precision": manifest.precision,
            "quantizer": new.versions["quantizer"],
            "format": "QDQ",
            "weights": "per output channel, symmetric",
            "activations": "per tensor, symmetric",
            "calibration_method": ("distribution" if precision == "fp8" else method)
                                  + (f" {percentile}" if precision == "int8" and method == "percentile" else ""),
            "quantized_ops": "MatMul of every linear layer (LM head excluded)",
            "calibration": {"source": source, "prompts": len(prompts), "fingerprint": _fingerprint(prompts),
                            "max_new_tokens": max_new_tokens, "samples_per_graph": samples, "seed": seed},
            "graphs": done,
        }
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
