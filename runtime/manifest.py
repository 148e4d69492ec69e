"""The manifest: the contract between build time and run time (docs/ARCHITECTURE.md).

Every artifact directory has a `manifest.json` beside its graphs/engines. A runtime, in Python
or C++, reads only the manifest and the artifact files, never the torch model. The format is
versioned: `MANIFEST_VERSION` bumps on any change a reader must know about, and a reader
refuses a version it does not understand with a one-line "re-export" error.
runtime/manifest.schema.json (`tidar_runtime.schema`) is its JSON Schema.

Each fact is recorded once:
- `dims`: every size, under the names the graphs' shapes use (tidar_runtime.contract.DIMS): the
  batch (max_batch), block_size, q_len, n_out, max_seq_len, kv_heads, head_dim, vocab, num_layers;
  null for the prefill's dynamic dims.
- `export`: the export options that are not sizes: target, precision, proposals, mask_token_id,
  ar_step ("gqa": the ort target's AR step as GroupQueryAttention; "attention").
- `model`: the rest of the model config (architecture, widths, RoPE, ...); `tokenizer`: its file,
  bos id, eos id or list of ids (each stops a sequence, `eos_ids`), the chat template file
  (`chat_template`, runtime/chat.py), their digests and the tokenizer's vocabulary size.
- `graphs.<kind>`: file, the cache-update mode `kv_update` (null for the prefill), `rows` (what
  each output row predicts, tidar_runtime.contract.graph_rows) and every binding with dtype and
  named shape (tidar_runtime.contract.graph_io); digests and sizes as written.
Optional: `weights` (the shared external data file, its size and digests), `versions`, `tuning`
(written by `tidar-export tune`: how block_size / proposals were chosen; informational).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tidar_runtime import stamps
from tidar_runtime.contract import (AR_STEPS, BOUNDS, DIMS, DYNAMIC_DIMS, FLOAT_PRECISIONS, GRAPH_KINDS, KV_UPDATES,
                                    MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, PAST_PREFIX, PRECISIONS,
                                    PRESENT_PREFIX, DTYPES, TensorSpec, graph_io, graph_rows, n_out, past_names,
                                    present_names, step_len)
from tidar_runtime.errors import TiDARError, first_line
from tidar_runtime.fileio import write_atomic
from tidar_runtime.paths import check_name, confined

# The model config fields recorded elsewhere than `model` (each fact once): sizes in `dims`
# (config field -> dim name), export options in `export`, token ids in `tokenizer`.
CONFIG_DIMS = {"vocab_size": "vocab", "num_layers": "num_layers", "num_kv_heads": "kv_heads", "head_dim": "head_dim",
               "block_size": "block_size"}
CONFIG_EXPORT = ("mask_token_id",)
CONFIG_TOKENIZER = ("bos_token_id", "eos_token_id")
TOKENIZER_DIGESTS = {"file": "blake2b", "chat_template": "chat_template_blake2b"}  # tokenizer file key -> its digest key


def model_record(config: dict) -> dict:
    """The `model` section of a manifest for a model config (as a dict): what no other section holds."""
    return {k: v for k, v in config.items() if k not in (*CONFIG_DIMS, *CONFIG_EXPORT, *CONFIG_TOKENIZER)}


@dataclass
class GraphSpec:
    kind: str  # one of GRAPH_KINDS
    file: str  # ONNX file, relative to the artifact directory
    kv_update: str | None  # how it writes the cache: one of KV_UPDATES; None for the prefill (no cache input)
    rows: list[dict]  # what each output row predicts (tidar_runtime.contract.graph_rows)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    engine: str | None = None  # TensorRT engine file, once built
    engine_info: dict = field(default_factory=dict)  # TensorRT version, compute capability, flags
    bytes: int | None = None  # size of `file` as written (a shorter file is a truncated artifact)
    digest: str | None = None  # BLAKE2b-128 (hex) of `file` as written; checked on every load

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass
class Manifest:
    model: dict  # the model config without what dims, export and tokenizer record (model_record)
    export: dict  # {"target", "precision", "proposals", "mask_token_id", "ar_step"}
    dims: dict[str, int | None]  # every named dim: its value, None when dynamic (contract.DIMS)
    graphs: dict[str, GraphSpec]  # by kind
    tokenizer: dict = field(default_factory=dict)  # {"file": "tokenizer.json", "bos_token_id", "eos_token_id": id or [ids],
    # "chat_template": "chat_template.jinja" (a Jinja file beside it, or absent)}
    versions: dict = field(default_factory=dict)  # exporter, torch, onnx, opsets, tensorrt ...
    weights: dict = field(default_factory=dict)  # {"file": "weights.bin", "bytes": N, "blake2b": hex,
    # "sample_blake2b": hex}: the shared external data, its whole-file digest (checked by `check`) and its
    # sampled digest (checked on every load, see sample_digest)
    tuning: dict = field(default_factory=dict)  # set by `tidar-export tune` (see the module doc); {} if untuned
    adapter: dict = field(default_factory=dict)  # the draft adapter in the prefill and step graphs' mask rows:
    # its config, "params" and "sha256" of its tensors (tidar_export.model.adapter.describe); {} if none
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    # -- the facts, by the names the code uses --------------------------------------------
    block_size = property(lambda self: self.dims["block_size"])
    max_seq_len = property(lambda self: self.dims["max_seq_len"])
    max_batch = property(lambda self: self.dims["batch"])
    vocab_size = property(lambda self: self.dims["vocab"])
    num_layers = property(lambda self: self.dims["num_layers"])
    num_kv_heads = property(lambda self: self.dims["kv_heads"])
    head_dim = property(lambda self: self.dims["head_dim"])
    step_len = property(lambda self: self.dims["q_len"])
    proposals = property(lambda self: list(self.export["proposals"]))
    mask_token_id = property(lambda self: self.export["mask_token_id"])
    precision = property(lambda self: self.export["precision"])
    target = property(lambda self: self.export["target"])

    def model_config(self) -> dict:
        """The whole model config (every TiDARConfig field), gathered from the sections that hold it."""
        return {**self.model, **{k: self.dims[d] for k, d in CONFIG_DIMS.items()},
                **{k: self.export[k] for k in CONFIG_EXPORT}, **{k: self.tokenizer.get(k) for k in CONFIG_TOKENIZER}}

    @property
    def eos_ids(self) -> list[int]:
        """The tokenizer's stop ids: eos_token_id as a list (empty when there is none)."""
        eos = self.tokenizer.get("eos_token_id")
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

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


