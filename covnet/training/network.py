"""The network covnet trains: a 3D UNet with a residual encoder, as in nnU-Net's ResEnc UNet.

Topology comes from ``plans.json`` (``network`` entry, see ``covnet.planning.memory.validate_network_plan``).
Axis order of every kernel/stride triple and of tensors is (z, y, x); tensors are (batch, channel, z, y, x).

- stem: one conv-norm-nonlin to ``features_per_stage[0]`` at full resolution;
- encoder stage i: ``n_blocks_per_stage[i]`` residual basic blocks, the first one downsampling by ``strides[i]``;
- decoder: transposed conv (kernel = stride) up, concatenation with the encoder skip, conv-norm-nonlin ×
  ``n_conv_per_stage_decoder``, and a 1×1×1 segmentation head per decoder stage;
- deep supervision (training mode only): a list of logits, full resolution first, then coarser ones
  (``n_stages - 1`` entries). In eval mode, or without deep supervision, only the full-resolution logits.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from covnet.planning.memory import validate_network_plan

NORM_EPS = 1e-5
LEAKY_SLOPE = 1e-2


def _padding(kernel_size: Sequence[int]) -> tuple[int, ...]:
    return tuple(k // 2 for k in kernel_size)


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, eps=NORM_EPS, affine=True)


def _nonlin() -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)


class ConvNormNonlin(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int] = (1, 1, 1)):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, tuple(kernel_size), tuple(stride), _padding(kernel_size)),
            _norm(out_channels),
            _nonlin(),
        )


class ResidualBasicBlock(nn.Module):
    """conv-norm-nonlin-conv-norm, plus a skip (1×1×1 strided conv + norm if the shape changes), then nonlin."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int] = (1, 1, 1)):
        super().__init__()
        self.conv_norm_nonlin = ConvNormNonlin(in_channels, out_channels, kernel_size, stride)
        self.conv = nn.Conv3d(out_channels, out_channels, tuple(kernel_size), 1, _padding(kernel_size))
        self.norm = _norm(out_channels)
        if in_channels != out_channels or any(s != 1 for s in stride):
            self.skip = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, tuple(stride), bias=False),
                                      _norm(out_channels))
        else:
            self.skip = nn.Identity()
        self.nonlin = _nonlin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.norm(self.conv(self.conv_norm_nonlin(x)))
        return self.nonlin(residual + self.skip(x))


class DecoderStage(nn.Module):
    """Upsample ``below`` to the skip's resolution, concatenate, convolve, and predict logits."""

    def __init__(self, below_channels: int, skip_channels: int, upsampling: Sequence[int],
                 kernel_size: Sequence[int], n_convs: int, num_classes: int):
        super().__init__()
        self.up = nn.ConvTranspose3d(below_channels, skip_channels, tuple(upsampling), tuple(upsampling))
        self.convs = nn.Sequential(*[
            ConvNormNonlin(2 * skip_channels if i == 0 else skip_channels, skip_channels, kernel_size)
            for i in range(n_convs)
        ])
        self.seg_head = nn.Conv3d(skip_channels, num_classes, 1)

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat((self.up(below), skip), dim=1))


class ResidualEncoderUNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: Sequence[int], n_conv_per_stage_decoder: Sequence[int],
                 deep_supervision: bool = True):
        super().__init__()
        validate_network_plan({
            "features_per_stage": features_per_stage, "kernel_sizes": kernel_sizes, "strides": strides,
            "n_blocks_per_stage": n_blocks_per_stage, "n_conv_per_stage_decoder": n_conv_per_stage_decoder,
            "deep_supervision": deep_supervision,
        })
        n_stages = len(features_per_stage)
        self.deep_supervision = bool(deep_supervision)

        self.stem = ConvNormNonlin(in_channels, features_per_stage[0], kernel_sizes[0])
        self.encoder = nn.ModuleList()
        channels = features_per_stage[0]
        for stage in range(n_stages):
            out_channels = features_per_stage[stage]
            blocks = [ResidualBasicBlock(channels, out_channels, kernel_sizes[stage], strides[stage])]
            blocks += [ResidualBasicBlock(out_channels, out_channels, kernel_sizes[stage])
                       for _ in range(n_blocks_per_stage[stage] - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            channels = out_channels

        # decoder[j] brings stage (n_stages - 1 - j) up to stage (n_stages - 2 - j): coarsest first
        self.decoder = nn.ModuleList()
        for j in range(n_stages - 1):
            below, target = n_stages - 1 - j, n_stages - 2 - j
            self.decoder.append(DecoderStage(
                features_per_stage[below], features_per_stage[target], strides[below],
                kernel_sizes[target], n_conv_per_stage_decoder[j], num_classes))
        self.apply(init_weights_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        x = self.stem(x)
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        with_deep_supervision = self.deep_supervision and self.training
        logits = []
        for j, decoder_stage in enumerate(self.decoder):
            x = decoder_stage(x, skips[-(j + 2)])
            if with_deep_supervision or j == len(self.decoder) - 1:
                logits.append(decoder_stage.seg_head(x))
        if not with_deep_supervision:
            return logits[-1]
        return logits[::-1]


def init_weights_he(module: nn.Module) -> None:
    """He (kaiming normal) init for conv weights with the LeakyReLU slope, zero biases."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_network(network_plan: dict, in_channels: int, num_classes: int) -> ResidualEncoderUNet:
    """The network described by the ``network`` entry of plans.json."""
    validate_network_plan(network_plan)
    return ResidualEncoderUNet(
        in_channels=in_channels,
        num_classes=num_classes,
        features_per_stage=network_plan["features_per_stage"],
        kernel_sizes=network_plan["kernel_sizes"],
        strides=network_plan["strides"],
        n_blocks_per_stage=network_plan["n_blocks_per_stage"],
        n_conv_per_stage_decoder=network_plan["n_conv_per_stage_decoder"],
        deep_supervision=network_plan.get("deep_supervision", True),
    )
