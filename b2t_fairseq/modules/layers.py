"""Transformer encoder/decoder layers whose residual wiring is a :mod:`connections` object (one per stack).

They subclass fairseq's own layers, so submodule names (``self_attn``, ``self_attn_layer_norm``,
``encoder_attn``, ``encoder_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``), initialisation and
state-dict keys are fairseq's; only ``forward`` is ours. With the ``post-ln`` and ``pre-ln`` connections
they compute exactly what fairseq's layers compute.
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from b2t_fairseq.modules.connections import NORM_OF, SUBLAYERS
from b2t_fairseq.modules.norms import adopt_norm_type

# NormFormer-style extras of fairseq's decoder layer that change the residual path; we do not wire them.
_UNSUPPORTED_DECODER_EXTRAS = {
    "attn_ln": "--scale-attn",
    "c_attn": "--scale-heads",
    "ffn_layernorm": "--scale-fc",
    "w_resid": "--scale-resids",
}


def _attach_method(layer, connection, names, fairseq_name):
    """Give ``layer`` norms of the model's ``--norm-type``, what its method adds (parameters) and takes away (layer
    norms), and fairseq's class name to its dropout modules (what --retain-dropout-modules selects them by)."""
    layer.connection = connection
    adopt_norm_type(layer, connection.shape.options)
    layer.dropout_module.module_name = layer.activation_dropout_module.module_name = fairseq_name
    if not connection.layer_norms:
        for name in names:
            setattr(layer, NORM_OF[name], None)
    connection.attach_layer(layer, names)


class ConnectedEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg, connection):
        super().__init__(cfg)
        _attach_method(self, connection, ("self_attn", "ffn"), "TransformerEncoderLayerBase")

    def feed_forward(self, x):
        x = self.activation_dropout_module(self.activation_fn(self.fc1(x)))
        return self.dropout_module(self.fc2(x))

    def forward(
        self,
        x,
        encoder_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor] = None,
        carry: Optional[Dict[str, Tensor]] = None,
    ):
        """fairseq's encoder layer call; with ``carry`` (what the method passes between layers, see
        connections.py), returns ``(x, carry)``, the input left unchanged."""
        given = carry is not None
        carry = dict(carry) if given else {}
        if attn_mask is not None:
            # same large-negative (not -inf) masking as fairseq, so fully padded rows stay finite
            attn_mask = attn_mask.masked_fill(attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4)

        def self_attention(h):
            h, _ = self.self_attn(
                query=h, key=h, value=h, key_padding_mask=encoder_padding_mask, need_weights=False, attn_mask=attn_mask
            )
            return self.dropout_module(h)

        bottom = x
        x = self.connection.sublayer(self, "self_attn", x, self_attention, self.self_attn_layer_norm, carry)
        x = self.connection.last_sublayer(self, "ffn", x, self.feed_forward, self.final_layer_norm, carry, bottom)
        return (x, carry) if given else x


class ConnectedDecoderLayer(TransformerDecoderLayerBase):
    def __init__(self, cfg, connection, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn)
        for attr, flag in _UNSUPPORTED_DECODER_EXTRAS.items():
            if getattr(self, attr) is not None:
                raise ValueError(f"{flag} is not supported by b2t_fairseq layers; drop it")
        if self.cross_self_attention:
            raise ValueError("--cross-self-attention is not supported by b2t_fairseq layers; drop it")
        names = ("self_attn", "ffn") if self.encoder_attn is None else SUBLAYERS
        _attach_method(self, connection, names, "TransformerDecoderLayerBase")

    def feed_forward(self, x):
        x = self.activation_dropout_module(self.activation_fn(self.fc1(x)))
        return self.dropout_module(self.fc2(x))

    @staticmethod
    def _restore_attn_state(attn, state: List[Tensor], incremental_state):
        saved: Dict[str, Optional[Tensor]] = {"prev_key": state[0], "prev_value": state[1]}
        if len(state) >= 3:
            saved["prev_key_padding_mask"] = state[2]
        assert incremental_state is not None
        attn._set_input_buffer(incremental_state, saved)

    def forward(
        self,
        x,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[Tensor]] = None,
        prev_attn_state: Optional[List[Tensor]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
        carry: Optional[Dict[str, Tensor]] = None,
    ):
        """fairseq's decoder layer call; returns ``(x, attn, None)``, or ``(x, attn, carry)`` when given
        ``carry`` (what the method passes between layers, see connections.py; the input is left unchanged)."""
        given = carry is not None
        carry = dict(carry) if given else {}
        need_attn = need_attn or need_head_weights
        if prev_self_attn_state is not None:
            self._restore_attn_state(self.self_attn, prev_self_attn_state, incremental_state)
        if prev_attn_state is not None and self.encoder_attn is not None:
            self._restore_attn_state(self.encoder_attn, prev_attn_state, incremental_state)
        attn = None

        def self_attention(h):
            h, _ = self.self_attn(
                query=h,
                key=h,
                value=h,
                key_padding_mask=self_attn_padding_mask,
                incremental_state=incremental_state,
                need_weights=False,
                attn_mask=self_attn_mask,
            )
            return self.dropout_module(h)

        def cross_attention(h):
            nonlocal attn
            h, attn = self.encoder_attn(
                query=h,
                key=encoder_out,
                value=encoder_out,
                key_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state,
                static_kv=True,
                need_weights=need_attn or (not self.training and self.need_attn),
                need_head_weights=need_head_weights,
            )
            return self.dropout_module(h)

        bottom = x
        x = self.connection.sublayer(self, "self_attn", x, self_attention, self.self_attn_layer_norm, carry)
        if self.encoder_attn is not None and encoder_out is not None:
            x = self.connection.sublayer(
                self, "encoder_attn", x, cross_attention, self.encoder_attn_layer_norm, carry
            )
        x = self.connection.last_sublayer(self, "ffn", x, self.feed_forward, self.final_layer_norm, carry, bottom)
        return x, attn, (carry if given else None)
