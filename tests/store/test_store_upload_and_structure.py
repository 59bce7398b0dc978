"""Uploading merged checkpoints, reading small objects, and reading a remote model's structure."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from mergesearch_trial_runner.checkpoint import Checkpoint
from mergesearch_trial_runner.plan.ir import MergePlan
from mergesearch_trial_runner.plan.tensors import plan_tensors
from mergesearch_trial_runner.store import ModelStore, RemoteCheckpoint, StoreError
from tests.store.store_helpers import FAST, count_requests, same_files, write_safetensors

EXTRA = {"mergesearch_plan.json": b'{"slices": []}', "scores.json": b'{"gsm8k": 0.5}'}


def test_upload_then_fetch_back_is_byte_identical(s3_server, bucket, tmp_path):
    from mergesearch_trial_runner.testbed.models import TinyLlama, random_llama

    merged = random_llama(tmp_path / "merged", seed=4, shape=TinyLlama(hidden_size=256, intermediate_size=1024))
    uploader = ModelStore(settings=replace(FAST, multipart_bytes=5 << 20))  # S3's smallest part
    uri = f"s3://{bucket}/merged/t17"
    uploader.upload_model(merged, uri, extra_files=EXTRA)

    head = s3_server.client().head_object(Bucket=bucket, Key="merged/t17/model.safetensors")
    assert head["ETag"].strip('"').endswith("-4")  # 16 MB in 5 MiB parts
    cache = tmp_path / "cache"
    fetched = ModelStore(cache, settings=FAST).fetch_model(uri)
    expected = tmp_path / "expected"
    shutil.copytree(merged, expected)
    for name, data in EXTRA.items():
        (expected / name).write_bytes(data)
    assert same_files(fetched, expected)
    blob_meta = json.loads((cache / "meta" / f"{(fetched / 'model.safetensors').resolve().name}.json").read_text())
    assert blob_meta["verified"] == "multipart MD5"
    assert uploader.read_bytes(f"{uri}/scores.json") == EXTRA["scores.json"]

    uploader.upload_model(merged, uri, extra_files=EXTRA)  # idempotent: the same objects again
    assert ModelStore(cache, settings=FAST).fetch_model(uri) == fetched


def test_upload_to_a_local_directory(tiny, tmp_path, store):
    for target in (tmp_path / "out" / "a", f"file://{tmp_path}/out/b"):
        store.upload_model(tiny["sharded"], target, extra_files=EXTRA)
        store.upload_model(tiny["sharded"], target, extra_files=EXTRA)  # replaces, same result
        written = store.fetch_model(target)
        assert sorted(p.name for p in written.iterdir()) == sorted(
            [p.name for p in tiny["sharded"].iterdir()] + list(EXTRA)
        )
        assert all((written / p.name).read_bytes() == p.read_bytes() for p in tiny["sharded"].iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b"]  # no temporary left behind


def test_upload_refuses_what_it_should_not_write(bucket, tiny, tmp_path, store):
    with pytest.raises(StoreError, match="must be a plain file name") as error:
        store.upload_model(tiny["single"], f"s3://{bucket}/x", extra_files={"../escape.json": b"{}"})
    assert not error.value.retryable
    with pytest.raises(StoreError, match="must be a plain file name"):
        store.upload_model(tiny["single"], f"s3://{bucket}/x", extra_files={"config.json": b"{}"})
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny["single"], pickled)
    (pickled / "optimizer.pt").write_bytes(b"pickle")
    with pytest.raises(StoreError, match="refusing to upload pickled weights"):
        store.upload_model(pickled, f"s3://{bucket}/x")
    with pytest.raises(StoreError, match="no such directory"):
        store.upload_model(tmp_path / "absent", f"s3://{bucket}/x")


def test_read_bytes_from_every_kind_of_uri(s3_server, bucket, store, tmp_path):
    lines = b'{"prompt": "abc", "answer": "cba"}\n' * 1000
    s3_server.client().put_object(Bucket=bucket, Key="tasks/reverse.jsonl", Body=lines)
    (tmp_path / "reverse.jsonl").write_bytes(lines)
    assert store.read_bytes(f"s3://{bucket}/tasks/reverse.jsonl") == lines
    assert store.read_bytes(f"file://{tmp_path}/reverse.jsonl") == lines
    assert store.read_bytes(str(tmp_path / "reverse.jsonl")) == lines
    with pytest.raises(StoreError, match="more than read_bytes allows") as error:
        ModelStore(settings=replace(FAST, max_read_bytes=100)).read_bytes(f"s3://{bucket}/tasks/reverse.jsonl")
    assert not error.value.retryable


def _layout(structure) -> list[tuple]:
    return [(n, t.dtype, t.shape, t.start, t.end) for n, t in structure.tensors.items()]


@pytest.mark.parametrize("model", ["single", "sharded"])
def test_remote_structure_equals_the_local_checkpoint(s3_server, bucket, tiny, model):
    s3_server.upload_dir(tiny[model], bucket, model)
    store = ModelStore(settings=FAST)  # the operator's: no cache directory at all
    counts = count_requests(store)
    remote = store.model_structure(f"s3://{bucket}/{model}")
    local = Checkpoint.open(tiny[model])
    assert isinstance(remote, RemoteCheckpoint)
    assert remote.config == local.config
    assert _layout(remote) == _layout(local)  # same names in the same order, same dtypes, shapes and offsets
    assert {t.file.rsplit("/", 1)[-1] for t in remote.tensors.values()} == {t.file.name for t in local.tensors.values()}
    weight_gets = [k for k in counts if k.startswith("GetObject ") and k.endswith(".safetensors")]
    assert weight_gets and all(counts[f"Range {k.removeprefix('GetObject ')} bytes=0-65535"] for k in weight_gets)

    plan = MergePlan.model_validate(
        {
            "models": {"base": "x", "a": "y"},
            "base_model": "base",
            "slices": [
                {
                    "method": "ties",
                    "base": {"model": "base", "layers": [0, 4]},
                    "sources": [{"model": "a", "layers": [0, 4], "params": {"weight": 1.0}}],
                    "params": {"density": 0.5},
                }
            ],
        }
    )
    assert plan_tensors(plan, {"base": remote, "a": remote}).ops == plan_tensors(plan, {"base": local, "a": local}).ops


def test_structure_of_a_header_larger_than_the_first_read(s3_server, bucket, store, tiny, tmp_path):
    model = tmp_path / "wide"
    model.mkdir()
    shutil.copy(tiny["single"] / "config.json", model)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": ("BF16", (4, 8)) for i in range(2000)}  # ~150 KB header
    write_safetensors(model / "model.safetensors", tensors, metadata={"format": "pt"})
    s3_server.upload_dir(model, bucket, "wide")
    counts = count_requests(store)
    remote = store.model_structure(f"s3://{bucket}/wide")
    assert _layout(remote) == _layout(Checkpoint.open(model))
    assert counts["GetObject model.safetensors"] == 2  # the probe, then the rest of the header


def test_structure_of_a_local_model_is_the_checkpoint(tiny, store):
    assert _layout(store.model_structure(str(tiny["sharded"]))) == _layout(Checkpoint.open(tiny["sharded"]))
    assert store.model_structure(f"file://{tiny['single']}").config == Checkpoint.open(tiny["single"]).config


def test_write_bytes_puts_one_object_and_replaces_it(s3_server, bucket, store, tmp_path):
    """What the operator writes a finished search's report with, to S3 or a local path."""
    uri = f"s3://{bucket}/merged/search/report.html"
    store.write_bytes(uri, b"<html>first</html>")
    store.write_bytes(uri, b"<html>second</html>")
    assert store.read_bytes(uri) == b"<html>second</html>"
    local = tmp_path / "out" / "report.html"
    store.write_bytes(local, b"<html>here</html>")
    assert local.read_bytes() == b"<html>here</html>"
    with pytest.raises(StoreError, match="no bucket"):
        store.write_bytes("s3:///report.html", b"x")
