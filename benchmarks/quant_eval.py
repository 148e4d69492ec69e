"""Quantized artifacts against the fp32 artifact, in ONNX Runtime (CPU), on held-out prompts.

    python benchmarks/quant_eval.py [--checkpoint tidar_export/demo_model] [--json OUT.json] [--write-docs]

Exports the checkpoint (fp32, target ort), quantizes it (int8 max / percentile, fp8, int4
weight-only RTN and AWQ at block 32/64/128, int8 weight-only) with the shipped calibration
prompts (calibration/prompts.txt), and measures every artifact on prompts cut from the held-out
files of the stdlib corpus (tidar_export/train/data.py; never seen by training or calibration):
- greedy token agreement with the fp32 artifact: per token (the AR graphs fed the fp32
  artifact's greedy output, argmax compared at every position) and up to the first difference
  of the TiDAR decodes (tokens before it, over all tokens; `exact` = prompts whose whole output
  is equal);
- T/NFE of the greedy TiDAR decode (decode forwards only);
- whether the artifact's TiDAR decode equals its own AR decode;
- AR-mode loss: teacher-forced next-token cross-entropy through the prefill + ar_step graphs;
- artifact size (every file but the tokenizer) and its ratio to fp32's;
- ORT CPU decode speed, 1 thread: greedy TiDAR decodes of the first `--speed-prompts` prompts,
  `--speed-rounds` rounds, the artifacts interleaved within each round (the machine is shared:
  interleaving spreads its load over all of them); median and min..max over the rounds.
`--write-docs` replaces the table between the markers in docs/QUANTIZATION.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "QUANTIZATION.md"
BEGIN, END = "<!-- quant_eval:begin -->", "<!-- quant_eval:end -->"


# (table name, precision, quantize_artifact keywords)
VARIANTS = (
    ("int8 (max)", "int8", {"method": "minmax"}),
    ("int8 (percentile)", "int8", {"method": "percentile"}),
    ("fp8 (max)", "fp8", {"method": "minmax"}),
    ("int4 RTN, block 32", "int4", {"method": "rtn", "block_size": 32}),
    ("int4 AWQ, block 32", "int4", {"method": "awq", "block_size": 32}),
    ("int4 AWQ, block 64", "int4", {"method": "awq", "block_size": 64}),
    ("int4 AWQ, block 128", "int4", {"method": "awq", "block_size": 128}),
    ("int4 AWQ, block 32, tables fp32", "int4", {"method": "awq", "block_size": 32, "quantize_tables": False}),
    ("int4 AWQ, block 32, accuracy_level 4", "int4", {"method": "awq", "block_size": 32, "accuracy_level": 4}),
    ("int8-wo RTN, block 32", "int8-wo", {"method": "rtn", "block_size": 32}),
)


def artifact_bytes(path: Path) -> int:
    from tidar_runtime.manifest import load_manifest

    tok = load_manifest(path).tokenizer.get("file")
    return sum(f.stat().st_size for f in path.iterdir() if f.name != tok)


def decode_speed(path: Path, prompts, max_new: int) -> float:
    from tidar_runtime import SamplingParams, generate_tidar
    from tidar_runtime.backends.ort import OrtBackend

    backend = OrtBackend(path, intra_op_threads=1)
    generate_tidar(backend, prompts[0], 8, SamplingParams())  # warm-up
    t0 = time.perf_counter()
    n = sum(len(generate_tidar(backend, p, max_new, SamplingParams()).tokens) for p in prompts)
    return n / (time.perf_counter() - t0)


def measure(artifact: Path, prompts, windows, max_new: int, reference=None) -> dict:
    from tidar_export.quantize import greedy_agreement, teacher_forced, token_agreement
    from tidar_runtime import SamplingParams, generate_ar, generate_tidar
    from tidar_runtime.backends.ort import OrtBackend

    backend = OrtBackend(artifact, intra_op_threads=1)
    greedy = SamplingParams()
    tidar = [generate_tidar(backend, p, max_new, greedy) for p in prompts]
    ar = [generate_ar(backend, p, max_new, greedy).tokens for p in prompts]
    tokens = [r.tokens for r in tidar]
    accepted = [k for r in tidar for k in r.stats.accepted]
    out = {
        "tokens_per_forward": round(sum(accepted) / max(1, len(accepted)), 3),
        "tidar_equals_own_ar": sum(t == a for t, a in zip(tokens, ar)),
        "ar_loss": round(teacher_forced(backend, windows)[0], 4),
        "tokens": tokens,
    }
    ref_tokens = reference["tokens"] if reference else tokens
    _, picks = teacher_forced(backend, [p + t for p, t in zip(prompts, ref_tokens)])
    out["picks"] = picks
    if reference is not None:
        out["agreement"] = round(greedy_agreement(reference["tokens"], tokens), 4)
        out["token_agreement"] = round(token_agreement(reference["picks"], picks), 4)
        out["exact"] = sum(r == t for r, t in zip(reference["tokens"], tokens))
    return out


def markdown(report: dict) -> str:
    s = report["setup"]
    lines = [
        f"Measured by `python benchmarks/quant_eval.py --write-docs` ({s['date']}; checkpoint `{s['checkpoint']}`, "
        f"{s['params'] / 1e6:.1f}M params, b = {s['block_size']}; {s['prompts']} held-out prompts of "
        f"{s['prompt_len']} tokens, {s['max_new_tokens']} new tokens, greedy; AR loss over {s['loss_windows']} "
        f"windows of {s['window']} tokens; onnxruntime {s['onnxruntime']} CPU; tokens/s: 1 thread, TiDAR decodes "
        f"of {s['speed_prompts']} prompts, median and min..max of {s['speed_rounds']} interleaved rounds, load "
        f"average {s['load_average']} at the start on a shared 2-core VM).",
        "",
        "| artifact | per-token agreement with fp32 | agreement to first difference | exact outputs | T/NFE "
        "| TiDAR == own AR | AR loss | size (ratio to fp32) | ORT CPU tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    n = s["prompts"]
    for name, r in report["artifacts"].items():
        agree = "1 (reference)" if name == "fp32" else f"{r['agreement']:.3f}"
        per_token = "1 (reference)" if name == "fp32" else f"{r['token_agreement']:.3f}"
        exact = f"{n}/{n}" if name == "fp32" else f"{r['exact']}/{n}"
        speed = r.get("tokens_per_s")
        speed = f"{speed['median']:.0f} ({speed['min']:.0f}..{speed['max']:.0f})" if speed else "-"
        lines.append(f"| {name} | {per_token} | {agree} | {exact} | {r['tokens_per_forward']:.2f} "
                     f"| {r['tidar_equals_own_ar']}/{n} | {r['ar_loss']:.4f} "
                     f"| {r['size_mib']:.2f} MiB ({r['size_ratio']:.2f}x) | {speed} |")
    return "\n".join(lines)


def write_docs(table: str) -> None:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    tmp = DOC.with_name(f".{DOC.name}.tmp")
    tmp.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    os.replace(tmp, DOC)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "tidar_export" / "demo_model"))
    ap.add_argument("--work", help="folder for the artifacts (default: a temp folder, removed)")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--loss-windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--speed-prompts", type=int, default=4)
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--only", help="';'-separated variant names to run (default: all)")
    ap.add_argument("--json", help="also write the report (with every decoded token) to this file")
    ap.add_argument("--write-docs", action="store_true", help=f"replace the table in {DOC.relative_to(ROOT)}")
    args = ap.parse_args()

    import onnxruntime

    from tidar_export.model.checkpoint import read_config
    from tidar_export.train.evaluate import heldout_stream, prompts_from
    from tidar_export.export.artifact import export_artifact
    from tidar_export.quantize import (DEFAULT_CALIBRATION, collect_calibration_inputs, quantize_artifact,
                                               read_prompt_file, tokenize_prompts)
    from tidar_runtime.manifest import load_manifest

    ckpt = Path(args.checkpoint)
    cfg = read_config(ckpt)
    stream, _ = heldout_stream(ckpt, "stdlib", "*.py", (cfg.eos_ids or [None])[0])
    prompts = prompts_from(stream, args.num_prompts, args.prompt_len, args.max_new_tokens)
    W = args.window
    step = max(W, (len(stream) - W) // max(1, args.loss_windows))
    windows = [[int(t) for t in stream[o : o + W]] for o in range(0, len(stream) - W, step)][: args.loss_windows]

    with tempfile.TemporaryDirectory(prefix="quant_eval.") as scratch:
        work = Path(args.work or scratch)
        t0 = time.perf_counter()
        # int8 / fp8 need the AR step with the step's own Attention op (docs/QUANTIZATION.md)
        fp32 = export_artifact(ckpt, work / "fp32", max_seq_len=args.max_seq_len, ar_step="attention")
        print(f"exported fp32 in {time.perf_counter() - t0:.0f}s", flush=True)
        variants = {"fp32": fp32}
        feeds = None
        calibration = tokenize_prompts(fp32, load_manifest(fp32), read_prompt_file(DEFAULT_CALIBRATION))
        for name, precision, kwargs in VARIANTS:
            if args.only and name not in args.only.split(";"):
                continue
            t0 = time.perf_counter()
            slug = name.replace(" ", "-").replace("(", "").replace(")", "").replace(",", "")
            needs = precision in ("int8", "fp8") or kwargs.get("method") == "awq"
            if needs and feeds is None:  # the same recorded decode inputs calibrate every variant
                feeds = collect_calibration_inputs(fp32, calibration, max_new_tokens=48)
            variants[name] = quantize_artifact(fp32, work / slug, precision, prompts=calibration,
                                               feeds=feeds if needs else None, **kwargs)
            print(f"quantized {name} in {time.perf_counter() - t0:.0f}s", flush=True)
        report = {"setup": {
            "date": time.strftime("%Y-%m-%d"), "checkpoint": ckpt.name, "params": cfg.num_params(),
            "block_size": cfg.block_size, "prompts": len(prompts), "prompt_len": args.prompt_len,
            "max_new_tokens": args.max_new_tokens, "loss_windows": len(windows), "window": W,
            "max_seq_len": args.max_seq_len, "onnxruntime": onnxruntime.__version__, "machine": platform.machine(),
            "speed_prompts": args.speed_prompts, "speed_rounds": args.speed_rounds,
            "load_average": f"{os.getloadavg()[0]:.1f}",
        }, "artifacts": {}}
        reference = None
        for name, path in variants.items():
            t0 = time.perf_counter()
            r = measure(path, prompts, windows, args.max_new_tokens, reference)
            r["size_mib"] = round(artifact_bytes(path) / 2**20, 3)
            r["size_ratio"] = round(artifact_bytes(path) / artifact_bytes(fp32), 3)
            reference = reference or r
            report["artifacts"][name] = r
            print(f"{name}: " + json.dumps({k: v for k, v in r.items() if k not in ("tokens", "picks")})
                  + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
        speeds = {name: [] for name in variants}
        for _ in range(args.speed_rounds):  # interleaved: every artifact once per round
            for name, path in variants.items():
                speeds[name].append(decode_speed(path, prompts[: args.speed_prompts], args.max_new_tokens))
        for name, v in speeds.items():
            report["artifacts"][name]["tokens_per_s"] = {"median": round(statistics.median(v), 1),
                                                         "min": round(min(v), 1), "max": round(max(v), 1)}
            print(f"{name}: {report['artifacts'][name]['tokens_per_s']} tokens/s", flush=True)
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.write_docs:
        write_docs(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
