"""lm-evaluation-harness task configs in the formats users bring (GSM8K: `####` answers and a regex filter;
MMLU: lettered choices), written over the tiny world's reversal task for the lm_eval objective tests."""

from __future__ import annotations

import json
from pathlib import Path

GSM8K_FORMAT = {
    "task": "tiny_gsm8k_format",
    "output_type": "generate_until",
    "doc_to_text": "{{question}}",
    "doc_to_target": "{{answer}}",
    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
    "metric_list": [
        {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "regexes_to_ignore": ["(?s).*#### "]}
    ],
    "filter_list": [
        {
            "name": "strict-match",
            "filter": [{"function": "regex", "regex_pattern": "^([a-h]+)$"}, {"function": "take_first"}],
        },
        {
            "name": "flexible-extract",
            "filter": [{"function": "regex", "regex_pattern": "([a-h]+)"}, {"function": "take_first"}],
        },
    ],
}
MMLU_FORMAT = {
    "task": "tiny_mmlu_format",
    "output_type": "multiple_choice",
    "doc_to_text": "{{question}}",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "answer",
    "target_delimiter": "",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
