"""Host overhead of the decode loop per step, against the demo model's ONNX Runtime step time.

    python benchmarks/loop_overhead.py [--artifact-dir DIR] [--threads 1] [--out benchmarks/results]

1. The loop alone: `tidar_runtime.loop` over NullBackend (no work, constant outputs that make
   every step accept exactly k drafts), b = 8 and the demo model's vocabulary, so verify,
   commit, block choice and bookkeeping run on their real paths. Per-step overhead = wall time
   of a whole decode / number of decode forwards. Greedy (the graph's token ids) and sampling
   (numpy softmax, top-k/top-p and the acceptance test over the fetched logits rows).
2. The model: the demo model's artifact (exported into the demo cache, or --artifact-dir) over
   OrtBackend, median wall time of one step and one ar_step (backend.step as the loop times
   it: ONNX Runtime's run plus the backend's binding and K/V writes).
Writes loop_overhead.json and loop_overhead.md (atomically) to --out; docs/RUNTIME.md
records a run. Numbers depend on the machine and its load: the report records both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else \
        platform.processor()
    import numpy
    import onnxruntime

    return {"nproc": os.cpu_count(), "cpu": cpu, "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__}


def loop_overhead(block_size: int, vocab: int, accept: int, mode: str, sampling: bool, tokens: int,
                  repeats: int, batch: int = 1) -> dict:
    """Median per-step wall time of the loop over NullBackend (microseconds)."""
    from tidar_runtime import SamplingParams, generate_ar_batch, generate_tidar_batch
    from tidar_runtime.backends.null import NullBackend

    backend = NullBackend(block_size, max_batch=batch, vocab_size=vocab, accept=accept)
    params = SamplingParams(temperature=1.0, seed=0) if sampling else SamplingParams()
    run = generate_tidar_batch if mode == "tidar" else generate_ar_batch
    per_step = []
    prompts = [[1, 2, 3]] * batch
    run(backend, prompts, 8, params)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = run(backend, prompts, tokens, params)
        dt = time.perf_counter() - t0
        per_step.append(dt / max(r.stats.forwards for r in res))
    # Sampling over NullBackend's all-zero logits has p = q (uniform): every draft is accepted, k = b.
    k = (block_size if sampling else accept) if mode == "tidar" else 1
    return {"mode": mode, "sampling": sampling, "batch": batch, "accept": k,
            "us_per_step": round(statistics.median(per_step) * 1e6, 1)}


def ort_step_ms(artifact_dir: Path, threads: int, tokens: int, repeats: int) -> dict:
    """Median wall time of OrtBackend.step / ar_step on the artifact (milliseconds)."""
    from tidar_runtime.tokenizer import folder_tokenizer
    from tidar_runtime import generate_ar, generate_tidar
    from tidar_runtime.backends.ort import OrtBackend

    backend = OrtBackend(artifact_dir, intra_op_threads=threads)
    tok = folder_tokenizer(artifact_dir)
    prompt = tok.encode("def main():\n    ").ids if tok is not None else [5, 17, 42, 9]
    generate_tidar(backend, prompt, 8)  # sessions and first-run allocations
    generate_ar(backend, prompt, 8)
    step, ar_step, tpf = [], [], []
    for _ in range(repeats):
        r = generate_tidar(backend, prompt, tokens)
        step += r.stats.step_s
        tpf.append(r.stats.tokens_per_forward)
        ar_step += generate_ar(backend, prompt, tokens).stats.step_s
    return {"block_size": backend.block_size, "vocab_size": backend.vocab_size, "max_seq_len": backend.max_len,
            "q_len": backend.manifest.step_len, "intra_op_threads": threads,
            "step_ms": round(statistics.median(step) * 1e3, 3), "ar_step_ms": round(statistics.median(ar_step) * 1e3, 3),
            "steps_measured": len(step), "tokens_per_forward": round(statistics.mean(tpf), 3)}


def markdown(report: dict) -> str:
    ort = report["ort"]
    lines = [
        f"Machine: {report['machine']['nproc']} cores, {report['machine']['cpu']}, load average "
        f"{report['machine']['loadavg_1min_at_start']} at start; onnxruntime {report['machine']['onnxruntime']}, "
        f"numpy {report['machine']['numpy']}.",
        "",
        f"Demo model over OrtBackend (b = {ort['block_size']}, q_len = {ort['q_len']}, vocab {ort['vocab_size']}, "
        f"max_seq_len {ort['max_seq_len']}, {ort['intra_op_threads']} intra-op thread(s)): step "
        f"{ort['step_ms']} ms, ar_step {ort['ar_step_ms']} ms (medians of {ort['steps_measured']} steps).",
        "",
        "| loop over NullBackend | batch | accepted k | host µs / step | % of ORT step | % of ORT ar_step |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["loop"]:
        what = f"{r['mode']} {'sampling T=1' if r['sampling'] else 'greedy'}"
        step_pct = f"{r['pct_of_ort_step']:.2f}" if r["mode"] == "tidar" else "-"
        ar_pct = f"{r['pct_of_ort_ar_step']:.2f}" if r["mode"] == "ar" else "-"
        lines.append(f"| {what} | {r['batch']} | {r['accept']} | {r['us_per_step']} | {step_pct} | {ar_pct} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact-dir", help="demo artifact (default: the `tidar-export demo` cache)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per decode")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    args = parser.parse_args(argv)

    from tidar_export.bench.demo import default_artifact_dir, ensure_demo_artifact
    from tidar_runtime.fileio import write_atomic

    machine = _machine()
    artifact, _ = ensure_demo_artifact(Path(args.artifact_dir) if args.artifact_dir else default_artifact_dir(),
                                       log=lambda m: print(m, file=sys.stderr))
    ort = ort_step_ms(artifact, args.threads, args.tokens, args.repeats)
    b, vocab = ort["block_size"], ort["vocab_size"]
    cases = [("tidar", False, k, 1) for k in (1, b // 2, b)] + [("tidar", True, b // 2, 1), ("tidar", False, b // 2, 4),
                                                             ("ar", False, 1, 1), ("ar", True, 1, 1)]
    loop = []
    for mode, sampling, k, batch in cases:
        r = loop_overhead(b, vocab, k, mode, sampling, 4096 if not sampling else 512, args.repeats, batch)
        r["pct_of_ort_step"] = round(100 * r["us_per_step"] / (ort["step_ms"] * 1e3), 3)
        r["pct_of_ort_ar_step"] = round(100 * r["us_per_step"] / (ort["ar_step_ms"] * 1e3), 3)
        loop.append(r)
        print(json.dumps(r), file=sys.stderr)
    report = {"command": "python benchmarks/loop_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "ort": ort, "loop": loop}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "loop_overhead.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "loop_overhead.md", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
