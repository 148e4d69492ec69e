"""The manifest: the contract between build time and run time (DESIGN.md).

Every artifact directory has a `manifest.json` beside its graphs/engines. A runtime, in Python
or C++, reads only the manifest and the artifact files, never the torch model. The schema is
versioned: `MANIFEST_VERSION` bumps on any change a reader must know about, and a reader
refuses a version it does not understand (one-line error).

Shape entries are ints (static) or names of dimensions (dynamic or per-artifact constants,
resolved in `dims`), e.g. ["batch", "kv_heads", "max_seq_len", "head_dim"].

Optional fields added within version 1 (a manifest without them loads; they default empty):
- `tuning` (written by `tidar-export tune`): how block_size / proposals were chosen, e.g.
  {"chosen": {"block_size": 4, "proposals": [1, 2, 3, 4], "speedup": 1.6, ...}, "objective": ...,
  "backend": "ort", "threads": 1, "device": ..., "candidates": [...], "date": ...}. Informational:
  the runtime decodes with `block_size` / `proposals` as always (tune rewrites the graphs too).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tidar_runtime.errors import TiDARError
from tidar_runtime.fileio import write_atomic
from tidar_runtime.layout import past_names, present_names, step_len

MANIFEST_FORMAT = "tidar-manifest"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
GRAPH_KINDS = ("prefill", "step", "ar_step")  # the graphs of every artifact, in export order


@dataclass
class TensorSpec:
    name: str  # binding name, e.g. "past_key_values.0.key"
    dtype: str  # numpy-style dtype name: "int64", "float32", "float16", "bfloat16", "bool"
    shape: list[int | str]  # ints are static; strings name a dimension (see Manifest.dims)


@dataclass
class GraphSpec:
    kind: str  # one of GRAPH_KINDS
    file: str  # ONNX file, relative to the artifact directory
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    engine: str | None = None  # TensorRT engine file, once built
    engine_info: dict = field(default_factory=dict)  # TensorRT version, compute capability, flags
    bytes: int | None = None  # size of `file` as written (a shorter file is a truncated artifact)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass
class Manifest:
    model: dict  # model config: arch, vocab_size, num_layers, num_heads, num_kv_heads, head_dim, rope_theta, ...
    block_size: int  # b: draft rows of the step graph
    proposals: list[int]  # acceptance levels r with a pre-drafted block (contains 1)
    mask_token_id: int  # the TiDAR mask token
    max_seq_len: int  # KV cache slots per row
    max_batch: int  # rows of the step graphs
    precision: str  # "fp32" | "fp16" | "bf16" | "int8" | "fp8"
    target: str  # "ort" | "trt-10.3" | "trt-10.15"
    kv_update: str  # "slice": graphs output the new K/V [B, KV, T, hd], the runtime writes them at L;
    # "inplace": they output the whole cache [B, KV, max_seq_len, hd] with the new K/V written at L
    # (bind present.* to the past_key_values.* buffers on engines that alias them)
    graphs: dict[str, GraphSpec]  # by kind
    dims: dict[str, int | None]  # named dims: value when fixed for this artifact, None when dynamic
    tokenizer: dict = field(default_factory=dict)  # {"file": "tokenizer.json", "eos_token_id": ...}
    versions: dict = field(default_factory=dict)  # exporter, torch, onnx, opset, tensorrt ...
    weights: dict = field(default_factory=dict)  # {"file": "weights.bin", "bytes": N}: the shared external data
    tuning: dict = field(default_factory=dict)  # set by `tidar-export tune` (see the module doc); {} if untuned
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def step_len(self) -> int:
        return step_len(self.block_size, self.proposals)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def save(self, artifact_dir: str | os.PathLike) -> Path:
        """Write manifest.json atomically (temp file, then rename)."""
        return write_atomic(Path(artifact_dir) / MANIFEST_FILE, self.to_json())

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["graphs"] = {
            k: GraphSpec(**{**g, "inputs": [TensorSpec(**t) for t in g["inputs"]],
                             "outputs": [TensorSpec(**t) for t in g["outputs"]]})
            for k, g in d["graphs"].items()
        }
        return cls(**d)


def load_manifest(artifact_dir: str | os.PathLike) -> Manifest:
    """Read and check an artifact's manifest; every problem is a one-line TiDARError."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST_FILE
    if not artifact_dir.is_dir():
        raise TiDARError(f"artifact directory not found: {artifact_dir}")
    if not path.is_file():
        raise TiDARError(f"{artifact_dir}: no {MANIFEST_FILE} (not an artifact, or an interrupted export)")
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise TiDARError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
        raise TiDARError(f"{path}: not a TiDAR manifest")
    if d.get("version") != MANIFEST_VERSION:
        raise TiDARError(
            f"{path}: manifest version {d.get('version')!r} is not supported by this runtime "
            f"(it reads version {MANIFEST_VERSION}); re-export the artifact or upgrade tidar-export"
        )
    try:
        m = Manifest.from_dict(d)
    except (TypeError, KeyError) as e:
        raise TiDARError(f"{path}: malformed manifest ({e})") from None
    for g in m.graphs.values():
        for f in (g.file, g.engine):
            if f is not None and not (artifact_dir / f).is_file():
                raise TiDARError(f"{artifact_dir}: {g.kind} file {f} named by the manifest is missing")
        if g.bytes is not None and (artifact_dir / g.file).stat().st_size != g.bytes:
            raise TiDARError(f"{artifact_dir}: {g.file} has {(artifact_dir / g.file).stat().st_size} bytes, "
                             f"the manifest says {g.bytes} (truncated or modified after export)")
    if m.weights:
        w = artifact_dir / m.weights["file"]
        if not w.is_file():
            raise TiDARError(f"{artifact_dir}: weight file {m.weights['file']} named by the manifest is missing")
        if w.stat().st_size != m.weights["bytes"]:
            raise TiDARError(f"{artifact_dir}: {m.weights['file']} has {w.stat().st_size} bytes, the manifest "
                             f"says {m.weights['bytes']} (truncated or modified after export)")
    return m


def read_artifact(backend, artifact_dir: str | os.PathLike) -> Manifest:
    """Load an artifact's manifest and set on `backend` the attributes every backend reads from
    it: dir, manifest, block_size, proposals, max_len, max_batch, mask_token_id, vocab_size and
    the cache binding names past_names / present_names (one per layer and K/V). A kv_update
    other than "slice" or "inplace" is refused."""
    backend.dir = Path(artifact_dir)
    backend.manifest = m = load_manifest(backend.dir)
    if m.kv_update not in ("slice", "inplace"):
        raise TiDARError(f"unknown kv_update {m.kv_update!r} in the manifest")
    backend.block_size, backend.proposals = m.block_size, tuple(m.proposals)
    backend.max_len, backend.max_batch, backend.mask_token_id = m.max_seq_len, m.max_batch, m.mask_token_id
    backend.vocab_size = m.model["vocab_size"]
    layers = m.model["num_layers"]
    backend.past_names, backend.present_names = past_names(layers), present_names(layers)
    return m
