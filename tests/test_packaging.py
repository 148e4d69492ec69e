"""Packaging follows the layers: the base install is the runtime, torch is the `export` extra.

Two kinds of checks:
- in this environment: the runtime packages import neither torch nor tidar_export, and the
  CLI's module graph stays torch-free until a torch-side command runs;
- in a second, torch-free environment (`pip install .`, base dependencies only), made by
  .ci/run and named by TIDAR_RUNTIME_PYTHON: it decodes an artifact exported here, token for
  token like this environment, and a torch-only command says in one line which extra to install.
  Without that variable these tests skip with the reason.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import random_model
from tidar_export.export.artifact import export_artifact
from tidar_export.model.checkpoint import save_checkpoint
from tidar_runtime import generate_tidar
from tidar_runtime.backends.ort import OrtBackend

RUNTIME_PYTHON = os.environ.get("TIDAR_RUNTIME_PYTHON")
needs_runtime_env = pytest.mark.skipif(
    not RUNTIME_PYTHON, reason="no torch-free environment: .ci/run creates one and sets TIDAR_RUNTIME_PYTHON")
PROMPT = [5, 17, 42, 9]


def _imports(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runtime_imports_neither_torch_nor_tidar_export():
    _imports("import sys, tidar_runtime, tidar_runtime.loop, tidar_runtime.stats, tidar_runtime.tokenizer, "
             "tidar_runtime.backends.ort, tidar_runtime.backends.select, tidar_runtime.backends.null; "
             "bad = [m for m in sys.modules if m == 'torch' or m.startswith('tidar_export')]; "
             "assert not bad, bad")


def test_cli_parser_does_not_import_torch():
    _imports("import sys; from tidar_export.cli import build_parser; build_parser(); "
             "assert 'torch' not in sys.modules, 'the CLI imported torch before any command ran'")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    ckpt = save_checkpoint(random_model(seed=5), tmp_path_factory.mktemp("pkg") / "ckpt")
    return export_artifact(ckpt, ckpt.parent / "art", block_size=3, max_seq_len=32)


def _run(*argv):
    return subprocess.run([RUNTIME_PYTHON, "-m", "tidar_export", *map(str, argv)], capture_output=True, text=True)


@needs_runtime_env
def test_runtime_env_has_no_torch():
    probe = subprocess.run([RUNTIME_PYTHON, "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the torch-free environment has torch installed"


@needs_runtime_env
def test_torch_free_environment_decodes_an_artifact(artifact):
    res = _run("generate", artifact, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 8, "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)["token_ids"]
    want = generate_tidar(OrtBackend(artifact), PROMPT, 8).tokens
    assert got == want


@needs_runtime_env
def test_torch_only_command_names_its_extra(artifact, tmp_path):
    res = _run("export", artifact.parent / "ckpt", "-o", tmp_path / "out")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tidar-export[export]'" in lines[0], res.stderr
    assert not (tmp_path / "out").exists()
