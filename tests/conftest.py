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
