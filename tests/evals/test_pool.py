"""The Ray pool: exact against torch-fidelity, independent of the worker count, and a killed worker's
chunks are redone elsewhere and counted once (a real SIGKILL of the actor process)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from evals.inception import load_inception_weights
from evals.jobs import evaluate_folders
from evals.merge import ResultMerger
from evals.pool import EvalError, EvalPool, PoolSettings
from evals.sources import resolve_input
from evals.worker import Chunk, EvalWorker, ScoreTask, WorkerSettings
from tests.evals.conftest import IMAGES_PER_SET, eval_config, write_images


def _folders_config(image_folders, weights: str, workers: int):
    return eval_config("eval.kind=folders", f"eval.input1={image_folders[0]}", f"eval.input2={image_folders[1]}",
                       f"eval.num_workers={workers}", "eval.chunk_size=8", "eval.batch_size=8",
                       f"eval.inception_weights={weights}", "eval.progress=false", "mlflow.enabled=false")


def test_pool_fid_and_is_equal_torch_fidelity(ray_local, image_folders, inception_weights, fidelity_reference) -> None:
    result, previews = evaluate_folders(_folders_config(image_folders, inception_weights, 2))
    assert result["count1"] == result["count2"] == IMAGES_PER_SET
    assert result["fid"] == pytest.approx(fidelity_reference["frechet_inception_distance"], rel=1e-6)
    assert result["is_mean"] == pytest.approx(fidelity_reference["inception_score_mean"], rel=1e-6)
    assert result["is_std"] == pytest.approx(fidelity_reference["inception_score_std"], rel=1e-6)
    assert result["fid"] > 1.0 and result["is_mean"] > 1.05  # a real signal, not a degenerate network
    assert result["protocol"]["metric"] == f"FID-{IMAGES_PER_SET}"
    assert result["protocol"]["weights_sha256"] == load_inception_weights(inception_weights).fingerprint
    assert [p.shape for p in previews] == [(16, 32, 32, 3), (16, 32, 32, 3)]


def _chunks(folder: str) -> list[Chunk]:
    image_set = resolve_input(folder, chunk_size=4, image_size=256)
    return [Chunk(i, "input1", part, logits=True) for i, part in enumerate(image_set.slices)]


@pytest.fixture(scope="module")
def single_process(image_folders, inception_weights) -> ResultMerger:
    """Input1's chunks evaluated in this process by one worker, merged in order."""
    chunks = _chunks(image_folders[0])
    worker = EvalWorker(WorkerSettings(inception_weights, batch_size=4), ScoreTask())
    merger = ResultMerger(len(chunks))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each pool worker (cpus_per_worker=1)
    try:
        for chunk in chunks:
            merger.add(worker.run(chunk))
    finally:
        torch.set_num_threads(threads)
    return merger


def _assert_same_bits(merged, expected: ResultMerger) -> None:
    assert merged.count("input1") == IMAGES_PER_SET
    assert torch.equal(merged.sums["input1"].outer, expected.merged.sums["input1"].outer)
    assert torch.equal(merged.sums["input1"].total, expected.merged.sums["input1"].total)
    assert torch.equal(merged.all_logits("input1"), expected.merged.all_logits("input1"))


@pytest.mark.parametrize("workers", [1, 2])
def test_any_worker_count_gives_the_single_process_bits(ray_local, image_folders, inception_weights, single_process,
                                                        workers: int) -> None:
    chunks = _chunks(image_folders[0])
    with EvalPool(WorkerSettings(inception_weights, batch_size=4, threads=1), ScoreTask(),
                  PoolSettings(num_workers=workers, progress=False)) as pool:
        merged, report = pool.run(chunks)
    assert len(set(report.chunk_workers.values())) == workers  # every worker did some of it
    _assert_same_bits(merged, single_process)


def test_killed_worker_chunks_are_redone_elsewhere_and_counted_once(ray_local, image_folders, inception_weights,
                                                                     single_process) -> None:
    chunks = _chunks(image_folders[0])
    settings = WorkerSettings(inception_weights, batch_size=4, threads=1)
    killed: list[int] = []
    with EvalPool(settings, ScoreTask(), PoolSettings(num_workers=2, progress=False)) as pool:
        pids = pool.worker_pids()
        assert len(set(pids)) == 2

        def kill_the_other_worker(result) -> None:
            # At the first result the other actor is inside a chunk, with one more queued behind it.
            if not killed:
                victim = next(pid for pid in pids if pid != result.worker_pid)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        merged, report = pool.run(chunks, on_result=kill_the_other_worker)
        assert len(pool.actors) == 2  # the dead actor was replaced

    assert killed and report.workers_replaced == 1 and report.retried_chunks >= 1
    assert sorted(report.chunk_workers) == list(range(len(chunks)))
    # Whatever the victim had finished before the kill may still be delivered; the rest was redone.
    assert sum(pid != killed[0] for pid in report.chunk_workers.values()) >= report.retried_chunks
    assert report.images == IMAGES_PER_SET
    _assert_same_bits(merged, single_process)


def test_bad_image_fails_the_job_at_once_with_its_name(ray_local, tmp_path, inception_weights) -> None:
    folder = tmp_path / "imgs"
    write_images(folder, 3, seed=0, shift=0)
    (folder / "00001.png").write_bytes(b"garbage")
    with EvalPool(WorkerSettings(inception_weights, batch_size=4), ScoreTask(),
                  PoolSettings(num_workers=1, max_retries=3, progress=False)) as pool:
        with pytest.raises(EvalError, match="00001.png: cannot decode"):
            pool.run(_chunks(str(folder)))


def test_merger_takes_each_chunk_once_in_order() -> None:
    from evals.stats import FeatureSums
    from evals.worker import ChunkResult

    def result(i: int) -> ChunkResult:
        sums = FeatureSums(2048)
        sums.add(torch.full((1, 2048), float(i)))
        return ChunkResult(i, {"s": sums})

    merger = ResultMerger(3)
    assert merger.add(result(2)) and merger.merged.chunks == 0  # held until 0 and 1 arrive
    assert merger.add(result(0)) and not merger.add(result(0))
    assert merger.missing() == [1] and not merger.done
    merger.add(result(1))
    assert merger.done and merger.merged.count("s") == 3
    assert merger.merged.sums["s"].total[0].item() == 3.0
