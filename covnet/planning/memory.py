"""Peak training-memory estimate for the residual-encoder UNet (``covnet.network.unet``).

Pure arithmetic on a ``covnet.network.topology.Topology``: planning must not import torch or training code.

Model (float32, one forward + backward + SGD-with-momentum step):

    total = 3 × 4 bytes × Topology.parameter_count()        (weights, gradients, momentum)
          + CALIBRATED_BYTES_PER_ACTIVATION × batch_size × estimate_activation_elements(...)

``estimate_activation_elements`` is ``Topology.saved_activation_elements`` with LOSS_MAPS_PER_LOGIT maps of
``num_classes`` channels per returned logits tensor (logits, log-softmax of the cross-entropy, softmax and
one-hot target of the Dice); that method's docstring lists what is counted per layer. The count was checked
against the tensors torch's ``saved_tensors_hooks`` sees (benchmarks/calibrate_memory.py prints both). What
autograd keeps is not the whole peak: gradients of activations and conv workspaces are alive at the same
time, which is what the calibrated constant (> 4 bytes) absorbs.

Calibration (benchmarks/calibrate_memory.py, table in BENCHMARKS.md "Network memory calibration"):
CALIBRATED_BYTES_PER_ACTIVATION = 4.78, the least-squares fit through the origin of measured activation
memory against batch_size × estimate_activation_elements over 10 configurations (4 topologies: isotropic
4-stage, anisotropic 5-stage, 4-stage without deep supervision, the nnU-Net-sized 6-stage [32..320] one;
0.3–3.0 GB), max relative error 4.7% (ratios 4.57–4.94 bytes/element). Measured 2026-11-26 on CPU (2-core
AMD EPYC, 24 GiB, torch 2.13.0+cpu, oneDNN convolutions), each configuration in a fresh process: resident-set
growth (VmHWM after clearing it, minus /proc/self/statm before the step) of one forward + Dice/CE loss +
backward + SGD step, parameter gradients and momentum allocated beforehand, glibc mmap threshold fixed so
freed tensors leave the resident set (an earlier run with glibc's default and a larger warm-up step
scattered 4.2–6.6 bytes/element, max error 25%). The hook-counted saved tensors matched
estimate_activation_elements within 0.04% in every configuration.

Not measured: the CUDA path of the script (``--device cuda``: torch.cuda.max_memory_allocated growth, float32
and fp16 autocast) exists but was not run, as this machine has no GPU. With AMP on a GPU, conv outputs are
kept in half precision, so the bytes per element should come out lower (expected, not measured: roughly 2–3
instead of 4.78, as norms and the loss may keep float32 copies), while cuDNN workspaces and the caching
allocator's reserve come on top of max_memory_allocated; parameters, gradients and momentum stay float32.
Until the script is run on a GPU, this float32 CPU constant is a conservative choice for AMP training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from covnet.errors import CovnetError
from covnet.network.topology import Topology, is_positive_int

FLOAT32_BYTES = 4
# weights + gradients + SGD momentum buffer, each float32
PARAMETER_COPIES = 3
LOSS_MAPS_PER_LOGIT = 4
# bytes per counted activation element, float32, fitted by benchmarks/calibrate_memory.py (see above)
CALIBRATED_BYTES_PER_ACTIVATION = 4.78


def estimate_activation_elements(patch_size: Sequence[int], topology: Topology) -> int:
    """Elements of the feature maps kept for backward, for ONE sample (multiply by the batch size)."""
    return topology.saved_activation_elements(patch_size, LOSS_MAPS_PER_LOGIT)


@dataclass(frozen=True)
class TrainingMemoryEstimate:
    parameter_bytes: int  # weights + gradients + momentum
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.activation_bytes


def estimate_training_memory(patch_size: Sequence[int], batch_size: int, topology: Topology) -> TrainingMemoryEstimate:
    if not is_positive_int(batch_size):
        raise CovnetError(None, f"memory estimate for the network plan: batch size must be a positive integer, "
                                f"got {batch_size}")
    elements = estimate_activation_elements(patch_size, topology)
    return TrainingMemoryEstimate(
        parameter_bytes=PARAMETER_COPIES * FLOAT32_BYTES * topology.parameter_count(),
        activation_bytes=round(CALIBRATED_BYTES_PER_ACTIVATION * batch_size * elements),
    )


def estimate_training_memory_bytes(patch_size: Sequence[int], batch_size: int, topology: Topology) -> int:
    """Estimated peak float32 training memory in bytes (see the module docstring for the model)."""
    return estimate_training_memory(patch_size, batch_size, topology).total_bytes
