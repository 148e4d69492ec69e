"""The C++ runtime's manifest reading (cpp/src/manifest.cpp) against the Python reader's.

- cpp/tests/data/manifest.json, the manifest of the C++ unit tests, is a format-2 manifest that
  runtime/manifest.schema.json and tidar_runtime.manifest.validate accept (no build needed);
- with TIDAR_CPP_BUILD (a folder `bash cpp/build.sh` built), `tidar-generate` refuses each of a
  set of broken manifests with the one-line error `tidar-export generate` prints for it, and an
  artifact of format version 1 with the same "re-export" line.
"""

import json
import os
import subprocess
from importlib.resources import files
from pathlib import Path

import pytest

from tidar_runtime.errors import TiDARError
from tidar_runtime.manifest import MANIFEST_VERSION, load_manifest, validate
from tidar_runtime.schema import SCHEMA_FILE

FIXTURE = Path(__file__).resolve().parents[1] / "cpp" / "tests" / "data" / "manifest.json"
BUILD = os.environ.get("TIDAR_CPP_BUILD")
needs_build = pytest.mark.skipif(not BUILD, reason="TIDAR_CPP_BUILD is not set: run `bash cpp/build.sh DIR` and "
                                                   "set it to DIR (.ci/run does)")


def test_the_cpp_fixture_manifest_follows_the_schema_and_the_python_reader():
    from jsonschema import Draft202012Validator

    d = json.loads(FIXTURE.read_text())
    schema = json.loads(files("tidar_runtime").joinpath(SCHEMA_FILE).read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft202012Validator(schema).iter_errors(d)]
    assert not errors, errors[:3]
    m = validate(d, str(FIXTURE))
    assert m.version == MANIFEST_VERSION
    assert m.graphs["step"].kv_update == "slice" and m.graphs["ar_step"].kv_update == "inplace"


def _edit(path: str, value):
    """An edit of a manifest: set the entry at `path` ("dims.batch", "graphs.step.rows.-1") to
    `value`, or delete it when value is DELETE."""
    def apply(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[int(key)] if isinstance(m, list) else m[key]
        if isinstance(m, list):
            last = int(last)
        if value is DELETE:
            del m[last]
        else:
            m[last] = value
    return apply


DELETE = object()
EDITS = {  # each breaks one rule of runtime/manifest.py validate / load_manifest
    "version 1": _edit("version", 1),
    "no export": _edit("export", DELETE),
    "no dims.batch": _edit("dims.batch", DELETE),
    "unknown field": _edit("extra", 1),
    "unknown dim": _edit("dims.wat", 1),
    "bool dim": _edit("dims.batch", True),
    "dynamic dim set": _edit("dims.prompt_len", 3),
    "n_out": _edit("dims.n_out", 5),
    "max_seq_len beyond positions": _edit("dims.max_seq_len", 65),
    "kv_heads": _edit("dims.kv_heads", 3),
    "proposals": _edit("export.proposals", [1, 1]),
    "mask token": _edit("export.mask_token_id", 32),
    "ar_step": _edit("export.ar_step", "x"),
    "model bound": _edit("model.head_dim", 1),
    "step kv_update": _edit("graphs.step.kv_update", None),
    "prefill kv_update": _edit("graphs.prefill.kv_update", "slice"),
    "rows": _edit("graphs.step.rows.3", DELETE),
    "ar row": _edit("graphs.ar_step.rows.0.ar", True),
    "binding lost": _edit("graphs.step.inputs.0", DELETE),
    "binding shape": _edit("graphs.step.inputs.0.shape", ["batch", "nope"]),
    "inplace shape": _edit("graphs.step.kv_update", "inplace"),
    "binding dtype": _edit("graphs.ar_step.outputs.1.dtype", "float16"),
    "eos list": _edit("tokenizer.eos_token_id", [30, 32]),
    "eos list length": _edit("tokenizer.eos_token_id", [30] * 65),
    "chat template path": _edit("tokenizer.chat_template", "../t.jinja"),
    "tokenizer digest": _edit("tokenizer.blake2b", 1),
    "adapter": _edit("adapter", []),
    "weights size": _edit("weights.bytes", 4),
    "graph digest": _edit("graphs.step.digest", "00"),
}


def _artifact(folder: Path, edit) -> Path:
    """The fixture manifest with `edit` applied, over the placeholder files it names."""
    folder.mkdir()
    for kind in ("prefill", "step", "ar_step"):
        (folder / f"{kind}.onnx").write_text("x")
    (folder / "weights.bin").write_text("abc")
    m = json.loads(FIXTURE.read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m, indent=2))
    return folder


@needs_build
def test_cpp_refuses_each_broken_manifest_with_the_python_line(tmp_path):
    tool = Path(BUILD) / "tidar-generate"
    for i, (what, edit) in enumerate(EDITS.items()):
        art = _artifact(tmp_path / str(i), edit)
        with pytest.raises(TiDARError) as e:
            load_manifest(art)
        res = subprocess.run([str(tool), str(art), "--prompt-ids", "1"], capture_output=True, text=True, timeout=60)
        assert (res.returncode, res.stderr) == (1, f"error: {e.value}\n"), what

