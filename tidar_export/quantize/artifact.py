"""The quantized artifact: checks of the request, the calibration and the per-graph quantization, and
the artifact written atomically with its recipe (quantization.json).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tidar_export.errors import TiDARError
from tidar_export.quantize.calibration import (
    DEFAULT_CALIBRATION, DEFAULT_CALIBRATION_NEW_TOKENS, DEFAULT_CALIBRATION_PROMPTS, DEFAULT_SAMPLES, collect_calibration_inputs, read_prompt_file, tokenize_prompts,
)
from tidar_export.quantize.graph import linear_layers
from tidar_export.quantize.stats import activation_stats
from tidar_export.quantize.qdq import (
    DEFAULT_INT8_METHOD, DEFAULT_PERCENTILE, FP8_MIN_OPSET, INT8_METHODS, QMAX, activation_scales,
    keep_bias_adds_unfused, qdq_graph,
)
from tidar_export.quantize.weight_only import (
    BLOCK_DQ_MIN_OPSET, BLOCK_SIZES, DEFAULT_BLOCK_SIZE, WEIGHT_ONLY_BITS, WO_METHODS, externalize_packed,
    unshare_weights, weight_only_graph,
)
from tidar_export.quantize.metrics import (
    AGREEMENT_NEW_TOKENS, AGREEMENT_PROMPT_LEN, AGREEMENT_PROMPTS, AGREEMENT_WARNING, agreement_with_source,
)
from tidar_export.quantize.awq import awq_folded_weights, awq_groups, awq_search, value_cache_scales
from tidar_runtime.contract import GRAPH_KINDS, QUANTIZED_PRECISIONS
from tidar_runtime.manifest import Manifest, load_manifest
from tidar_runtime.paths import confined

# The embedding table and LM head of the default int4 recipe (minmax): 8 bits. On SmolLM2-135M
# (tied, 21% of the weights, not from a 4-bit grid) int4 tables cost about 0.05 of per-token
# agreement (docs/QUANTIZATION.md).
MINMAX_TABLE_BITS = 8
QUANTIZER_VERSION = "3"  # 2: shared activation scales, own Q/DQ writer, weight-only int4 / int8;
# 3: quantization.json records the V-cache scales of AWQ's v_proj folds (value_cache_scales)
SIDECAR = "quantization.json"


def _fingerprint(prompts: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(np.asarray(p, np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def default_method(precision: str, target: str = "ort") -> str:
    """int8 / fp8: min/max ranges. Weight-only: the asymmetric "minmax" grid where the target's
    operator takes zero points (ort's MatMulNBits; no calibration), AWQ's symmetric grid elsewhere."""
    if precision not in WEIGHT_ONLY_BITS:
        return DEFAULT_INT8_METHOD
    return "minmax" if target == "ort" else "awq"


def _check_request(manifest: Manifest, artifact: Path, precision: str, method: str, block: int) -> None:
    if precision not in QUANTIZED_PRECISIONS:
        raise TiDARError(f"unknown quantized precision {precision!r}: choose one of {', '.join(QUANTIZED_PRECISIONS)}")
    methods = WO_METHODS if precision in WEIGHT_ONLY_BITS else INT8_METHODS
    if method not in methods:
        raise TiDARError(f"--method {method} does not apply to {precision}: choose one of {', '.join(methods)}")
    if method == "minmax" and precision in WEIGHT_ONLY_BITS and manifest.target != "ort":
        raise TiDARError(f"--method minmax needs zero points (MatMulNBits, target ort); TensorRT's INT4 weights are "
                         f"symmetric: use --method awq or rtn for {manifest.target}")
    if manifest.precision in QUANTIZED_PRECISIONS:
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
                   target: str = "ort", tables: bool = True, accuracy_level: int = 0, overrides=None,
                   minmax: bool = False, table_bits: int | None = None) -> dict:
    """Quantize one graph in place with the artifact's shared parameters; returns what was done."""
    if not linear_layers(model):
        raise TiDARError(f"{kind}: no linear-layer MatMul with a weight initializer to quantize")
    if precision in WEIGHT_ONLY_BITS:
        return weight_only_graph(model, precision, block, target, tables, accuracy_level, overrides or {}, minmax,
                                 table_bits)
    n = qdq_graph(model, scales, precision)
    keep_bias_adds_unfused(model)
    return {"nodes": n}


def quantize_artifact(artifact: str | os.PathLike, output: str | os.PathLike, precision: str = "int8", *,
                      calibration: str | os.PathLike | None = None, prompts: Sequence[Sequence[int]] | None = None,
                      samples: int = DEFAULT_SAMPLES, max_new_tokens: int = DEFAULT_CALIBRATION_NEW_TOKENS,
                      calibration_prompts: int = DEFAULT_CALIBRATION_PROMPTS, method: str | None = None,
                      percentile: float = DEFAULT_PERCENTILE, block_size: int = DEFAULT_BLOCK_SIZE,
                      quantize_tables: bool = True, table_bits: int | None = None, accuracy_level: int = 0,
                      seed: int = 0, check_prompts: Sequence[Sequence[int]] | None = None,
                      feeds: dict[str, list[dict]] | None = None, log=None, force: bool = False) -> Path:
    """Write a quantized artifact at `output` from the fp32/fp16 artifact `artifact` (atomically).

    int8 / fp8: Q/DQ on activations and weights, one activation scale per tensor role shared by
    the three graphs. int4 / int8-wo: weight-only, block-wise (`block_size`), RTN or AWQ-style
    scales (`method`), embedding and LM head too unless `quantize_tables` is False.
    Calibration prompts: `prompts` (token ids) if given, else the text file `calibration`
    (default: calibration/prompts.txt) tokenized with the artifact's tokenizer. `feeds`: the
    graph inputs `collect_calibration_inputs` recorded for these prompts, to reuse them.
    Afterwards the new artifact's per-token agreement with `artifact` is measured on a few of
    `check_prompts` (default: the calibration prompts; [] skips it), logged with a warning below
    AGREEMENT_WARNING, and recorded in quantization.json.
    """
    import onnx
    import onnxruntime
    import tidar_graphs

    import tidar_export
    from tidar_export.export.artifact import WEIGHTS_FILE, prepare_output, staged_artifact

    log = log or (lambda msg: None)
    artifact, output = Path(artifact), Path(output)
    if table_bits not in (None, 4, 8):
        raise TiDARError(f"--table-bits must be 4 or 8, got {table_bits}")
    if samples < 1 or max_new_tokens < 1 or calibration_prompts < 1:
        raise TiDARError("--samples, --max-new-tokens and --calibration-prompts must be >= 1")
    if not 50.0 < percentile <= 100.0:
        raise TiDARError(f"--percentile must be in (50, 100], got {percentile}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise TiDARError(f"--accuracy-level must be 0..4 (MatMulNBits), got {accuracy_level}")
    manifest = load_manifest(artifact)
    method = method or default_method(precision, manifest.target)
    _check_request(manifest, artifact, precision, method, block_size)
    if table_bits is None and method == "minmax" and precision == "int4":
        table_bits = MINMAX_TABLE_BITS
    if artifact.resolve() == output.resolve():
        raise TiDARError("the quantized artifact must go to another directory than its source (-o)")
    output = prepare_output(output, force, inputs=[artifact])
    blocks = tidar_graphs.get_target(manifest.target).int4_block_sizes
    if precision in WEIGHT_ONLY_BITS and block_size not in blocks:
        log(f"warning: blocks of {block_size} run in ONNX Runtime, but `tidar-export build` refuses them: "
            f"TensorRT's INT4 weights take blocks of {' or '.join(map(str, blocks))}")
    if precision in QMAX and manifest.export["ar_step"] == "gqa":
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
        prompts = prompts[:calibration_prompts]
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
        config = manifest.model_config()
        awq = awq_groups(graphs["step"], config)
        awq_search(graphs["step"], awq, stats, WEIGHT_ONLY_BITS[precision], block_size, config)
        overrides = awq_folded_weights(graphs["step"], awq, config)
        log(f"AWQ scales for {sum(g.scales is not None for g in awq)}/{len(awq)} layer groups in "
            f"{time.perf_counter() - t0:.1f}s (alphas {[g.alpha for g in awq]})")

    with staged_artifact(output, force) as (tmp, weights):
        new = dataclasses.replace(manifest, graphs={}, export={**manifest.export, "precision": precision},
                                  versions=dict(manifest.versions))
        done = {}
        for kind in GRAPH_KINDS:
            spec, model = manifest.graphs[kind], graphs[kind]
            done[kind] = quantize_graph(kind, model, precision, scales=scales, block=block_size,
                                        target=manifest.target, tables=quantize_tables, table_bits=table_bits,
                                        minmax=method == "minmax",
                                        accuracy_level=accuracy_level, overrides=overrides)
            externalize_packed(weights, model)
            weights.externalize_proto(model)
            name = f"{kind}.{precision}.onnx"
            onnx.save_model(model, str(tmp / name))
            new.graphs[kind] = dataclasses.replace(spec, file=name, bytes=(tmp / name).stat().st_size, digest=None,
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
                           + ("asymmetric (each block's min..max: MatMulNBits on the codes plus a float offset per block)"
                              if method == "minmax"
                              else "symmetric (zero point 0)"), "block_size": block_size,
                "table_bits": (table_bits or WEIGHT_ONLY_BITS[precision]) if quantize_tables else None,
                "activations": "not quantized" + (f" (MatMulNBits accuracy_level {accuracy_level})"
                                                  if manifest.target == "ort" else ""),
                "quantized_ops": "MatMul of every linear layer" + (
                    ("" if not quantize_tables else ", LM head and embedding" if manifest.target == "ort"
                     else ", LM head (the embedding lookup stays float: TensorRT documents INT4 weights for GEMMs)")),
                "awq": {g.role: g.alpha for g in awq},
                # the V cache of this artifact holds V / s in these layers (AWQ's o_proj fold)
                "value_cache_scales": value_cache_scales(awq, manifest.model_config())})
        if needs_calibration:
            recipe["calibration"] = {"source": source, "prompts": len(prompts), "fingerprint": _fingerprint(prompts),
                                     "max_new_tokens": max_new_tokens, "samples_per_graph": samples, "seed": seed,
                                     "modes": ["tidar", "ar"]}
        new.save(tmp)
        if check_prompts is None:
            check_prompts = prompts
        if check_prompts is None and manifest.tokenizer.get("file"):
            check_prompts = tokenize_prompts(artifact, manifest, read_prompt_file(DEFAULT_CALIBRATION))
        if check_prompts:
            recipe["agreement"] = _check_agreement(artifact, tmp, precision, check_prompts, log)
        (tmp / SIDECAR).write_text(json.dumps(recipe, indent=2) + "\n")
    return output


def _check_agreement(source: Path, quantized: Path, precision: str, prompts, log) -> dict:
    """The per-token agreement of the new artifact with its source on a few prompts (logged, and a
    warning below AGREEMENT_WARNING); the record quantization.json keeps of it."""
    prompts = [list(p)[:AGREEMENT_PROMPT_LEN] for p in prompts[:AGREEMENT_PROMPTS]]
    t0 = time.perf_counter()
    value = agreement_with_source(source, quantized, prompts, AGREEMENT_NEW_TOKENS)
    log(f"agreement with the source artifact: {value:.3f} per token ({len(prompts)} prompts, "
        f"{AGREEMENT_NEW_TOKENS} greedy tokens each, {time.perf_counter() - t0:.1f}s)")
    if value < AGREEMENT_WARNING:
        log(f"warning: this {precision} artifact picks the source's greedy token at only {value:.0%} of positions "
            f"(below {AGREEMENT_WARNING:.0%}); check it on your prompts (benchmarks/quant_real.py) or try "
            f"--keep-tables, another --method or a wider precision (docs/QUANTIZATION.md)")
    return {"per_token": round(value, 4), "prompts": len(prompts), "new_tokens": AGREEMENT_NEW_TOKENS}
