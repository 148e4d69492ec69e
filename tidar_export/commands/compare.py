"""`tidar-export compare ARTIFACT_DIR --checkpoint CKPT`: torch vs ONNX Runtime vs TensorRT per output."""

from __future__ import annotations

from pathlib import Path

from tidar_export.engines.compare import compare_artifact, failures, format_report, has_tensorrt, worst_failures
from tidar_export.export.check import ArtifactCheckError
from tidar_runtime.contract import GRAPH_KINDS
from tidar_runtime.fileio import write_atomic


def cmd_compare(args) -> int:
    graphs = tuple(g for g in args.graphs.split(",") if g) if args.graphs else GRAPH_KINDS
    use_trt = False if args.no_trt else None
    if not args.no_trt and not has_tensorrt():
        print("tensorrt is not installed: comparing torch and ONNX Runtime only")
    reports = compare_artifact(args.artifact, args.checkpoint, graphs=graphs, use_trt=use_trt,
                               localize=args.localize, seed=args.seed, log=print)
    print(format_report(reports, args.verbose))
    if not all(rep.ok for rep in reports):
        report = Path(args.report or f"compare-{Path(args.artifact).resolve().name}.txt")
        detail = format_report(reports, verbose=True) + "\n\nfailures:\n" + "\n".join(failures(reports))
        write_atomic(report, detail + "\n")
        raise ArtifactCheckError(worst_failures(reports) + [f"every failure and module error in {report}"])
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
    p.add_argument("--report", metavar="FILE", help="on failure, where every failure and module error is written "
                   "(default: compare-<artifact name>.txt in the current directory); the error line shows the "
                   "worst few per output")
    p.set_defaults(func=cmd_compare)
