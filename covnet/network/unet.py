"""The network covnet trains, in torch: a 3D UNet with a residual encoder, as in nnU-Net's ResEnc UNet.

Built from a ``covnet.network.topology.Topology`` (the ``network`` entry of plans.json), whose module
docstring describes the layout; this module only turns its layer layouts into torch modules.
Tensors are (batch, channel, z, y, x).

Output: in training mode with deep supervision, a list of logits, one per decoder stage, finest (input
resolution) first, shaped as ``Topology.logit_shapes`` predicts; in eval mode, or without deep
supervision, only the input-resolution logits.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from covnet.network.topology import DecoderStageLayout, ResidualBlockLayout, Topology

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

    def __init__(self, layout: ResidualBlockLayout):
        super().__init__()
        c_in, c_out, kernel, stride = layout.in_channels, layout.out_channels, layout.kernel_size, layout.stride
        self.conv_norm_nonlin = ConvNormNonlin(c_in, c_out, kernel, stride)
        self.conv = nn.Conv3d(c_out, c_out, tuple(kernel), 1, _padding(kernel))
        self.norm = _norm(c_out)
        if layout.has_projection:
            self.skip = nn.Sequential(nn.Conv3d(c_in, c_out, 1, tuple(stride), bias=False), _norm(c_out))
        else:
            self.skip = nn.Identity()
        self.nonlin = _nonlin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.norm(self.conv(self.conv_norm_nonlin(x)))
        return self.nonlin(residual + self.skip(x))


class DecoderStage(nn.Module):
    """Upsample ``below`` to the skip's resolution, concatenate, convolve; ``seg_head`` predicts logits."""

    def __init__(self, layout: DecoderStageLayout, num_classes: int):
        super().__init__()
        channels = layout.channels
        self.up = nn.ConvTranspose3d(layout.below_channels, channels, tuple(layout.upsampling),
                                     tuple(layout.upsampling))
        self.convs = nn.Sequential(*[
            ConvNormNonlin(2 * channels if i == 0 else channels, channels, layout.kernel_size)
            for i in range(layout.n_convs)
        ])
        self.seg_head = nn.Conv3d(channels, num_classes, 1)

    def forward(self, below: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat((self.up(below), skip), dim=1))


class ResidualEncoderUNet(nn.Module):
    def __init__(self, topology: Topology):
        super().__init__()
        if not isinstance(topology, Topology):
            raise TypeError(f"expected a Topology, got {type(topology).__name__}")
        self.topology = topology
        self.deep_supervision = topology.deep_supervision

        self.stem = ConvNormNonlin(topology.in_channels, topology.features_per_stage[0], topology.kernel_sizes[0])
        blocks_per_stage: list[list[nn.Module]] = [[] for _ in range(topology.n_stages)]
        for block in topology.encoder_blocks():
            blocks_per_stage[block.stage].append(ResidualBasicBlock(block))
        self.encoder = nn.ModuleList(nn.Sequential(*blocks) for blocks in blocks_per_stage)
        # coarsest first: decoder[j] brings stage (n_stages - 1 - j) up to stage (n_stages - 2 - j)
        self.decoder = nn.ModuleList(DecoderStage(stage, topology.num_classes) for stage in topology.decoder_stages())
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
