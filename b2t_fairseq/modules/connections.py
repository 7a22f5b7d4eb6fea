"""The residual methods: how a Transformer layer wires its sub-layers to the residual stream.

One class per method, each holding its whole difference (METHODS.md has the table with references):

    sublayer(layer, name, x, f, norm)   one sub-layer: ``f`` is attention or FFN (dropout included), ``norm``
                                        the layer norm that belongs to it, ``name`` one of SUBLAYERS
    last_sublayer(..., bottom)          the FFN; ``bottom`` is the raw input of the whole layer (B2T uses it)
    add_parameters(layer, names)        parameters the method adds to a layer (Admin's omega, ReZero's a, ...)
    scale_init(stack, shape)            the method's own initialisation, after fairseq's (``--init-scaling``)

Class attributes say what the stacks must build: ``final_norm`` (one layer norm on top of each stack, which
fairseq keys off ``normalize_before``) and ``layer_norms`` (False: the layers have none at all).

An object is made per stack (:class:`StackShape` gives its side and the depths N and M), so depth-dependent
constants are computed once, in ``__init__``.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

SUBLAYERS = ("self_attn", "encoder_attn", "ffn")
# the layer-norm attribute of each sub-layer in fairseq's layers
NORM_OF = {"self_attn": "self_attn_layer_norm", "encoder_attn": "encoder_attn_layer_norm", "ffn": "final_layer_norm"}


@dataclass(frozen=True)
class StackShape:
    side: str  # "encoder", "decoder" (of an encoder-decoder) or "decoder-only" (language model)
    layers: int  # layers of this stack (N for the encoder, M for a decoder)
    encoder_layers: Optional[int] = None  # N, for an encoder-decoder's decoder and encoder
    decoder_layers: Optional[int] = None  # M, likewise
    embed_dim: int = 0
    options: object = None  # the model's config, for method-specific knobs

    @property
    def residual_sublayers(self):
        return self.layers * (3 if self.side == "decoder" else 2)


def _scale_weights(stack, names, factor):
    """Multiply the ``.weight`` of the listed submodules of every layer of ``stack`` by ``factor``."""
    for layer in stack.layers._modules.values():  # nn.ModuleList's iterator (layerdrop's skips layers)
        for name, module in layer.named_modules():
            if name in names and getattr(module, "weight", None) is not None:
                module.weight.mul_(factor)


# attention value/output projections and FFN matrices: what DeepNet and T-Fixup rescale (q/k are left alone)
VALUE_AND_OUTPUT = (
    "self_attn.v_proj", "self_attn.out_proj", "encoder_attn.v_proj", "encoder_attn.out_proj", "fc1", "fc2",
)


class Connection:
    name = None
    final_norm = False
    layer_norms = True
    # the --init-scaling that `auto` picks for this method
    default_init_scaling = "none"
    # False: the method defines no decoder-only (language model) form
    decoder_only = True

    def __init__(self, shape: StackShape):
        self.shape = shape

    def add_parameters(self, layer, names):
        pass

    def sublayer(self, layer, name, x, f, norm):
        raise NotImplementedError

    def last_sublayer(self, layer, name, x, f, norm, bottom):
        return self.sublayer(layer, name, x, f, norm)

    @classmethod
    def scale_init(cls, stack, shape):
        """The initialisation rule named after this method (``--init-scaling <name>``)."""
        raise NotImplementedError(f"{cls.name} has no initialisation rule of its own")

    def __repr__(self):
        return f"{type(self).__name__}({self.shape.side}, layers={self.shape.layers})"


class PostLN(Connection):
    """h = LN(x + F(x)) — Vaswani et al.; fairseq's default."""

    name = "post-ln"

    def sublayer(self, layer, name, x, f, norm):
        return norm(x + f(x))


class PreLN(Connection):
    """h = x + F(LN(x)) — fairseq's ``--*-normalize-before``."""

    name = "pre-ln"
    final_norm = True

    def sublayer(self, layer, name, x, f, norm):
        return x + f(norm(x))


class B2T(PostLN):
    """Post-LN, plus the layer input ``bottom`` added before the layer's last norm:
    y = LN(x_bottom + h + FFN(h)). The bottom term gets no dropout. Init: N^-1/2 on every non-LN weight
    matrix of each layer (the authors' current code)."""

    name = "b2t"
    default_init_scaling = "depth"

    def last_sublayer(self, layer, name, x, f, norm, bottom):
        return norm(bottom + x + f(x))

    @classmethod
    def scale_init(cls, stack, shape):
        factor = len(stack.layers) ** -0.5
        for layer in stack.layers._modules.values():
            for pname, p in layer.named_parameters():
                if p.dim() >= 2 and "layer_norm" not in pname:
                    p.mul_(factor)
        return factor


class DeepNorm(Connection):
    """DeepNet (Wang et al. 2022): h = LN(alpha * x + F(x)), beta on v/out projections and FFN weights.
    Encoder-decoder: enc alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16); dec alpha = (3M)^(1/4),
    beta = (12M)^(-1/4). Decoder-only: alpha = (2M)^(1/4), beta = (8M)^(-1/4). (torchscale's encoder beta is
    1.15 (N^4 M)^(-1/16); we follow the paper.)"""

    name = "deepnorm"
    default_init_scaling = "deepnorm"

    @staticmethod
    def constants(shape):
        n, m = shape.encoder_layers, shape.decoder_layers
        if shape.side == "encoder":
            return 0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)
        if shape.side == "decoder":
            return (3 * m) ** (1 / 4), (12 * m) ** (-1 / 4)
        return (2 * shape.layers) ** (1 / 4), (8 * shape.layers) ** (-1 / 4)

    def __init__(self, shape):
        super().__init__(shape)
        self.alpha = self.constants(shape)[0]

    def sublayer(self, layer, name, x, f, norm):
        return norm(self.alpha * x + f(x))

    @classmethod
    def scale_init(cls, stack, shape):
        beta = cls.constants(shape)[1]
        _scale_weights(stack, VALUE_AND_OUTPUT, beta)
        return beta


