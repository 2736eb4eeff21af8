"""The one description of covnet's residual-encoder UNet, and everything derived from it. No torch here.

``Topology`` is the ``network`` entry of plans.json, typed and validated. The torch builder
(``covnet.network.unet``), the planner's memory model (``covnet.planning.memory``) and the planning rules
all read the network's layout from it, so the blocks and strides are walked in one place only.

Axis order of every kernel/stride triple and of every shape is (z, y, x). The layout:

- stem: one conv-norm-nonlin from ``in_channels`` to ``features_per_stage[0]`` at the input resolution;
- encoder stage i: ``n_blocks_per_stage[i]`` residual blocks, the first one pooling by ``strides[i]``
  (``strides[0]`` is all ones, so stage 0 works at the input resolution);
- decoder: one stage per encoder stage but the last, applied coarsest first; decoder stage for encoder
  stage i upsamples stage i + 1 by ``strides[i + 1]``, concatenates the skip of stage i, applies
  ``n_conv_per_stage_decoder[n_stages - 2 - i]`` conv-norm-nonlins and has a 1×1×1 head to ``num_classes``;
- in training with ``deep_supervision`` every decoder stage's logits are returned, finest first; otherwise
  only the finest (input resolution).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from math import prod
from typing import NoReturn, Sequence

from covnet.runtime.errors import CovnetError

Triple = tuple[int, int, int]


def _fail(problem: str) -> NoReturn:
    raise CovnetError(None, f"network plan: {problem}")


def is_positive_int(value) -> bool:
    """True for integers > 0, numpy integers included; False for bools, floats and everything else."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) > 0
    except TypeError:
        return False


def _as_list(values) -> list | None:
    """The items of a list, tuple, numpy array or other iterable; None for scalars, strings and mappings."""
    if isinstance(values, (str, bytes, dict)):
        return None
    try:
        return list(values)
    except TypeError:
        return None


def _positive_ints(name: str, values, length: int) -> tuple[int, ...]:
    items = _as_list(values)
    if items is None or len(items) != length or not all(is_positive_int(v) for v in items):
        _fail(f"{name} must be {length} positive integers, got {values}")
    return tuple(operator.index(v) for v in items)


def _triples(name: str, values, length: int) -> tuple[Triple, ...]:
    items = [_as_list(t) for t in _as_list(values) or [None]]
    if len(items) != length or not all(
            t is not None and len(t) == 3 and all(is_positive_int(v) for v in t) for t in items):
        _fail(f"{name} must be {length} (z, y, x) triples of positive integers, got {values}")
    return tuple(tuple(operator.index(v) for v in t) for t in items)


def _patch(patch_size: Sequence[int]) -> Triple:
    values = _as_list(patch_size)
    if values is None or len(values) != 3 or not all(is_positive_int(v) for v in values):
        _fail(f"patch size must be 3 positive integers, got {patch_size}")
    return tuple(operator.index(v) for v in values)


@dataclass(frozen=True)
class ResidualBlockLayout:
    """One residual block of the encoder: conv-norm-nonlin, conv-norm, skip, nonlin."""
    stage: int
    in_channels: int
    out_channels: int
    kernel_size: Triple
    stride: Triple

    @property
    def has_projection(self) -> bool:
        """A 1×1×1 strided conv + norm on the skip path, needed when the shape or channel count changes."""
        return self.in_channels != self.out_channels or any(s != 1 for s in self.stride)


@dataclass(frozen=True)
class DecoderStageLayout:
    """Brings encoder stage ``stage + 1`` (``below_channels``) up to the resolution of encoder stage ``stage``."""
    stage: int
    below_channels: int
    channels: int            # of the skip, of the conv outputs and of the head's input
    upsampling: Triple       # transposed conv kernel = stride
    kernel_size: Triple
    n_convs: int


