"""What a training is told: the job (what to train, on which cases, into which model folder) and the settings
(how: schedule, optimiser, sampling, augmentation, validation, machine).

``TrainingSettings`` fields are declared once with their help, flag and limits (``covnet.runtime.settings``):
``covnet_train``'s flags are derived from them, and a caller that trains (self-training) holds a
``TrainingSettings`` instead of copying its fields.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from covnet.planning.plans import Plan
from covnet.runtime.cpus import usable_cpu_count
from covnet.runtime.settings import check_limits, setting, settings_from_json
from covnet.workspace import ModelFolder, Workspace

MAX_DEFAULT_WORKERS = 12   # nnU-Net's cap on background augmentation processes


@dataclass(frozen=True)
class AugmentationSettings:
    """nnU-Net's default training augmentation. Probabilities are per sample unless named otherwise."""
    p_rotation: float = 0.2
    rotation_degrees: float = 30.0             # ± about each axis (3D patches)
    dummy_2d_rotation_degrees: float = 180.0   # ± in-plane (dummy-2D patches)
    p_scaling: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)   # multiplies sampling coordinates: > 1 zooms out
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_blur_per_channel: float = 0.5
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_low_resolution: float = 0.25
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    p_low_resolution_per_channel: float = 0.5
    p_inverted_gamma: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_mirror_per_axis: float = 0.5


@dataclass(frozen=True)
class TrainingSettings:
    """nnU-Net's recipe by default. Every field but ``augmentation`` is a ``covnet_train`` flag."""
    epochs: int = setting(1000, "training epochs", minimum=1)
    iterations_per_epoch: int = setting(250, "training iterations per epoch", flag="--iters-per-epoch", minimum=1)
    validation_iterations: int = setting(50, "validation patch batches per epoch for the pseudo-Dice (0: none)",
                                         flag="--val-iters", minimum=0)
    initial_lr: float = setting(1e-2, "initial learning rate, decayed per epoch by poly(0.9)", flag="--lr", above=0)
    weight_decay: float = setting(3e-5, "SGD weight decay", minimum=0)
    momentum: float = setting(0.99, "SGD (Nesterov) momentum", minimum=0, below=1)
    gradient_clip: float = setting(12.0, "clip the gradient norm to this", above=0)
    oversample_foreground: float = setting(0.33, "share of each batch centred on a voxel of a random present class",
                                           minimum=0, maximum=1)
    batch_dice: bool = setting(True, "Dice loss over the whole batch (nnU-Net's choice for 3D), else per sample")
    seed: int = setting(0, "seed of the network's initialisation, the patch sampling and the augmentation")
    pretrained: str | None = setting(None, "initialise the weights from this checkpoint")
    device: str = setting("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    num_workers: int | None = setting(None, "data-augmentation processes (default: usable CPUs - 1, at least 1, "
                                            "at most 12; 0 = in-process)", minimum=0)
    checkpoint_every: int = setting(50, "write checkpoint_latest.pth every E epochs (also on Ctrl-C/SIGTERM)",
                                    minimum=1)
    compile: bool = setting(False, "torch.compile the network (CUDA only)")
    fp32: bool = setting(False, "train in float32, whatever plans.json's mixed_precision says (otherwise its "
                                "mixed precision: float16 on CUDA, bfloat16 on CPUs with AMX or AVX512-BF16)")
    validation_step_size: float = setting(0.5, "sliding-window step of the whole-case validation, as a fraction of "
                                               "the patch", flag="--val-step-size", above=0, maximum=1)
    validation_mirroring: bool = setting(True, "test-time mirroring in the whole-case validation (off: 8x faster)",
                                         flag="--val-mirroring")
    augmentation: AugmentationSettings = setting(default_factory=AugmentationSettings, cli=False)

    # What a resumed training may change: the length (extending a finished one), the machine and the validation.
    # Anything else would make one run of two recipes. (Precision counts with the machine: it already follows
    # whether the machine computes bfloat16 natively.)
    MACHINE_SETTINGS = ("device", "num_workers", "checkpoint_every", "compile", "fp32")
    CHANGEABLE_ON_CONTINUE = ("epochs", *MACHINE_SETTINGS, "validation_iterations", "validation_step_size",
                              "validation_mirroring")

    def __post_init__(self):
        check_limits(self)

    @property
    def data_workers(self) -> int:
        """Background augmentation processes: every usable CPU but one for the network (at least 1), at most 12
        (nnU-Net's)."""
        if self.num_workers is not None:
            return self.num_workers
        return max(1, min(MAX_DEFAULT_WORKERS, usable_cpu_count() - 1))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainingSettings":
        return settings_from_json(cls, data)


@dataclass(kw_only=True)
class TrainingJob:
    """What to train and where: a cross-validation fold, or a self-training round's student."""
    name: str                                   # recorded in checkpoints: "0".."K-1", "all", "selftrain_round_01"
    plan: Plan
    workspace: Workspace                        # dataset.json and the reference labels of the validation cases
    folder: ModelFolder                         # checkpoints, settings.json, log, progress.png, validation/
    train_cases: list[str]
    validation_cases: list[str]
    case_folders: dict[str, Path]               # case -> folder of its preprocessed arrays
    # A self-training student: its pseudo-labelled cases (the others in train_cases are expert cases), the
    # share of each batch drawn from the expert cases, and whether pseudo-labelled patches get strong noise.
    pseudo_cases: list[str] = field(default_factory=list)
    expert_share: float = 0.5
    strong_noise: bool = False
