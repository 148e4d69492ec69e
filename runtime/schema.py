"""The JSON Schema of manifest.json (format version `MANIFEST_VERSION`), made from the contract's
tables so that the two cannot drift: runtime/manifest.schema.json is this function's output, shipped
with the package for readers in other languages (a test checks the file equals it).

    python -m tidar_runtime.schema > runtime/manifest.schema.json

The schema states the structure, types, bounds and names; `tidar_runtime.manifest.validate` also
checks what a schema cannot say simply (q_len and n_out against block_size and proposals, each
graph's bindings and rows equal to the contract's for its kv_update).
"""

from __future__ import annotations

import json

from tidar_runtime.contract import (AR_STEPS, BOUNDS, DIMS, DTYPES, DYNAMIC_DIMS, GRAPH_KINDS, KV_UPDATES, MANIFEST_FORMAT,
                                    MANIFEST_VERSION, PRECISIONS)

SCHEMA_FILE = "manifest.schema.json"


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _file() -> dict:
    return {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[^/\\]+$"}


def _tensor() -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["name", "dtype", "shape"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 256,
                         "description": "binding name (tidar_runtime.contract)"},
                "dtype": {"enum": list(DTYPES)},
                "shape": {"type": "array", "maxItems": 8, "items": {
                    "oneOf": [{"type": "integer", "minimum": 0}, {"enum": list(DIMS)}]},
                    "description": "ints are static; strings name a dim of `dims`"}}}


def _row() -> dict:
    return {"oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["ar"],
         "properties": {"ar": {"type": "integer", "minimum": 0}},
         "description": "the AR prediction after draft i (step: position L+i+1; prefill: at the last prompt token)"},
        {"type": "object", "additionalProperties": False, "required": ["block", "slot"],
         "properties": {"block": {"type": "integer", "minimum": 0}, "slot": {"type": "integer", "minimum": 1}},
         "description": "slot t of the block drafted for acceptance level r (step: position L+r+t; prefill: "
                        "block 0, position P+t)"}]}


def _graph(kind: str) -> dict:
    kv = {"type": "null"} if kind == "prefill" else {"enum": list(KV_UPDATES)}
    return {"type": "object", "additionalProperties": False,
            "required": ["kind", "file", "kv_update", "rows", "inputs", "outputs"],
            "properties": {
                "kind": {"const": kind}, "file": _file(),
                "kv_update": {**kv, "description": "slice: the graph returns the new K/V [B, KV, T, hd] and the "
                              "runtime writes them at each row's L; inplace: it returns the whole cache with them "
                              "written at L (bind present.* to the past_key_values.* buffers); null: no cache input"},
                "rows": {"type": "array", "items": {"$ref": "#/$defs/row"},
                         "description": "what each output row predicts"},
                "inputs": {"type": "array", "items": {"$ref": "#/$defs/tensor"}},
                "outputs": {"type": "array", "items": {"$ref": "#/$defs/tensor"}},
                "engine": {"oneOf": [{"type": "null"}, _file()]},
                "engine_info": {"type": "object"},
                "bytes": {"oneOf": [{"type": "null"}, _int(0, 1 << 46)]},
                "digest": {"type": ["string", "null"], "maxLength": 128}}}


def _dims() -> dict:
    bounds = {"batch": BOUNDS["max_batch"], "block_size": BOUNDS["block_size"], "max_seq_len": BOUNDS["max_seq_len"],
              "kv_heads": BOUNDS["num_kv_heads"], "head_dim": BOUNDS["head_dim"], "vocab": BOUNDS["vocab_size"],
              "num_layers": BOUNDS["num_layers"]}
    props = {}
    for name, what in DIMS.items():
        if name in DYNAMIC_DIMS:
            props[name] = {"type": "null", "description": what}
        else:
            props[name] = {**_int(*bounds.get(name, (1, BOUNDS["max_seq_len"][1]))), "description": what}
    return {"type": "object", "additionalProperties": False, "required": list(DIMS), "properties": props}


def manifest_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a manifest."""
    model_ints = {k: _int(*BOUNDS[k]) for k in ("hidden_size", "intermediate_size", "num_heads",
                                                "max_position_embeddings")}
    token = {"oneOf": [{"type": "null"}, _int(0, BOUNDS["vocab_size"][1] - 1)]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"TiDAR artifact manifest, version {MANIFEST_VERSION}",
        "description": "manifest.json of a TiDAR artifact (docs/ARCHITECTURE.md). Each fact is recorded once: "
                       "sizes in dims, export options in export, the rest of the model config in model.",
        "type": "object", "additionalProperties": False,
        "required": ["format", "version", "model", "export", "dims", "graphs"],
        "$defs": {"tensor": _tensor(), "row": _row()},
        "properties": {
            "format": {"const": MANIFEST_FORMAT},
            "version": {"const": MANIFEST_VERSION},
            "model": {"type": "object", "properties": {"arch": {"type": "string"}, **model_ints},
                      "description": "the model config without what dims, export and tokenizer hold"},
            "export": {"type": "object", "additionalProperties": False,
                       "required": ["target", "precision", "proposals", "mask_token_id", "ar_step"],
                       "properties": {
                           "target": {"type": "string", "minLength": 1, "maxLength": 64},
                           "precision": {"enum": list(PRECISIONS)},
                           "proposals": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1},
                                         "description": "acceptance levels with a drafted block, ascending, from 1"},
                           "mask_token_id": _int(0, BOUNDS["vocab_size"][1] - 1),
                           "ar_step": {"enum": list(AR_STEPS)}}},
            "dims": _dims(),
            "graphs": {"type": "object", "additionalProperties": False, "required": list(GRAPH_KINDS),
                       "properties": {kind: _graph(kind) for kind in GRAPH_KINDS}},
            "tokenizer": {"type": "object", "properties": {
                "file": {"oneOf": [{"type": "null"}, _file()]}, "bos_token_id": token,
                "eos_token_id": {"oneOf": [token, {"type": "array", "maxItems": 64, "items": token}],
                                 "description": "one stop id, or a list of them (every id ends a sequence)"},
                "chat_template": {"oneOf": [{"type": "null"}, _file()],
                                  "description": "a Jinja chat template file beside the tokenizer"},
                "vocab_size": {"oneOf": [{"type": "null"}, _int(1, BOUNDS["vocab_size"][1])],
                               "description": "the tokenizer's vocabulary, checked when it is loaded"},
                "blake2b": {"type": ["string", "null"], "description": "digest of the tokenizer file"},
                "chat_template_blake2b": {"type": ["string", "null"],
                                          "description": "digest of the chat template file"}}},
            "weights": {"type": "object", "properties": {
                "file": _file(), "bytes": _int(0, 1 << 46),
                "blake2b": {"type": ["string", "null"]}, "sample_blake2b": {"type": ["string", "null"]}}},
            "versions": {"type": "object"},
            "tuning": {"type": "object"},
            "adapter": {"type": "object", "description": "the draft adapter the prefill and step graphs carry on "
                                                        "their mask rows: config, params, sha256; {} if none"},
        },
    }


def schema_text() -> str:
    return json.dumps(manifest_schema(), indent=2) + "\n"


if __name__ == "__main__":
    print(schema_text(), end="")
