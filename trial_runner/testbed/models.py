"""Tiny Llama models for tests, benchmarks and the quick start.

`build_world` trains, from a seed, a base model briefly on a mixture of the synthetic tasks and one
expert per task fine-tuned from that base on its task alone, and writes each as a real Hugging Face
checkpoint (safetensors, config.json, a character-level tokenizer) beside the tasks' search and test
splits. The experts end up better than the base on their own task and worse on the others, so a search
has something to find. Results are cached under a key of every setting, so a second call is free.

`random_llama` writes an untrained model of any size, for engine tests that need no skill.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .tasks import LETTERS, OFF_OBJECTIVE_TASKS, TASKS, Sample, samples

_CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
WORLD_VERSION = 1  # bump when training changes, so caches rebuild


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, BOS prepended; loads in transformers and vLLM alike."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in _CHARS:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@dataclass(frozen=True)
class TinyLlama:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False
    vocab_size: int | None = None  # default: the tokenizer's; larger makes big embeddings for engine tests

    def config(self, vocab_size: int) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size or vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=64,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )


def save_model(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int | None = None,
) -> None:
    """Save as a plain HF directory with safetensors weights (written atomically as a directory)."""
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shard_args = {"max_shard_size": max_shard_bytes} if max_shard_bytes else {}
    model.to(dtype).save_pretrained(tmp, safe_serialization=True, **shard_args)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def random_llama(
    out_dir: Path,
    *,
    seed: int,
    shape: TinyLlama = TinyLlama(),
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
) -> Path:
    """An untrained tiny Llama (optionally sharded), for engine tests."""
    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    model = LlamaForCausalLM(shape.config(len(tokenizer)))
    save_model(model, tokenizer, Path(out_dir), dtype, max_shard_bytes)
    return Path(out_dir)


@dataclass(frozen=True)
class WorldSettings:
    seed: int = 0
    shape: TinyLlama = field(default_factory=TinyLlama)
    # A base that knows every task a little, and experts fine-tuned gently (small task vectors, as in
    # real fine-tunes) that master their own task and lose some of the others.
    base_steps: int = 250
    expert_steps: int = 300
    batch_size: int = 48
    learning_rate: float = 3e-3
    expert_learning_rate: float = 2e-4
    # The share of an expert's training samples drawn from the other tasks, so that it keeps them.
    expert_replay: float = 0.0
    # Per task (in task order), the letters its words are made of; empty: "abcdefgh" for every task.
    # Tasks over disjoint letters share less of the model, so their task vectors add up with less loss.
    task_letters: tuple[str, ...] = ()
    # Experts fine-tuned, beside one per task, on tasks no objective measures (`OFF_OBJECTIVE_TASKS`).
    extra_experts: tuple[str, ...] = ()
    search_samples: int = 1000
    test_samples: int = 300

    def letters(self, task: str) -> str:
        return self.task_letters[list(TASKS).index(task)] if self.task_letters and task in TASKS else LETTERS

    @property
    def experts(self) -> tuple[str, ...]:
        return (*TASKS, *self.extra_experts)

    def key(self) -> str:
        fields = asdict(self)
        if not self.extra_experts:  # added later: worlds cached before it keep their key
            del fields["extra_experts"]
        blob = json.dumps({"version": WORLD_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# The quick start's world: besides an expert per task, one fine-tuned on copying, which no objective
# measures. Every hand recipe merges all four experts alike and pays for the fourth; a search can weigh
# each expert per layer and tensor group. (With three experts the tiny world is too flat: its search ends
# within 0.01 of uniform task arithmetic; docs/benchmarks.md.)
DEMO_WORLD = WorldSettings(extra_experts=("copy",))


@dataclass(frozen=True)
class World:
    """Where a built world lies: models by name (`base` and each expert) and the tasks' splits."""

    root: Path
    experts: tuple[str, ...] = tuple(TASKS)  # an expert is named as the task it was fine-tuned on
    tasks: tuple[str, ...] = tuple(TASKS)  # the tasks with search and test splits: the objectives

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def split(self, task: str, split: str) -> Path:
        return self.root / "tasks" / f"{task}.{split}.jsonl"

    def manifest_models(self) -> dict[str, Any]:
        """A MergeSearch manifest's `spec.models` for this world: the base and every expert, as paths."""
        return {
            "base": str(self.model("base")),
            "experts": [{"name": e, "uri": str(self.model(e))} for e in self.experts],
        }

    def manifest_objectives(self, tasks: Iterable[str] | None = None, **settings: Any) -> list[dict[str, Any]]:
        """A manifest's `spec.objectives`: one per task (every task by default) on its search and test
        splits, each with `settings` (camelCase objective fields, e.g. maxNewTokens)."""
        return [
            {"name": t, "data": str(self.split(t, "search")), "testData": str(self.split(t, "test")), **settings}
            for t in (self.tasks if tasks is None else tasks)
        ]


