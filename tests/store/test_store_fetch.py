"""Fetching models through the cache: correct bytes, one download per node, resumable, self-healing."""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mergesearch_trial_runner.checkpoint import Checkpoint
from mergesearch_trial_runner.store import ModelStore, StoreError
from tests.store.store_helpers import FAST, count_requests, same_files


@pytest.mark.parametrize("model", ["single", "sharded"])
def test_fetch_returns_the_model_byte_for_byte(s3_server, bucket, store, tiny, model):
    s3_server.upload_dir(tiny[model], bucket, f"models/{model}")
    fetched = store.fetch_model(f"s3://{bucket}/models/{model}")
    assert same_files(fetched, tiny[model])
    opened, original = Checkpoint.open(fetched), Checkpoint.open(tiny[model])
    assert opened.config == original.config
    assert {n: (t.dtype, t.shape) for n, t in opened.tensors.items()} == {
        n: (t.dtype, t.shape) for n, t in original.tensors.items()
    }


def test_cache_hit_downloads_nothing(s3_server, bucket, cache, tiny):
    s3_server.upload_dir(tiny["sharded"], bucket, "m")
    first = ModelStore(cache, settings=FAST)
    first_counts = count_requests(first)
    path = first.fetch_model(f"s3://{bucket}/m")
    files = sorted(p.name for p in tiny["sharded"].iterdir())
    assert first_counts["GetObject"] == len(files)
    stamps = {p.name: (p.resolve().stat().st_ino, p.resolve().stat().st_mtime_ns) for p in path.iterdir()}

    again = ModelStore(cache, settings=FAST)  # another process on the node: a fresh client, the same cache
    counts = count_requests(again)
    assert again.fetch_model(f"s3://{bucket}/m") == path
    assert first.fetch_model(f"s3://{bucket}/m") == path
    assert counts["GetObject"] == 0 and counts["HeadObject"] == 0 and counts["ListObjectsV2"] == 1
    assert stamps == {p.name: (p.resolve().stat().st_ino, p.resolve().stat().st_mtime_ns) for p in path.iterdir()}


def _fetch_in_child(cache: str, uri: str, barrier, results) -> None:
    store = ModelStore(cache, settings=FAST)
    counts = count_requests(store)
    barrier.wait()
    try:
        path = store.fetch_model(uri)
        results.put((str(path), counts["GetObject"], None))
    except Exception as exc:  # reported to the parent, which fails the test
        results.put((None, counts["GetObject"], repr(exc)))


