"""How big each step is: the real check on one GPU, and the dry run that exercises the same code on a CPU.

The estimates are seconds per step on an H100 host (16 cores) for ``GPU``, and on a 2-core CPU for ``DRY_RUN``; a
step starts only when the budget still holds its estimate. The GPU ones are reasoned, not yet measured (no GPU
was at hand when they were written): phantom generation and preprocessing from the 2-core timings here (about
7 s per clinical phantom, 6 s to preprocess one) with faster, idle cores; network steps from nnU-Net v1's
41-47 s per 250 iterations on an A100 for a network of this size. Correct them from the first run's
``seconds`` per step.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PhantomSet:
    """A phantom workspace: ``covnet_make_phantoms`` then ``covnet_plan_and_preprocess``."""
    size: str                           # covnet_make_phantoms --size
    labelled: int
    test: int
    seed: int
    tiny_network: bool = False          # replace the planned network and patch by a tiny one (hand edit)


@dataclass(frozen=True)
class Scale:
    name: str
    device: str                                      # the device the check is about
    small: PhantomSet                                # the phantom model of the correctness tests
    model_training: tuple[str, ...]                  # covnet_train flags of that model
    clinical: PhantomSet                             # memory plans, training speed, the model for inference
    memory_budgets_gb: tuple[float, float, float]    # smaller, default, larger
    memory_steps: int                                # training steps measured per plan (the first one warms up)
    speed_epochs: int                                # the first epoch warms up (and compiles); the rest are timed
    speed_iterations: int                            # per epoch
    preprocessing_processes: int
    estimates_s: dict
    # step_profile and step_variants (benchmarks/gpu_check/speed.py): iterations on random batches of the 8 GB plan
    profile_warm_up: int
    profile_steps: int                               # timed, then profiled, then timed by phase
    variant_warm_up: int                             # per variant (a compiled one compiles here)
    variant_iterations: int                          # timed per variant, at most
    variant_max_seconds: float                       # a variant's timing stops after this (at least 2 rounds)
    step_patch_size: tuple[int, int, int] | None     # in place of the plan's (the dry run's smaller step)
    compile_variants_apart: bool                     # each compiled variant in a process of its own (else one
                                                     # process for every variant)


GPU = Scale(
    name="gpu", device="cuda",
    small=PhantomSet("small", labelled=10, test=3, seed=0),
    model_training=("--epochs", "12", "--iters-per-epoch", "50", "--val-iters", "0"),
    clinical=PhantomSet("clinical", labelled=4, test=0, seed=0),
    memory_budgets_gb=(4.0, 8.0, 24.0), memory_steps=3,
    speed_epochs=6, speed_iterations=50,            # 50 warm-up iterations, then 5 x 50 = 250 timed
    preprocessing_processes=12,
    estimates_s={"environment": 20, "small_data": 15, "clinical_data": 60, "phantom_model": 45, "correctness": 110,
                 "memory": 45, "training_speed": 75, "inference": 50, "training_speed_compile": 150,
                 "step_profile": 30, "step_variants": 150, "compile_variant": 100},
    profile_warm_up=5, profile_steps=5, variant_warm_up=5, variant_iterations=24, variant_max_seconds=10.0,
    step_patch_size=None, compile_variants_apart=True,
)

DRY_RUN = Scale(
    name="dry-run", device="cpu",
    small=PhantomSet("small", labelled=4, test=1, seed=0, tiny_network=True),
    model_training=("--epochs", "2", "--iters-per-epoch", "2", "--val-iters", "0", "--num-workers", "0"),
    clinical=PhantomSet("small", labelled=4, test=0, seed=1, tiny_network=True),
    memory_budgets_gb=(0.03, 0.1, 0.2), memory_steps=2,
    speed_epochs=2, speed_iterations=2,
    preprocessing_processes=2,
    estimates_s={"environment": 5, "small_data": 10, "clinical_data": 15, "phantom_model": 10, "correctness": 40,
                 "memory": 25, "training_speed": 10, "inference": 15, "training_speed_compile": 10,
                 "step_profile": 10, "step_variants": 25, "compile_variant": 10},
    profile_warm_up=1, profile_steps=1, variant_warm_up=1, variant_iterations=1, variant_max_seconds=10.0,
    step_patch_size=(8, 16, 16), compile_variants_apart=False,
)