def _batch(tokenizer: PreTrainedTokenizerFast, batch: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels; the loss covers the answer and the end-of-sequence token only."""
    rows, labels = [], []
    for sample in batch:
        prompt = tokenizer(sample["prompt"])["input_ids"]
        answer = tokenizer(sample["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    target = torch.full((len(rows), width), -100)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        target[i, : len(label)] = torch.tensor(label)
    return ids, target


def _train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    tasks: list[str],
    steps: int,
    learning_rate: float,
    settings: WorldSettings,
    seed: int,
    replay: float = 0.0,
) -> None:
    """Train on samples of `tasks`, and a `replay` share of samples of the other tasks."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    others = [t for t in TASKS if t not in tasks]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        batch = [_draw(rng, tasks, others, replay, settings) for _ in range(settings.batch_size)]
        ids, target = _batch(tokenizer, batch)
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id), labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _draw(rng: random.Random, tasks: list[str], others: list[str], replay: float, settings: WorldSettings) -> Sample:
    """One training sample: of `tasks`, or with probability `replay` of the `others`."""
    # Without replay no extra draw is made, so worlds built before replay existed stay the same.
    name = rng.choice(others) if replay and rng.random() < replay else rng.choice(tasks)
    return {**TASKS, **OFF_OBJECTIVE_TASKS}[name](rng, settings.letters(name))


def build_world(cache_dir: Path | str, settings: WorldSettings = WorldSettings()) -> World:
    """Build (or find in `cache_dir`) the base, one expert per task, and every task's search/test split."""
    world = World(Path(cache_dir) / f"world-{settings.key()}", experts=settings.experts)
    if (world.root / "DONE").exists():
        return world
    world.root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    tokenizer = char_tokenizer()
    base = LlamaForCausalLM(settings.shape.config(len(tokenizer)))
    _train(base, tokenizer, list(TASKS), settings.base_steps, settings.learning_rate, settings, seed=settings.seed)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    save_model(base, tokenizer, world.model("base"), torch.float32)
    for offset, task in enumerate(settings.experts, start=1):
        base.load_state_dict(base_state)
        _train(
            base,
            tokenizer,
            [task],
            settings.expert_steps,
            settings.expert_learning_rate,
            settings,
            seed=settings.seed + 1000 * offset,
            replay=settings.expert_replay,
        )
        save_model(base, tokenizer, world.model(task), torch.float32)
    (world.root / "tasks").mkdir(exist_ok=True)
    for task in TASKS:
        # Different seeds from training's stream; search and test splits never share a sample list.
        for split, count, seed in (("search", settings.search_samples, 1), ("test", settings.test_samples, 2)):
            rows = samples(task, count, seed=settings.seed * 10 + seed + 100, letters=settings.letters(task))
            world.split(task, split).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (world.root / "DONE").write_text(json.dumps(asdict(settings)))
    return world