def new_manifest(config: dict, *, target: str, precision: str, block_size: int, proposals, max_seq_len: int,
                 max_batch: int, mask_token_id: int, ar_step: str, graph_files: dict[str, str],
                 kv_updates: dict[str, str | None], kv_dtype: str) -> Manifest:
    """The manifest of an export: every section built from the model config and the export plan
    (its graphs' bindings and rows from the contract); tokenizer, versions and weights empty."""
    rs = list(proposals)
    dims = {name: None for name in DYNAMIC_DIMS}
    dims.update(batch=max_batch, block_size=block_size, q_len=step_len(block_size, rs), n_out=n_out(block_size, rs),
                max_seq_len=max_seq_len, kv_heads=config["num_kv_heads"], head_dim=config["head_dim"],
                vocab=config["vocab_size"], num_layers=config["num_layers"])
    graphs = {}
    for kind in GRAPH_KINDS:
        inputs, outputs = graph_io(kind, config["num_layers"], kv_dtype, kv_updates[kind])
        graphs[kind] = GraphSpec(kind=kind, file=graph_files[kind], kv_update=kv_updates[kind],
                                 rows=graph_rows(kind, block_size, rs), inputs=inputs, outputs=outputs)
    return Manifest(model=model_record(config),
                    export={"target": target, "precision": precision, "proposals": rs,
                            "mask_token_id": mask_token_id, "ar_step": ar_step},
                    dims={name: dims[name] for name in DIMS}, graphs=graphs,
                    tokenizer={"file": None, **{k: config.get(k) for k in CONFIG_TOKENIZER}})


MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KiB; a larger file is not one
MAX_JSON_DEPTH = 32  # the deepest manifest field (tuning.candidates[i].proposals[j]) is at depth 5
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
    and every graph's bindings and rows against the contract; returns the Manifest or raises a
    one-line TiDARError."""
    f = _Fields(where)
    f.obj("the manifest", d)
    known = {x.name for x in dataclasses.fields(Manifest)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise TiDARError(f"{where}: malformed manifest (unknown field {unknown[0][:60]!r})")
    missing = [k for k in ("model", "export", "dims", "graphs") if k not in d]
    if missing:
        raise TiDARError(f"{where}: malformed manifest (missing field {missing[0]!r})")
    model = f.obj("model", d["model"])
    for key, value in model.items():
        if key in BOUNDS:  # informational for a runtime; bounded when present
            f.int(f"model.{key}", value, *BOUNDS[key])
    dims = _dims(f, f.obj("dims", d["dims"]), model)
    b, vocab, layers = dims["block_size"], dims["vocab"], dims["num_layers"]
    export = f.obj("export", d["export"])
    for key in ("target", "precision", "proposals", "mask_token_id", "ar_step"):
        if key not in export:
            raise TiDARError(f"{where}: malformed manifest (missing field 'export.{key}')")
    f.str("export.target", export["target"], max_len=64)
    f.str("export.precision", export["precision"], PRECISIONS)
    f.str("export.ar_step", export["ar_step"], AR_STEPS)
    f.int("export.mask_token_id", export["mask_token_id"], 0, vocab - 1)
    rs = f.list("export.proposals", export["proposals"], b)
    if not rs or any(type(r) is not int for r in rs) or rs != sorted(set(rs)) or rs[0] != 1 or rs[-1] > b:
        raise f.fail("export.proposals", f"ascending distinct integers in 1..{b} starting with 1", rs)
    for name, want in (("q_len", step_len(b, rs)), ("n_out", n_out(b, rs))):
        if dims[name] != want:
            raise f.fail(f"dims.{name}", f"{want} (block_size {b}, proposals {rs})", dims[name])
    if dims["max_seq_len"] < dims["q_len"] + 1:
        raise f.fail("dims.max_seq_len", f"at least q_len + 1 = {dims['q_len'] + 1}", dims["max_seq_len"])
    graphs = f.obj("graphs", d["graphs"])
    if sorted(graphs) != sorted(GRAPH_KINDS):
        raise f.fail("graphs", f"an object with exactly {', '.join(GRAPH_KINDS)}", sorted(graphs))
    kv_dtype = None
    for kind in GRAPH_KINDS:
        kv_dtype = _graph(f, kind, f.obj(f"graphs.{kind}", graphs[kind]), dims, layers, rs, kv_dtype)
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
    f.int("tokenizer.vocab_size", tok.get("vocab_size"), 1, BOUNDS["vocab_size"][1], none=True)  # the tokenizer's own
    for key in TOKENIZER_DIGESTS.values():
        f.str(f"tokenizer.{key}", tok.get(key), none=True, max_len=128)
    weights = f.obj("weights", d.get("weights", {}), none=True)
    if weights:
        check_name(weights.get("file"), f"{where}: weights.file")
        f.int("weights.bytes", weights.get("bytes"), 0, 1 << 46)
        for key in ("blake2b", "sample_blake2b"):
            f.str(f"weights.{key}", weights.get(key), none=True, max_len=128)
    for key in ("versions", "tuning", "adapter"):
        f.obj(key, d.get(key, {}), none=True)
    try:
        return Manifest.from_dict(d)
    except (TypeError, KeyError) as e:
        raise TiDARError(f"{where}: malformed manifest ({first_line(e)})") from None


_DIM_BOUNDS = {"batch": BOUNDS["max_batch"], "block_size": BOUNDS["block_size"], "q_len": (2, 1 << 22),
               "n_out": (1, 1 << 22), "max_seq_len": BOUNDS["max_seq_len"], "kv_heads": BOUNDS["num_kv_heads"],
               "head_dim": BOUNDS["head_dim"], "vocab": BOUNDS["vocab_size"], "num_layers": BOUNDS["num_layers"]}


def _dims(f: "_Fields", dims: dict, model: dict) -> dict:
    """Every named dim of the contract, static ones in bounds, dynamic ones null."""
    extra = sorted(set(dims) - set(DIMS))
    if extra:
        raise TiDARError(f"{f.where}: malformed manifest (unknown field dims.{extra[0][:60]})")
    for name in DIMS:
        if name not in dims:
            raise TiDARError(f"{f.where}: malformed manifest (missing field 'dims.{name}')")
        if name in DYNAMIC_DIMS:
            if dims[name] is not None:
                raise f.fail(f"dims.{name}", "null (a dynamic dim)", dims[name])
        else:
            f.int(f"dims.{name}", dims[name], *_DIM_BOUNDS[name])
    max_pos = model.get("max_position_embeddings")
    if type(max_pos) is int and dims["max_seq_len"] > max_pos:
        raise f.fail("dims.max_seq_len", f"at most the model's max_position_embeddings {max_pos}", dims["max_seq_len"])
    if type(model.get("num_heads")) is int and model["num_heads"] % dims["kv_heads"]:
        raise f.fail("dims.kv_heads", f"a divisor of num_heads {model['num_heads']}", dims["kv_heads"])
    return dims


def _graph(f: "_Fields", kind: str, g: dict, dims: dict, layers: int, rs: list, kv_dtype: str | None) -> str:
    """One graph's fields, its rows and its bindings against the contract (tidar_runtime.contract.graph_io);
    returns the KV cache's dtype (the step's sets it, the AR step's must equal it)."""
    where = f"graphs.{kind}"
    extra = sorted(set(g) - {x.name for x in dataclasses.fields(GraphSpec)})
    if extra:
        raise TiDARError(f"{f.where}: malformed manifest (unknown field {where}.{extra[0][:60]})")
    f.str(f"{where}.kind", g.get("kind"), (kind,))
    check_name(g.get("file"), f"{f.where}: {where}.file")
    if g.get("engine") is not None:
        check_name(g["engine"], f"{f.where}: {where}.engine")
    f.obj(f"{where}.engine_info", g.get("engine_info", {}))
    f.int(f"{where}.bytes", g.get("bytes"), 0, 1 << 46, none=True)
    f.str(f"{where}.digest", g.get("digest"), none=True, max_len=128)
    if kind == "prefill":
        if g.get("kv_update") is not None:
            raise f.fail(f"{where}.kv_update", "null (the prefill graph has no cache input)", g["kv_update"])
    else:
        f.str(f"{where}.kv_update", g.get("kv_update"), KV_UPDATES)
    want_rows = graph_rows(kind, dims["block_size"], rs)
    if g.get("rows") != want_rows:
        raise f.fail(f"{where}.rows", f"the contract's rows {json.dumps(want_rows)[:80]}", g.get("rows"))
    specs = {}
    for side in ("inputs", "outputs"):
        specs[side] = []
        for i, t in enumerate(f.list(f"{where}.{side}", g.get(side), 4 * BOUNDS["num_layers"][1] + 8)):
            t = f.obj(f"{where}.{side}[{i}]", t)
            if set(t) != {"name", "dtype", "shape"}:
                raise f.fail(f"{where}.{side}[{i}]", "an object with name, dtype, shape", sorted(t))
            f.str(f"{where}.{side}[{i}].name", t["name"])
            f.str(f"{where}.{side}[{i}].dtype", t["dtype"], tuple(DTYPES))
            f.list(f"{where}.{side}[{i}].shape", t["shape"], 8)
            specs[side].append(t)
    if kv_dtype is None:  # the float dtype of the cache, from the first cache binding
        kv_dtype = next((t["dtype"] for t in specs["outputs"] if t["name"].startswith(PRESENT_PREFIX + ".")), "float32")
        if kv_dtype not in FLOAT_PRECISIONS.values():
            raise f.fail(f"{where}.outputs {PRESENT_PREFIX}.0.key dtype", f"one of {', '.join(FLOAT_PRECISIONS.values())}",
                         kv_dtype)
    want = dict(zip(("inputs", "outputs"), graph_io(kind, layers, kv_dtype, g.get("kv_update"))))
    for side in ("inputs", "outputs"):
        names = [t["name"] for t in specs[side]]
        lost = [t.name for t in want[side] if t.name not in names]
        kv = PAST_PREFIX if side == "inputs" else PRESENT_PREFIX
        strays = [n for n in names if n.startswith(kv + ".") and n not in {t.name for t in want[side]}]
        if lost or strays:
            raise TiDARError(f"{f.where}: malformed manifest ({where}.{side} "
                             + (f"lacks the binding {lost[0][:60]!r}" if lost else
                                f"has {strays[0][:60]!r}, which a {layers}-layer model does not have") + ")")
        if len(names) != len(want[side]):
            raise f.fail(f"{where}.{side}", f"the {len(want[side])} bindings of the contract", names)
        for i, (t, w) in enumerate(zip(specs[side], want[side])):
            if (t["name"], t["dtype"], t["shape"]) != (w.name, w.dtype, w.shape):
                raise f.fail(f"{where}.{side}[{i}] ({t['name'][:60]}) shape and dtype",
                             f"{w.dtype} {w.shape}", [t["dtype"], t["shape"]])
    return kv_dtype


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
    """Graph files and the tokenizer against their recorded digests; the weights file against its
    quick digest, and against its whole-file digest once per file (tidar_runtime.stamps: again
    only when the file changed) or always with `full`. Artifacts exported before digests were
    recorded have none and pass. A mismatch is a one-line TiDARError."""
    artifact_dir = Path(artifact_dir)
    for g in m.graphs.values():
        if g.digest is not None and file_digest(artifact_dir / g.file) != g.digest:
            raise TiDARError(f"{artifact_dir}: {g.file} does not match its digest in the manifest "
                             "(corrupt or modified after export)")
    tok = m.tokenizer
    for key, digest in TOKENIZER_DIGESTS.items():  # tokenizer.json, chat_template.jinja
        if tok.get(key) is None or tok.get(digest) is None:
            continue
        if not (artifact_dir / tok[key]).is_file():
            raise TiDARError(f"{artifact_dir}: tokenizer {key} {tok[key]} named by the manifest is missing")
        if file_digest(artifact_dir / tok[key]) != tok[digest]:
            raise TiDARError(f"{artifact_dir}: {tok[key]} does not match its digest in the manifest "
                             "(replaced or modified after export)")
    if m.weights:
        w = artifact_dir / m.weights["file"]
        whole = m.weights.get("blake2b")
        hash_whole = whole is not None and (full or not stamps.is_verified(w, whole))
        checks = [("sample_blake2b", sample_digest)] + ([("blake2b", file_digest)] if hash_whole else [])
        for key, fn in checks:
            if m.weights.get(key) is not None and fn(w) != m.weights[key]:
                raise TiDARError(f"{artifact_dir}: {m.weights['file']} does not match its digest in the manifest "
                                 "(corrupt or modified after export)")
        if hash_whole:
            stamps.mark_verified(w, whole)


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
            f"(it reads version {MANIFEST_VERSION}): re-export the artifact with this version of tidar-export"
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
    the cache binding names past_names / present_names (one per layer and K/V)."""
    backend.dir = Path(artifact_dir)
    backend.manifest = m = load_manifest(backend.dir)
    backend.block_size, backend.proposals = m.block_size, tuple(m.proposals)
    backend.max_len, backend.max_batch, backend.mask_token_id = m.max_seq_len, m.max_batch, m.mask_token_id
    backend.vocab_size = m.vocab_size
    backend.past_names, backend.present_names = past_names(m.num_layers), present_names(m.num_layers)
    return m