class Admin(Connection):
    """Admin (Liu et al. 2020), admin-torch's closed form: h = LN(omega * x + F(x)), omega a learnable vector
    per sub-layer (``<sublayer>_omega``), initialised to sqrt((n+1)/ln(n+1) - 1) with n residual sub-layers in
    the stack (2N encoder, 3M decoder, 2M decoder-only); ``--admin-output-change`` picks admin-torch's other
    forms (O(n): 1, O(1): sqrt(n))."""

    name = "admin"

    @staticmethod
    def omega(n, output_change="O(logn)"):
        if output_change == "O(n)":
            return 1.0
        if output_change == "O(1)":
            return math.sqrt(n)
        return math.sqrt((n + 1) / math.log(n + 1) - 1)

    def add_parameters(self, layer, names):
        change = getattr(self.shape.options, "admin_output_change", None) or "O(logn)"
        value = self.omega(self.shape.residual_sublayers, change)
        for name in names:
            setattr(layer, f"{name}_omega", nn.Parameter(torch.full((self.shape.embed_dim,), value)))

    def sublayer(self, layer, name, x, f, norm):
        return norm(getattr(layer, f"{name}_omega") * x + f(x))


class TFixup(Connection):
    """T-Fixup (Huang et al. 2020): h = x + F(x), no layer norm anywhere, trained without warmup.
    Init: encoder v/out projections and FFN weights times 0.67 N^(-1/4), decoder's (self and cross) times
    (9M)^(-1/4); v_proj also times sqrt(2), undoing fairseq's xavier gain 1/sqrt(2) as the reference does;
    input embeddings times (9N)^(-1/4) (encoder) and (9M)^(-1/4) (decoder; once only when shared)."""

    name = "tfixup"
    layer_norms = False
    default_init_scaling = "tfixup"
    decoder_only = False

    def sublayer(self, layer, name, x, f, norm):
        return x + f(x)

    @staticmethod
    def constants(shape):
        n, m = shape.encoder_layers, shape.decoder_layers
        if shape.side == "encoder":
            return 0.67 * n ** (-1 / 4), (9 * n) ** (-1 / 4)
        return (9 * m) ** (-1 / 4), (9 * m) ** (-1 / 4)

    @classmethod
    def scale_init(cls, stack, shape):
        beta, embed = cls.constants(shape)
        _scale_weights(stack, VALUE_AND_OUTPUT, beta)
        _scale_weights(stack, ("self_attn.v_proj", "encoder_attn.v_proj"), math.sqrt(2))
        shared = shape.side == "decoder" and getattr(shape.options, "share_all_embeddings", False)
        if not shared:
            stack.embed_tokens.weight.mul_(embed)
        return beta


class ReZero(Connection):
    """ReZero (Bachlechner et al. 2021): h = x + a * F(x), a learnable scalar per sub-layer
    (``<sublayer>_rezero_a``) starting at 0, no layer norm."""

    name = "rezero"
    layer_norms = False

    def add_parameters(self, layer, names):
        for name in names:
            setattr(layer, f"{name}_rezero_a", nn.Parameter(torch.zeros(1)))

    def sublayer(self, layer, name, x, f, norm):
        return x + getattr(layer, f"{name}_rezero_a") * f(x)


class PeriLN(Connection):
    """Peri-LN (Kim et al. 2025): h = x + LN_out(F(LN_in(x))); LN_in is fairseq's layer norm of the
    sub-layer, LN_out is added (``<sublayer>_out_layer_norm``); one final LN per stack."""

    name = "peri-ln"
    final_norm = True

    def add_parameters(self, layer, names):
        from fairseq.modules import LayerNorm

        for name in names:
            setattr(layer, f"{name}_out_layer_norm", LayerNorm(self.shape.embed_dim))

    def sublayer(self, layer, name, x, f, norm):
        return x + getattr(layer, f"{name}_out_layer_norm")(f(norm(x)))


CONNECTIONS = {c.name: c for c in (B2T, PostLN, PreLN, DeepNorm, Admin, TFixup, ReZero, PeriLN)}
# --init-scaling choices besides auto/none: the rules named after the method that owns them
INIT_RULES = {"depth": B2T, "deepnorm": DeepNorm, "tfixup": TFixup}


def get_connection(name):
    """The method class registered as ``name``."""
    try:
        return CONNECTIONS[name]
    except KeyError:
        raise ValueError(f"unknown connection {name!r}; choose one of {', '.join(CONNECTIONS)}") from None


def stack_shape(cfg, side):
    """The :class:`StackShape` of the ``side`` stack of a model built from fairseq config ``cfg``."""
    n = cfg.encoder.layers if side == "encoder" else None
    m = cfg.decoder.layers
    if side == "encoder":
        return StackShape("encoder", n, n, m, cfg.encoder.embed_dim, cfg)
    return StackShape(side, m, n if side == "decoder" else None, m, cfg.decoder.embed_dim, cfg)