@pytest.mark.slow
def test_two_processes_fetch_the_same_model_once(s3_server, bucket, cache, tmp_path, tiny):
    from mergesearch_trial_runner.testbed.models import TinyLlama, random_llama

    source = random_llama(
        tmp_path / "big", seed=3, shape=TinyLlama(hidden_size=256, intermediate_size=1024), max_shard_bytes=4_000_000
    )
    s3_server.upload_dir(source, bucket, "big")
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    children = [
        context.Process(target=_fetch_in_child, args=(str(cache), f"s3://{bucket}/big", barrier, results))
        for _ in range(2)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert [error for _, _, error in outcomes] == [None, None]
    paths = {path for path, _, _ in outcomes}
    assert len(paths) == 1
    assert same_files(Path(paths.pop()), source)
    files = sorted(p.name for p in source.iterdir())
    assert sum(gets for _, gets, _ in outcomes) == len(files)  # each object downloaded by one process only


def test_threads_of_one_process_share_one_download(s3_server, bucket, store, tiny):
    s3_server.upload_dir(tiny["sharded"], bucket, "m")
    counts = count_requests(store)
    with ThreadPoolExecutor(3) as pool:
        paths = set(pool.map(lambda _: store.fetch_model(f"s3://{bucket}/m"), range(3)))
    assert len(paths) == 1 and same_files(paths.pop(), tiny["sharded"])
    assert counts["GetObject"] == len(list(tiny["sharded"].iterdir()))


def test_partial_download_is_continued(s3_server, bucket, cache, tmp_path, tiny):
    s3_server.upload_dir(tiny["single"], bucket, "m")
    uri = f"s3://{bucket}/m"
    reference = ModelStore(tmp_path / "reference-cache", settings=FAST).fetch_model(uri)
    key = (reference / "model.safetensors").resolve().name  # blob keys depend on the content only

    whole = (tiny["single"] / "model.safetensors").read_bytes()
    half = len(whole) // 2
    (cache / "partial").mkdir(parents=True)
    (cache / "partial" / f"{key}.part").write_bytes(whole[:half])  # what a killed download leaves
    store = ModelStore(cache, settings=FAST)
    counts = count_requests(store)
    fetched = store.fetch_model(uri)
    assert same_files(fetched, tiny["single"])
    assert counts[f"Range model.safetensors bytes={half}-"] == 1
    assert counts["GetObject model.safetensors"] == 1
    assert not list((cache / "partial").iterdir())


def test_corrupt_partial_download_is_restarted_not_trusted(s3_server, bucket, cache, tmp_path, tiny):
    s3_server.upload_dir(tiny["single"], bucket, "m")
    uri = f"s3://{bucket}/m"
    key = (ModelStore(tmp_path / "reference-cache", settings=FAST).fetch_model(uri) / "model.safetensors").resolve()
    (cache / "partial").mkdir(parents=True)
    (cache / "partial" / f"{key.name}.part").write_bytes(b"\0" * 1000)  # same length as a prefix, wrong bytes
    store = ModelStore(cache, settings=FAST)
    counts = count_requests(store)
    fetched = store.fetch_model(uri)
    assert same_files(fetched, tiny["single"])
    assert counts["GetObject model.safetensors"] == 2  # continued, caught by the MD5, then downloaded whole
    assert counts["Range model.safetensors bytes=1000-"] == 1


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete"])
def test_damaged_cache_entry_is_detected_and_downloaded_again(s3_server, bucket, cache, tiny, damage):
    s3_server.upload_dir(tiny["single"], bucket, "m")
    uri = f"s3://{bucket}/m"
    path = ModelStore(cache, settings=FAST).fetch_model(uri)
    blob = (path / "model.safetensors").resolve()
    blob.chmod(0o644)  # blobs are read-only; someone with the rights writes anyway
    if damage == "overwrite":
        with blob.open("r+b") as handle:
            handle.seek(4096)
            handle.write(os.urandom(64))
    elif damage == "truncate":
        os.truncate(blob, blob.stat().st_size - 10)
    else:
        blob.unlink()

    store = ModelStore(cache, settings=FAST)
    counts = count_requests(store)
    assert store.fetch_model(uri) == path
    assert same_files(path, tiny["single"])
    assert counts["GetObject"] == 1 and counts["GetObject model.safetensors"] == 1


def test_object_replaced_after_listing_is_never_mixed(s3_server, bucket, store, tiny):
    s3_server.upload_dir(tiny["single"], bucket, "m")
    changed_config = json.loads((tiny["single"] / "config.json").read_text()) | {"note": "replaced"}
    new_bytes = json.dumps(changed_config).encode()
    writer = s3_server.client()
    counts = count_requests(store)

    def replace_once(**_: object) -> None:
        if counts["ListObjectsV2"] == 1:
            writer.put_object(Bucket=bucket, Key="m/config.json", Body=new_bytes)

    store.client.meta.events.register("after-call.s3.ListObjectsV2", replace_once)
    fetched = store.fetch_model(f"s3://{bucket}/m")
    assert (fetched / "config.json").read_bytes() == new_bytes  # the version listed second, not a mix
    assert counts["ListObjectsV2"] == 2


def test_only_the_model_files_are_downloaded(s3_server, bucket, store, tiny):
    """Pickled and foreign weights, shards the index does not name, and nested prefixes are skipped."""
    s3_server.upload_dir(tiny["sharded"], bucket, "m")
    client = s3_server.client()
    for key in ("m/pytorch_model.bin", "m/training_args.bin", "m/model.gguf", "m/stale.safetensors", "m/sub/x.json"):
        client.put_object(Bucket=bucket, Key=key, Body=b"never downloaded")
    counts = count_requests(store)
    fetched = store.fetch_model(f"s3://{bucket}/m")
    assert same_files(fetched, tiny["sharded"])
    assert counts["GetObject"] == len(list(tiny["sharded"].iterdir()))


def test_empty_objects_are_files_too(s3_server, bucket, store, tiny):
    s3_server.upload_dir(tiny["single"], bucket, "m")
    s3_server.client().put_object(Bucket=bucket, Key="m/added_tokens.json", Body=b"")
    fetched = store.fetch_model(f"s3://{bucket}/m")
    assert (fetched / "added_tokens.json").read_bytes() == b""


def test_local_paths_and_file_uris_are_used_in_place(store, tiny, tmp_path):
    path = tiny["single"]
    assert store.fetch_model(str(path)) == path
    assert store.fetch_model(f"file://{path}") == path
    assert store.fetch_model(path) == path
    assert not (store.cache_dir and store.cache_dir.exists())
    with pytest.raises(StoreError, match="no such directory") as error:
        store.fetch_model(tmp_path / "absent")
    assert not error.value.retryable
