"""Synthetic experts of SmolLM2-135M-Instruct, for the benchmarks that time merges of a real architecture.

Each "expert" is the base with small seeded noise added to every tensor: a fine-tune's task vector is
small next to its weights, and its content does not change what a merge costs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergesearch_trial_runner.testbed.smollm2 import export_smollm2


def make_experts(root: Path, count: int = 3, relative_noise: float = 0.02) -> None:
    base = root / "base"
    export_smollm2(base)
    state = load_file(base / "model.safetensors")
    for index in range(1, count + 1):
        out = root / f"expert{index}"
        if (out / "model.safetensors").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(index)
        expert = {}
        for name, tensor in state.items():
            scale = relative_noise * float(tensor.float().std()) if tensor.numel() > 1 else 0.0
            noise = torch.randn(tensor.shape, generator=generator) * scale
            expert[name] = (tensor.float() + noise).to(tensor.dtype)
        save_file(expert, out / "model.safetensors", metadata={"format": "pt"})
        for file in base.iterdir():
            if file.name != "model.safetensors":
                shutil.copy(file, out / file.name)
