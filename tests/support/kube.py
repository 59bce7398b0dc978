"""A Kubernetes API for tests: kmock's emulator on a loopback port, in a thread of the test process.

kmock keeps objects and streams watches but is no apiserver; this fixture papers over what the operator
relies on from a real one (never the other way round): objects get a uid, a creationTimestamp, a
resourceVersion that grows with every write, a generation that grows when the spec changes, Secrets'
stringData folded into data, `generateName` turned into a name; the
MergeSearch resource is registered (creating a CRD object does not register it in kmock).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import itertools
import threading
import uuid
from pathlib import Path
from typing import Any

import kmock
import yaml
from kmock._internal import enums

MERGESEARCH = "mergesearch.io/v1alpha1/mergesearches"


class StampingEmulator(kmock.KubernetesEmulator):
    """The emulator plus the metadata an apiserver maintains."""

    _versions = itertools.count(1)

    def __init__(self) -> None:
        super().__init__()
        self.served: list[Any] = []  # every request before the one being handled

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        # kmock matches each request against a filtered view of every request it has logged, which makes
        # a long run quadratic (a 1,000-trial bench stalled on it). Its log keeps only the request being
        # handled, which is always the last one here: it was appended just before this call.
        self.served.extend(self._requests[:-1])
        del self._requests[:-1]
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None:
            metadata = data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if "stringData" in data:  # the apiserver folds a Secret's stringData into data
                    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.pop("stringData").items()}
                    data["data"] = {**data.get("data", {}), **encoded}
                if "generateName" in metadata and "name" not in metadata:  # the apiserver names these
                    metadata["name"] = metadata["generateName"] + uuid.uuid4().hex[:5]
                metadata.setdefault("uid", str(uuid.uuid4()))
                metadata.setdefault("generation", 1)
                metadata["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                metadata["resourceVersion"] = str(next(self._versions))
                if request.namespace and "namespace" not in metadata:
                    metadata["namespace"] = request.namespace
            elif request.action == enums.action.UPDATE and request.name is not None:
                metadata["resourceVersion"] = str(next(self._versions))
                if "spec" in data and request.subresource is None:
                    key = (request.resource, request.namespace, request.name)
                    if key in self.objects and not self.objects[key].deleted:
                        metadata["generation"] = int(self.objects[key].get("metadata", {}).get("generation", 1)) + 1
        return await super()._handle(request)

    async def _serve_list(self, request):  # type: ignore[no-untyped-def]
        """Lists carry their kind and apiVersion, as kubectl expects."""
        listing = await super()._serve_list(request)
        resource = request.resource
        info = self.resources.get(resource)
        kind = (info.kind if info is not None and info.kind else resource.plural.capitalize()) + "List"
        group_version = f"{resource.group}/{resource.version}" if resource.group else resource.version
        return {"apiVersion": group_version, "kind": kind, **listing}


class KubeServer:
    """Runs the emulator on its own event loop in a daemon thread; thread-safe enough for tests to read."""

    def __init__(self) -> None:
        self.emulator = StampingEmulator()
        self.emulator.resources.load_bundled()
        self.emulator.resources[MERGESEARCH] = kmock.ResourceInfo(
            kind="MergeSearch",
            singular="mergesearch",
            namespaced=True,
            shortnames={"ms"},
            subresources={"status"},
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
        )
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="kube-emulator", daemon=True)

    def _serve(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with self.emulator, kmock.Server(self.emulator) as server:
                self.url = str(server.url).rstrip("/")
                self._ready.set()
                await self._stop.wait()

        asyncio.run(main())

    def start(self) -> KubeServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test"}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}
            ],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        found = []
        for key in list(self.emulator.objects):
            res, ns, _ = key
            obj = self.emulator.objects[key]
            if obj.deleted or str(res) != str(kmock.resource(resource)):
                continue
            if namespace is None or ns == namespace:
                found.append(obj.raw)
        return found

    def object(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        return self.emulator.objects[key].raw

    @property
    def requests(self) -> list[Any]:
        """Every request served so far."""
        return [*self.emulator.served, *self.emulator]
