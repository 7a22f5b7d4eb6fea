"""The residual methods: how a Transformer layer wires its sub-layers to the residual stream.

One class per method, each holding its whole difference (METHODS.md has the table with references).

Inside a layer:

    sublayer(layer, name, x, f, norm, carry)  one sub-layer: ``f`` is attention or FFN (dropout included),
                                              ``norm`` the layer norm that belongs to it, ``name`` one of
                                              SUBLAYERS; ``carry`` is the layer's own copy of what travels
                                              from layer to layer besides ``x`` (ResiDual's dual stream,
                                              RealFormer's attention scores), a dict it may update
    last_sublayer(..., carry, bottom)         the FFN; ``bottom`` is the raw input of the whole layer (B2T)
    add_parameters(layer, names)              what the method adds to a layer (Admin's omega, ReZero's a, ...);
                                              ``layer.layer_index`` (0-based, in its stack) is set by then

Around the layers of one stack (encoder, decoder; the stacks call these for every method):

    attach_stack(stack)                       parameters of the whole stack (DLCL's weights); every norm a method
                                              builds comes from ``self.norm(dim)`` (the model's --norm-type)
    begin(stack, x) -> (x, carry)             after the embeddings; the first carry
    layer_input(stack, i, x, carry) -> x      the input of layer i (DLCL combines the earlier outputs)
    layer_output(stack, i, x, carry) -> carry after layer i
    end(stack, x, carry) -> x                 the stack's output (default: its final layer norm, if any)

    scale_init(stack, shape)                  the method's own initialisation, after fairseq's (``--init-scaling``)

Class attributes say what the stacks must build: ``final_norm`` (one layer norm on top of each stack, which
fairseq keys off ``normalize_before``) and ``layer_norms`` (False: the layers have none at all); ``knobs`` are
the method's own options with their defaults (other methods refuse them; ``check_options`` checks their values).

An object is made per stack (:class:`StackShape` gives its side and the depths N and M), so depth-dependent
constants are computed once, in ``__init__``.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import nn

from b2t_fairseq.modules.norms import adopt_norm_type, norm_factory

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
    # True: the method's init rule (scale_init) also rescales each stack's token embeddings (``embed_tokens``)
    init_scales_embeddings = False
    # False: the method defines no decoder-only (language model) form
    decoder_only = True

    # the method's own options (fairseq config names) and their defaults
    knobs = {}
    # False: the method weighs every layer's output, so layers cannot be dropped (--*-layerdrop)
    layerdrop = True
    # False: the method's constants (of its layers, its init rule, its embedding scale) are defined for N, M >= 1
    # only (DeepNet's encoder alpha uses N^4 M; T-Fixup scales the encoder's embeddings by (9N)^(-1/4)), so no
    # stack may be empty (--encoder-layers 0, --decoder-layers 0)
    empty_stacks = True

    def __init__(self, shape: StackShape):
        self.shape = shape
        self._layers_attached = 0
        self.norm = norm_factory(shape.options)  # every norm the method adds: of the model's --norm-type

    @classmethod
    def check_options(cls, value_of):
        """What is wrong with the values of this method's knobs (``value_of(name)``), in one line; None if nothing."""
        return None

    def attach_layer(self, layer, names):
        """Called by every layer of the stack as it is built, in order: the layer learns its index in the stack
        (``layer.layer_index``, 0-based; Mix-LN, LNS and SiameseNorm depend on it), then gets what the method adds."""
        layer.layer_index = self._layers_attached
        self._layers_attached += 1
        self.add_parameters(layer, names)

    def option(self, name):
        value = getattr(self.shape.options, name, None)
        return self.knobs[name] if value is None else value

    def add_parameters(self, layer, names):
        pass

    def attach_stack(self, stack):
        pass

    def build_stack(self, stack):
        """Called by each stack once fairseq has built it: its own norms (final, embedding) become the model's
        ``--norm-type``, then the method adds what it needs (``attach_stack``)."""
        adopt_norm_type(stack, self.shape.options)
        self.attach_stack(stack)

    def begin(self, stack, x):
        return x, {}

    def layer_input(self, stack, index, x, carry):
        return x

    def layer_output(self, stack, index, x, carry):
        return carry

    def end(self, stack, x, carry):
        return x if stack.layer_norm is None else stack.layer_norm(x)

    def sublayer(self, layer, name, x, f, norm, carry):
        raise NotImplementedError

    def last_sublayer(self, layer, name, x, f, norm, carry, bottom):
        return self.sublayer(layer, name, x, f, norm, carry)

    @classmethod
    def scale_init(cls, stack, shape):
        """The initialisation rule named after this method (``--init-scaling <name>``)."""
        raise NotImplementedError(f"{cls.name} has no initialisation rule of its own")

    def __repr__(self):
        return f"{type(self).__name__}({self.shape.side}, layers={self.shape.layers})"


