"""Linear layers that decode on the CPU with their weight prepacked for oneDNN (exact mode's CPU fast path).

PyTorch's ``F.linear`` on the CPU runs MKL's GEMM on the weight as stored, at every call. Beam search calls
each decoder Linear once per step with a few dozen rows, where PyTorch's oneDNN kernel with the weight
reordered once into its blocked layout (``torch.ops.mkldnn``, what torch.compile's CPU backend uses for frozen
weights) is faster; the benchmark's "b2t unpacked" row measures the difference (benchmarks/RESULTS.md). The
results differ from MKL's only in the rounding of float32 sums (tests/test_fast_paths.py holds them to 1e-5).

Applied when fairseq prepares a loaded model for inference (``prepare_for_inference_``, see decoding.py), to every
plain ``nn.Linear`` of the model; checkpoints, training and state dicts never see it. A packed layer uses its
packed weight only where the kernel applies (CPU, float32, no gradients) and fairseq's Linear everywhere else
(a GPU, half precision, training), and repacks when its weight changes. ``B2T_PACKED_LINEARS`` in the
environment switches it: 0/false/off/no (any case) off, 1/true/on/yes on (the default); it is read when a model
is prepared (off: nothing is packed) and at every call (off: fairseq's Linear).
"""
import logging
import os

import torch
from torch import nn

from b2t_fairseq.fast_paths.classes import swap_class
from b2t_fairseq.fast_paths.switches import switched_on

logger = logging.getLogger(__name__)

SWITCH = "B2T_PACKED_LINEARS"


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packing_switched_on() -> bool:
    """What B2T_PACKED_LINEARS says (on when unset)."""
    return switched_on(SWITCH, "the packed CPU Linear layers")


def packing_enabled() -> bool:
    return packing_switched_on() and packing_available()


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose CPU float32 inference multiplies with a oneDNN-packed copy of the weight."""

    _packed = None
    _packed_of = None

    def forward(self, x):
        if (
            torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")  # autocast picks the dtype of F.linear: leave it to do so
            or not packing_enabled()
        ):
            return super().forward(x)
        # the weight's storage and version counter: any in-place update (an optimizer step, load_state_dict)
        # or a new tensor makes the packed copy stale
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed_of != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            self._packed_of = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


def pack_linears(model) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a :class:`PackedLinear`, and put one under every method's own
    Linear class (in place; parameters, their names and values unchanged); returns how many. int8 layers are left
    alone."""
    if not packing_switched_on():
        logger.info(f"{SWITCH}={os.environ[SWITCH]}: CPU Linear layers are not packed")
        return 0
    if not packing_available():
        logger.info("oneDNN is not available in this torch build: CPU Linear layers are not packed")
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
            count += 1
        elif type(module).__module__ == METHOD_CLASSES and isinstance(module, nn.Linear):
            # a method's own Linear class (Sub-LN's input-normed, HybridNorm's head-normed projections): its steps
            # stay, the product its forward reaches through super().forward is the packed one
            swap_class(module, (type(module), PackedLinear), f"Packed{type(module).__name__}")
            count += 1
    return count


METHOD_CLASSES = "b2t_fairseq.modules.connections"
