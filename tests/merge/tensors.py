"""Reading a merged model back, for the tests that compare merges."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged model directory, whatever its sharding."""
    state: dict[str, torch.Tensor] = {}
    for file in model_dir.glob("*.safetensors"):
        state.update(load_file(file))
    return state