class PostLN(Connection):
    """h = LN(x + F(x)) — Vaswani et al.; fairseq's default."""

    name = "post-ln"

    def sublayer(self, layer, name, x, f, norm, carry):
        return norm(x + f(x))


class PreLN(Connection):
    """h = x + F(LN(x)) — fairseq's ``--*-normalize-before``."""

    name = "pre-ln"
    final_norm = True

    def sublayer(self, layer, name, x, f, norm, carry):
        return x + f(norm(x))


class B2T(PostLN):
    """Post-LN, plus the layer input ``bottom`` added before the layer's last norm:
    y = LN(x_bottom + h + FFN(h)). The bottom term gets no dropout. Init: N^-1/2 on every non-LN weight
    matrix of each layer (the authors' current code)."""

    name = "b2t"
    default_init_scaling = "depth"

    def last_sublayer(self, layer, name, x, f, norm, carry, bottom):
        return norm(bottom + x + f(x))

    @classmethod
    def scale_init(cls, stack, shape):
        if len(stack.layers) == 0:
            return None  # no layer to scale (the other stack's factor is its own N^-1/2)
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
    empty_stacks = False

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

    def sublayer(self, layer, name, x, f, norm, carry):
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
    knobs = {"admin_output_change": "O(logn)"}

    @staticmethod
    def omega(n, output_change="O(logn)"):
        if output_change == "O(n)":
            return 1.0
        if output_change == "O(1)":
            return math.sqrt(n)
        return math.sqrt((n + 1) / math.log(n + 1) - 1)

    def add_parameters(self, layer, names):
        value = self.omega(self.shape.residual_sublayers, self.option("admin_output_change"))
        for name in names:
            setattr(layer, f"{name}_omega", nn.Parameter(torch.full((self.shape.embed_dim,), value)))

    def sublayer(self, layer, name, x, f, norm, carry):
        return norm(getattr(layer, f"{name}_omega") * x + f(x))


class TFixup(Connection):
    """T-Fixup (Huang et al. 2020): h = x + F(x), no layer norm anywhere, trained without warmup.
    Init: encoder v/out projections and FFN weights times 0.67 N^(-1/4), decoder's (self and cross) times
    (9M)^(-1/4); v_proj also times sqrt(2), undoing fairseq's xavier gain 1/sqrt(2) as the reference does;
    input embeddings times (9N)^(-1/4) (encoder) and (9M)^(-1/4) (decoder; once only when shared)."""

    name = "tfixup"
    layer_norms = False
    default_init_scaling = "tfixup"
    init_scales_embeddings = True
    decoder_only = False
    empty_stacks = False

    def sublayer(self, layer, name, x, f, norm, carry):
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

    def sublayer(self, layer, name, x, f, norm, carry):
        return x + getattr(layer, f"{name}_rezero_a") * f(x)


class PeriLN(Connection):
    """Peri-LN (Kim et al. 2025): h = x + LN_out(F(LN_in(x))); LN_in is fairseq's layer norm of the
    sub-layer, LN_out is added (``<sublayer>_out_layer_norm``); one final LN per stack."""

    name = "peri-ln"
    final_norm = True

    def add_parameters(self, layer, names):
        for name in names:
            setattr(layer, f"{name}_out_layer_norm", self.norm(self.shape.embed_dim))

    def sublayer(self, layer, name, x, f, norm, carry):
        return x + getattr(layer, f"{name}_out_layer_norm")(f(norm(x)))


def _extend(module, cls):
    """Make ``module`` an instance of ``cls``, a subclass of its class that changes one method: the module keeps
    its parameters, their names and their initial values (fairseq's random draws stay as in a post-ln build)."""
    assert isinstance(module, cls.__mro__[1]), (type(module), cls)
    module.__class__ = cls
    return module


