"""OpenVINO for the network's passes on a CPU: the same network, converted from torch, 1.5× faster in bfloat16.

Why: on a CPU nearly all of covnet_predict's time is the network (BENCHMARKS.md, "Fast prediction on the CPU").
OpenVINO (Intel's inference runtime, an optional dependency: ``pip install 'covnet[openvino]'``) ran one batch
of the CPU plan's windows in 0.052 s where torch's bfloat16 autocast took 0.079 s, with the same argmax as
torch to within bfloat16's own disagreement with float32 (benchmarks/cpu_runtimes.py; ONNX Runtime was slower
than torch). ``auto`` uses it on a CPU when the package is installed; torch otherwise, and always on a GPU.

How: :class:`OpenVinoNetwork` converts the network with its weights (``openvino.convert_model``, a few seconds)
once per checkpoint, kept in covnet's cache (:mod:`covnet.inference.openvino_cache`, which also keeps OpenVINO's
telemetry off), and compiles it for each window shape (the lung box can clamp the window; the last, partial batch
is padded to a full one), keeping the last few, in bfloat16 where the CPU computes it natively and autocast is
on, else float32.
"""
from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from covnet.inference.openvino_cache import load_or_convert, openvino_without_telemetry
from covnet.runtime.errors import CovnetError

AUTO, TORCH, OPENVINO = "auto", "torch", "openvino"
RUNTIMES = (AUTO, TORCH, OPENVINO)
KEPT_SHAPES = 4      # compiled input shapes kept per model


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``torch`` or ``openvino`` for ``runtime`` on ``device``; a one-line error when OpenVINO cannot run."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    on_cpu = torch.device(device).type == "cpu"
    if runtime == AUTO:
        return OPENVINO if on_cpu and openvino_installed() else TORCH
    if runtime == OPENVINO and not on_cpu:
        raise CovnetError(None, f"the openvino runtime runs on a CPU, not on {device}: use --runtime torch")
    if runtime == OPENVINO and not openvino_installed():
        raise CovnetError(None, "the openvino runtime needs the openvino package: pip install 'covnet[openvino]'")
    return runtime


def weights_sha256(network: torch.nn.Module) -> str:
    """SHA-256 of the weights ``network`` holds (each state entry's name, type, shape and bytes, in order). The
    weights in memory, not the checkpoint file: the very weights converted, whatever happened to the file since."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class FullResolution(torch.nn.Module):
    """The network's full-resolution logits only (the first output under deep supervision)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x):
        output = self.network(x)
        return output[0] if isinstance(output, (list, tuple)) else output


class OpenVinoNetwork:
    """``network`` (in eval mode, with the weights to use) as an OpenVINO model: called with a (B, C, z, y, x)
    float32 CPU tensor, it returns the full-resolution logits as a float32 tensor.

    ``topology``: the network's topology as JSON (the plan's); with it the conversion is read from, or saved to, the
    cache in ``cache_dir`` (default: covnet's), keyed by the topology, the weights (:func:`weights_sha256`) and the
    input's shape; without it the network is converted in memory."""

    def __init__(self, network: torch.nn.Module, example: torch.Tensor, *, bfloat16: bool, threads: int,
                 topology: Mapping | None = None, cache_dir: Path | None = None):
        openvino = openvino_without_telemetry()
        self._core = openvino.Core()

        def convert():
            # Conversion traces the network; the tracer warns of Python branches on shapes, which take the same way
            # for every window (the channels never change).
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return openvino.convert_model(FullResolution(network).eval(), example_input=example)

        if topology is None:
            self._model = convert()
        else:
            parts = {"weights_sha256": weights_sha256(network), "topology": topology, "input": list(example.shape),
                     "torch": torch.__version__}
            self._model = load_or_convert(self._core, parts, convert, cache_dir=cache_dir)
        self._config = {"INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32", "INFERENCE_NUM_THREADS": threads}
        self._batch = int(example.shape[0])
        self._requests: OrderedDict[tuple, object] = OrderedDict()     # the most recently used shapes last

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        count = int(batch.shape[0])
        if count < self._batch:     # a last, partial batch is padded: it needs no compiled model of its own
            batch = torch.cat([batch, batch.new_zeros((self._batch - count, *batch.shape[1:]))])
        shape = tuple(batch.shape)
        request = self._requests.pop(shape, None)
        if request is None:
            model = self._model.clone()
            model.reshape(list(shape))              # a static shape compiles to faster code than a dynamic one
            request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
        self._requests[shape] = request
        while len(self._requests) > KEPT_SHAPES:     # windows follow each case's lung box: keep a few, not all
            self._requests.popitem(last=False)
        result = request.infer({0: np.ascontiguousarray(batch.numpy(), dtype=np.float32)})
        return torch.from_numpy(np.array(result[0][:count], dtype=np.float32))
