"""Quantized artifacts of a real pretrained model against its fp32 artifact, on held-out prompts.

    python benchmarks/quant_real.py FP32_ARTIFACT QUANTIZED_ARTIFACT [...] [--max-new-tokens 24] [--json OUT]

The prompts (below) are general text and code, none of them in calibration/prompts.txt. Per
artifact, on ONNX Runtime CPU with one thread, greedy AR decodes (TiDAR decodes the same
tokens: TiDAR == AR is tested elsewhere):
- agreement to first difference (`tidar_export.quantize.greedy_agreement`): the tokens the
  quantized artifact decodes before its first difference from fp32's, over all of fp32's tokens;
- per-token agreement (`token_agreement` of `teacher_forced`): the AR graphs fed fp32's greedy
  output, argmax compared at every position;
- the first prompt's continuation, to read.
Numbers go to docs/QUANTIZATION.md by hand, with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "import numpy as np\n\ndef normalize(x):",
    "Once upon a time, in a small village,",
    "The largest planet in the solar system is",
    "To make a cup of tea, you first",
    "SELECT name, age FROM users WHERE",
    "The theory of relativity was developed by",
    "A good way to learn a new language is",
    "for i in range(10):",
]


def decode_all(artifact: Path, max_new: int, reference=None, n_prompts: int = len(PROMPTS)) -> dict:
    from tidar_export.quantize import greedy_agreement, teacher_forced, token_agreement
    from tidar_export.train.data import load_tokenizer
    from tidar_runtime import SamplingParams, generate_ar
    from tidar_runtime.backends.ort import OrtBackend

    backend = OrtBackend(artifact, intra_op_threads=1)
    tok = load_tokenizer(artifact / backend.manifest.tokenizer["file"])
    prompts = [enc.ids for enc in tok.encode_batch(PROMPTS[:n_prompts], add_special_tokens=False)]
    t0 = time.perf_counter()
    outs = [generate_ar(backend, p, max_new, SamplingParams(), stop_tokens=()).tokens for p in prompts]
    seconds = time.perf_counter() - t0
    row = {"artifact": str(artifact), "precision": backend.manifest.precision, "outputs": outs,
           "tokens_per_s": sum(map(len, outs)) / seconds, "first": tok.decode(outs[0])}
    if reference is not None:
        windows = [p + r for p, r in zip(prompts, reference["outputs"])]
        _, picks = teacher_forced(backend, windows)
        want = [w[1:] for w in windows]
        row["per_token"] = token_agreement([w[len(p) - 1:] for w, p in zip(want, prompts)],
                                           [k[len(p) - 1:] for k, p in zip(picks, prompts)])
        row["first_difference"] = greedy_agreement(reference["outputs"], outs)
        row["exact"] = sum(a == b for a, b in zip(reference["outputs"], outs))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fp32")
    ap.add_argument("quantized", nargs="*")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="the first N prompts (default all)")
    ap.add_argument("--json")
    ap.add_argument("--reference", help="the --json of an earlier run: reuse its fp32 decodes")
    args = ap.parse_args()
    if args.reference:
        ref = json.loads(Path(args.reference).read_text())[0]
    else:
        ref = decode_all(Path(args.fp32), args.max_new_tokens, n_prompts=args.prompts)
    rows = [ref]
    print(f"fp32: {ref['tokens_per_s']:.1f} tokens/s; {PROMPTS[0]!r} -> {ref['first']!r}")
    for q in args.quantized:
        row = decode_all(Path(q), args.max_new_tokens, ref, args.prompts)
        rows.append(row)
        print(f"{q}: first-difference {row['first_difference']:.3f}, per-token {row['per_token']:.3f}, "
              f"exact {row['exact']}/{len(ref['outputs'])}, {row['tokens_per_s']:.1f} tokens/s; -> {row['first']!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