class DLCL(PreLN):
    """DLCL (Wang et al. 2019), learnable dense history as in its reference code: Pre-LN layers; the input
    of layer l+1 is sum_{k<=l} W[l, k] * LN_k(y_k), with y_0 the embeddings (no LN) and y_k the output of
    layer k; the stack's output is the row-N combination, then the final LN. W (``dlcl_weights``,
    (N+1) x (N+1), only its lower triangle is used) starts with each row averaging its entries;
    ``dlcl_layer_norms`` are LN_1..LN_N."""

    name = "dlcl"
    layerdrop = False

    def attach_stack(self, stack):
        n = self.shape.layers
        weights = torch.ones(n + 1, n + 1).tril()
        stack.dlcl_weights = nn.Parameter(weights / weights.sum(1, keepdim=True))
        stack.dlcl_layer_norms = nn.ModuleList(self.norm(self.shape.embed_dim) for _ in range(n))

    @staticmethod
    def combine(stack, row, history):
        weights = stack.dlcl_weights[row, : len(history)].to(history[0].dtype)
        return torch.einsum("k,k...->...", weights, torch.stack(history))

    def begin(self, stack, x):
        return x, {"dlcl_history": (x,)}

    def layer_input(self, stack, index, x, carry):
        return self.combine(stack, index, carry["dlcl_history"])

    def layer_output(self, stack, index, x, carry):
        return {**carry, "dlcl_history": carry["dlcl_history"] + (stack.dlcl_layer_norms[index](x),)}

    def end(self, stack, x, carry):
        return stack.layer_norm(self.combine(stack, len(stack.dlcl_layer_norms), carry["dlcl_history"]))


class ResiDual(Connection):
    """ResiDual (Xie et al. 2023): a Post-LN stream x_{k+1} = LN(x_k + F(x_k)) beside a dual stream
    r_{k+1} = r_k + F(x_k), r_0 = the embeddings, over all sub-layers of the stack; the stack's output is
    alpha * x + LN(r) with the stack's final LN (``--resi-dual-alpha``, 1 as in the reference)."""

    name = "resi-dual"
    final_norm = True
    knobs = {"resi_dual_alpha": 1.0}

    def __init__(self, shape):
        super().__init__(shape)
        self.alpha = float(self.option("resi_dual_alpha"))

    def begin(self, stack, x):
        return x, {"dual": x}

    def sublayer(self, layer, name, x, f, norm, carry):
        h = f(x)
        carry["dual"] = carry["dual"] + h
        return norm(x + h)

    def end(self, stack, x, carry):
        return self.alpha * x + stack.layer_norm(carry["dual"])


class ResidualScoreAttention(MultiheadAttention):
    """fairseq's attention with RealFormer's residual scores: the previous layer's pre-softmax scores
    ``carried`` are added to Q K^T / sqrt(d_head) before the masks, and the sum replaces them. fairseq calls
    ``apply_sparse_mask`` on exactly those scores; its fused path never does, so it is switched off."""

    carried: Optional[torch.Tensor] = None

    def apply_sparse_mask(self, attn_weights, tgt_len: int, src_len: int, bsz: int):
        if self.carried is not None:
            attn_weights = attn_weights + self.carried
        self.carried = attn_weights
        return attn_weights.clone()  # fairseq adds the attention mask in place


class RealFormer(PostLN):
    """RealFormer (He et al. 2021): Post-LN layers whose attention scores carry up the stack,
    S_l = Q_l K_l^T / sqrt(d_head) + S_{l-1} before softmax and masks, per head; self- and cross-attention
    each carry their own. Needs the scores, so it runs fairseq's unfused attention."""

    name = "realformer"

    def add_parameters(self, layer, names):
        for name in names:
            if name != "ffn":
                _extend(getattr(layer, name), ResidualScoreAttention)._set_skip_embed_dim_check()

    def sublayer(self, layer, name, x, f, norm, carry):
        if name == "ffn":
            return norm(x + f(x))
        attention = getattr(layer, name)
        attention.carried = carry.get(name)
        h = f(x)
        carry[name], attention.carried = attention.carried, None
        return norm(x + h)


class InputNormedLinear(nn.Linear):
    """A Linear layer with a layer norm on its input (``sub_layer_norm``): Sub-LN's extra norms."""

    def forward(self, x):
        return super().forward(self.sub_layer_norm(x))


