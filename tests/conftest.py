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


@pytest.fixture(scope="session")
def tiny_model() -> TiDARModel:
    return random_model()


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
