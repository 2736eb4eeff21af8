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

AMP mode (``amp=True``, what a CUDA plan uses: training under autocast): conv outputs, norm outputs and most
saved maps are 16-bit, while weights, gradients and momentum stay float32 and autocast caches a 16-bit copy of
each weight for the step, so

    total = (3 × 4 + HALF_WEIGHT_BYTES) bytes × parameters
          + CALIBRATED_BYTES_PER_ACTIVATION_AMP × batch_size × estimate_activation_elements(...)

with the same element count. The constant was fitted the same way (``calibrate_memory.py --amp``, same 10
configurations, same machine) under ``torch.autocast("cpu", dtype=torch.bfloat16)``; the numbers are in
BENCHMARKS.md "AMP memory model (bf16 on CPU)". On CPU, softmax stays bf16 where CUDA autocast computes it in
float32, and the CUDA caching allocator and cuDNN workspaces come on top; the CUDA path of the script
(``--device cuda [--amp]``: torch.cuda.max_memory_allocated growth, fp16 + GradScaler) exists but was not
run, as this machine has no GPU. Re-fit on the GPU before trusting the AMP constant to the last few percent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from covnet.network.topology import Topology, is_positive_int
from covnet.runtime.errors import CovnetError

FLOAT32_BYTES = 4
# weights + gradients + SGD momentum buffer, each float32
PARAMETER_COPIES = 3
LOSS_MAPS_PER_LOGIT = 4
# bytes per counted activation element, float32, fitted by benchmarks/calibrate_memory.py (see above)
CALIBRATED_BYTES_PER_ACTIVATION = 4.78
# the same under autocast (bf16 on CPU), fitted by benchmarks/calibrate_memory.py --amp (see above)
CALIBRATED_BYTES_PER_ACTIVATION_AMP = 2.49
# autocast's cached 16-bit copy of every weight, alive from the forward until backward has used it
HALF_WEIGHT_BYTES = 2


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


def estimate_training_memory(patch_size: Sequence[int], batch_size: int, topology: Topology,
                             amp: bool = False) -> TrainingMemoryEstimate:
    """Float32 training, or with ``amp`` mixed-precision training under autocast (module docstring)."""
    if not is_positive_int(batch_size):
        raise CovnetError(None, f"memory estimate for the network plan: batch size must be a positive integer, "
                                f"got {batch_size}")
    elements = estimate_activation_elements(patch_size, topology)
    per_parameter = PARAMETER_COPIES * FLOAT32_BYTES + (HALF_WEIGHT_BYTES if amp else 0)
    per_element = CALIBRATED_BYTES_PER_ACTIVATION_AMP if amp else CALIBRATED_BYTES_PER_ACTIVATION
    return TrainingMemoryEstimate(
        parameter_bytes=per_parameter * topology.parameter_count(),
        activation_bytes=round(per_element * batch_size * elements),
    )


def estimate_training_memory_bytes(patch_size: Sequence[int], batch_size: int, topology: Topology,
                                   amp: bool = False) -> int:
    """Estimated peak training memory in bytes, float32 or ``amp`` (see the module docstring for the model)."""
    return estimate_training_memory(patch_size, batch_size, topology, amp).total_bytes