class SubLN(PreLN):
    """Sub-LN (Magneto, Wang et al. 2022b): Pre-LN plus a layer norm on the input of the self-attention's
    out_proj and of fc2 (``self_attn.out_proj.sub_layer_norm``, ``fc2.sub_layer_norm``). Init (torchscale's
    ``--subln``): weights and biases of self_attn.v_proj, self_attn.out_proj, fc1, fc2 times gamma; encoder
    gamma = sqrt(ln(3M) ln(2N) / 3), decoder sqrt(ln 3M), decoder-only sqrt(ln 2M); cross-attention is
    left alone."""

    name = "sub-ln"
    default_init_scaling = "subln"
    empty_stacks = False
    SCALED = ("self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")

    def add_parameters(self, layer, names):
        layer.self_attn._set_skip_embed_dim_check()  # the fused path would skip out_proj's forward
        for linear in (layer.self_attn.out_proj, layer.fc2):
            _extend(linear, InputNormedLinear).sub_layer_norm = self.norm(linear.in_features)

    @staticmethod
    def gamma(shape):
        n, m = shape.encoder_layers, shape.decoder_layers
        if shape.side == "encoder":
            return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3)
        if shape.side == "decoder":
            return math.sqrt(math.log(3 * m))
        return math.sqrt(math.log(2 * shape.layers))

    @classmethod
    def scale_init(cls, stack, shape):
        gamma = cls.gamma(shape)
        for layer in stack.layers._modules.values():
            for name in cls.SCALED:
                module = layer.get_submodule(name)
                module.weight.mul_(gamma)
                if module.bias is not None:
                    module.bias.mul_(gamma)
        return gamma


# ------------------------------------------------------------------ the methods of 2024-2026 (METHODS.md, second table)
class MixLN(PreLN):
    """Mix-LN (Li, Yin, Liu; ICLR 2025): the first K = floor(alpha L) layers of a stack are Post-LN,
    h = LN(x + F(x)), the others Pre-LN, h = x + F(LN(x)), with Pre-LN's final LN (alpha:
    ``--mix-ln-post-fraction``, 0.25 as the reference's POST_NUM: 6 layers -> 1, 18 -> 4, 100 -> 25)."""

    name = "mix-ln"
    knobs = {"mix_ln_post_fraction": 0.25}

    @classmethod
    def check_options(cls, value_of):
        fraction = float(value_of("mix_ln_post_fraction"))
        if not 0.0 <= fraction <= 1.0:
            return f"--mix-ln-post-fraction {fraction}: the fraction of Post-LN layers is in [0, 1] (default 0.25)"

    def __init__(self, shape):
        super().__init__(shape)
        self.post_ln_layers = math.floor(float(self.option("mix_ln_post_fraction")) * shape.layers)

    def sublayer(self, layer, name, x, f, norm, carry):
        if layer.layer_index < self.post_ln_layers:
            return norm(x + f(x))
        return x + f(norm(x))


class LNS(PreLN):
    """LayerNorm Scaling (Sun et al., NeurIPS 2025, "The Curse of Depth"): Pre-LN with the layer norm's output
    scaled by 1/sqrt(l) in layer l (1-based), for every sub-layer of that layer: h = x + F(LN(x) / sqrt(l)).
    No scaled init (the authors drop it with LNS)."""

    name = "lns"

    def sublayer(self, layer, name, x, f, norm, carry):
        return x + f(norm(x) * (layer.layer_index + 1) ** -0.5)


class LayerScale(PreLN):
    """LayerScale (CaiT, Touvron et al. 2021): h = x + lambda * F(LN(x)), lambda a learnable vector per sub-layer
    (``<sublayer>_layerscale``) starting at eps: ``--layerscale-init``, or by the stack's depth L as in CaiT
    (0.1 for L <= 18, 1e-5 for L <= 24, 1e-6 deeper)."""

    name = "layerscale"
    knobs = {"layerscale_init": 0.0}

    @classmethod
    def check_options(cls, value_of):
        eps = float(value_of("layerscale_init"))
        if eps < 0:
            return f"--layerscale-init {eps}: lambda starts at a positive value (0, the default: by depth)"

    @staticmethod
    def epsilon(layers):
        return 0.1 if layers <= 18 else 1e-5 if layers <= 24 else 1e-6

    def add_parameters(self, layer, names):
        eps = float(self.option("layerscale_init")) or self.epsilon(self.shape.layers)
        for name in names:
            setattr(layer, f"{name}_layerscale", nn.Parameter(torch.full((self.shape.embed_dim,), eps)))

    def sublayer(self, layer, name, x, f, norm, carry):
        return x + getattr(layer, f"{name}_layerscale") * f(norm(x))


