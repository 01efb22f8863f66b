"""The pool of edit-worker actors: start them, keep them at one version, shard a batch across them.

Worker 0 is the leader: it solves the closed-form update. v* (the expensive part) is sharded across all workers.
After a commit every follower moves to the new version from the weight store and must report the manifest's
checksums; a worker that does not is rebuilt from base + deltas. Dead workers are restarted by Ray
(``max_restarts=-1``) and come back at the base version; ``sync`` brings them to the head before they get work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import ray
from ray.actor import ActorHandle

from shared.jobs import CompactJob, EditJob, EditResult, StoreMeta, ValuesJob, WorkerConfig, WorkerInfo
from shared.schemas import EditRequest
from shared.settings import Settings
from shared.weight_store import WeightStore
from workers.edit_worker import EditWorker
from workers.editing.hparams import V_STAR_ALGOS

log = logging.getLogger("editq.pool")


class WorkerDivergedError(RuntimeError):
    """A worker's matrices do not match the committed version even after a rebuild."""


def store_meta_path(settings: Settings):
    return settings.resolved_store_dir() / "store.json"


def load_store_meta(settings: Settings) -> StoreMeta | None:
    path = store_meta_path(settings)
    return StoreMeta.model_validate_json(path.read_text()) if path.exists() else None


def save_store_meta(settings: Settings, meta: StoreMeta) -> None:
    path = store_meta_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(meta.model_dump_json(indent=2) + "\n")
    tmp.replace(path)


def shard(requests: Sequence[EditRequest], n: int) -> list[list[EditRequest]]:
    """Contiguous, near-equal shards (order kept, so concatenating results restores the batch order)."""
    n = max(1, min(n, len(requests)))
    size, extra = divmod(len(requests), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(list(requests[start:end]))
        start = end
    return out


class EditWorkerPool:
    def __init__(self, settings: Settings, store: WeightStore) -> None:
        self.settings = settings
        self.store = store
        self.workers: list[ActorHandle] = []
        self.meta: StoreMeta | None = None
        self.timeout = settings.worker_call_timeout_s
        self.last_infos: list[WorkerInfo] = []  # as of the last sync: status reads never wait for a busy worker

    def _spawn(self, index: int, meta: StoreMeta | None) -> ActorHandle:
        config = WorkerConfig(index=index, settings=self.settings.model_dump(mode="json"), meta=meta)
        actor_cls = ray.remote(EditWorker).options(
            num_cpus=self.settings.worker_num_cpus,
            num_gpus=self.settings.worker_num_gpus,
            resources=self.settings.worker_resources or None,
            max_restarts=-1,
            max_task_retries=0,
        )
        return actor_cls.remote(config)

    async def _call(self, ref: ray.ObjectRef):
        return await asyncio.wait_for(ref, timeout=self.timeout)

    async def start(self) -> StoreMeta:
        """Start the workers; the first one of a new store fixes its model, editor settings and templates."""
        meta = load_store_meta(self.settings)
        first = self._spawn(0, meta)
        info: WorkerInfo = await self._call(first.prepare.remote())
        if meta is None:
            meta = info.meta
            save_store_meta(self.settings, meta)
        elif info.meta != meta:
            raise ValueError("edit worker 0 disagrees with the store's metadata")
        self.workers = [first] + [self._spawn(i, meta) for i in range(1, self.settings.n_edit_workers)]
        await asyncio.gather(*(self._call(w.prepare.remote()) for w in self.workers[1:]))
        self.meta = meta
        return meta

    async def infos(self) -> list[WorkerInfo]:
        return list(await asyncio.gather(*(self._call(w.info.remote()) for w in self.workers)))

    async def sync(self, version: int) -> list[WorkerInfo]:
        """Bring every worker to committed ``version`` and check they agree with its manifest."""
        infos = await self._sync(version)
        self.last_infos = infos
        return infos

    async def _sync(self, version: int) -> list[WorkerInfo]:
        infos = list(await asyncio.gather(*(self._call(w.sync.remote(version)) for w in self.workers)))
        if version == 0:
            expected = infos[0].checksums if infos else {}
            base_ok = [i for i in infos if i.checksums == expected]
            if len(base_ok) != len(infos):
                raise WorkerDivergedError("workers disagree on the base model's matrices")
            return infos
        manifest = self.store.manifest(version)
        want = {e.name: e.sha256 for e in manifest.matrices}
        for i, info in enumerate(infos):
            if any(info.checksums.get(name) != sha for name, sha in want.items()):
                log.warning("worker %d diverged at version %d: rebuilding from the store", info.index, version)
                infos[i] = await self._call(self.workers[i].sync.remote(version, True))
                if any(infos[i].checksums.get(n) != sha for n, sha in want.items()):
                    raise WorkerDivergedError(f"worker {info.index} cannot reproduce version {version}")
        return infos

    async def edit(self, parent: int, version: int, requests: Sequence[EditRequest]) -> EditResult:
        """Compute one batch on top of ``parent``: v* sharded over the pool, the solve on the leader (an algorithm
        without v*, UltraEdit, runs on the leader alone: its one forward/backward is cheap)."""
        await self.sync(parent)
        leader = self.workers[0]
        shards = None
        if len(self.workers) > 1 and len(requests) > 1 and self.meta is not None and self.meta.algo in V_STAR_ALGOS:
            parts = shard(requests, len(self.workers))
            shards = list(await asyncio.gather(*(
                self._call(w.compute_values.remote(ValuesJob(version=parent, requests=part)))
                for w, part in zip(self.workers, parts, strict=False)
            )))
        job = EditJob(parent=parent, version=version, requests=list(requests), shards=shards)
        return await self._call(leader.edit.remote(job))

    async def compact(
        self, parent: int, version: int, max_lost: int | None, exclude: Sequence[str] = ()
    ) -> EditResult:
        """Re-solve all live edits of ``parent`` (but ``exclude``) jointly on the leader (one closed-form solve)."""
        await self.sync(parent)
        job = CompactJob(parent=parent, version=version, max_lost=max_lost, exclude=list(exclude))
        return await self._call(self.workers[0].compact.remote(job))

    def kill(self, index: int, restart: bool = True) -> None:
        """Kill one worker (tests and operators); with ``restart`` Ray brings it back at the base version."""
        ray.kill(self.workers[index], no_restart=not restart)
