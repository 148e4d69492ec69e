"""`tidar-export`: the command line. Subcommands with kebab-case flags.

User errors (TiDARError) print one line `error: ...` and exit with status 1, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tidar_export.errors import TiDARError


# A missing optional dependency -> the extra that installs it (pyproject.toml). The base install
# is the runtime (numpy, onnxruntime, tokenizers); torch and the ONNX tooling are the `export` extra.
EXTRA_OF = {"torch": "export", "safetensors": "export", "onnx": "export", "onnxscript": "export",
            "onnx_ir": "export", "tqdm": "export", "matplotlib": "plot", "tensorrt": "trt", "polygraphy": "trt",
            "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve"}

# Modules that add subcommands: each defines register(subparsers) and imports its heavy
# dependencies (torch, onnx, tensorrt) inside the command, so `--help` stays fast.
COMMAND_MODULES = tuple(f"tidar_export.commands.{name}" for name in (
    "model", "train", "eval", "export", "check", "build", "quantize", "compare", "generate", "serve", "triton", "demo", "bench", "tune"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidar-export", description="Export, build and run TiDAR models (diffusion drafts, AR verification)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TiDARError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRA_OF:
            raise
        print(f"error: `tidar-export {args.command}` needs {top}, which is not installed: "
              f"pip install 'tidar-export[{EXTRA_OF[top]}]'", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
