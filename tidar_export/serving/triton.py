"""A Triton Inference Server model repository over an exported artifact. No torch.

    MODEL_REPO/
      README.md              how to start tritonserver on it, the inputs and outputs
      .tidar-triton.json     marks the folder as written here (a rerun may replace it)
      NAME/
        config.pbtxt         Python backend, decoupled, instance group, the engine's parameters
        1/
          model.py           TritonPythonModel: the serving engine in-process (triton_model.py)
          tidar_runtime/     the runtime this repository was generated with (pure Python)
          artifact/          the artifact's files as exported/built: manifest.json beside the
                             ONNX graphs, weights, TensorRT engines and tokenizer.json

The repository is self-contained: Triton's Python needs numpy, tokenizers and the backend's
library (onnxruntime, onnxruntime-gpu or tensorrt), not this package. Inputs and outputs use
the names of Triton's LLM tooling (TensorRT-LLM's ensemble: text_input, max_tokens, stream,
temperature, top_k, top_p, random_seed, stop_words -> text_output, output_ids; vLLM's JSON
`sampling_parameters` is read too), so the generate endpoint and the usual clients work.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import tidar_runtime
from tidar_runtime.errors import TiDARError, first_line
from tidar_runtime.fileio import replace_dir, usual_mode
from tidar_runtime.manifest import load_manifest
from tidar_runtime.tokenizer import TOKENIZER_FILE

BACKENDS = ("ort", "ort-cuda", "trt")
MODES = ("tidar", "ar")
MARKER = ".tidar-triton.json"
MARKER_FORMAT = "tidar-triton-repository"
MODEL_FILE = Path(__file__).with_name("triton_model.py")
ARTIFACT_DIR = "artifact"  # inside the version folder
DRAIN_TIMEOUT_S = 25  # unload: in-flight requests may finish for this long (tritonserver's --exit-timeout-secs is 30)
# Triton model names become URL path segments and folder names
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# (name, Triton type, dims, optional) in the order clients usually list them
INPUTS = (
    ("text_input", "TYPE_STRING", "[ 1 ]", False),
    ("max_tokens", "TYPE_INT32", "[ 1 ]", True),
    ("stream", "TYPE_BOOL", "[ 1 ]", True),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("top_k", "TYPE_INT32", "[ 1 ]", True),
    ("top_p", "TYPE_FP32", "[ 1 ]", True),
    ("random_seed", "TYPE_UINT64", "[ 1 ]", True),
    ("stop_words", "TYPE_STRING", "[ -1 ]", True),
    ("end_id", "TYPE_INT32", "[ 1 ]", True),
    ("sampling_parameters", "TYPE_STRING", "[ 1 ]", True),
)
OUTPUTS = (
    ("text_output", "TYPE_STRING", "[ -1 ]"),
    ("output_ids", "TYPE_INT32", "[ -1 ]"),
    ("finish_reason", "TYPE_STRING", "[ -1 ]"),
)


def config_pbtxt(name: str, backend: str, instances: int, mode: str, max_queue: int, threads: int) -> str:
    """The model's config.pbtxt: one request per execute call (the engine batches across
    requests itself, so Triton's batcher is off), decoupled responses, the instance group."""
    kind = "KIND_CPU" if backend == "ort" else "KIND_GPU"
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
             "model_transaction_policy { decoupled: true }", "input ["]
    lines += [",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d}{" optional: true" if opt else ""} }}'
                         for n, t, d, opt in INPUTS)]
    lines += ["]", "output ["]
    lines += [",\n".join(f'  {{ name: "{n}" data_type: {t} dims: {d} }}' for n, t, d in OUTPUTS)]
    lines += ["]", f"instance_group [ {{ count: {instances} kind: {kind} }} ]"]
    params = {"backend": backend, "mode": mode, "max_queue": str(max_queue), "intra_op_threads": str(threads),
              "artifact": ARTIFACT_DIR, "drain_timeout": str(DRAIN_TIMEOUT_S)}
    lines += [f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items()]
    return "\n".join(lines) + "\n"


def _check_options(name: str, backend: str, instances: int, mode: str, max_queue: int, threads: int) -> None:
    if not _NAME.fullmatch(name):
        raise TiDARError(f"--name {name!r}: use letters, digits, '_', '-' or '.' (at most 64, no leading '.')")
    if backend not in BACKENDS:
        raise TiDARError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if mode not in MODES:
        raise TiDARError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if instances < 1:
        raise TiDARError(f"--instances must be at least 1, got {instances}")
    if max_queue < 1:
        raise TiDARError(f"--max-queue must be at least 1, got {max_queue}")
    if threads < 0:
        raise TiDARError(f"--threads must be 0 (ONNX Runtime's default) or more, got {threads}")


def _check_output(out: Path) -> None:
    """An output folder that is absent, empty, or a repository written here (replaced whole)."""
    if out.exists() and not out.is_dir():
        raise TiDARError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            ours = json.loads((out / MARKER).read_text()).get("format") == MARKER_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise TiDARError(f"{out} is not empty and not a model repository written by `tidar-export triton`: "
                             "choose another -o")


def _copy_artifact(src: Path, dst: Path) -> None:
    """The artifact's files, cloned where the file system allows (a reflink: shared blocks,
    copy-on-write), copied otherwise. Never hard links: a second link to a file makes the onnx
    package refuse its external data, so `quantize` of the original would fail afterwards.
    Subfolders are kept; nothing outside the artifact is followed."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_symlink() and not path.resolve().is_relative_to(src.resolve()):
            raise TiDARError(f"{path} links outside the artifact: copy the file into it first")
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        clone_or_copy(path.resolve(), target)


FICLONE = 0x40049409  # Linux ioctl: make dst share src's blocks (btrfs, XFS, bcachefs, ...)


def clone_or_copy(src: Path, dst: Path) -> None:
    """`dst` as an independent file with `src`'s data and times: a reflink where the file system
    supports it, a plain copy otherwise."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            import fcntl

            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except (ImportError, OSError):
            shutil.copyfileobj(fin, fout, 16 << 20)
    shutil.copystat(src, dst)


