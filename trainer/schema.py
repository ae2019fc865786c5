"""Config schema of ``trainer/run.py`` (both stages): one dataclass per component.

Defaults here are the framework's; ``configs/tokenizer.yaml`` / ``configs/generator.yaml`` carry the
stage defaults and ``configs/experiments/*.yaml`` the published recipes and the tiny ``demo``.
Keys named in the training contract: ``experiment``, ``seed``, ``output_dir``, ``data.train_shards``,
``data.val_shards``, ``trainer.max_steps``, ``trainer.num_workers``, ``trainer.use_gpu``,
``trainer.batch_size_per_worker``, ``deepspeed.zero_stage``, ``deepspeed.precision``,
``mlflow.tracking_uri``, ``mlflow.experiment``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional

from trainer.config import ConfigError
from trainer.losses.config import DiscriminatorConfig, PixelLossConfig
from trainer.models.config import GeneratorConfig, TiTokConfig
from trainer.sample import SamplingConfig


class Stage(str, enum.Enum):
    tokenizer = "tokenizer"
    generator = "generator"


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class TokenizerRecipe(str, enum.Enum):
    proxy_codes = "proxy_codes"            # paper stage 1: CE on a frozen MaskGIT-VQGAN's codes
    decoder_finetune = "decoder_finetune"  # paper stage 2: frozen encoder/quantizer, pixel losses + GAN
    single_stage = "single_stage"          # pixel losses from the start


@dataclass
class DataConfig:
    # Shards: a directory/prefix (local or s3://), a glob, or a brace pattern such as
    # s3://bucket/imagenet/train-{000000..001023}.tar. The generator stage reads token shards.
    train_shards: Optional[str] = None
    val_shards: Optional[str] = None
    image_size: int = 256
    loader_workers: int = 2
    shuffle_buffer: int = 1000
    # Logical streams the training images are read in (trainer/batch_layout.py): fixed when a run
    # starts, so that the samples of every step do not depend on the worker count. null: a new run
    # takes the largest divisor of the global batch that is at most workers x loader workers; a
    # resumed run keeps its own.
    streams: Optional[int] = None
    # MB of resized decodes each loader worker keeps, so a dataset that fits is decoded once rather than
    # once an epoch (trainer/data.py, DecodedCache). 0: off (ImageNet does not fit; the demo's does).
    decoded_cache_mb: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.loader_workers < 0 or self.shuffle_buffer < 1:
            raise ConfigError("data", "image_size > 0, loader_workers >= 0, shuffle_buffer >= 1 are required")
        if self.decoded_cache_mb < 0:
            raise ConfigError("data.decoded_cache_mb", f"must be >= 0 (0: off), got {self.decoded_cache_mb}")
        if self.streams is not None and self.streams < 1:
            raise ConfigError("data.streams", f"must be >= 1 or null, got {self.streams}")


@dataclass
class TrainerConfig:
    max_steps: int = 1000               # length of the run (and of the LR schedule)
    # Stop early at this step with a checkpoint (time-limited allocations); re-run without it to go on.
    stop_at_step: Optional[int] = None
    # Ray Train workers (one per GPU on a cluster): a count, or [min, max] for an elastic group that
    # shrinks when nodes are lost and grows back when they return (Ray Train's elastic mode).
    num_workers: Any = 1
    use_gpu: bool = False
    # Samples per optimizer step, an invariant of the run (every resume keeps it, whatever the worker
    # count). null: a new run takes max workers x batch_size_per_worker; a resumed run keeps its own.
    global_batch_size: Optional[int] = None
    # Resuming with another global_batch_size is refused unless this is set (a deliberate change).
    allow_global_batch_change: bool = False
    # The most samples a worker feeds its model at once; gradient accumulation makes up the rest of its
    # share of the global batch (recomputed at every start, so it follows the worker count).
    batch_size_per_worker: int = 32
    cpus_per_worker: float = 1.0
    grad_clip: float = 1.0               # 0 disables clipping
    log_every: int = 50
    image_log_every: int = 1000          # input/reconstruction grid to MLflow (0 disables)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # Worker-group restarts from the last checkpoint after a failure (a crashed worker, a lost node).
    # null: 0 for a fixed group, 10 for an elastic one (which exists to survive lost nodes); -1: no limit.
    max_failures: Optional[int] = None
    max_nonfinite_steps: int = 10        # abort after this many non-finite losses in a row
    activation_checkpointing: bool = False
    compile: bool = False                # torch.compile the model (GPU)
    ema_decay: Optional[float] = 0.999   # null disables the EMA; exports then hold the raw weights
    export_every: Optional[int] = None   # default: with every checkpoint
    # Elastic mode: how often Ray Train looks for capacity to grow the group back (seconds).
    elastic_resize_interval_s: float = 60.0
    # Ask Ray every N steps whether a node of the run is being preempted (a barrier of all workers);
    # on a drain notice the workers checkpoint at the next step boundary and wait to be restarted.
    preemption_check_every: int = 1
    # Append each step's sample keys to <output_dir>/sample_keys/ (local run dirs; for audits and tests).
    record_sample_keys: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size_per_worker", "log_every", "checkpoint_every", "keep_checkpoints",
                     "max_nonfinite_steps", "preemption_check_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}", f"must be >= 1, got {getattr(self, name)}")
        self.num_workers = _worker_count(self.num_workers)
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError("trainer.global_batch_size", f"must be >= 1 or null, got {self.global_batch_size}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("trainer.ema_decay", f"must be in [0, 1) or null, got {self.ema_decay}")
        if self.elastic_resize_interval_s < 0:
            raise ConfigError("trainer.elastic_resize_interval_s", f"must be >= 0, got {self.elastic_resize_interval_s}")

    @property
    def effective_max_failures(self) -> int:
        if self.max_failures is not None:
            return self.max_failures
        return 10 if self.elastic else 0

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if self.elastic else self.num_workers


def _worker_count(value: Any) -> int | list[int]:
    """``trainer.num_workers``: a count >= 1, or ``[min, max]`` with 1 <= min <= max (elastic)."""
    from omegaconf import ListConfig

    if isinstance(value, (list, tuple, ListConfig)):
        values = list(value)
        if (len(values) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
                and 1 <= values[0] <= values[1]):
            return values if values[0] < values[1] else values[0]
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError("trainer.num_workers", f"must be a count >= 1 or [min, max] with 1 <= min <= max, got {value!r}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``end_lr``."""

    lr: float = 1e-4
    end_lr: float = 1e-5
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 1e-4
    warmup_steps: int = 10_000
    fused: bool = False                  # fused CUDA AdamW (GPU only)

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError("optim.betas", f"needs two values, got {self.betas}")
        if self.lr <= 0 or self.end_lr < 0 or self.warmup_steps < 0:
            raise ConfigError("optim", "lr > 0, end_lr >= 0 and warmup_steps >= 0 are required")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: Precision = Precision.fp32
    # bf16/fp16 as torch autocast over fp32 parameters (the authors' mixed precision); false keeps
    # the parameters themselves in 16 bit (DeepSpeed's bf16/fp16 modes, less memory).
    autocast: bool = True
    offload_optimizer: bool = False      # ZeRO-Offload of optimizer state to CPU (stages 1-3)
    offload_param: bool = False          # parameters to CPU (stage 3)
    overlap_comm: bool = True
    # ZeRO buffer and fetch limits, in elements: "auto" derives each from the model's size (the rules
    # are in trainer/partitioning.py), an integer fixes it. Buckets apply at stages 1-3, stage3_* at 3.
    reduce_bucket_size: str = "auto"
    allgather_bucket_size: str = "auto"
    stage3_max_live_parameters: str = "auto"
    stage3_max_reuse_distance: str = "auto"
    stage3_prefetch_bucket_size: str = "auto"
    stage3_param_persistence_threshold: str = "auto"
    sub_group_size: str = "auto"             # ZeRO-3: elements of a rank's partition stepped at once

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_stage", f"{self.zero_stage!r} is not a valid choice; valid: 0, 1, 2, 3")
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param", "needs deepspeed.zero_stage=3")
        if self.precision != Precision.fp32 and not self.autocast and self.zero_stage == 0:
            # Without ZeRO, DeepSpeed's 16-bit optimizer wrappers keep fp32 master weights that resizable
            # checkpoints cannot address; ZeRO 1-3 keep them in a form they can (and ZeRO-1 costs nothing
            # on one worker).
            raise ConfigError("deepspeed.autocast", f"false (16-bit parameters) with deepspeed.precision="
                                                    f"{self.precision.value} needs deepspeed.zero_stage >= 1")
        from trainer.partitioning import LIMIT_KEYS

        for key in LIMIT_KEYS:
            self.limit(key)

    def limit(self, key: str) -> Optional[int]:
        """The integer value of a limit key, None for "auto"."""
        value = str(getattr(self, key)).strip()
        if value == "auto":
            return None
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if number < 0 or number != int(number):
            raise ConfigError(f"deepspeed.{key}", f"{value!r} is not valid; valid: auto or a whole number >= 0")
        return int(number)


