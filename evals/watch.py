"""Watch mode: evaluate every new complete export of a run once, remembering what was done.

The record lives on the store next to the run (``<output_dir>/eval/watch_<kind>.json``), written
after each evaluation, so a restarted watcher goes on where it stopped and never evaluates a
checkpoint twice. Exports without their ``COMPLETE`` marker are invisible (still being written).
A checkpoint whose evaluation fails is retried on later polls, at most ``eval.max_retries`` times.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

from cluster import storage
from evals.jobs import Checkpoint, evaluate_and_log
from evals.schema import EvalConfig, EvalKind

log = logging.getLogger(__name__)

STAGE_OF_KIND = {EvalKind.reconstruction: "tokenizer", EvalKind.generation: "generator"}


def state_url(cfg: EvalConfig) -> str:
    return storage.join(cfg.output_dir, "eval", f"watch_{cfg.eval.kind.value}.json")  # type: ignore[arg-type]


def load_state(cfg: EvalConfig) -> dict[str, Any]:
    url = state_url(cfg)
    if not storage.exists(url):
        return {"done": {}, "failures": {}}
    state = json.loads(storage.read_text(url))
    state.setdefault("done", {})
    state.setdefault("failures", {})
    return state


def pending_exports(cfg: EvalConfig, state: dict[str, Any]) -> list[Checkpoint]:
    """Complete exports of the watched stage not yet evaluated (oldest first)."""
    from trainer.checkpoint import list_exports

    stage = STAGE_OF_KIND[cfg.eval.kind]
    out = []
    for export in list_exports(cfg.output_dir):  # type: ignore[arg-type]
        key = str(export.step)
        if export.meta.get("stage", stage) != stage or key in state["done"]:
            continue
        if state["failures"].get(key, 0) > cfg.eval.max_retries:
            continue
        out.append(Checkpoint(export.url, export.step, export.meta))
    return out


def watch(cfg: EvalConfig, stop: threading.Event | None = None,
          on_result: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Poll ``output_dir`` every ``eval.poll_seconds``; evaluate and log each new export once.

    Returns when ``stop`` is set or after ``eval.max_idle_polls`` polls without new exports.
    """
    stop = stop or threading.Event()
    results: list[dict[str, Any]] = []
    state = load_state(cfg)
    idle = 0
    log.info("watching %s for %s exports (every %.0fs)", cfg.output_dir, STAGE_OF_KIND[cfg.eval.kind], cfg.eval.poll_seconds)
    while not stop.is_set():
        found = pending_exports(cfg, state)
        for checkpoint in found:
            if stop.is_set():
                break
            key = str(checkpoint.step)
            try:
                result = evaluate_and_log(cfg, checkpoint)
            except Exception as err:  # noqa: BLE001 - one bad checkpoint must not stop the watcher
                state["failures"][key] = state["failures"].get(key, 0) + 1
                log.error("evaluation of %s failed (%d/%d): %s: %s", checkpoint.url, state["failures"][key],
                          cfg.eval.max_retries + 1, type(err).__name__, err)
            else:
                state["done"][key] = {"checkpoint": checkpoint.url, "fid": result["fid"],
                                      "metric": result["protocol"]["metric"]}
                results.append(result)
                if on_result is not None:
                    on_result(result)
            storage.write_text(state_url(cfg), json.dumps(state, indent=2))
        idle = 0 if found else idle + 1
        if cfg.eval.max_idle_polls is not None and idle >= cfg.eval.max_idle_polls:
            break
        stop.wait(cfg.eval.poll_seconds)
    return results
