"""`tidar-export build ARTIFACT_DIR`: TensorRT engines for an artifact (tidar_export.engines.build)."""

from __future__ import annotations

import time

from tidar_export.engines.build import (DEFAULT_PREFILL_OPT_LEN, HARDWARE_COMPAT, PRECISIONS, BuildSettings,
                                        build_engines, build_settings)
from tidar_runtime.manifest import load_manifest


def settings_from_args(args) -> BuildSettings:
    manifest = load_manifest(args.artifact)
    return build_settings(
        manifest, args.artifact, precision=args.precision, timing_cache=args.timing_cache,
        optimization_level=args.builder_optimization_level, hardware_compat=args.hardware_compat,
        version_compat=args.version_compat, weight_streaming=args.weight_streaming, tf32=args.tf32,
        prefill_opt_len=args.prefill_opt_len,
    )


def cmd_build(args) -> int:
    settings = settings_from_args(args)  # user errors first, without TensorRT
    if args.dry_run:
        print(settings.to_json())
        return 0
    t0 = time.perf_counter()
    build_engines(settings, log=print)
    print(f"built {len(settings.graphs)} engines into {settings.artifact_dir} in {time.perf_counter() - t0:.1f}s")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="build TensorRT engines for an exported artifact (needs a GPU)")
    p.add_argument("artifact", help="artifact directory written by `tidar-export export`")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the artifact's precision (default): its export dtype, or int8|fp8|int4 for an artifact "
                        "written by `tidar-export quantize` (int4: trt-10.15 artifacts with blocks of 64 or 128; "
                        "int8-wo is ONNX Runtime only and refused)")
    p.add_argument("--timing-cache", metavar="FILE", help="tactic timing cache to read and update")
    p.add_argument("--builder-optimization-level", type=int, metavar="N", help="0..5 (TensorRT's default: 3)")
    p.add_argument("--hardware-compat", choices=HARDWARE_COMPAT,
                   help="engines that run on any Ampere or newer GPU (slower than device-specific ones)")
    p.add_argument("--version-compat", action="store_true",
                   help="engines that later TensorRT versions can run (embeds the lean runtime)")
    p.add_argument("--weight-streaming", action="store_true",
                   help="allow streaming weights from host memory (budget chosen when loading)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 math in fp32 engines (faster, not bit-exact)")
    p.add_argument("--prefill-opt-len", type=int, default=DEFAULT_PREFILL_OPT_LEN, metavar="N",
                   help=f"prompt length the prefill engine is tuned for (default {DEFAULT_PREFILL_OPT_LEN}, "
                        "capped at max_seq_len - block_size)")
    p.add_argument("--dry-run", action="store_true", help="print the build settings as JSON; build nothing")
    p.set_defaults(func=cmd_build)
