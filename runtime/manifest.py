"""The manifest: the contract between build time and run time (docs/ARCHITECTURE.md).

Every artifact directory has a `manifest.json` beside its graphs/engines. A runtime, in Python
or C++, reads only the manifest and the artifact files, never the torch model. The schema is
versioned: `MANIFEST_VERSION` bumps on any change a reader must know about, and a reader
refuses a version it does not understand (one-line error).

Shape entries are ints (static) or names of dimensions (dynamic or per-artifact constants,
resolved in `dims`), e.g. ["batch", "kv_heads", "max_seq_len", "head_dim"].

Optional fields added within version 1 (a manifest without them loads; they default empty):
- `graphs.*.digest`, `weights.blake2b`, `weights.sample_blake2b` (written by export and
  quantize): BLAKE2b digests; a reader checks the graphs' and the sampled weights digest on
  every load and `tidar-export check` the whole weights file (docs/RELIABILITY.md).
- `tokenizer.chat_template`: the chat template file beside tokenizer.json (runtime/chat.py);
  `tokenizer.eos_token_id` may be a list of ids, each of which stops a sequence (`eos_ids`).
- `tuning` (written by `tidar-export tune`): how block_size / proposals were chosen, e.g.
  {"chosen": {"block_size": 4, "proposals": [1, 2, 3, 4], "speedup": 1.6, ...}, "objective": ...,
  "backend": "ort", "threads": 1, "device": ..., "candidates": [...], "date": ...}. Informational:
  the runtime decodes with `block_size` / `proposals` as always (tune rewrites the graphs too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tidar_runtime.errors import TiDARError, first_line
from tidar_runtime.fileio import write_atomic
from tidar_runtime.layout import PAST_PREFIX, PRESENT_PREFIX, past_names, present_names, step_len
from tidar_runtime.paths import check_name, confined

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
    digest: str | None = None  # BLAKE2b-128 (hex) of `file` as written; checked on every load
    kv_update: str | None = None  # step / ar_step: how this graph writes the cache, where it differs
    # from the manifest's kv_update (the ort target's ar_step: "inplace"); None: the manifest's

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
    precision: str  # "fp32" | "fp16" | "bf16" | "int8" | "fp8" | "int4" | "int8-wo"
    target: str  # "ort" | "trt-10.3" | "trt-10.15"
    kv_update: str  # "slice": graphs output the new K/V [B, KV, T, hd], the runtime writes them at L;
    # "inplace": they output the whole cache [B, KV, max_seq_len, hd] with the new K/V written at L
    # (bind present.* to the past_key_values.* buffers on engines that alias them)
    graphs: dict[str, GraphSpec]  # by kind
    dims: dict[str, int | None]  # named dims: value when fixed for this artifact, None when dynamic
    tokenizer: dict = field(default_factory=dict)  # {"file": "tokenizer.json", "eos_token_id": id or [ids],
    # "bos_token_id": ..., "chat_template": "chat_template.jinja" (a Jinja file beside it, or absent)}
    versions: dict = field(default_factory=dict)  # exporter, torch, onnx, opset, tensorrt ...
    weights: dict = field(default_factory=dict)  # {"file": "weights.bin", "bytes": N, "blake2b": hex,
    # "sample_blake2b": hex}: the shared external data, its whole-file digest (checked by `check`) and its
    # sampled digest (checked on every load, see sample_digest)
    tuning: dict = field(default_factory=dict)  # set by `tidar-export tune` (see the module doc); {} if untuned
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def step_len(self) -> int:
        return step_len(self.block_size, self.proposals)

    @property
    def eos_ids(self) -> list[int]:
        """The tokenizer's stop ids: eos_token_id as a list (empty when there is none)."""
        eos = self.tokenizer.get("eos_token_id")
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    def kv_update_of(self, kind: str) -> str | None:
        """How graph `kind` writes the cache: a cached graph's ("step" | "ar_step") own kv_update,
        else the manifest's; None for the prefill, which has no cache input (as
        ExportPlan.kv_update_of and tidar_graphs' Target.kv_update_of say)."""
        if kind == "prefill":
            return None
        return self.graphs[kind].kv_update or self.kv_update

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


MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KiB; a larger file is not one
MAX_JSON_DEPTH = 32  # the deepest manifest field (tuning.candidates[i].proposals[j]) is at depth 5
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int4", "int8-wo")  # the last two: weight-only (tidar-export quantize)
TENSOR_DTYPES = ("int64", "int32", "int8", "uint8", "bool", "float32", "float16", "bfloat16",
                 "float8e4m3fn", "float8_e4m3fn")
# Bounds of what a runtime allocates from the manifest (checked before any allocation).
LIMITS = {"vocab_size": 1 << 24, "num_layers": 1024, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024,
          "hidden_size": 1 << 17, "block_size": 1024, "max_seq_len": 1 << 22, "max_batch": 4096}
# Bindings the runtime feeds and reads, per graph (besides past_key_values.* / present.*).
RUNTIME_INPUTS = {"prefill": ("input_ids",), "step": ("draft_ids", "cache_len"), "ar_step": ("input_ids", "cache_len")}
RUNTIME_OUTPUTS = ("token_ids", "logits")
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 64 << 10  # the quick weights digest reads at most 4 MiB


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def read_json(path: Path, limit: int = MAX_MANIFEST_BYTES):
    """A JSON file of bounded size and nesting depth; one-line TiDARError otherwise."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise TiDARError(f"{path}: {size} bytes, more than the {limit} this JSON file may have")
        d = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise TiDARError(f"{path}: invalid JSON (not UTF-8)") from None
    except RecursionError:
        raise TiDARError(f"{path}: invalid JSON (nested more than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:
        raise TiDARError(f"{path}: invalid JSON ({first_line(e)})") from None
    if _depth(d) > MAX_JSON_DEPTH:
        raise TiDARError(f"{path}: invalid JSON (nested more than {MAX_JSON_DEPTH} levels)")
    return d


class _Fields:
    """Type and bound checks with the field's path in the message."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, want: str, value) -> TiDARError:
        shown = repr(value)
        return TiDARError(f"{self.where}: malformed manifest ({field} must be {want}, got {shown[:60]})")

    def int(self, field: str, value, lo: int, hi: int, none: bool = False):
        if value is None and none:
            return None
        if type(value) is not int or not lo <= value <= hi:
            raise self.fail(field, f"an integer in {lo}..{hi}" + (" or null" if none else ""), value)
        return value

    def str(self, field: str, value, choices=None, none: bool = False, max_len: int = 256):
        if value is None and none:
            return None
        if not isinstance(value, str) or not value or len(value) > max_len or (choices and value not in choices):
            raise self.fail(field, f"one of {', '.join(choices)}" if choices else "a non-empty string", value)
        return value

    def obj(self, field: str, value, none: bool = False) -> dict:
        if value is None and none:
            return {}
        if not isinstance(value, dict):
            raise self.fail(field, "an object", value)
        return value

    def list(self, field: str, value, max_len: int = 1 << 16) -> list:
        if not isinstance(value, list) or len(value) > max_len:
            raise self.fail(field, f"a list of at most {max_len} entries", value)
        return value