def _copy_runtime(dst: Path) -> None:
    shutil.copytree(Path(tidar_runtime.__file__).parent, dst,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def write_repository(artifact: str | os.PathLike, output: str | os.PathLike, *, name: str = "tidar",
                     backend: str = "ort", instances: int = 1, mode: str = "tidar", max_queue: int = 64,
                     threads: int = 0) -> Path:
    """Write the model repository `output` for `artifact` (see the module doc) and return it.
    Built in a temporary folder beside `output` and renamed into place: a failure leaves
    nothing half-written, and an earlier repository written here is replaced whole."""
    _check_options(name, backend, instances, mode, max_queue, threads)
    src, out = Path(artifact), Path(output)
    manifest = load_manifest(src)  # one-line errors for a missing or broken artifact
    if not (src / TOKENIZER_FILE).is_file():
        raise TiDARError(f"{src} has no {TOKENIZER_FILE}: the Triton model takes text (text_input) and needs it")
    if backend == "trt":
        needed = ("prefill", "step") if mode == "tidar" else ("prefill", "ar_step")
        missing = [k for k in needed if k not in manifest.graphs or manifest.graphs[k].engine is None]
        if missing:
            raise TiDARError(f"{src} has no TensorRT engine for {', '.join(missing)}: run `tidar-export build "
                             f"{src}` first (on a GPU like the one that will serve it)")
    _check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(stage, usual_mode(folder=True))
        version = stage / name / "1"
        version.mkdir(parents=True)
        _copy_artifact(src, version / ARTIFACT_DIR)
        _copy_runtime(version / "tidar_runtime")
        shutil.copy2(MODEL_FILE, version / "model.py")
        (stage / name / "config.pbtxt").write_text(
            config_pbtxt(name, backend, instances, mode, max_queue, threads))
        (stage / "README.md").write_text(readme(name, backend, instances, mode, manifest))
        (stage / MARKER).write_text(json.dumps({
            "format": MARKER_FORMAT, "version": 1, "name": name, "backend": backend, "instances": instances,
            "mode": mode, "artifact": str(src.resolve()), "max_batch": manifest.max_batch}, indent=2) + "\n")
        return replace_dir(stage, out)
    except OSError as e:
        raise TiDARError(f"cannot write the model repository {out}: {first_line(e)}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def server_command(repo: str = "MODEL_REPO") -> str:
    """The tritonserver command line the README gives (loopback only; see it for a node), the
    repository path quoted for a shell."""
    return (f"tritonserver --model-repository {shlex.quote(repo)} --http-address 127.0.0.1 --http-port 8000 "
            f"--grpc-address 127.0.0.1 --grpc-port 8001 --metrics-port 8002 --exit-on-error false")


def readme(name: str, backend: str, instances: int, mode: str, manifest) -> str:
    kind = "CPU" if backend == "ort" else "GPU"
    lib = {"ort": "onnxruntime", "ort-cuda": "onnxruntime-gpu", "trt": "tensorrt (the version that built the "
           "engines)"}[backend]
    rows = manifest.max_batch
    return f"""# Triton model repository: `{name}`

Written by `tidar-export triton`. One decoupled (streaming) Python-backend model, `{name}`,
runs TiDAR's serving engine in-process over the artifact in `{name}/1/artifact/` (backend
`{backend}`, {mode} decoding, {instances} instance(s) of kind {kind}). Each instance holds one
engine with the artifact's {rows} batch row(s): concurrent requests to an instance share its
batched step; more requests than rows wait in the instance's queue.

## Start the server

Triton's Python (the `python3` its Python backend stub finds first on PATH, or the
environment named by EXECUTION_ENV_PATH in config.pbtxt) needs `numpy<2`, `tokenizers` and
`{lib}`. Nothing else: the runtime is in `{name}/1/tidar_runtime/`.

```bash
{server_command("MODEL_REPO")}
```

(`MODEL_REPO` is this folder's absolute path. Bind to a routable address and publish the
ports only behind your own network policy.) Ready when `curl -sf
127.0.0.1:8000/v2/health/ready` succeeds; in a container:

```bash
docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD:/models \\
  nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
  bash -c "pip install 'numpy<2' tokenizers {lib.split(' ')[0]} && tritonserver --model-repository /models"
```

## Requests

Inputs (all but `text_input` optional): `text_input` (string), `max_tokens` (int32, default
64), `stream` (bool, default false: one response with the whole text), `temperature` (fp32, 0
= greedy), `top_k` (int32), `top_p` (fp32), `random_seed` (uint64), `stop_words` (strings),
`end_id` (int32, replaces the tokenizer's end-of-sequence token), `sampling_parameters` (a
JSON string with any of temperature, top_k, top_p, seed, max_tokens, stop, as Triton's vLLM
backend takes). Outputs per response: `text_output` (the new text; the prompt is never
repeated), `output_ids` (its token ids), `finish_reason` (`stop`, `length`, `cache_full` on
the last response).

```bash
curl -sN -X POST 127.0.0.1:8000/v2/models/{name}/generate_stream \\
  -d '{{"text_input": "def main():", "max_tokens": 32, "stream": true}}'
```

Plain HTTP `infer` refuses decoupled models: use `generate` / `generate_stream` or gRPC
streaming (tritonclient `start_stream` + `async_stream_infer`).
"""
