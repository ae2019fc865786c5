"""What the data-prep entry points (``shard.py``, ``pretokenize.py``) share: exit codes, output URLs,
the leftovers of killed runs, and how many Ray workers to run."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from cluster import storage
from cluster.preflight import BadInput

EXIT_FAILED = 1          # some shards failed (re-run to retry) or verification found problems
EXIT_INPUT_ERROR = 2     # unusable input or settings; nothing was written


def absolute_url(url: str) -> str:
    """``s3://...`` as is; a local path made absolute (Ray workers run in other directories)."""
    return url if storage.is_remote(url) else os.path.abspath(url)


def remove_stale_temp_files(output: str, folders: Iterable[str], target_names: str) -> None:
    """Delete the temp files a killed run left behind while writing files named like the regex
    ``target_names`` in ``output/<folder>`` (local output only: S3 uploads appear whole or not at all).

    :func:`cluster.storage.open_write` writes ``.<name>.<random>.tmp`` next to the target, then renames it.
    """
    if storage.is_remote(output):
        return
    pattern = re.compile(rf"^\.(?:{target_names})\..*\.tmp$")
    for folder in folders:
        path = Path(output, folder)
        if path.is_dir():
            for item in path.iterdir():
                if pattern.match(item.name):
                    item.unlink(missing_ok=True)


def ray_concurrency(workers: int, resource: str = "CPU", per_worker: float = 1.0) -> int:
    """``workers``, or when 0, how many workers of ``per_worker`` x ``resource`` the Ray cluster fits
    (what is free now, else its total; at least 1)."""
    import ray

    if workers:
        return workers
    amount = ray.available_resources().get(resource, ray.cluster_resources().get(resource, 1))
    return max(1, int(amount // per_worker))


def run_write_or_verify(name: str, cfg: Any, write: Callable[[Any], Any], verify: Callable[[Any], Any],
                        input_errors: tuple[type[BaseException], ...]) -> int:
    """The body of a data-prep ``main()``: ``mode=verify`` lists problems, else write; one summary line.

    ``write``'s report has ``.line()`` and ``.failed``; ``verify``'s has ``.line()`` and ``.problems``.
    Input errors (``write``/``verify`` check inputs and output before any work, see
    :mod:`cluster.preflight`) print one line and exit with :data:`EXIT_INPUT_ERROR`; an error of the
    store during the work is one line too, exit :data:`EXIT_FAILED` (re-running resumes).
    """
    import sys

    from cluster.local import apply_service_env
    from trainer.config import ConfigError

    apply_service_env()
    try:
        if cfg.mode.value == "verify":
            result = verify(cfg)
            for problem in result.problems:
                print(problem)
            print(result.line(), flush=True)
            return EXIT_FAILED if result.problems else 0
        report = write(cfg)
    except BadInput as err:  # already names the key
        print(str(err), file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (ConfigError, *input_errors) as err:
        print(f"{name}: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except storage.StorageError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(report.line(), flush=True)
    return EXIT_FAILED if report.failed else 0
