"""Driver-side checks of a run before any work: its invariants, its global batch, its worker count.

A run (one ``output_dir``) fixes its model, recipe, seed, global batch and data streams when it
starts; the worker count is free. Before anything is written to the run dir, :func:`resolve_run`

* fills what a new run leaves open (``trainer.global_batch_size``: workers x micro-batch;
  ``data.streams``: see ``trainer/batch_layout.default_streams``), or takes a resumed run's values;
* refuses, with one line naming the key and both values, a resume that changes an invariant
  (an explicit ``trainer.allow_global_batch_change=true`` permits a deliberate global-batch change);
* refuses a fixed worker count that does not divide the global batch, listing the counts that do.

The comparison is against the config saved in the run's newest complete checkpoint: what actually
trained, not what a failed launch may have written.
"""

from __future__ import annotations

from typing import Any

import yaml

from cluster import storage
from trainer import checkpoint as ckpt
from trainer.batch_layout import default_streams, divisors, valid_worker_counts
from trainer.config import ConfigError, to_yaml
from trainer.schema import Stage, TrainConfigBase

# Keys (prefixes of flattened keys) a resume may not change.
INVARIANT_PREFIXES = ("model.", "tokenizer.recipe", "seed", "stage", "data.image_size")


def previous_run_config(run_dir: str) -> tuple[dict[str, Any], str] | None:
    """(flattened config, checkpoint url) of the run's newest complete checkpoint, or None."""
    checkpoints = ckpt.list_checkpoints(run_dir)
    if not checkpoints:
        return None
    url = checkpoints[-1][1]
    state = storage.read_text(storage.join(url, "train_state.json"))
    if '"global_batch_size"' not in state:
        raise ConfigError("output_dir", f"{run_dir} holds checkpoints of an older version of this code, which do "
                                        "not record their global batch and data streams and cannot resume; use a "
                                        "new output_dir")
    text = storage.read_text(storage.join(url, "config.yaml"))
    return _flat_dict(yaml.safe_load(text) or {}), url


def _flat_dict(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat_dict(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def resolve_run(cfg: TrainConfigBase, previous: tuple[dict[str, Any], str] | None) -> list[str]:
    """Resolve ``cfg``'s open invariants in place and check it against the run's previous config.

    Raises :class:`ConfigError` (one line) for anything refused; returns notices to print."""
    tr = cfg.trainer
    notices: list[str] = []
    if previous is not None:
        before, where = previous
        now = _flat_dict(yaml.safe_load(to_yaml(cfg)) or {})
        for key in sorted(set(before) | set(now)):
            if key.startswith(INVARIANT_PREFIXES) and before.get(key) != now.get(key):
                raise ConfigError(key, f"the run in {cfg.run_dir} has {before.get(key)!r} (checkpoint "
                                       f"{where.rstrip('/').rsplit('/', 1)[-1]}), this command {now.get(key)!r}; "
                                       "a run's model, recipe, seed and image size are fixed: use a new output_dir")
        run_batch, run_streams = before.get("trainer.global_batch_size"), before.get("data.streams")
        if tr.global_batch_size is None:
            tr.global_batch_size = run_batch
        elif tr.global_batch_size != run_batch and not tr.allow_global_batch_change:
            raise ConfigError("trainer.global_batch_size",
                              f"the run in {cfg.run_dir} has {run_batch}, this command {tr.global_batch_size}; "
                              "set trainer.allow_global_batch_change=true to change it deliberately")
        if cfg.data.streams is None:
            cfg.data.streams = run_streams
        elif cfg.data.streams != run_streams:
            raise ConfigError("data.streams", f"the run in {cfg.run_dir} reads its data in {run_streams} streams, "
                                              f"this command {cfg.data.streams}; the data order cannot change")
        if tr.global_batch_size is not None and tr.global_batch_size != run_batch:
            notices.append(f"global batch {run_batch} -> {tr.global_batch_size} (trainer.allow_global_batch_change)")
    if tr.global_batch_size is None:
        tr.global_batch_size = tr.max_workers * tr.batch_size_per_worker
    batch = tr.global_batch_size
    if cfg.stage == Stage.generator:
        cfg.data.streams = 1  # token data is one seeded order held in memory (trainer/token_data.py)
    elif cfg.data.streams is None:
        cfg.data.streams = default_streams(batch, tr.max_workers * max(1, cfg.data.loader_workers))
    if batch % cfg.data.streams:
        raise ConfigError("data.streams", f"{cfg.data.streams} does not divide the global batch {batch}; "
                                          f"valid: {_listing(divisors(batch))}")
    if tr.max_workers > batch:
        raise ConfigError("trainer.num_workers", f"{tr.max_workers} workers cannot share a global batch of {batch}")
    if not tr.elastic and batch % tr.num_workers:
        raise ConfigError("trainer.num_workers", f"{tr.num_workers} does not divide the global batch {batch} "
                                                 f"(trainer.global_batch_size); valid: "
                                                 f"{_listing(valid_worker_counts(batch))}")
    if tr.elastic:
        uneven = [m for m in range(tr.min_workers, tr.max_workers + 1) if batch % m]
        if uneven:
            notices.append(f"elastic group {tr.num_workers}: at {_listing(uneven)} worker(s) the global batch {batch} "
                           "splits unevenly (micro-batches differ by one sample, losses weighted to the exact mean)")
    return notices


def _listing(values: list[int], limit: int = 24) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")
