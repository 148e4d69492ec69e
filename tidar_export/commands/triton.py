"""`tidar-export triton ARTIFACT -o MODEL_REPO`: a Triton Inference Server model repository
(tidar_export.serving.triton). No torch."""

from __future__ import annotations


def cmd_triton(args) -> int:
    from tidar_export.serving.triton import server_command, write_repository

    out = write_repository(args.artifact, args.output, name=args.name, backend=args.backend,
                           instances=args.instances, mode=args.mode, max_queue=args.max_queue,
                           threads=args.threads)
    print(f"wrote Triton model repository {out} (model {args.name}, backend {args.backend}, "
          f"{args.instances} instance(s)); serve it with:")
    print(f"  {server_command(str(out.resolve()))}")
    return 0


def register(subparsers) -> None:
    from tidar_export.serving.triton import BACKENDS, MODES

    p = subparsers.add_parser("triton", help="write a Triton Inference Server model repository for an artifact")
    p.add_argument("artifact", help="artifact directory (`tidar-export export`, engines from `tidar-export build`)")
    p.add_argument("-o", "--output", required=True, help="model repository folder to write (absent, empty, or "
                   "one written by this command, which is replaced)")
    p.add_argument("--name", default="tidar", help="Triton model name (default: tidar)")
    p.add_argument("--backend", choices=BACKENDS, default="ort",
                   help="ort (CPU instances) | ort-cuda | trt (GPU instances) (default: ort)")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances (per GPU for KIND_GPU); each has its own engine and KV cache (default: 1)")
    p.add_argument("--mode", choices=MODES, default="tidar", help="decoding of every request (default: tidar)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a row, per instance, before new ones are refused (default: 64)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads per instance, --backend ort (default: 0, its own choice)")
    p.set_defaults(func=cmd_triton)
