"""Shared prompt building (BOS, chat template, budgets) and backend settings, without loading a model."""

from __future__ import annotations

import pytest

from mergesearch_trial_runner.evaluate import (
    BACKENDS,
    CPU_DEFAULTS,
    HFSettings,
    PromptBuilder,
    TaskModelError,
    VLLMSettings,
    validate_settings,
)
from mergesearch_trial_runner.tasks import Sample, TaskSpec
from mergesearch_trial_runner.testbed.models import char_tokenizer

BOS, EOS = 1, 2
# SmolLM2-135M's shape: 30 layers, 3 KV heads of 64, bf16, 8k context; 23,040 bytes of KV per token.
CONFIG = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "max_position_embeddings": 8192,
    "dtype": "bfloat16",
}
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def builder(tokenizer, context_len: int = 64) -> PromptBuilder:
    return PromptBuilder(tokenizer, context_len, frozenset({EOS}))


def task(**fields) -> TaskSpec:
    return TaskSpec(**{"name": "rev", "data": "unused.jsonl", **fields})


def test_plain_prompt_is_few_shot_then_prompt_with_the_tokenizers_bos(tokenizer):
    ids = builder(tokenizer).prompt_ids(task(few_shot="rev ab=ba\n"), Sample(prompt="rev abc=", answer="cba"))
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert tokenizer.decode(ids[1:]) == "rev ab=ba\nrev abc="


def test_a_bos_written_in_the_text_is_not_doubled(tokenizer):
    ids = builder(tokenizer).prompt_ids(task(few_shot="<s>"), Sample(prompt="rev a=", answer="a"))
    assert ids[:2] != [BOS, BOS] and ids[0] == BOS


def test_chat_prompt_is_rendered_by_the_template_which_owns_the_bos(tokenizer):
    chat_tokenizer = char_tokenizer()
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    ids = builder(chat_tokenizer).prompt_ids(task(chat_template=True, few_shot="x "), Sample(prompt="hi", answer="a"))
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert chat_tokenizer.decode(ids, skip_special_tokens=True) == "[user]x hi[assistant]"


def test_chat_task_for_a_tokenizer_without_template_is_a_task_model_error(tokenizer):
    with pytest.raises(TaskModelError, match="task rev: chat_template is true, but the model's tokenizer has no"):
        builder(tokenizer).prompt_ids(task(chat_template=True), Sample(prompt="hi", answer="a"))


def test_budget_is_the_smaller_of_max_new_tokens_and_the_room_left(tokenizer):
    prompts = builder(tokenizer, context_len=20)
    short, long = Sample(prompt="ab", answer="x"), Sample(prompt="a" * 15, answer="x")
    requests = prompts.generation_requests(task(max_new_tokens=8), [short, long])
    assert [r.max_new_tokens for r in requests] == [8, 20 - 16]


def test_a_prompt_that_fills_the_context_is_refused_by_task_and_sample(tokenizer):
    samples = [Sample(prompt="ab", answer="x"), Sample(prompt="a" * 40, answer="x")]
    with pytest.raises(TaskModelError, match="task rev, sample 1 of the range: the prompt has 41 tokens, but"):
        builder(tokenizer, context_len=32).generation_requests(task(), samples)


def test_choices_follow_the_prompt_without_special_tokens(tokenizer):
    requests = builder(tokenizer).continuation_requests(
        task(kind="multiple_choice"), [Sample(prompt="rev ab=", choices=("ba", "ab"), gold=0)]
    )
    assert [tokenizer.decode(r.continuation_ids) for r in requests] == ["ba", "ab"]
    assert requests[0].context_ids == requests[1].context_ids and requests[0].context_ids[0] == BOS


def test_completion_drops_a_final_stop_token_and_finished_sees_stop_strings(tokenizer):
    prompts = builder(tokenizer)
    ids = tokenizer("cba", add_special_tokens=False)["input_ids"]
    assert prompts.completion([*ids, EOS]) == "cba"
    assert prompts.finished([*ids, EOS], stop=[]) and not prompts.finished(ids, stop=[])
    assert prompts.finished(ids, stop=["ba"]) and not prompts.finished(ids, stop=["ab"])


def test_backends_are_registered_with_their_settings():
    assert {name: b.settings for name, b in BACKENDS.items()} == {"hf": HFSettings, "vllm": VLLMSettings}
    with pytest.raises(ValueError, match=r"The value of `backend` is 'tgi', but must be one of \['hf', 'vllm'\]"):
        validate_settings("tgi", {})


def test_unknown_or_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="max_model_length"):
        validate_settings("vllm", {"max_model_length": 4096})
    with pytest.raises(ValueError, match="batch_size"):
        validate_settings("hf", {"batch_size": 0})
    with pytest.raises(ValueError, match=r"engine_args repeats \['enforce_eager'\]"):
        validate_settings("vllm", {"engine_args": {"enforce_eager": True}})