class SiameseNorm(Connection):
    """SiameseNorm (Li et al., ICML 2026): two streams from the embeddings, x (post-norm) and y (pre-norm). Each
    sub-layer of layer l (1-based): x <- LN_post(x); z = F(LN_in(x + LN_pre(y))); x <- x + z / c; y <- y + z, with
    c = sqrt(2 l). LN_in is fairseq's layer norm of the sub-layer; LN_post, LN_pre are added
    (``<sublayer>_post_norm``, ``<sublayer>_pre_norm``). The stack's output is LN_f(LN_a(x) + LN_b(y)): LN_f its
    final LN, LN_a, LN_b added (``siamese_post_stream_norm``, ``siamese_pre_stream_norm``). y travels in the carry."""

    name = "siamese"
    final_norm = True

    def add_parameters(self, layer, names):
        for name in names:
            setattr(layer, f"{name}_post_norm", self.norm(self.shape.embed_dim))
            setattr(layer, f"{name}_pre_norm", self.norm(self.shape.embed_dim))

    def attach_stack(self, stack):
        stack.siamese_post_stream_norm = self.norm(self.shape.embed_dim)
        stack.siamese_pre_stream_norm = self.norm(self.shape.embed_dim)

    def begin(self, stack, x):
        return x, {"siamese_pre_stream": x}

    def sublayer(self, layer, name, x, f, norm, carry):
        y = carry["siamese_pre_stream"]
        x = getattr(layer, f"{name}_post_norm")(x)
        z = f(norm(x + getattr(layer, f"{name}_pre_norm")(y)))
        carry["siamese_pre_stream"] = y + z
        return x + z * (2 * (layer.layer_index + 1)) ** -0.5

    def end(self, stack, x, carry):
        y = carry["siamese_pre_stream"]
        return stack.layer_norm(stack.siamese_post_stream_norm(x) + stack.siamese_pre_stream_norm(y))


class HeadNormedLinear(nn.Linear):
    """A query, key or value projection whose output is normalised per attention head (``head_norm``, over the
    d_head features of each head): HybridNorm's q/k/v norms, as a property of fairseq's attention module."""

    def forward(self, x):
        y = super().forward(x)
        return self.head_norm(y.unflatten(-1, (-1, self.head_dim))).flatten(-2)


class HybridNorm(Connection):
    """HybridNorm (Zhuo et al. 2025): attention sub-layers x + Attn(x) with no layer norm on their input but Q, K
    and V normalised per head after their projections (``<attention>.{q,k,v}_proj.head_norm``, size d_head; in the
    decoder's cross-attention the queries are the decoder's, keys and values the encoder's); the FFN
    u = LN(x); u + FFN(u) (its residual from the normalised stream); final LN. ``--hybridnorm-first-pre``:
    HybridNorm*, whose first layer is Pre-LN throughout (x + F(LN(x))), q/k/v norms kept."""

    name = "hybridnorm"
    final_norm = True
    knobs = {"hybridnorm_first_pre": False}

    def _pre_ln(self, layer):
        return layer.layer_index == 0 and bool(self.option("hybridnorm_first_pre"))

    def add_parameters(self, layer, names):
        for name in names:
            if name == "ffn":
                continue
            if not self._pre_ln(layer):
                setattr(layer, NORM_OF[name], None)  # no LN on the attention's input: none left unused
            attention = getattr(layer, name)
            attention._set_skip_embed_dim_check()  # the fused path would skip the projections' forward
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                _extend(projection, HeadNormedLinear).head_dim = attention.head_dim
                projection.head_norm = self.norm(attention.head_dim)

    def sublayer(self, layer, name, x, f, norm, carry):
        if self._pre_ln(layer):
            return x + f(norm(x))
        if name == "ffn":
            u = norm(x)
            return u + f(u)
        return x + f(x)


CONNECTIONS = {
    c.name: c
    for c in (B2T, PostLN, PreLN, DeepNorm, Admin, TFixup, DLCL, RealFormer, ResiDual, PeriLN, ReZero, SubLN, MixLN,
              LNS, LayerScale, SiameseNorm, HybridNorm)
}
# every method's own options with their defaults: part of a run's identity, refused on the other methods
METHOD_OPTIONS = {knob: default for c in CONNECTIONS.values() for knob, default in c.knobs.items()}
# --init-scaling choices besides auto/none: the rules named after the method that owns them
INIT_RULES = {"depth": B2T, "deepnorm": DeepNorm, "tfixup": TFixup, "subln": SubLN}


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
