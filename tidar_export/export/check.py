"""`tidar-export check`: verify an artifact against its manifest, its target, and torch.

Three layers, each failure collected (a result per output, one typed error that
lists every failing check):
1. Files: the manifest loads (version, sizes), every graph parses, every external weight
   reference lies inside the shared weight file. A broken artifact stops here with a
   one-line TiDARError: nothing else can be trusted.
2. Graphs: bindings, dtypes and shapes equal the manifest's; `tidar_graphs.check_graph`
   finds no operator, attribute, shape or int64 problem for the target.
3. Numerics (with `--checkpoint`): ONNX Runtime against the torch reference model on random
   inputs, per output and per case (several prompt lengths, batch sizes and per-row cache
   lengths), with per-output tolerances. The torch side is the reference model's own
   forward (scatter cache write, full logits), not the traced wrappers, so it also checks
   the wrappers' row selection, positions and masks.

Tolerances. An output passes when every element is within the fixed per-precision tolerance
of `TOLERANCES`, or, failing that, when ONNX Runtime is about as accurate as the torch
reference itself: both are compared with the reference model run in float64 on the same
inputs, and ORT's largest error may be at most REFERENCE_ERROR_FACTOR times torch's own
(`float64_bound`). Rounding error grows with depth, with the scale of the logits and with
the cache length (each attention sums over more slots), so a fixed tolerance that suits a
4-layer model fails a correct export of a 30-layer one; the float64 run measures that
growth per case instead of guessing it (docs/EXPORT.md has the measurements).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tidar_export.errors import TiDARError, first_line
from tidar_runtime.backends.ort import run_graph
from tidar_runtime.contract import (CACHE_LEN, DTYPES, INPUT_IDS, LOGITS, PAST_PREFIX, PRESENT_PREFIX, TOKEN_IDS,
                                    dtype_of_onnx, ids_input, past_names)
from tidar_runtime.manifest import GraphSpec, Manifest, load_manifest, verify_digests

# (atol, rtol) per precision and output family: an element fails if |ort - torch| > atol + rtol * |torch|.
TOLERANCES = {
    "fp32": {"logits": (1e-3, 1e-3), "present": (5e-4, 1e-3)},
    "fp16": {"logits": (5e-2, 2e-2), "present": (2e-2, 1e-2)},
    "bf16": {"logits": (2.5e-1, 5e-2), "present": (1e-1, 5e-2)},
}
# ORT's largest error against the float64 reference may be this many times the torch reference's
# own (same inputs, same precision), plus FLOAT64_FLOOR_ULPS units in the last place of the
# output's scale. Measured on SmolLM2-135M fp32 (30 layers, ort target): the ratio of the two
# errors ranged 0.6-2.1 over the step cases; a wrong graph is orders of magnitude off.
REFERENCE_ERROR_FACTOR = 4.0
FLOAT64_FLOOR_ULPS = 8
_EPS = {"fp32": float(np.finfo(np.float32).eps), "fp16": float(np.finfo(np.float16).eps), "bf16": 2.0 ** -7}
_ONNX_EXTERNAL = 1  # onnx.TensorProto.EXTERNAL


class ArtifactCheckError(TiDARError):
    """Checks failed; `failures` lists every one (the message joins them on one line)."""

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        super().__init__(f"{len(self.failures)} check(s) failed: " + "; ".join(self.failures))


@dataclass
class OutputResult:
    """ORT against torch for one output of one case."""

    graph: str
    case: str  # e.g. "batch=2 cache_len=[0,37]"
    output: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    tolerance: str  # "atol=1e-04 rtol=1e-03", or the token rule
    ok: bool
    detail: str = ""  # why it failed, or the token agreement

    def failure(self) -> str:
        return f"{self.graph} [{self.case}] {self.output}: {self.detail}"


@dataclass
class CheckReport:
    manifest: Manifest
    failures: list[str] = field(default_factory=list)  # structural and numeric, one line each
    results: list[OutputResult] = field(default_factory=list)
    numerics: bool = False  # whether ORT vs torch ran
    warnings: list[str] = field(default_factory=list)  # risks that are no failure (attention_warnings)

    @property
    def ok(self) -> bool:
        return not self.failures

    def raise_for_failures(self) -> None:
        """ArtifactCheckError listing every failure, if there is any."""
        if self.failures:
            raise ArtifactCheckError(self.failures)


# --------------------------------------------------------------------------- files and graphs


def load_graph(artifact_dir: Path, spec: GraphSpec, manifest: Manifest):
    """Parse one graph (without its weights) and check its external references; TiDARError if broken."""
    import onnx
    from google.protobuf.message import DecodeError

    path = artifact_dir / spec.file
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError) as e:
        raise TiDARError(f"{path}: not a readable ONNX graph, the file is corrupt or truncated "
                         f"({type(e).__name__})") from None
    weights = manifest.weights.get("file")
    size = (artifact_dir / weights).stat().st_size if weights else 0
    for t in proto.graph.initializer:
        if t.data_location != _ONNX_EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") != weights:
            raise TiDARError(f"{path}: initializer {t.name} points at {info.get('location')!r}, not at "
                             f"the artifact's weight file {weights!r}")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > size:
            raise TiDARError(f"{path}: initializer {t.name} ends at byte {end} of {weights}, which has "
                             f"{size} bytes (truncated weight file)")
    return proto


_FLOAT_TYPES = {1: np.float32, 10: np.float16, 11: np.float64}  # onnx.TensorProto float element types


def nonfinite_weights(artifact_dir: Path, proto, manifest: Manifest, kind: str) -> list[str]:
    """External float initializers holding NaN or inf (read through a memory map, one at a time)."""
    weights = manifest.weights.get("file")
    if not weights:
        return []
    data = np.memmap(artifact_dir / weights, dtype=np.uint8, mode="r")
    bad = []
    for t in proto.graph.initializer:
        dtype = _FLOAT_TYPES.get(t.data_type)
        if t.data_location != _ONNX_EXTERNAL or (dtype is None and t.data_type != 16):
            continue
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        raw = data[offset:offset + length]
        if t.data_type == 16:  # bfloat16: the upper half of a float32
            values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw[: length - length % np.dtype(dtype).itemsize].view(dtype)
        if not np.isfinite(values).all():
            bad.append(f"{kind}: initializer {t.name} in {weights} holds NaN or infinite values")
    return bad


def attention_warnings(manifest: Manifest, protos: dict) -> list[str]:
    """One line when an artifact for trt-10.15 carries fused Attention nodes in float32.

    TensorRT 10.15's ONNX parser turns each ONNX Attention node into an IAttention layer that is
    not decomposable (unless the node carries TensorRT's own decomposable attribute, which
    ONNX Runtime would reject), and a non-decomposable IAttention must find a fused kernel;
    TensorRT may have none in fp32 (the demo model's head_dim is 32), and then the build fails.
    fp16/bf16 is what trt-10.15 is meant for; fp32 engines come from the trt-10.3 target, whose
    attention is decomposed (docs/TENSORRT.md).
    """
    if manifest.target != "trt-10.15":
        return []
    kv = next((t.dtype for t in manifest.graphs["step"].inputs if t.name.startswith(PAST_PREFIX + ".")), None)
    if kv != "float32":
        return []
    counts = {kind: sum(n.op_type == "Attention" and n.domain in ("", "ai.onnx") for n in p.graph.node)
              for kind, p in protos.items()}
    counts = {k: n for k, n in counts.items() if n}
    if not counts:
        return []
    where = ", ".join(f"{k} {n}" for k, n in counts.items())
    return [f"fused Attention in float32 for trt-10.15 ({where} nodes, head_dim {manifest.head_dim}): "
            "TensorRT 10.15 builds them as non-decomposable IAttention layers, which need a fused kernel that may "
            "not exist in fp32, so the engine build can fail; export with --dtype bf16 (or fp16) for trt-10.15, or "
            "--target trt-10.3 (decomposed attention) for fp32 engines"]


def _shape_of(value) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def graph_failures(proto, spec: GraphSpec, manifest: Manifest) -> list[str]:
    """Bindings of the graph against the manifest's GraphSpec (names, dtypes, shapes)."""
    failures = []
    for what, values, specs in (("inputs", proto.graph.input, spec.inputs),
                                ("outputs", proto.graph.output, spec.outputs)):
        names, want = [v.name for v in values], [t.name for t in specs]
        if names != want:
            failures.append(f"{spec.kind}: graph {what} {names} differ from the manifest's {want}")
            continue
        for v, t in zip(values, specs):
            dtype = dtype_of_onnx(v.type.tensor_type.elem_type)
            if dtype != t.dtype:
                failures.append(f"{spec.kind}: {v.name} has dtype {dtype}, the manifest says {t.dtype}")
            shape = _shape_of(v)
            resolved = [d if isinstance(d, int) else manifest.dims.get(d, d) for d in t.shape]
            expected = [d if r is None else r for d, r in zip(t.shape, resolved)]
            if shape != expected:
                failures.append(f"{spec.kind}: {v.name} has shape {shape}, the manifest says {expected}")
    return failures


# --------------------------------------------------------------------------- numerics


def _cases(manifest: Manifest, kind: str, rng: np.random.Generator) -> list[tuple[int, object]]:
    """(batch, lengths) of the random cases: prompt lengths for prefill, per-row cache_len otherwise."""
    S, b, B = manifest.max_seq_len, manifest.block_size, manifest.max_batch
    if kind == "prefill":
        longest = S - b
        lengths = sorted({1, min(7, longest), min(2 * b + 3, longest), min(64, longest)})
        return [(1 + i % 2, P) for i, P in enumerate(lengths)]
    T = manifest.step_len if kind == "step" else 1
    top = S - T  # the largest L a runtime may use (L + T <= S)
    cases = [np.zeros(B, dtype=np.int64), np.full(B, top, dtype=np.int64)]
    rand = rng.integers(0, top + 1, size=B)
    rand[0] = min(top, 1 + rng.integers(0, max(1, top // 4)))
    cases.append(rand.astype(np.int64))
    if B > 1:  # distinct per-row lengths, one row at each extreme
        spread = np.linspace(0, top, B).round().astype(np.int64)
        cases.append(spread)
    return [(B, c) for c in cases]


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own error types (they derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, n) for n in ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError",
                                            "RuntimeException", "InvalidProtobuf", "ModelLoaded",
                                            "NotImplemented", "InvalidGraph", "EPFail") if hasattr(state, n))


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _random_feeds(manifest: Manifest, kind: str, batch: int, lengths, rng) -> dict:
    """Random graph inputs as torch tensors, caches already in the artifact's precision (so that
    torch and ORT see the same values)."""
    import torch

    from tidar_export.export.tracing import torch_dtype

    V, n = manifest.vocab_size, manifest.num_layers
    ids = lambda *shape: torch.from_numpy(rng.integers(0, V, size=shape).astype(np.int64))  # noqa: E731
    if kind == "prefill":
        return {INPUT_IDS: ids(batch, lengths)}
    width = manifest.block_size if kind == "step" else 1
    feeds = {ids_input(kind): ids(batch, width), CACHE_LEN: torch.as_tensor(np.asarray(lengths, dtype=np.int64))}
    shape = (batch, manifest.dims["kv_heads"], manifest.max_seq_len, manifest.dims["head_dim"])
    dtype = torch_dtype(manifest.precision)
    for name in past_names(n):
        feeds[name] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(dtype)
    return feeds


def _compare(graph: str, case: str, name: str, got: np.ndarray, want: np.ndarray, atol: float,
             rtol: float) -> OutputResult:
    got64, want64 = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    tol = f"atol={atol:.0e} rtol={rtol:.0e}"
    if got64.shape != want64.shape:
        return OutputResult(graph, case, name, np.nan, np.nan, np.nan, np.nan, tol, False,
                            f"shape {list(got64.shape)} != torch {list(want64.shape)}")
    diff = np.abs(got64 - want64)
    rel = diff / np.maximum(np.abs(want64), 1e-6)
    bad = ~(diff <= atol + rtol * np.abs(want64))  # NaN counts as bad
    res = OutputResult(graph, case, name, float(np.nanmax(diff)) if diff.size else 0.0,
                       float(np.nanmean(diff)) if diff.size else 0.0, float(np.nanmax(rel)) if rel.size else 0.0,
                       float(np.nanmean(rel)) if rel.size else 0.0, tol, not bad.any())
    if bad.any():
        res.detail = (f"{int(bad.sum())} of {bad.size} elements outside {tol} "
                      f"(max abs {res.max_abs:.3g}, max rel {res.max_rel:.3g})")
    return res


def compare_tokens(graph: str, case: str, got: np.ndarray, want: np.ndarray, ref_logits: np.ndarray,
                    atol: float, rtol: float) -> OutputResult:
    """Exact agreement, except at near ties: ORT may pick another token only if torch's logit for
    it is within the logits tolerance of torch's maximum."""
    rule = "exact, ties within logits tol"
    if got.shape != want.shape:
        return OutputResult(graph, case, TOKEN_IDS, np.nan, np.nan, np.nan, np.nan, rule, False,
                            f"shape {list(got.shape)} != torch {list(want.shape)}")
    agree = got == want
    top = ref_logits.max(-1)
    picked = np.take_along_axis(ref_logits, np.clip(got, 0, ref_logits.shape[-1] - 1)[..., None], -1)[..., 0]
    in_vocab = (got >= 0) & (got < ref_logits.shape[-1])
    tie = in_vocab & (top - picked <= atol + rtol * np.abs(top))
    unexplained = ~agree & ~tie
    mismatch = float((~agree).mean()) if agree.size else 0.0
    res = OutputResult(graph, case, TOKEN_IDS, mismatch, mismatch, 0.0, 0.0, rule, not unexplained.any(),
                       f"agreement {100 * (1 - mismatch):.1f}%")
    if unexplained.any():
        res.detail = (f"{int(unexplained.sum())} of {agree.size} token ids differ from torch's argmax "
                      f"outside a near tie (agreement {100 * (1 - mismatch):.1f}%)")
    return res


def numeric_results(artifact_dir: Path, manifest: Manifest, model, seed: int = 0) -> list[OutputResult]:
    """ORT against torch for every graph, case and output. One ORT session alive at a time.
    Outputs outside the fixed tolerance are judged against the float64 reference (`float64_bound`)."""
    from tidar_export.model.reference import reference_outputs

    rng = np.random.default_rng(seed)
    tol = TOLERANCES[manifest.precision]
    results = []
    ort_errors = _ort_errors()
    exact_model = _Float64Model(model)
    for kind, spec in manifest.graphs.items():
        try:
            session = _ort_session(artifact_dir / spec.file)
        except ort_errors as e:  # e.g. bf16 kernels that the CPU provider lacks
            results.append(OutputResult(kind, "session", "*", np.nan, np.nan, np.nan, np.nan, "-", False,
                                        f"ONNX Runtime (CPU) cannot load it: {first_line(e)}"))
            continue
        names = [o.name for o in session.get_outputs()]
        for batch, lengths in _cases(manifest, kind, rng):
            feeds = _random_feeds(manifest, kind, batch, lengths, rng)
            want = reference_outputs(model, manifest, kind, feeds)
            case = (f"batch={batch} prompt_len={lengths}" if kind == "prefill"
                    else f"batch={batch} cache_len={list(map(int, lengths))}")
            try:
                got = run_graph(session, {k: _to_ort(v) for k, v in feeds.items()},
                                spec.kv_update == "inplace")
            except ort_errors as e:
                results.append(OutputResult(kind, case, "*", np.nan, np.nan, np.nan, np.nan, "-", False,
                                            f"ONNX Runtime failed: {first_line(e)}"))
                continue
            got = {name: got[name] if name == TOKEN_IDS else _from_ort(got[name]) for name in names}
            case_results = []
            for name in names:
                if name == TOKEN_IDS:
                    case_results.append(compare_tokens(kind, case, got[name], want[name], want[LOGITS],
                                                       *tol["logits"]))
                else:
                    family = "logits" if name == LOGITS else "present"
                    case_results.append(_compare(kind, case, name, got[name], want[name], *tol[family]))
            if not all(r.ok for r in case_results):
                exact = exact_model.outputs(manifest, kind, feeds)
                case_results = [float64_bound(r, got, want, exact, manifest.precision) if not r.ok else r
                                for r in case_results]
            results += case_results
        del session
    return results


class _Float64Model:
    """The reference model in float64, made on first use (only a case that fails the fixed
    tolerance needs it) and kept for the following cases."""

    def __init__(self, model):
        self._model, self._exact = model, None

    def outputs(self, manifest: Manifest, kind: str, feeds: dict) -> dict[str, np.ndarray]:
        import copy

        import torch

        from tidar_export.model.reference import reference_outputs

        if self._exact is None:
            self._exact = copy.deepcopy(self._model).to(torch.float64)
        wide = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in feeds.items()}
        return reference_outputs(self._exact, manifest, kind, wide)


def float64_bound(res: OutputResult, got: dict, want: dict, exact: dict, precision: str) -> OutputResult:
    """Re-judge an output that failed the fixed tolerance: it passes if ORT's largest error
    against the float64 reference `exact` is at most REFERENCE_ERROR_FACTOR times the torch
    reference's own largest error against it (plus a floor of a few ulps of the output's scale).
    token_ids: ORT's token must then be torch's argmax or within that logits bound of it."""
    if res.output == TOKEN_IDS:
        if got[TOKEN_IDS].shape != want[TOKEN_IDS].shape or LOGITS not in got:
            return res
        bound, _, _ = _error_bound(got[LOGITS], want[LOGITS], exact[LOGITS], precision)
        retry = compare_tokens(res.graph, res.case, got[TOKEN_IDS], want[TOKEN_IDS], want[LOGITS], bound, 0.0)
        retry.tolerance = f"exact, ties within {bound:.1e} (float64-calibrated)"
        return retry
    name = res.output
    if got[name].shape != want[name].shape:
        return res
    bound, ort_err, ref_err = _error_bound(got[name], want[name], exact[name], precision)
    ok = bool(ort_err <= bound)  # NaN fails
    out = dataclasses.replace(res, ok=ok, tolerance=f"<= {REFERENCE_ERROR_FACTOR:g}x torch's own error "
                                                    f"vs float64 ({ref_err:.1e})")
    out.detail = ("" if ok else f"max abs error vs float64 {ort_err:.3g} > {bound:.3g} "
                                f"({REFERENCE_ERROR_FACTOR:g}x torch's own {ref_err:.3g} + floor), "
                                f"vs torch {res.detail}")
    return out


def _error_bound(got: np.ndarray, want: np.ndarray, exact: np.ndarray, precision: str) -> tuple[float, float, float]:
    """(allowed max abs error, ORT's max abs error, torch's max abs error), both against float64."""
    exact = np.asarray(exact, dtype=np.float64)
    ort_err = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - exact))) if exact.size else 0.0
    ref_err = float(np.max(np.abs(np.asarray(want, dtype=np.float64) - exact))) if exact.size else 0.0
    scale = float(np.max(np.abs(exact))) if exact.size else 0.0
    floor = FLOAT64_FLOOR_ULPS * _EPS[precision] * scale
    return REFERENCE_ERROR_FACTOR * ref_err + floor, ort_err, ref_err