def validate(d, where: str) -> "Manifest":
    """The one validation of a parsed manifest: every field a runtime reads, its type and bounds,
    and the bindings it feeds; returns the Manifest or raises a one-line TiDARError."""
    f = _Fields(where)
    f.obj("the manifest", d)
    known = {x.name for x in dataclasses.fields(Manifest)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise TiDARError(f"{where}: malformed manifest (unknown field {unknown[0][:60]!r})")
    missing = [k for k in ("model", "block_size", "proposals", "mask_token_id", "max_seq_len", "max_batch",
                           "precision", "target", "kv_update", "graphs", "dims") if k not in d]
    if missing:
        raise TiDARError(f"{where}: malformed manifest (missing field {missing[0]!r})")
    model = f.obj("model", d["model"])
    for key in ("vocab_size", "num_layers", "num_kv_heads", "head_dim"):  # what a runtime allocates from
        f.int(f"model.{key}", model.get(key), 1, LIMITS[key])
    for key in ("hidden_size", "num_heads"):  # informational for a runtime; bounded when present
        if key in model:
            f.int(f"model.{key}", model[key], 1, LIMITS[key])
    if "num_heads" in model and model["num_heads"] % model["num_kv_heads"]:
        raise f.fail("model.num_kv_heads", f"a divisor of num_heads {model['num_heads']}", model["num_kv_heads"])
    vocab, layers = model["vocab_size"], model["num_layers"]
    b = f.int("block_size", d["block_size"], 1, LIMITS["block_size"])
    rs = f.list("proposals", d["proposals"], b)
    if not rs or any(type(r) is not int for r in rs) or rs != sorted(set(rs)) or rs[0] != 1 or rs[-1] > b:
        raise f.fail("proposals", f"ascending distinct integers in 1..{b} starting with 1", rs)
    f.int("mask_token_id", d["mask_token_id"], 0, vocab - 1)
    max_pos = model.get("max_position_embeddings")
    hi = min(LIMITS["max_seq_len"], max_pos) if type(max_pos) is int and max_pos > 0 else LIMITS["max_seq_len"]
    S = f.int("max_seq_len", d["max_seq_len"], step_len(b, rs) + 1, hi)
    f.int("max_batch", d["max_batch"], 1, LIMITS["max_batch"])
    f.str("precision", d["precision"], PRECISIONS)
    f.str("target", d["target"], max_len=64)
    f.str("kv_update", d["kv_update"], ("slice", "inplace"))
    dims = f.obj("dims", d["dims"])
    for name, value in dims.items():
        f.str("dims key", name, max_len=64)
        f.int(f"dims.{name}", value, 0, 1 << 31, none=True)
    graphs = f.obj("graphs", d["graphs"])
    if sorted(graphs) != sorted(GRAPH_KINDS):
        raise f.fail("graphs", f"an object with exactly {', '.join(GRAPH_KINDS)}", sorted(graphs))
    past, present = past_names(layers), present_names(layers)
    for kind, g in graphs.items():
        g = f.obj(f"graphs.{kind}", g)
        extra = sorted(set(g) - {x.name for x in dataclasses.fields(GraphSpec)})
        if extra:
            raise TiDARError(f"{where}: malformed manifest (unknown field graphs.{kind}.{extra[0][:60]})")
        f.str(f"graphs.{kind}.kind", g.get("kind"), (kind,))
        check_name(g.get("file"), f"{where}: graphs.{kind}.file")
        if g.get("engine") is not None:
            check_name(g["engine"], f"{where}: graphs.{kind}.engine")
        f.obj(f"graphs.{kind}.engine_info", g.get("engine_info", {}))
        f.int(f"graphs.{kind}.bytes", g.get("bytes"), 0, 1 << 46, none=True)
        f.str(f"graphs.{kind}.digest", g.get("digest"), none=True, max_len=128)
        f.str(f"graphs.{kind}.kv_update", g.get("kv_update"), ("slice", "inplace"), none=True)
        if kind == "prefill" and g.get("kv_update") is not None:
            raise f.fail(f"graphs.{kind}.kv_update", "absent (the prefill graph has no cache input)", g["kv_update"])
        names = {}
        for side in ("inputs", "outputs"):
            names[side] = []
            for i, t in enumerate(f.list(f"graphs.{kind}.{side}", g.get(side), 4 * LIMITS["num_layers"] + 8)):
                t = f.obj(f"graphs.{kind}.{side}[{i}]", t)
                if set(t) != {"name", "dtype", "shape"}:
                    raise f.fail(f"graphs.{kind}.{side}[{i}]", "an object with name, dtype, shape", sorted(t))
                names[side].append(f.str(f"graphs.{kind}.{side}[{i}].name", t["name"]))
                f.str(f"graphs.{kind}.{side}[{i}].dtype", t["dtype"], TENSOR_DTYPES)
                for dim in f.list(f"graphs.{kind}.{side}[{i}].shape", t["shape"], 8):
                    if isinstance(dim, str):
                        if dim not in dims:
                            raise f.fail(f"graphs.{kind}.{side}[{i}].shape", "ints or names of dims", dim)
                    else:
                        f.int(f"graphs.{kind}.{side}[{i}].shape", dim, 0, 1 << 31)
        want_in = list(RUNTIME_INPUTS[kind]) + ([] if kind == "prefill" else past)
        want_out = list(RUNTIME_OUTPUTS) + present
        for side, want in (("inputs", want_in), ("outputs", want_out)):
            lost = [n for n in want if n not in names[side]]
            kv = PAST_PREFIX if side == "inputs" else PRESENT_PREFIX
            strays = [n for n in names[side] if n.startswith(kv + ".") and n not in want]
            if lost or strays:
                raise TiDARError(f"{where}: malformed manifest (graphs.{kind}.{side} "
                                 + (f"lacks the binding {lost[0][:60]!r}" if lost else
                                    f"has {strays[0][:60]!r}, which a {layers}-layer model does not have") + ")")
    # The cache a backend allocates: [max_batch, num_kv_heads, max_seq_len, head_dim] per binding.
    kv_spec = next(t for t in graphs["step"]["inputs"] if t["name"] == past[0])
    shape = [dims.get(x) if isinstance(x, str) else x for x in kv_spec["shape"]]
    want = [d["max_batch"], model["num_kv_heads"], S, model["head_dim"]]
    if len(shape) != 4 or any(s is not None and s != w for s, w in zip(shape, want)):
        raise f.fail(f"graphs.step.inputs {past[0]} shape", f"{want} (batch, kv heads, max_seq_len, head_dim)", shape)
    tok = f.obj("tokenizer", d.get("tokenizer", {}), none=True)
    if tok.get("file") is not None:
        check_name(tok["file"], f"{where}: tokenizer.file")
    f.int("tokenizer.bos_token_id", tok.get("bos_token_id"), 0, vocab - 1, none=True)
    eos = tok.get("eos_token_id")  # an id or a list of ids (every one stops a sequence)
    if isinstance(eos, list):
        for i, v in enumerate(f.list("tokenizer.eos_token_id", eos, 64)):
            f.int(f"tokenizer.eos_token_id[{i}]", v, 0, vocab - 1)
    else:
        f.int("tokenizer.eos_token_id", eos, 0, vocab - 1, none=True)
    if tok.get("chat_template") is not None:
        check_name(tok["chat_template"], f"{where}: tokenizer.chat_template")
    weights = f.obj("weights", d.get("weights", {}), none=True)
    if weights:
        check_name(weights.get("file"), f"{where}: weights.file")
        f.int("weights.bytes", weights.get("bytes"), 0, 1 << 46)
        for key in ("blake2b", "sample_blake2b"):
            f.str(f"weights.{key}", weights.get(key), none=True, max_len=128)
    for key in ("versions", "tuning"):
        f.obj(key, d.get(key, {}), none=True)
    try:
        return Manifest.from_dict(d)
    except (TypeError, KeyError) as e:
        raise TiDARError(f"{where}: malformed manifest ({first_line(e)})") from None


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b-128 of a whole file, streamed in 4 MiB chunks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def sample_digest(path: str | os.PathLike) -> str:
    """BLAKE2b-128 of the file's size and of SAMPLE_BLOCKS evenly spaced 64 KiB blocks (first and
    last included): a whole-file digest for files up to 4 MiB, a cheap check on load otherwise."""
    h = hashlib.blake2b(digest_size=16)
    size = os.stat(path).st_size
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
            while chunk := f.read(4 << 20):
                h.update(chunk)
        else:
            for i in range(SAMPLE_BLOCKS):
                f.seek((size - SAMPLE_BLOCK_BYTES) * i // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


def verify_digests(artifact_dir: str | os.PathLike, m: "Manifest", full: bool = False) -> None:
    """Graph files against their recorded digests, and the weights file against its quick digest
    (and, with `full`, its whole-file digest). Artifacts exported before digests were recorded
    have none and pass. A mismatch is a one-line TiDARError."""
    artifact_dir = Path(artifact_dir)
    for g in m.graphs.values():
        if g.digest is not None and file_digest(artifact_dir / g.file) != g.digest:
            raise TiDARError(f"{artifact_dir}: {g.file} does not match its digest in the manifest "
                             "(corrupt or modified after export)")
    if m.weights:
        w = artifact_dir / m.weights["file"]
        checks = [("sample_blake2b", sample_digest)] + ([("blake2b", file_digest)] if full else [])
        for key, fn in checks:
            if m.weights.get(key) is not None and fn(w) != m.weights[key]:
                raise TiDARError(f"{artifact_dir}: {m.weights['file']} does not match its digest in the manifest "
                                 "(corrupt or modified after export)")


def load_manifest(artifact_dir: str | os.PathLike, verify: str = "quick") -> Manifest:
    """Read and check an artifact's manifest; every problem is a one-line TiDARError.

    Always: JSON of bounded size and depth, format and version, every field validated
    (`validate`), every file name confined to the artifact (no absolute path, '..' or symlink
    out), the files present with their recorded sizes. verify="quick" (the default, on every
    load) also checks the graph digests and the weights' sampled digest; "full" adds the
    whole-file weights digest (`tidar-export check`); "none" skips digests."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST_FILE
    if not artifact_dir.is_dir():
        raise TiDARError(f"artifact directory not found: {artifact_dir}")
    if not path.is_file():
        raise TiDARError(f"{artifact_dir}: no {MANIFEST_FILE} (not an artifact, or an interrupted export)")
    d = read_json(path)
    if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
        raise TiDARError(f"{path}: not a TiDAR manifest")
    if d.get("version") != MANIFEST_VERSION:
        raise TiDARError(
            f"{path}: manifest version {repr(d.get('version'))[:20]} is not supported by this runtime "
            f"(it reads version {MANIFEST_VERSION}); re-export the artifact or upgrade tidar-export"
        )
    m = validate(d, str(path))
    for g in m.graphs.values():
        for f in (g.file, g.engine):
            if f is not None and not confined(artifact_dir, f, f"{path}: {g.kind} file").is_file():
                raise TiDARError(f"{artifact_dir}: {g.kind} file {f} named by the manifest is missing")
        if g.bytes is not None and (artifact_dir / g.file).stat().st_size != g.bytes:
            raise TiDARError(f"{artifact_dir}: {g.file} has {(artifact_dir / g.file).stat().st_size} bytes, "
                             f"the manifest says {g.bytes} (truncated or modified after export)")
    for key in ("file", "chat_template"):
        if m.tokenizer.get(key) is not None:
            confined(artifact_dir, m.tokenizer[key], f"{path}: tokenizer {key}")
    if m.weights:
        w = confined(artifact_dir, m.weights["file"], f"{path}: weight file")
        if not w.is_file():
            raise TiDARError(f"{artifact_dir}: weight file {m.weights['file']} named by the manifest is missing")
        if w.stat().st_size != m.weights["bytes"]:
            raise TiDARError(f"{artifact_dir}: {m.weights['file']} has {w.stat().st_size} bytes, the manifest "
                             f"says {m.weights['bytes']} (truncated or modified after export)")
    if verify != "none":
        verify_digests(artifact_dir, m, full=verify == "full")
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
