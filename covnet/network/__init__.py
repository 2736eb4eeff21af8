"""covnet's network: ``topology`` describes it (torch-free, used by planning), ``unet`` builds it in torch.

Importing this package does not import torch; import ``covnet.network.unet`` for the torch modules.
"""
from covnet.network.topology import DecoderStageLayout, ResidualBlockLayout, Topology

__all__ = ["DecoderStageLayout", "ResidualBlockLayout", "Topology"]
