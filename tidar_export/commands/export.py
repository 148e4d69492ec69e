"""`tidar-export export CHECKPOINT -o ARTIFACT`: prefill, step and ar_step graphs with their manifest."""

from __future__ import annotations

import time

from tidar_export.export.artifact import BUILDERS, export_artifact, print_written


def cmd_export(args) -> int:
    t0 = time.perf_counter()
    out = export_artifact(args.checkpoint, args.output, block_size=args.block_size, proposals=args.proposals,
                          target=args.target, precision=args.dtype, max_seq_len=args.max_seq_len,
                          max_batch=args.max_batch, mask_token_id=args.mask_token_id, ar_step=args.ar_step,
                          builder=args.builder, log=print, force=args.force)
    print_written(args.target, out, t0)
    return 0


def register(subparsers) -> None:
    from tidar_export.commands.args import add_force_flag, int_list

    p = subparsers.add_parser("export", help="export prefill, step and ar_step graphs to an ONNX artifact")
    p.add_argument("checkpoint", help="TiDAR checkpoint folder (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--block-size", type=int, help="TiDAR block size b (default: the checkpoint's)")
    p.add_argument("--mask-token-id", type=int, help="TiDAR mask token id (default: the checkpoint's)")
    p.add_argument("--proposals", type=int_list, help="sparse proposal blocks, e.g. 1,4,7 (default: all)")
    p.add_argument("--target", default="ort", help="ort | trt-10.3 | trt-10.15 (default: ort)")
    p.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16 (default: fp32)")
    p.add_argument("--max-seq-len", type=int, help="KV cache slots per row (default: 2048, at most the "
                   "checkpoint's max_position_embeddings)")
    p.add_argument("--max-batch", type=int, default=1, help="rows of the step graphs (default: 1)")
    p.add_argument("--ar-step", choices=("gqa", "attention"), default="gqa",
                   help="ort target: the AR step as ONNX Runtime's GroupQueryAttention (gqa, default; "
                        "head size a multiple of 16) or with the step's Attention op (attention: for "
                        "artifacts to be quantized to int8/fp8, so that TiDAR == AR holds)")
    p.add_argument("--builder", choices=BUILDERS, default="auto",
                   help="how the graphs are made: direct (written node by node, seconds; the ort target), "
                        "trace (torch.onnx, then the lowering passes), auto (default: direct where it covers "
                        "the export, else trace)")
    add_force_flag(p)
    p.set_defaults(func=cmd_export)
