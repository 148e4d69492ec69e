"""`tidar-export check ARTIFACT_DIR [--checkpoint DIR]`: graphs against the manifest, the target's op tables and torch."""

from __future__ import annotations

import time

from tidar_export.export.check import check_artifact, format_table


def cmd_check(args) -> int:
    t0 = time.perf_counter()
    report = check_artifact(args.artifact, args.checkpoint, args.seed)
    if report.results:
        print(format_table(report.results, args.verbose))
    m = report.manifest
    print(f"{args.artifact}: target {m.target}, {m.precision}, b={m.block_size}, proposals {m.proposals}, "
          f"max_seq_len {m.max_seq_len}, max_batch {m.max_batch} ({time.perf_counter() - t0:.1f}s)")
    for line in report.warnings:
        print(f"warning: {line}")
    if not report.numerics:
        print("numeric comparison skipped: pass --checkpoint DIR to run ONNX Runtime against torch")
    report.raise_for_failures()
    print(f"ok: manifest, {len(m.graphs)} graphs, target checks"
          + (f" and {len(report.results)} ORT-vs-torch comparisons" if report.numerics else "") + " passed")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="verify an artifact: files, target checks, ORT against torch")
    p.add_argument("artifact", help="artifact directory (manifest.json + graphs)")
    p.add_argument("--checkpoint", help="the checkpoint it was exported from; enables the ORT-vs-torch comparison")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--verbose", action="store_true", help="one table row per present.* output")
    p.set_defaults(func=cmd_check)
