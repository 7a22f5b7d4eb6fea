"""``--int8-decoding {decoder,all}``: dynamic int8 quantization (torch.ao) of Linear layers for CPU decoding.

Applied when fairseq prepares a loaded model for inference (``prepare_for_inference_``: fairseq-generate,
fairseq-interactive, fairseq-eval-lm, the hub interface), so checkpoints keep their float32 weights and training
never sees it. Switch it on for a trained model with ``--model-overrides "{'int8_decoding': 'decoder'}"``.

``decoder`` quantizes every Linear of the decoder's layers and its output projection: the parts run once per
beam and step. ``all`` adds the encoder's layers, which run once per sentence. Activations are quantized per batch
on the fly (dynamic quantization), weights per output channel. fairseq's attention hands its projection weights to
PyTorch's fused kernel in full-sequence self-attention; quantized projections have no weight tensor to hand over,
so their attention modules take fairseq's own path (the one incremental decoding always takes).
"""
import logging

import torch
from torch import nn

from b2t_fairseq.errors import B2TConfigError

SCOPES = ("none", "decoder", "all")
logger = logging.getLogger(__name__)


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
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    targets = {"decoder.layers": per_channel_dynamic_qconfig}
    if isinstance(getattr(model.decoder, "output_projection", None), nn.Linear):
        targets["decoder.output_projection"] = per_channel_dynamic_qconfig
    if scope == "all" and getattr(getattr(model, "encoder", None), "layers", None) is not None:
        targets["encoder.layers"] = per_channel_dynamic_qconfig
    quantize_dynamic(model, qconfig_spec=targets, dtype=torch.qint8, inplace=True)
    from fairseq.modules import MultiheadAttention

    for name in targets:
        for module in model.get_submodule(name).modules():
            if isinstance(module, MultiheadAttention):
                module.skip_embed_dim_check = True  # keeps it off the fused path that needs weight tensors
    count = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
    logger.info(f"--int8-decoding {scope}: {count} Linear layers quantized to int8 ({', '.join(targets)})")
    return model


class Int8Decoding:
    """Mixin of our models: apply ``--int8-decoding`` after fairseq's own inference preparation."""

    def prepare_for_inference_(self, cfg):
        super().prepare_for_inference_(cfg)
        quantize_for_cpu_decoding(self, getattr(self, "b2t_int8_decoding", "none"))