def test_no_setting_turns_on_remote_code():
    """A checkpoint's own Python code never runs in a trial: neither backend takes trust_remote_code, and
    vLLM's passthrough to vllm.LLM refuses it."""
    for backend in ("hf", "vllm"):
        with pytest.raises(ValueError, match="trust_remote_code"):
            validate_settings(backend, {"trust_remote_code": True})
    with pytest.raises(ValueError, match="engine_args must not set trust_remote_code"):
        validate_settings("vllm", {"engine_args": {"trust_remote_code": True}})


def test_vllm_settings_resolve_to_explicit_engine_arguments_per_device():
    settings = VLLMSettings(max_model_len=2048, engine_args={"swap_space": 0})
    cpu = settings.resolve("cpu", CONFIG)
    assert cpu.engine_args["max_model_len"] == 2048 and cpu.engine_args["swap_space"] == 0
    assert cpu.engine_args["kv_cache_memory_bytes"] == CPU_DEFAULTS["kv_cache_tokens"] * 23_040
    assert "kv_cache_tokens" not in cpu.engine_args and "cpu_omp_threads_bind" not in cpu.engine_args
    gpu = settings.resolve("cuda", CONFIG)
    assert "kv_cache_memory_bytes" not in gpu.engine_args and gpu.env == {}
    assert gpu.engine_args["enforce_eager"] is False
    assert cpu.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process: vLLM binds no threads
    spawned = VLLMSettings(
        enforce_eager=True, in_process=False, cpu_omp_threads_bind="0-1", cpu_reserved_cores=0
    ).resolve("cpu", CONFIG)
    assert spawned.engine_args["enforce_eager"] is True
    assert spawned.env == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert VLLMSettings(in_process=False).resolve("cpu", CONFIG).env == {
        "VLLM_CPU_OMP_THREADS_BIND": "auto",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    with pytest.raises(ValueError, match="apply to vLLM on CPU only"):
        VLLMSettings(cpu_reserved_cores=0).resolve("cuda", CONFIG)
    with pytest.raises(ValueError, match=r"\['cpu_omp_threads_bind'\] bind the threads of vLLM's worker process"):
        VLLMSettings(cpu_omp_threads_bind="0-1").resolve("cpu", CONFIG)


def test_vllm_runs_in_process_on_cpu_unless_tensor_parallel():
    cpu = VLLMSettings().resolve("cpu", CONFIG)
    assert cpu.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert cpu.engine_args["distributed_executor_backend"] == "uni" and "in_process" not in cpu.engine_args
    parallel = VLLMSettings(tensor_parallel_size=2).resolve("cpu", CONFIG)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in parallel.env
    assert "distributed_executor_backend" not in parallel.engine_args
    assert "distributed_executor_backend" not in VLLMSettings().resolve("cuda", CONFIG).engine_args
    assert VLLMSettings(in_process=True).resolve("cuda", CONFIG).engine_args["distributed_executor_backend"] == "uni"
    with pytest.raises(ValueError, match="in_process needs tensor_parallel_size 1"):
        VLLMSettings(in_process=True, tensor_parallel_size=2).resolve("cpu", CONFIG)
    with pytest.raises(ValueError, match=r"engine_args repeats \['distributed_executor_backend'\]"):
        VLLMSettings(engine_args={"distributed_executor_backend": "mp"})


def test_the_kv_cache_is_sized_in_tokens_of_the_model_or_in_gib():
    def kv_bytes(**settings):
        return VLLMSettings(**settings).resolve("cpu", CONFIG).engine_args["kv_cache_memory_bytes"]

    assert kv_bytes(kv_cache_tokens=10_000) == 10_000 * 23_040
    assert kv_bytes(kv_cache_tokens=100) == 8192 * 23_040  # never less than one sequence of the full context
    assert kv_bytes(kv_cache_tokens=100, max_model_len=512) == 512 * 23_040
    assert kv_bytes(kv_cache_tokens=100, max_model_len=512, dtype="float32") == 512 * 46_080
    no_kv_heads = {k: v for k, v in CONFIG.items() if k != "num_key_value_heads"}  # one KV head per query head
    assert VLLMSettings().resolve("cpu", no_kv_heads).engine_args["kv_cache_memory_bytes"] == 32768 * 69_120
    assert kv_bytes(kv_cache_gib=1.5) == int(1.5 * 2**30)  # the spec's GiB replace the default's tokens
    with pytest.raises(ValueError, match="kv_cache_gib or kv_cache_tokens, not both"):
        VLLMSettings(kv_cache_gib=1, kv_cache_tokens=1000)
    with pytest.raises(ValueError, match=r"kv_cache_tokens: config.json has no 'num_hidden_layers'.*kv_cache_gib"):
        VLLMSettings().resolve("cpu", {"dtype": "bfloat16"})
