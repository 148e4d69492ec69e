"""`tidar-export quantize ARTIFACT -o OUT`: a quantized artifact (tidar_export.quantize)."""

from __future__ import annotations

import time

from tidar_export.quantize import (BLOCK_SIZES, DEFAULT_BLOCK_SIZE, DEFAULT_CALIBRATION_NEW_TOKENS,
                                   DEFAULT_CALIBRATION_PROMPTS, DEFAULT_PERCENTILE, DEFAULT_SAMPLES, INT8_METHODS,
                                   WO_METHODS, quantize_artifact)
from tidar_runtime.contract import QUANTIZED_PRECISIONS


def cmd_quantize(args) -> int:
    from tidar_export.export.artifact import print_written

    t0 = time.perf_counter()
    out = quantize_artifact(args.artifact, args.output, args.precision, calibration=args.calibration,
                            samples=args.samples, max_new_tokens=args.max_new_tokens,
                            calibration_prompts=args.calibration_prompts, method=args.method,
                            percentile=args.percentile, block_size=args.block_size,
                            quantize_tables=not args.keep_tables, table_bits=args.table_bits,
                            accuracy_level=args.accuracy_level,
                            seed=args.seed, log=print, force=args.force)
    print_written(args.precision, out, t0)
    return 0


def register(subparsers) -> None:
    from tidar_export.commands.args import add_force_flag

    p = subparsers.add_parser("quantize", help="quantized artifact from an exported one: int8/fp8 Q/DQ, or "
                                               "int4/int8 weight-only (block-wise, RTN or AWQ)")
    p.add_argument("artifact", help="fp32/fp16 artifact directory written by `tidar-export export`")
    p.add_argument("-o", "--output", required=True, help="quantized artifact directory to write")
    p.add_argument("--precision", choices=QUANTIZED_PRECISIONS, default="int8",
                   help="int8 / fp8: weights and activations (Q/DQ); int4 / int8-wo: weights only")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration prompts, each after a line '# %%%%' (default: calibration/prompts.txt)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"calibration inputs kept per graph (default {DEFAULT_SAMPLES})")
    p.add_argument("--calibration-prompts", type=int, default=DEFAULT_CALIBRATION_PROMPTS,
                   help=f"calibration prompts decoded, the first of the file (default {DEFAULT_CALIBRATION_PROMPTS})")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_CALIBRATION_NEW_TOKENS,
                   help=f"tokens decoded per calibration prompt and mode (default {DEFAULT_CALIBRATION_NEW_TOKENS})")
    p.add_argument("--method", choices=tuple(dict.fromkeys(INT8_METHODS + WO_METHODS)),
                   help="int8/fp8 activation ranges: minmax (default) or percentile; int4/int8-wo weight grids: "
                        "minmax (default on ort: each block's min..max with a zero point, no calibration), "
                        "awq (default on TensorRT targets: symmetric, calibrated scales) or rtn (symmetric, "
                        "round to nearest)")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE, help="for --method percentile")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=DEFAULT_BLOCK_SIZE,
                   help=f"weight-only: input channels per scale (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--keep-tables", action="store_true",
                   help="weight-only: leave the embedding table and the LM head in the exported precision")
    p.add_argument("--table-bits", type=int, choices=(4, 8),
                   help="weight-only on target ort: bits of the embedding table and LM head (default: 8 for "
                        "int4 --method minmax, else the precision's)")
    p.add_argument("--accuracy-level", type=int, default=0, choices=range(5), metavar="0..4",
                   help="weight-only on target ort: MatMulNBits accuracy_level (0/1: fp32 compute, the default; "
                        "4: int8 activations, faster)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reservoir that picks calibration inputs")
    add_force_flag(p)
    p.set_defaults(func=cmd_quantize)
