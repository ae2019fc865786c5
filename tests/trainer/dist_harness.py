"""Run a function on N real processes joined in a gloo process group (DeepSpeed engines need one).

``run_ranks(n, fn, *args)`` starts ``n`` processes, sets the environment a Ray Train worker would
have, calls ``fn(rank, world_size, *args)`` in each, and returns the ranks' return values in rank
order. An exception in any rank fails the call with that rank's traceback.

The ranks are forked from multiprocessing's fork server, a fresh interpreter (nothing of the test
process leaks in, as with ``spawn``) that has imported torch and DeepSpeed once: a call then starts
its ranks in ~0.3 s instead of ~6 s of imports (two ranks, 2 cores). ``stop_fork_server()`` ends it
(``tests/trainer/conftest.py`` does at the end of the session).
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


# Imported once by the fork server; each rank imports the rest (the test module, its own helpers).
PRELOAD = ["torch", "torch.distributed", "deepspeed", "trainer.distributed", "trainer.engine_state", "trainer.ema"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def stop_fork_server() -> None:
    """End the fork server (and its resource tracker) if one was started."""
    from multiprocessing import forkserver, resource_tracker

    forkserver._forkserver._stop()
    resource_tracker._resource_tracker._stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from trainer.distributed import setup_worker

        setup_worker(use_gpu=False)
        # Plain pickle: tensors travel by value (torch's queue pickler would share them through file
        # descriptors that die with this process).
        results.put((rank, True, pickle.dumps(fn(rank, world, *args))))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout_s: float = 600) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each in its own process."""
    ctx = _context()
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    out: dict[int, Any] = {}
    errors = []
    import time

    deadline = time.time() + timeout_s
    while len(out) + len(errors) < world_size:
        if time.time() > deadline:
            break
        if results.empty():
            if all(not p.is_alive() for p in procs) and results.empty():
                break
            time.sleep(0.05)
            continue
        rank, ok, value = results.get()
        if ok:
            out[rank] = pickle.loads(value)
        else:
            errors.append(f"rank {rank}:\n{value}")
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    if len(out) != world_size:
        raise AssertionError(f"only ranks {sorted(out)} of {world_size} returned (a process died or timed out)")
    return [out[r] for r in range(world_size)]
