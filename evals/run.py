"""Distributed FID / IS / rFID on a pool of Ray workers, logged to MLflow.

    python evals/run.py eval.kind=folders eval.input1=<dir|shards|npz> eval.input2=<dir|shards|npz|stats.npz>
    python evals/run.py eval.kind=reconstruction eval.checkpoint=<tokenizer export> eval.data=<val shards>
    python evals/run.py eval.kind=generation eval.checkpoint=<generator export> \\
        eval.reference=VIRTUAL_imagenet256_labeled.npz eval.num_workers=8 eval.use_gpu=true
    python evals/run.py eval.kind=reconstruction eval.watch=true output_dir=<run dir> eval.data=<val shards>

Ray: RAY_ADDRESS (e.g. under `ray job submit`), else a local instance. The last line of stdout is
the result as one JSON object (watch mode: one line per checkpoint, then a summary). Exit codes:
0 done, 1 the evaluation failed (message on stderr and in the JSON's "error"), 2 config error or an
input that does not exist (one line on stderr, checked before any weights are loaded or Ray starts).
eval.image_size=null (the default) takes the checkpoint's image size.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python evals/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import load_config  # noqa: E402

from evals.schema import EvalConfig, EvalKind  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg = load_config("eval", EvalConfig, argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cluster import storage
    from cluster.local import apply_service_env
    from cluster.ray_session import connect_ray
    from evals.preflight import check_inputs, with_image_size
    from evals.sources import BadInputError
    from trainer.config import EXIT_CONFIG_ERROR, ConfigError

    apply_service_env()
    checkpoint = None
    try:  # what costs nothing first: before Inception weights, Ray or MLflow (evals/preflight.py)
        check_inputs(cfg)
        if cfg.eval.kind == EvalKind.folders:
            cfg = with_image_size(cfg)
        elif not cfg.eval.watch:
            from evals.jobs import checkpoint_to_evaluate

            checkpoint = checkpoint_to_evaluate(cfg)
    except ConfigError as err:  # cluster.preflight.BadInput: one line naming the key
        print(str(err), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (BadInputError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    from evals.inception import InceptionWeightsError
    from evals.jobs import evaluate_and_log
    from evals.pool import EvalError
    from evals.watch import watch

    try:
        connect_ray()
        if cfg.eval.watch:
            results = watch(cfg, on_result=lambda r: print(json.dumps(r, default=str), flush=True))
            summary = {"kind": cfg.eval.kind.value, "watch": True, "output_dir": cfg.output_dir,
                       "evaluated": [{"step": r["step"], "fid": r["fid"]} for r in results]}
            print(json.dumps(summary), flush=True)
            return 0
        result = evaluate_and_log(cfg, checkpoint)
    except (EvalError, BadInputError, InceptionWeightsError, storage.StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        print(json.dumps({"error": str(err), "kind": cfg.eval.kind.value}), flush=True)
        return 1
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
