"""What goes wrong, and what the store says about it: fix-it errors are final, infrastructure errors retryable,
and neither leaves a cache entry that a later fetch would trust."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from mergesearch_trial_runner.store import ModelStore, StoreError
from tests.store.store_helpers import FAST, count_requests, same_files, write_safetensors
from tests.support.s3 import s3_server as running_s3_server


def _committed(cache: Path) -> list[Path]:
    return sorted((cache / "snapshots").glob("[!.]*")) if (cache / "snapshots").exists() else []


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_are_final_and_say_what_to_fix(s3_server, bucket, cache, tiny, monkeypatch, variable):
    s3_server.upload_dir(tiny["single"], bucket, "m")
    monkeypatch.setenv(variable, "wrong")
    store = ModelStore(cache, settings=FAST)
    counts = count_requests(store)
    uri = f"s3://{bucket}/m"
    for call in (store.fetch_model, store.model_structure, store.read_bytes):
        with pytest.raises(StoreError) as error:
            call(uri if call != store.read_bytes else f"{uri}/config.json")
        assert not error.value.retryable
        assert error.value.uri.startswith(uri)
        assert "AWS_SECRET_ACCESS_KEY" in str(error.value) and uri in str(error.value)
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID") as error:
        store.upload_model(tiny["single"], f"s3://{bucket}/out")
    assert not error.value.retryable
    assert counts["ListObjectsV2"] == 2 and counts["GetObject"] == 1  # one try each: nothing retried
    assert not _committed(cache)


def test_missing_credentials(bucket, cache, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no S3 credentials; set AWS_ACCESS_KEY_ID") as error:
        ModelStore(cache, settings=FAST).fetch_model(f"s3://{bucket}/m")
    assert not error.value.retryable


def test_missing_bucket_prefix_and_key(s3_server, bucket, store, tiny):
    s3_server.upload_dir(tiny["single"], bucket, "m")
    cases = {
        f"s3://{bucket}/nothing-here": "no objects under this prefix",
        f"s3://no-such-bucket-{bucket}/m": "the bucket does not exist",
    }
    for uri, message in cases.items():
        for call in (store.fetch_model, store.model_structure):
            with pytest.raises(StoreError, match=message) as error:
                call(uri)
            assert not error.value.retryable and error.value.uri == uri
    with pytest.raises(StoreError, match="no such object") as error:
        store.read_bytes(f"s3://{bucket}/m/absent.jsonl")
    assert not error.value.retryable and error.value.uri == f"s3://{bucket}/m/absent.jsonl"
    with pytest.raises(StoreError, match="no such file"):
        store.read_bytes("/nonexistent/tasks.jsonl")


def test_bad_uris(store):
    for uri, message in {
        "gs://bucket/model": "unsupported URI scheme 'gs'",
        "s3:///model": "no bucket",
        "file://otherhost/model": "must name a local path",
    }.items():
        with pytest.raises(StoreError, match=message) as error:
            store.fetch_model(uri)
        assert not error.value.retryable


def test_pickled_only_prefix_is_refused_without_downloading(s3_server, bucket, store, tiny):
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="m/config.json", Body=(tiny["single"] / "config.json").read_bytes())
    client.put_object(Bucket=bucket, Key="m/pytorch_model.bin", Body=b"a pickle: never opened, never downloaded")
    counts = count_requests(store)
    for call in (store.fetch_model, store.model_structure):
        with pytest.raises(StoreError, match=r"only pickled weights \(pytorch_model.bin\).*never unpickles") as error:
            call(f"s3://{bucket}/m")
        assert not error.value.retryable
    assert counts["GetObject"] == 0 and counts["HeadObject"] == 0


def test_prefix_without_config_is_refused(s3_server, bucket, store, tiny):
    s3_server.client().put_object(
        Bucket=bucket, Key="m/model.safetensors", Body=(tiny["single"] / "model.safetensors").read_bytes()
    )
    with pytest.raises(StoreError, match=r"no config\.json") as error:
        store.fetch_model(f"s3://{bucket}/m")
    assert not error.value.retryable


def test_an_object_that_is_not_safetensors_is_refused_and_no_snapshot_is_made(s3_server, bucket, cache, tiny):
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="m/config.json", Body=(tiny["single"] / "config.json").read_bytes())
    client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=b"\xff" * 64)
    store = ModelStore(cache, settings=FAST)
    for call in (store.fetch_model, store.model_structure):
        with pytest.raises(StoreError, match="corrupt or truncated safetensors header") as error:
            call(f"s3://{bucket}/m")
        assert not error.value.retryable
    assert not _committed(cache)


def test_truncated_shard_is_refused_by_its_header(s3_server, bucket, store, tiny):
    """An object cut short at upload (its ETag matches its bytes) is caught by the safetensors header."""
    whole = (tiny["single"] / "model.safetensors").read_bytes()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="m/config.json", Body=(tiny["single"] / "config.json").read_bytes())
    client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=whole[: len(whole) // 2])
    for call in (store.fetch_model, store.model_structure):
        with pytest.raises(StoreError, match="truncated") as error:
            call(f"s3://{bucket}/m")
        assert not error.value.retryable


@pytest.mark.slow
def test_server_gone_mid_download_is_retryable_and_leaves_no_entry(tmp_path, monkeypatch, tiny):
    with running_s3_server(tmp_path / "s3") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        server.create_bucket("vanishing")
        model = tmp_path / "model"
        model.mkdir()
        shutil.copy(tiny["single"] / "config.json", model)
        write_safetensors(model / "model.safetensors", {"embed": ("F32", (6 << 20,))})  # 24 MiB
        server.upload_dir(model, "vanishing", "m")

        cache = tmp_path / "cache"
        store = ModelStore(cache, settings=FAST)
        counts = count_requests(store)

        killed: list[int] = []

        def kill_during_the_shard(parsed, **_: object) -> None:
            if parsed.get("ContentLength", 0) > 1 << 20 and not killed:
                killed.append(server.pid)
                server.kill()  # the headers came; the body is still on its way

        store.client.meta.events.register("after-call.s3.GetObject", kill_during_the_shard)
        with pytest.raises(StoreError, match="network failure") as error:
            store.fetch_model("s3://vanishing/m")
        assert error.value.retryable
        assert not _committed(cache)
        size = (model / "model.safetensors").stat().st_size
        assert all(blob.stat().st_size != size for blob in (cache / "blobs").iterdir())
        partials = list((cache / "partial").iterdir())
        assert all(part.stat().st_size < size for part in partials)
        kept = partials[0].stat().st_size if partials else 0

        server.restart()
        path = store.fetch_model("s3://vanishing/m")
        assert same_files(path, model)
        if kept:
            assert counts[f"Range model.safetensors bytes={kept}-"] == 1  # continued where it stopped


def test_store_errors_survive_pickling():
    """Executors pass a trial's failure between processes; the retry decision must survive."""
    error = pickle.loads(pickle.dumps(StoreError("s3://b/m", "network failure", retryable=True)))
    assert (error.uri, error.message, error.retryable, str(error)) == (
        "s3://b/m",
        "network failure",
        True,
        "s3://b/m: network failure",
    )


def test_a_cache_file_that_cannot_be_opened_is_a_store_error(tmp_path):
    """Not a TypeError from building the error: the message names the file and the fix."""
    from mergesearch_trial_runner.store.transfer import _writable

    missing = tmp_path / "gone" / "model.safetensors.partial"
    with (
        pytest.raises(StoreError, match="free space or move the cache") as error,
        _writable(missing, append=False, uri="s3://bucket/m/model.safetensors"),
    ):
        pass
    assert not error.value.retryable and error.value.uri == "s3://bucket/m/model.safetensors"
