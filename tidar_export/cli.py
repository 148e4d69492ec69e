"""`tidar-export`: the command line. Subcommands with kebab-case flags.

User errors (TiDARError), argument errors and OS errors (disk full, read-only disk, permission
denied) print one line `error: ...` and exit with status 1, no traceback and no usage block.
Ctrl-C (SIGINT) and SIGTERM unwind the command like an exception, so staging folders are removed
on the way out, then print one line and exit with status 130 / 143 (docs/RELIABILITY.md).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys

from tidar_export.errors import TiDARError
from tidar_runtime.fileio import os_error_line, remove_temp_dirs


# A missing optional dependency -> the extra that installs it (pyproject.toml). The base install
# is the runtime (numpy, onnxruntime, tokenizers); torch and the ONNX tooling are the `export` extra.
EXTRA_OF = {"torch": "export", "safetensors": "export", "onnx": "export", "onnxscript": "export",
            "onnx_ir": "export", "tqdm": "export", "matplotlib": "plot", "tensorrt": "trt", "polygraphy": "trt",
            "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve", "gguf": "gguf"}

# Modules that add subcommands: each defines register(subparsers) and imports its heavy
# dependencies (torch, onnx, tensorrt) inside the command, so `--help` stays fast.
COMMAND_MODULES = tuple(f"tidar_export.commands.{name}" for name in (
    "model", "train", "eval", "export", "check", "build", "quantize", "compare", "generate", "demo", "bench", "serve", "tune", "triton"))


class ArgumentError(Exception):
    """A command line that does not parse; its message is one line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `error: ...` line and exit status 1 (argparse's
    own is a usage block and status 2); --help still prints the usage."""

    def error(self, message: str):
        raise ArgumentError(f"{self.prog}: {' '.join(message.split())}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tidar-export", description="Export, build and run TiDAR models (diffusion drafts, AR verification)."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT (not an Exception:
    `except Exception` blocks let it through; `finally` blocks remove staging folders). Uncaught,
    it exits with status 128 + SIGTERM."""


def _terminate(signum, frame):
    raise Terminated(128 + signum)


@contextlib.contextmanager
def _sigterm_unwinds():
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ArgumentError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    try:
        with _sigterm_unwinds():
            return args.func(args)
    except KeyboardInterrupt:
        remove_temp_dirs()
        print(f"tidar-export {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated:
        remove_temp_dirs()
        print(f"tidar-export {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except TiDARError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {_one_line(os_error_line(e))}", file=sys.stderr)
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
