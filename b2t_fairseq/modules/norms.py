"""The norm types (``--norm-type``), orthogonal to the method: every norm a model builds is of the chosen type.

    layernorm  fairseq's LayerNorm (the default; state dicts unchanged)
    rmsnorm    x / sqrt(mean(x^2) + eps) * weight                     (eps as LayerNorm's, 1e-5; as torch.nn.RMSNorm)
    dyt        weight * tanh(alpha * x) + bias, alpha a learnable scalar     (Zhu et al., CVPR 2025: Dynamic Tanh)
    derf       weight * erf(alpha * x + shift) + bias, alpha, shift scalars  (Chen et al.: Dynamic erf)

alpha starts at ``--dyt-alpha-init`` (0.5, DyT's default for models other than LLMs, and x-transformers' Derf
default), shift at 0, weight at 1, bias at 0. :func:`norm_factory` is the one place that builds a norm: the methods'
own norms come from it, and the norms fairseq's layers and stacks build themselves are swapped for its module
under their own names (:func:`adopt_norm_type`), so keys stay fairseq's (``self_attn_layer_norm.weight``).
"""
import torch
from torch import nn

NORM_TYPES = ("layernorm", "rmsnorm", "dyt", "derf")
DEFAULT_ALPHA = 0.5


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # the mean of squares in float32 at least
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

    def extra_repr(self):
        return f"{self.weight.numel()}, eps={self.eps}"


class DynamicTanh(nn.Module):
    def __init__(self, dim, alpha=DEFAULT_ALPHA):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return torch.tanh(self.alpha * x) * self.weight + self.bias


class DynamicErf(nn.Module):
    def __init__(self, dim, alpha=DEFAULT_ALPHA):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))
        self.shift = nn.Parameter(torch.zeros(1))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return torch.erf(self.alpha * x + self.shift) * self.weight + self.bias


def norm_factory(cfg):
    """``build(dim, eps=1e-5)``: a norm of the type ``cfg`` (a model config) names."""
    from fairseq.modules import LayerNorm

    norm_type = getattr(cfg, "norm_type", None) or "layernorm"
    alpha = getattr(cfg, "dyt_alpha_init", None)
    alpha = DEFAULT_ALPHA if alpha is None else float(alpha)

    def build(dim, eps=1e-5):
        if norm_type == "rmsnorm":
            return RMSNorm(dim, eps)
        if norm_type == "dyt":
            return DynamicTanh(dim, alpha)
        if norm_type == "derf":
            return DynamicErf(dim, alpha)
        return LayerNorm(dim, eps=eps)

    build.norm_type = norm_type
    return build


def adopt_norm_type(module, cfg):
    """Swap the layer norms that fairseq built as direct children of ``module`` (a layer or a stack) for the
    factory's, under the same names. Nothing to do for ``layernorm``."""
    build = norm_factory(cfg)
    if build.norm_type == "layernorm":
        return
    for name, child in list(module.named_children()):
        if isinstance(child, nn.LayerNorm) or type(child).__name__ == "FusedLayerNorm":  # fairseq's, with apex
            setattr(module, name, build(child.normalized_shape[-1], child.eps))
