"""The tiny world's task letters and expert replay: what the search benchmark's world is made of."""

from __future__ import annotations

import random

from mergesearch_trial_runner.testbed.models import WorldSettings, _draw
from mergesearch_trial_runner.testbed.tasks import LETTERS, TASKS, samples


def test_a_task_over_its_own_letters_uses_only_them_and_shift_wraps_within_them():
    letters = "qrstuvwx"
    rows = samples("shift", 200, seed=3, letters=letters)
    for row in rows:
        word = row["prompt"].removeprefix("shf ").removesuffix("=")
        assert set(word) <= set(letters) and set(row["answer"]) <= set(letters)
    assert any("x" in r["prompt"] and "q" in r["answer"] for r in rows)  # x wraps to q, not to the default's a


def test_without_replay_a_training_stream_is_the_one_worlds_were_built_from():
    """Worlds cached before replay and letters existed must still be what the settings describe."""
    settings = WorldSettings()
    drawn, before = random.Random(7), random.Random(7)
    for _ in range(50):
        assert _draw(drawn, ["sort"], ["reverse", "shift"], 0.0, settings) == TASKS["sort"](
            _consume(before, ["sort"]), LETTERS
        )


def _consume(rng: random.Random, tasks: list[str]) -> random.Random:
    rng.choice(tasks)  # the old loop drew the task first, then the sample
    return rng


def test_replay_mixes_in_the_other_tasks_at_its_share_and_settings_name_their_world():
    settings = WorldSettings(expert_replay=0.25, task_letters=("abcdefgh", "ijklmnop", "qrstuvwx"))
    rng = random.Random(0)
    drawn = [_draw(rng, ["sort"], ["reverse", "shift"], settings.expert_replay, settings) for _ in range(2000)]
    others = sum(not d["prompt"].startswith("srt ") for d in drawn)
    assert 0.2 < others / len(drawn) < 0.3
    sorts = [d for d in drawn if d["prompt"].startswith("srt ")]
    assert all(set(d["answer"]) <= set("ijklmnop") for d in sorts)
    assert settings.key() != WorldSettings().key()


def test_the_demo_world_has_an_expert_no_objective_measures_and_the_quickstart_merges_it():
    from pathlib import Path

    import yaml

    from mergesearch_trial_runner.testbed.models import DEMO_WORLD, World

    assert DEMO_WORLD.experts == (*TASKS, "copy") and WorldSettings().experts == tuple(TASKS)
    assert WorldSettings().key() == "1eefb130691b"  # the key worlds were cached under before extra experts
    assert DEMO_WORLD.key() != WorldSettings().key()
    copying = _draw(random.Random(0), ["copy"], list(TASKS), 0.0, DEMO_WORLD)
    assert copying["prompt"] == f"cpy {copying['answer']}="
    world = World(Path("/w"), experts=DEMO_WORLD.experts)
    assert [m["name"] for m in world.manifest_models()["experts"]] == list(DEMO_WORLD.experts)
    assert [o["name"] for o in world.manifest_objectives()] == list(TASKS)  # copying is no objective
    quickstart = yaml.safe_load((Path(__file__).parents[2] / "manifests/examples/quickstart.yaml").read_text())
    assert [e["name"] for e in quickstart["spec"]["models"]["experts"]] == list(DEMO_WORLD.experts)
    assert [o["name"] for o in quickstart["spec"]["objectives"]] == list(TASKS)