@dataclass(frozen=True)
class Topology:
    """The UNet's layout (module docstring). Field names are the keys of plans.json's ``network`` entry;
    sequences are stored as tuples of ints, so equal topologies compare and hash equal."""
    in_channels: int
    num_classes: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[Triple, ...]
    strides: tuple[Triple, ...]
    n_blocks_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    deep_supervision: bool = True

    def __post_init__(self):
        for name in ("in_channels", "num_classes"):
            if not is_positive_int(getattr(self, name)):
                _fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        features = _as_list(self.features_per_stage)
        if features is None or len(features) < 2:
            _fail(f"needs at least 2 stages, got features_per_stage {self.features_per_stage}")
        n_stages = len(features)
        normalized = {
            "in_channels": operator.index(self.in_channels),
            "num_classes": operator.index(self.num_classes),
            "features_per_stage": _positive_ints("features_per_stage", features, n_stages),
            "n_blocks_per_stage": _positive_ints("n_blocks_per_stage", self.n_blocks_per_stage, n_stages),
            "n_conv_per_stage_decoder": _positive_ints("n_conv_per_stage_decoder", self.n_conv_per_stage_decoder,
                                                       n_stages - 1),
            "kernel_sizes": _triples("kernel_sizes", self.kernel_sizes, n_stages),
            "strides": _triples("strides", self.strides, n_stages),
        }
        if any(k % 2 == 0 for kernel in normalized["kernel_sizes"] for k in kernel):
            _fail(f"kernel sizes must be odd, got {self.kernel_sizes}")
        if normalized["strides"][0] != (1, 1, 1):
            _fail(f"the first stage must not pool (its logits are the input resolution), got strides {self.strides}")
        if not isinstance(self.deep_supervision, bool):
            _fail(f"deep_supervision must be true or false, got {self.deep_supervision!r}")
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    # --- JSON (the ``network`` entry of plans.json) -------------------------------------------------------

    def to_json(self) -> dict:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes,
                "features_per_stage": list(self.features_per_stage),
                "kernel_sizes": [list(k) for k in self.kernel_sizes], "strides": [list(s) for s in self.strides],
                "n_blocks_per_stage": list(self.n_blocks_per_stage),
                "n_conv_per_stage_decoder": list(self.n_conv_per_stage_decoder),
                "deep_supervision": self.deep_supervision}

    @classmethod
    def from_json(cls, data: dict) -> "Topology":
        if not isinstance(data, dict):
            _fail(f"expected a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data and name != "deep_supervision"]
        unknown = sorted(set(data) - set(names))
        if missing:
            _fail(f"missing {', '.join(missing)}")
        if unknown:
            _fail(f"unknown entries {', '.join(unknown)}")
        return cls(**data)

    # --- shapes -------------------------------------------------------------------------------------------

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def cumulative_strides(self) -> tuple[Triple, ...]:
        """Pooling of each encoder stage's output relative to the input, per axis."""
        pooled, total = [], (1, 1, 1)
        for stride in self.strides:
            total = tuple(t * s for t, s in zip(total, stride))
            pooled.append(total)
        return tuple(pooled)

    @property
    def total_stride(self) -> Triple:
        """Pooling of the bottleneck per axis: every patch size must be a multiple of it."""
        return self.cumulative_strides[-1]

    def patch_is_valid(self, patch_size: Sequence[int]) -> bool:
        """True for 3 positive integers, each divisible by the total stride along its axis."""
        try:
            patch = _patch(patch_size)
        except CovnetError:
            return False
        return all(size % step == 0 for size, step in zip(patch, self.total_stride))

    def stage_shapes(self, patch_size: Sequence[int]) -> list[Triple]:
        """Spatial (z, y, x) shape of each encoder stage's output for a patch (a CovnetError if not valid)."""
        patch = _patch(patch_size)
        if not self.patch_is_valid(patch):
            _fail(f"patch size {list(patch)} is not divisible by the total stride {list(self.total_stride)} "
                  f"(strides {[list(s) for s in self.strides]})")
        return [tuple(size // step for size, step in zip(patch, pooled)) for pooled in self.cumulative_strides]

    def output_stages(self, training: bool = True) -> tuple[int, ...]:
        """Encoder stages at whose resolution the network returns logits, finest first."""
        return tuple(range(self.n_stages - 1)) if training and self.deep_supervision else (0,)

    def logit_shapes(self, patch_size: Sequence[int], training: bool = True) -> list[tuple[int, int, int, int]]:
        """(num_classes, z, y, x) of each logits tensor the network returns for one sample, finest first."""
        shapes = self.stage_shapes(patch_size)
        return [(self.num_classes, *shapes[stage]) for stage in self.output_stages(training)]

    @property
    def deep_supervision_scales(self) -> tuple[tuple[float, float, float], ...]:
        """Scale of each training-mode output relative to the input per axis, finest first (the first is
        all ones); one entry per decoder stage with deep supervision, else only the first."""
        pooled = self.cumulative_strides
        return tuple(tuple(1.0 / p for p in pooled[stage]) for stage in self.output_stages(training=True))

    # --- layers -------------------------------------------------------------------------------------------

    def encoder_blocks(self) -> tuple[ResidualBlockLayout, ...]:
        """Every residual block, stage by stage, in the order the network applies them."""
        blocks, channels = [], self.features_per_stage[0]
        for stage, features in enumerate(self.features_per_stage):
            for index in range(self.n_blocks_per_stage[stage]):
                first = index == 0
                blocks.append(ResidualBlockLayout(
                    stage=stage, in_channels=channels if first else features, out_channels=features,
                    kernel_size=self.kernel_sizes[stage], stride=self.strides[stage] if first else (1, 1, 1)))
            channels = features
        return tuple(blocks)

    def decoder_stages(self) -> tuple[DecoderStageLayout, ...]:
        """Every decoder stage, coarsest first (the order the network applies them)."""
        stages = []
        for index, n_convs in enumerate(self.n_conv_per_stage_decoder):
            stage = self.n_stages - 2 - index
            stages.append(DecoderStageLayout(
                stage=stage, below_channels=self.features_per_stage[stage + 1],
                channels=self.features_per_stage[stage], upsampling=self.strides[stage + 1],
                kernel_size=self.kernel_sizes[stage], n_convs=n_convs))
        return tuple(stages)

    def parameter_count(self) -> int:
        """Trainable parameters of the network built from this topology."""
        def conv_norm(c_in: int, c_out: int, kernel: Triple) -> int:
            return c_in * c_out * prod(kernel) + c_out + 2 * c_out  # weight, bias, affine norm

        total = conv_norm(self.in_channels, self.features_per_stage[0], self.kernel_sizes[0])
        for block in self.encoder_blocks():
            total += conv_norm(block.in_channels, block.out_channels, block.kernel_size)
            total += conv_norm(block.out_channels, block.out_channels, block.kernel_size)
            if block.has_projection:
                total += block.in_channels * block.out_channels + 2 * block.out_channels  # bias-free 1×1×1 + norm
        for stage in self.decoder_stages():
            f = stage.channels
            total += stage.below_channels * f * prod(stage.upsampling) + f  # transposed conv
            total += conv_norm(2 * f, f, stage.kernel_size) + (stage.n_convs - 1) * conv_norm(f, f, stage.kernel_size)
            total += f * self.num_classes + self.num_classes  # segmentation head
        return total

    def saved_activation_elements(self, patch_size: Sequence[int], maps_per_logit: int) -> int:
        """Elements of the tensors autograd keeps for the backward pass, for ONE training sample.

        Counted: the input; per conv-norm-nonlin the conv output (kept by the norm) and the in-place
        nonlinearity's output (kept by the nonlinearity and the next conv); per residual block 4 such maps
        (two conv outputs, the inner activation, the block output) plus 1 for a projection skip; per decoder
        stage the concatenation (2 × features) and 2 maps per conv; per returned logits tensor
        ``maps_per_logit`` maps of ``num_classes`` channels (what the loss keeps; 0 counts the network alone).
        """
        patch = _patch(patch_size)
        voxels = [prod(shape) for shape in self.stage_shapes(patch)]
        input_voxels = prod(patch)
        elements = self.in_channels * input_voxels
        elements += 2 * self.features_per_stage[0] * input_voxels  # stem conv output + activation
        for block in self.encoder_blocks():
            per_map = block.out_channels * voxels[block.stage]
            elements += 4 * per_map + (per_map if block.has_projection else 0)
        for stage in self.decoder_stages():
            per_map = stage.channels * voxels[stage.stage]
            elements += 2 * per_map + 2 * stage.n_convs * per_map  # concatenation + conv outputs and activations
        for stage in self.output_stages(training=True):
            elements += maps_per_logit * self.num_classes * voxels[stage]
        return elements
