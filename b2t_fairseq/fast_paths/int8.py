"""``--int8-decoding {decoder,all}``: dynamic int8 quantization (torch.ao) of Linear layers for CPU decoding.

Applied when fairseq prepares a loaded model for inference (``prepare_for_inference_``: fairseq-generate,
fairseq-interactive, fairseq-eval-lm, the hub interface), so checkpoints keep their float32 weights and training
never sees it. Switch it on for a trained model with ``--model-overrides "{'int8_decoding': 'decoder'}"``.

``decoder`` quantizes the Linear layers of the decoder's layers and its output projection: the parts run once per
beam and step. ``all`` adds the encoder's layers,
which run once per sentence. Activations are quantized per batch
on the fly (dynamic quantization: one scale per batch, 8 bits on CPUs with VNNI, 7 elsewhere), weights per
output channel. fairseq's attention hands its projection weights to
PyTorch's fused kernel in full-sequence self-attention; quantized projections have no weight tensor to hand over,
so their attention modules take fairseq's own path (the one incremental decoding always takes).
"""
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from b2t_fairseq.fast_paths.classes import swap_class
from b2t_fairseq.safety.errors import B2TConfigError

SCOPES = ("none", "decoder", "all")
# Linear layers left in float32, by name ending: none. Until 2026-12-06 the attention's queries and keys were (their
# error passes through the softmax; with 7-bit activations quantizing them cost 1.1 BLEU on the demo's toy model);
# with 8-bit activations (full_range_activations) experiments/int8_decoding.py measured them (benchmarks/RESULTS.md).
KEEP_FLOAT = ()
logger = logging.getLogger(__name__)


