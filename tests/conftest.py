import json

import pytest
import torch

from tidar_export.model.config import preset
from tidar_export.model.transformer import TiDARModel


def random_model(seed: int = 0, **overrides) -> TiDARModel:
    """A tiny randomly initialised model (std 2/sqrt(fan_in): peaked, varied predictions)."""
    torch.manual_seed(seed)
    model = TiDARModel(preset("tiny").replace(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=2.0 / p.shape[1] ** 0.5)
    return model.eval()


def with_random_adapter(model: TiDARModel, seed: int = 1, layers=(1,), rank: int = 2, projections=None) -> TiDARModel:
    """`model` with a draft adapter whose updates are all nonzero (B is zero at a fresh init)."""
    from tidar_export.model.adapter import PROJECTIONS, AdapterConfig, attach

    projections = PROJECTIONS if projections is None else tuple(projections)
    attach(model, AdapterConfig(rank=rank, layers=tuple(layers), projections=projections))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> TiDARModel:
    return random_model()


@pytest.fixture(scope="session", autouse=True)
def manifests_follow_the_schema():
    """Every manifest the suite writes (export, quantize, tune, build, the hand-made ones of the
    tests: all through Manifest.save) is validated against the shipped JSON Schema first."""
    from importlib.resources import files

    from jsonschema import Draft202012Validator

    from tidar_runtime.manifest import Manifest
    from tidar_runtime.schema import SCHEMA_FILE

    validator = Draft202012Validator(json.loads(files("tidar_runtime").joinpath(SCHEMA_FILE).read_text()))
    save = Manifest.save

    def checked_save(self, artifact_dir):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(json.loads(self.to_json()))]
        assert not errors, f"the manifest written to {artifact_dir} breaks {SCHEMA_FILE}: {errors[:3]}"
        return save(self, artifact_dir)

    Manifest.save = checked_save
    yield
    Manifest.save = save


@pytest.fixture(scope="session", autouse=True)
def _own_cache_folder(tmp_path_factory):
    """The suite's verified-once stamps (tidar_runtime.stamps) go to a temporary cache folder, for
    this process and the commands it starts, never into the user's ~/.cache."""
    import os

    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before