def _to_ort(t):
    """A torch input as ORT takes it; numpy has no bfloat16, so those go as OrtValues of raw bits."""
    import torch

    if t.dtype == torch.bfloat16:
        import onnxruntime as ort

        bf16 = DTYPES["bfloat16"][0]
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.contiguous().view(torch.uint16).numpy(), bf16)
    return t.numpy()


def _from_ort(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


# --------------------------------------------------------------------------- entry points


def check_artifact(artifact_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                   seed: int = 0) -> CheckReport:
    """Run every check. A broken artifact raises TiDARError at once; failed checks are collected in
    the report (`report.raise_for_failures()` turns them into one ArtifactCheckError)."""
    import tidar_graphs

    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir, verify="none")  # parse errors first, then the digests
    report = CheckReport(manifest)
    dynamic = [name for name, value in manifest.dims.items() if value is None]  # the prefill's own dims
    protos = {}
    for kind, spec in manifest.graphs.items():
        proto = protos[kind] = load_graph(artifact_dir, spec, manifest)
        report.failures += graph_failures(proto, spec, manifest)
        allowed = dynamic if kind == "prefill" else []
        report.failures += [f"{kind} ({manifest.target}): {msg}"
                            for msg in tidar_graphs.check_graph(proto, manifest.target, dynamic_dims=allowed)]
        report.failures += nonfinite_weights(artifact_dir, proto, manifest, kind)
    verify_digests(artifact_dir, manifest, full=True)
    if not (manifest.weights.get("blake2b") and all(g.digest for g in manifest.graphs.values())):
        report.failures.append("no digests recorded for the weights and graphs: re-export the artifact")
    report.warnings = attention_warnings(manifest, protos)
    del protos
    if checkpoint is not None:
        from tidar_export.model.reference import reference_model

        model = reference_model(checkpoint, manifest)
        report.results = numeric_results(artifact_dir, manifest, model, seed)
        report.numerics = True
        report.failures += [r.failure() for r in report.results if not r.ok]
    return report


