"""`tidar-export quantize ARTIFACT -o OUT`: an explicit Q/DQ artifact (tidar_export.engines.quantize)."""

from __future__ import annotations

import time

from tidar_export.engines.quantize import (DEFAULT_INT8_METHOD, DEFAULT_PERCENTILE, INT8_METHODS, PRECISIONS,
                                           quantize_artifact)


def cmd_quantize(args) -> int:
    from tidar_export.export.artifact import print_written

    t0 = time.perf_counter()
    out = quantize_artifact(args.artifact, args.output, args.precision, calibration=args.calibration,
                            samples=args.samples, max_new_tokens=args.max_new_tokens, method=args.method,
                            percentile=args.percentile, seed=args.seed, log=print, force=args.force)
    print_written(args.precision, out, t0)
    return 0


def register(subparsers) -> None:
    from tidar_export.commands.args import add_force_flag

    p = subparsers.add_parser("quantize", help="INT8/FP8 Q/DQ artifact from an exported one (ONNX Runtime calibration)")
    p.add_argument("artifact", help="fp32/fp16 artifact directory written by `tidar-export export`")
    p.add_argument("-o", "--output", required=True, help="quantized artifact directory to write")
    p.add_argument("--precision", choices=PRECISIONS, default="int8")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration prompts, each after a line '# %%%%' (default: calibration/prompts.txt)")
    p.add_argument("--samples", type=int, default=64, help="calibration inputs kept per graph (default 64)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens decoded per calibration prompt")
    p.add_argument("--method", choices=INT8_METHODS, default=DEFAULT_INT8_METHOD,
                   help="int8 activation ranges (fp8 always uses ONNX Runtime's distribution calibrator)")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE, help="for --method percentile")
    p.add_argument("--seed", type=int, default=0, help="seed of the reservoir that picks calibration inputs")
    add_force_flag(p)
    p.set_defaults(func=cmd_quantize)