@dataclass
class MLflowConfig:
    # null: $MLFLOW_TRACKING_URI, else a local SQLite store under ./mlruns.
    tracking_uri: Optional[str] = None
    experiment: str = "titok"
    enabled: bool = True


@dataclass
class TrainConfigBase:
    stage: Stage = Stage.tokenizer
    experiment: Optional[str] = None
    seed: int = 0
    # The run's directory (local or s3://): checkpoints, exports and the resolved config go under it.
    # Re-running with the same output_dir resumes. null: outputs/<stage>-<experiment>.
    output_dir: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)

    @property
    def run_dir(self) -> str:
        return self.output_dir or f"outputs/{self.stage.value}-{self.experiment or 'default'}"

    @property
    def run_name(self) -> str:
        return self.run_dir.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class TokenizerRecipeConfig:
    recipe: TokenizerRecipe = TokenizerRecipe.proxy_codes
    # MaskGIT-VQGAN weights (path or URL): the proxy-code teacher of stage 1 and the pixel decoder
    # that stage 2 starts from.
    teacher_weights: Optional[str] = None
    # A tokenizer export (dir with config.json + model.safetensors) to start from, e.g. stage 1's.
    init_from: Optional[str] = None
    # Pixel recipes (decoder_finetune, single_stage): L2 + perceptual + adversarial terms.
    losses: PixelLossConfig = field(default_factory=PixelLossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    # The discriminator's own AdamW (the authors: same settings as the tokenizer's; its schedule runs
    # over the whole run like the tokenizer's).
    discriminator_optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TokenizerTrainConfig(TrainConfigBase):
    model: TiTokConfig = field(default_factory=TiTokConfig)
    tokenizer: TokenizerRecipeConfig = field(default_factory=TokenizerRecipeConfig)

    def __post_init__(self) -> None:
        if self.data.image_size != self.model.image_size:
            raise ConfigError("data.image_size", f"{self.data.image_size} differs from model.image_size "
                                                 f"{self.model.image_size}; set both")
        stage1 = self.tokenizer.recipe == TokenizerRecipe.proxy_codes
        outputs_pixels = self.model.finetune_decoder or not self.model.is_legacy
        if stage1 and outputs_pixels:
            raise ConfigError("model.finetune_decoder",
                              "must be false (with model.is_legacy=true) for tokenizer.recipe=proxy_codes: "
                              "stage 1 predicts proxy codes")
        if not stage1 and not outputs_pixels:
            raise ConfigError("model.finetune_decoder",
                              f"tokenizer.recipe={self.tokenizer.recipe.value} trains on pixels: set "
                              "model.finetune_decoder=true (MaskGIT-VQGAN pixel decoder) or model.is_legacy=false "
                              "(the decoder predicts pixels directly)")


@dataclass
class GeneratorRecipeConfig:
    # Tokenizer export whose tokens the generator models; decodes the preview sample grids.
    tokenizer: Optional[str] = None
    # A generator export to start from (fine-tuning).
    init_from: Optional[str] = None
    label_smoothing: float = 0.1
    # Loss weight of visible (unmasked) tokens; masked tokens weigh 1 (the authors' MLM loss).
    loss_weight_unmasked_token: float = 0.1
    preview_sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class GeneratorTrainConfig(TrainConfigBase):
    stage: Stage = Stage.generator
    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    generator: GeneratorRecipeConfig = field(default_factory=GeneratorRecipeConfig)


STAGE_SCHEMAS: dict[Stage, type[TrainConfigBase]] = {
    Stage.tokenizer: TokenizerTrainConfig,
    Stage.generator: GeneratorTrainConfig,
}