def format_table(results: list[OutputResult], verbose: bool = False) -> str:
    """One row per graph, case and output; without `verbose`, present.* rows are merged per case
    into the worst layer's key and value rows."""
    rows: list[OutputResult] = []
    slot: dict[tuple, int] = {}  # merged present.* row -> its index in rows
    for r in results:
        if verbose or not r.output.startswith(PRESENT_PREFIX + "."):
            rows.append(r)
            continue
        key = (r.graph, r.case, f"{PRESENT_PREFIX}.*." + r.output.rsplit(".", 1)[1])
        merged = dataclasses.replace(r, output=f"{key[2]} (worst {r.output})")
        if key not in slot:
            slot[key] = len(rows)
            rows.append(merged)
            continue
        cur = rows[slot[key]]
        if (not r.ok, r.max_abs) > (not cur.ok, cur.max_abs):
            rows[slot[key]] = dataclasses.replace(merged, ok=r.ok and cur.ok)
        else:
            cur.ok = cur.ok and r.ok
    header = ("graph", "case", "output", "max abs", "mean abs", "max rel", "mean rel", "tolerance", "")
    lines = [header]
    for r in rows:
        if r.output == TOKEN_IDS:
            nums = (f"{100 * (1 - r.max_abs):.1f}% agree", "", "", "")
        else:
            nums = tuple(f"{x:.2e}" for x in (r.max_abs, r.mean_abs, r.max_rel, r.mean_rel))
        lines.append((r.graph, r.case, r.output, *nums, r.tolerance, "ok" if r.ok else "FAIL"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
