"""Train a TiTok tokenizer or generator on Ray Train + DeepSpeed.

    python trainer/run.py stage=tokenizer experiment=demo [key=value ...]
    ray job submit -- python trainer/run.py stage=tokenizer experiment=titok_l32 output_dir=s3://b/runs/l32

Re-running the same command (same output_dir) resumes from the latest complete checkpoint.
`--help` prints the merged config of the chosen stage. `--plan [--gpu-mem GiB] [--cpu-mem GiB]` prints
the capacity plan (parameters, memory per rank, largest micro-batch, checkpoint size) and starts nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Ray holds back worker lines that differ only in numbers and prints them in 5 s batches as
# "[repeated Nx across cluster]": exactly the progress lines (step, loss, img/s). Only rank 0 prints
# them, so there is nothing to deduplicate. Read by Ray at import; a user's own setting wins.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

if __package__ in (None, ""):  # `python trainer/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import EXIT_CONFIG_ERROR, ConfigError, load_config  # noqa: E402
from trainer.schema import STAGE_SCHEMAS, Stage  # noqa: E402

STAGES = ", ".join(s.value for s in Stage)


def parse_stage(argv: list[str]) -> Stage:
    """The stage named by `stage=...`; validated first, since it selects the schema."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith("stage=")]
    if not values:
        raise ConfigError("stage", f"is required (stage=...); valid: {STAGES}")
    try:
        return Stage(values[-1])
    except ValueError:
        raise ConfigError("stage", f"{values[-1]!r} is not a valid choice; valid: {STAGES}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from trainer.plan import pop_plan_args

        plan_options, argv = pop_plan_args(argv)  # --plan [--gpu-mem G] [--cpu-mem G]: trainer/plan.py
        stage = parse_stage(argv)
    except ConfigError as err:
        if any(a in ("-h", "--help") for a in argv):
            print(__doc__.strip() + f"\n\nstages: {STAGES}")
            return 0
        print(str(err), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    cfg = load_config(stage.value, STAGE_SCHEMAS[stage], argv, description=__doc__)
    if plan_options is not None:
        from trainer.plan import print_plan

        return print_plan(cfg, plan_options)
    from trainer.launch import launch

    return launch(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
