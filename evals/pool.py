"""A pool of Ray actors that evaluates chunks, survives dead workers and never counts a chunk twice.

    with EvalPool(worker_settings, task, PoolSettings(num_workers=8, use_gpu=True)) as pool:
        merged, run = pool.run(chunks)

Each actor (:class:`evals.worker.EvalWorker`) keeps two chunks queued so it never waits for the driver.
One-off work that must precede the chunks (training the GAN-test classifier) runs on one of the
pool's actors through :meth:`EvalPool.call_one`, with the same resources and the same retries.
When an actor dies (node lost, OOM kill, preemption), its queued chunks go back to the queue, a new
actor takes its place, and the chunks are redone elsewhere; other failures of a chunk are retried up
to ``max_retries`` times, except bad input, which fails the job at once with its message. Results
are merged in chunk order (:mod:`evals.merge`), so the numbers equal a single-process run's.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from evals.inception import InceptionWeights, load_inception_weights
from evals.merge import MergedSets, ResultMerger
from evals.sources import BadInputError
from evals.worker import Chunk, ChunkResult, EvalWorker, Task, WorkerSettings

log = logging.getLogger(__name__)


class EvalError(RuntimeError):
    """The evaluation cannot finish (a chunk failed for good, or no worker could start)."""


@dataclass(frozen=True)
class PoolSettings:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_retries: int = 3              # attempts after the first, per chunk
    max_worker_restarts: int | None = None  # replacements of dead actors (default: 2 x num_workers)
    chunks_in_flight: int = 2         # per actor: the next chunk waits in the actor's queue
    progress: bool = True


@dataclass
class RunReport:
    chunks: int = 0
    images: int = 0
    retried_chunks: int = 0
    workers_replaced: int = 0
    seconds: float = 0.0
    worker_seconds: float = 0.0       # summed time workers spent inside chunks
    chunk_workers: dict[int, int] = field(default_factory=dict)  # chunk index -> pid that delivered it

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _is_actor_death(err: BaseException) -> bool:
    from ray.exceptions import ActorUnavailableError, RayActorError, WorkerCrashedError

    return isinstance(err, (RayActorError, ActorUnavailableError, WorkerCrashedError))


def _task_cause(err: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    if isinstance(err, RayTaskError):
        return err.cause if getattr(err, "cause", None) is not None else err
    return err


class EvalPool:
    """Ray actors running :class:`EvalWorker`; see the module docstring."""

    def __init__(self, worker_settings: WorkerSettings, task: Task, settings: PoolSettings,
                 weights: InceptionWeights | None = None) -> None:
        import ray

        if settings.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.settings, self.worker_settings, self.task = settings, worker_settings, task
        # Read (and verify) the weights once on the driver; actors get them from the object store, so
        # workers on other nodes need no access to the path or the internet. No FID: no weights.
        self.weights = ((weights or load_inception_weights(worker_settings.inception_weights))
                        if worker_settings.fid else None)
        self._weights_ref = ray.put(self.weights)
        options = {"num_cpus": settings.cpus_per_worker, "num_gpus": 1 if settings.use_gpu else 0,
                   "max_restarts": 0, "max_task_retries": 0}
        self._actor_class = ray.remote(EvalWorker).options(**options)
        self.actors: list = []
        self._replacements_left = (settings.max_worker_restarts if settings.max_worker_restarts is not None
                                   else 2 * settings.num_workers)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self, num_workers: int | None = None) -> "EvalPool":
        import ray

        want = num_workers or self.settings.num_workers
        new = [self._spawn() for _ in range(want - len(self.actors))]
        try:
            ray.get([a.ready.remote() for a in new])
        except Exception as err:  # noqa: BLE001
            for actor in new:
                ray.kill(actor)
            raise EvalError(f"evaluation workers failed to start: {_task_cause(err)}") from None
        self.actors.extend(new)
        return self

    def _spawn(self):
        return self._actor_class.remote(self.worker_settings, self.task, self._weights_ref)

    def worker_pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> "EvalPool":
        return self.start() if not self.actors else self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- running ----------------------------------------------------------------------------------
    def call_one(self, method: str, *args):
        """``method(*args)`` on one actor (the pool is started if it is not); its return value.

        A dead actor is replaced and the call repeated elsewhere, another failure is retried up to
        ``max_retries`` times; bad input fails at once with its message (:class:`EvalError`)."""
        import ray

        if not self.actors:
            self.start()
        for attempt in range(self.settings.max_retries + 1):
            if not self.actors:
                raise EvalError(f"no workers left to run {method}")
            actor = self.actors[0]
            try:
                return ray.get(getattr(actor, method).remote(*args))
            except Exception as err:  # noqa: BLE001 - sorted out below
                cause = _task_cause(err)
                if isinstance(cause, BadInputError):
                    raise EvalError(str(cause)) from None
                if attempt == self.settings.max_retries:
                    raise EvalError(f"{method} failed {attempt + 1} times; last error: "
                                    f"{type(cause).__name__}: {cause}") from None
                if _is_actor_death(err):
                    self.actors.remove(actor)
                    ray.kill(actor)
                    if self._replacements_left > 0:
                        self._replacements_left -= 1
                        self.actors.append(self._spawn())
                log.warning("%s failed (%s: %s); retrying", method, type(cause).__name__, cause)
        raise AssertionError("unreachable")

    def run(self, chunks: Sequence[Chunk], on_result: Callable[[ChunkResult], None] | None = None,
            description: str = "eval") -> tuple[MergedSets, RunReport]:
        """Evaluate every chunk once (chunk ``i`` must have ``index == i``); merged results + report."""
        import ray

        if [c.index for c in chunks] != list(range(len(chunks))):
            raise ValueError("chunks must be indexed 0..n-1 in order")
        if not self.actors:
            self.start()
        merger = ResultMerger(len(chunks))
        report = RunReport(chunks=len(chunks))
        queue = collections.deque(chunks)
        attempts = collections.Counter()
        in_flight: dict = {}                     # ObjectRef -> (actor, chunk)
        per_actor = collections.Counter()        # actor id -> chunks queued on it
        started = time.perf_counter()
        progress = _progress(sum(c.size for c in chunks), description, self.settings.progress)
        try:
            while not merger.done:
                for actor in list(self.actors):
                    while queue and per_actor[id(actor)] < self.settings.chunks_in_flight:
                        chunk = queue.popleft()
                        in_flight[actor.run.remote(chunk)] = (actor, chunk)
                        per_actor[id(actor)] += 1
                if not in_flight:
                    raise EvalError(f"no workers left; chunks {merger.missing()[:10]} not evaluated")
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                ref = ready[0]
                actor, chunk = in_flight.pop(ref)
                per_actor[id(actor)] -= 1
                try:
                    result: ChunkResult = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - sorted out below
                    self._handle_failure(err, actor, chunk, queue, attempts, in_flight, per_actor, report)
                    continue
                if merger.add(result):
                    report.images += result.images
                    report.worker_seconds += result.seconds
                    report.chunk_workers[result.index] = result.worker_pid
                    progress.update(chunk.size)
                    if on_result is not None:
                        on_result(result)
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref, force=False)
            raise
        finally:
            progress.close()
        report.seconds = time.perf_counter() - started
        log.info("%s: %d images in %.1fs (%.1f images/s), %d chunk retries, %d workers replaced", description,
                 report.images, report.seconds, report.images_per_s, report.retried_chunks, report.workers_replaced)
        return merger.merged, report

    def _handle_failure(self, err: BaseException, actor, chunk: Chunk, queue: collections.deque,
                        attempts: collections.Counter, in_flight: dict, per_actor: collections.Counter,
                        report: RunReport) -> None:
        import ray

        cause = _task_cause(err)
        if isinstance(cause, BadInputError):
            raise EvalError(str(cause)) from None
        if _is_actor_death(err):
            # Every chunk queued on the dead actor fails the same way; requeue them all now, in order.
            lost = [chunk] + [c for ref, (a, c) in list(in_flight.items()) if a is actor]
            for ref in [r for r, (a, _) in in_flight.items() if a is actor]:
                in_flight.pop(ref)
            per_actor.pop(id(actor), None)
            if actor in self.actors:
                self.actors.remove(actor)
                ray.kill(actor)
                if self._replacements_left > 0:
                    self._replacements_left -= 1
                    self.actors.append(self._spawn())
                    report.workers_replaced += 1
                log.warning("evaluation worker died (%s); %d chunk(s) go to other workers", type(err).__name__, len(lost))
            failed = lost
        else:
            log.warning("chunk %d failed (%s: %s); retrying", chunk.index, type(cause).__name__, cause)
            failed = [chunk]
        for c in sorted(failed, key=lambda c: c.index, reverse=True):
            attempts[c.index] += 1
            if attempts[c.index] > self.settings.max_retries:
                raise EvalError(f"chunk {c.index} failed {attempts[c.index]} times; last error: "
                                f"{type(cause).__name__}: {cause}") from None
            report.retried_chunks += 1
            queue.appendleft(c)


def _progress(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
