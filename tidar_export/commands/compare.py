"""`tidar-export compare ARTIFACT_DIR --checkpoint CKPT`: torch vs ONNX Runtime vs TensorRT per output."""

from __future__ import annotations

from tidar_export.engines.compare import compare_artifact, format_report, has_tensorrt
from tidar_export.export.check import ArtifactCheckError
from tidar_runtime.contract import GRAPH_KINDS


def cmd_compare(args) -> int:
    graphs = tuple(g for g in args.graphs.split(",") if g) if args.graphs else GRAPH_KINDS
    use_trt = False if args.no_trt else None
    if not args.no_trt and not has_tensorrt():
        print("tensorrt is not installed: comparing torch and ONNX Runtime only")
    reports = compare_artifact(args.artifact, args.checkpoint, graphs=graphs, use_trt=use_trt,
                               localize=args.localize, seed=args.seed, log=print)
    print(format_report(reports, args.verbose))
    failures = [r.failure() for rep in reports for r in rep.results if not r.ok]
    for rep in reports:
        for pair in rep.layers:
            d = rep.first_divergence(pair)
            if d is not None and not rep.ok:
                failures.append(f"{rep.kind} {pair[1]} vs {pair[0]} first diverges at {d.module}")
    if failures:
        raise ArtifactCheckError(failures)
    print(f"ok: {sum(len(rep.results) for rep in reports)} comparisons passed")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="torch vs ONNX Runtime vs TensorRT per output; localize divergence")
    p.add_argument("artifact", help="artifact directory (manifest.json + graphs)")
    p.add_argument("--checkpoint", help="the checkpoint it was exported from (the torch runner)")
    p.add_argument("--graphs", help="comma-separated subset of prefill,step,ar_step (default: all)")
    p.add_argument("--localize", action="store_true",
                   help="always mark intermediate outputs and report per-module errors (default: on failure)")
    p.add_argument("--no-trt", action="store_true", help="skip TensorRT even where it is installed")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    p.add_argument("--verbose", action="store_true", help="every present.* row and every marked module")
    p.set_defaults(func=cmd_compare)
