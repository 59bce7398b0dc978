"""Reading merged models back and comparing them, for the tests that compare merges."""

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


def assert_same_tensors(ours_dir: Path, theirs_dir: Path) -> None:
    """The two merged models hold the same tensors: same names, same dtypes, equal within float32 rounding."""
    theirs, ours = load(theirs_dir), load(ours_dir)
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype, name
        torch.testing.assert_close(ours[name], expected, atol=1e-6, rtol=1e-5, msg=name)