def full_range_activations() -> bool:
    """Whether this CPU multiplies int8 with VNNI instructions (``avx512_vnni`` or ``avx_vnni``), which accumulate
    in 32 bits. torch's dynamic Linear always quantizes activations to 7 bits (``reduce_range``), which only
    CPUs without VNNI need (their 16-bit pairwise sums can saturate with 8-bit activations); with VNNI the
    eighth bit halves the quantization error at the same speed (tests/test_int8.py checks the error)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# the annotation is a string so that importing this module never asks torch for its quantized classes
def _int8_product(x: Tensor, packed: "torch.classes.quantized.LinearPackedParamsBase", reduce_range: bool) -> Tensor:
    return torch.ops.quantized.linear_dynamic(x, packed, reduce_range).to(x.dtype)


def _compiled_product():
    """``_int8_product`` as a TorchScript function. Handing torch's packed int8 weights (a TorchScript class object)
    from Python to an operator costs a fixed amount per call, whichever way the operator is called (its overload
    packet, the overload, even the object's own ``unpack``); through a TorchScript function the call costs about
    10 microseconds less (benchmarks/bench_decoding_ops.py: 20.8 -> 7.8 us for 16 tokens at width 64, 36.1 -> 26.6
    at width 512; RESULTS.md). It is the same operator on the same arguments, so the same numbers
    (tests/test_int8.py). torch marks TorchScript
    deprecated: where ``torch.jit.script`` is gone or fails, the product is called from Python as before."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(_int8_product)
    except Exception as error:  # a torch without TorchScript: the same product, called from Python
        logger.info(f"int8 products are called from Python (TorchScript unavailable: {error})")
        return _int8_product


int8_product = _compiled_product()


class Int8Linear(torch.ao.nn.quantized.dynamic.Linear):
    """torch's dynamic int8 Linear (activations quantized to 7 bits, torch's ``reduce_range``), its product called
    through ``int8_product``."""

    reduce_range = True

    def forward(self, x):
        return int8_product(x, self._packed_params._packed_params, self.reduce_range)


class FullRangeLinear(Int8Linear):
    """Activations quantized to the full 8 bits (see full_range_activations)."""

    reduce_range = False


def quantize_for_cpu_decoding(model, scope):
    """Quantize ``model``'s Linear layers in place for ``scope`` ('none', 'decoder', 'all'); returns the model."""
    if scope in (None, "", "none"):
        return model
    if scope not in SCOPES:
        raise B2TConfigError(f"--int8-decoding {scope}: choose one of {', '.join(SCOPES)}")
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype != torch.float32:
        raise B2TConfigError(
            f"--int8-decoding runs on the CPU in float32 (torch's dynamic int8 kernels), but the model is "
            f"{first.dtype} on {first.device}; decode with --cpu and without --fp16/--bf16, or drop it"
        )
    from fairseq.modules import MultiheadAttention
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    stacks = ["decoder"] + (["encoder"] if scope == "all" and getattr(model, "encoder", None) is not None else [])
    # found by identity, not by name: a stack may register its layers under another name (the speech encoder's
    # are fairseq's ``transformer_layers``)
    inside = {id(module) for stack in stacks for module in model.get_submodule(f"{stack}.layers").modules()}
    targets = [
        name
        for name, module in model.named_modules()
        if id(module) in inside and isinstance(module, nn.Linear) and not name.endswith(KEEP_FLOAT)
    ]
    if isinstance(getattr(model.decoder, "output_projection", None), nn.Linear):
        targets.append("decoder.output_projection")
    quantize_dynamic(model, qconfig_spec=dict.fromkeys(targets, per_channel_dynamic_qconfig), dtype=torch.qint8,
                     inplace=True)  # fmt: skip
    # what quantize_dynamic converted: the plain Linear layers; a method's own Linear classes (Sub-LN's input-normed,
    # HybridNorm's head-normed projections) keep their class and get an int8 product under it
    modules = list(map(model.get_submodule, targets))
    quantized = [m for m in modules if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    full_range = full_range_activations()
    for module in quantized:
        module.__class__ = FullRangeLinear if full_range else Int8Linear
    for module in modules:
        if type(module) is not nn.Linear and isinstance(module, nn.Linear):
            _int8_product_under(module, per_channel_dynamic_qconfig, full_range)
            quantized.append(module)
    fused = fuse_self_attention_projections(model.decoder)
    for stack in stacks:
        for module in model.get_submodule(f"{stack}.layers").modules():
            if isinstance(module, MultiheadAttention):
                module.skip_embed_dim_check = True  # keeps it off the fused path that needs weight tensors
    logger.info(f"--int8-decoding {scope}: {len(quantized)} Linear layers quantized to int8, activations to "
                f"{8 if full_range else 7} bits; {fused} decoder self-attention query/key/value projections fused")
    return model


class Int8Product(nn.Linear):
    """The ``nn.Linear.forward`` that a method's own Linear class reaches through ``super().forward`` (after its
    input norm, before its head norm): the int8 product of ``b2t_int8``, the packed weight."""

    def forward(self, x):
        return int8_product(x, self.b2t_int8, not self.b2t_full_range)


def _int8_product_under(module, qconfig, full_range):
    """Give ``module`` (a subclass of nn.Linear whose forward calls ``super().forward``) an int8 product: its class
    becomes (its class, Int8Product), so its own steps stay and the product under them is int8."""
    from torch.ao.quantization import quantize_dynamic

    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    plain.weight, plain.bias = module.weight, module.bias
    module.b2t_int8 = quantize_dynamic(nn.Sequential(plain), {nn.Linear: qconfig})[0]._packed_params._packed_params
    module.b2t_full_range = full_range
    swap_class(module, (type(module), Int8Product), f"Int8{type(module).__name__}")


class FusedProjections:
    """A self-attention's int8 query, key and value projections as one product (``b2t_qkv`` of the attention
    module, used by kv_cache.CachedSelfAttention): their weights side by side, each row with its own scale as
    before, and one activation scale for the input they share, so the integer sums and every output are those of
    the three products (tests/test_int8.py checks equality)."""

    def __init__(self, projections, reduce_range):
        weights = [m.weight() for m in projections]
        weight = torch._make_per_channel_quantized_tensor(
            torch.cat([w.int_repr() for w in weights]), torch.cat([w.q_per_channel_scales() for w in weights]),
            torch.cat([w.q_per_channel_zero_points() for w in weights]), 0,
        )  # fmt: skip
        biases = [m.bias() for m in projections]
        bias = None if any(b is None for b in biases) else torch.cat(biases)
        self.packed = torch.ops.quantized.linear_prepack(weight, bias)
        self.reduce_range = reduce_range

    def __call__(self, x):
        return int8_product(x, self.packed, self.reduce_range).chunk(3, dim=-1)


def fuse_self_attention_projections(decoder) -> int:
    """Give every self-attention of ``decoder`` whose query, key and value projections are all int8 Linear layers
    of one kind (not a method's normed projections) a :class:`FusedProjections`; returns how many."""
    from fairseq.modules import MultiheadAttention

    count = 0
    for module in decoder.modules():
        if isinstance(module, MultiheadAttention) and module.self_attention:
            projections = (module.q_proj, module.k_proj, module.v_proj)
            kinds = {type(m) for m in projections}
            if len(kinds) == 1 and kinds <= {FullRangeLinear, Int8Linear}:
                module.b2t_qkv = FusedProjections(projections, reduce_range=kinds.pop().reduce_range)
                count += 1
    return count
