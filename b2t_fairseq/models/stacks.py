"""fairseq's Transformer encoder and decoder with our layers, word dropout and layer loop.

The layer loop is ours (fairseq's passes nothing but ``x`` from layer to layer): it calls the method's stack
hooks (``begin``, ``layer_input``, ``layer_output``, ``end``; see modules/connections.py) for every method, and
the ``carry`` they pass between layers. Everything else follows fairseq's ``forward_scriptable`` /
``extract_features_scriptable``: embeddings, masks, incremental state, alignment, returned states.
"""
import contextlib
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase

from b2t_fairseq.modules import ConnectedDecoderLayer, ConnectedEncoderLayer, dropping_words, get_connection, stack_shape
from b2t_fairseq.modules.word_dropout import word_dropout
from b2t_fairseq.options import word_dropout_rate


class _LayerCalls:
    """How a stack calls one layer: directly, or under activation checkpointing (--checkpoint-activations).

    Checkpointing is torch's non-reentrant form, not fairseq's wrapper: the carry (a dict of tensors) and the
    stack's own parameters (DLCL's) get their gradients through it. ``--offload-activations`` keeps the
    checkpointed inputs on the CPU."""

    def _setup_layer_calls(self, cfg):
        self.checkpoint_layers = bool(cfg.checkpoint_activations)
        self.offload_activations = bool(cfg.offload_activations)

    def _call_layer(self, layer, *args, **kwargs):
        if not (self.checkpoint_layers and torch.is_grad_enabled()):
            return layer(*args, **kwargs)
        with _OffloadedInputs() if self.offload_activations else contextlib.nullcontext():
            return checkpoint(layer, *args, use_reentrant=False, **kwargs)


class _OffloadedInputs(torch.autograd.graph.saved_tensors_hooks):
    """What non-reentrant checkpointing saves outside the layer (its positional inputs), kept in CPU memory
    until the backward pass, each in its own layout.

    torch's ``save_on_cpu(pin_memory=True)`` copies every tensor into a new contiguous one, so a transposed
    input came back contiguous: the recomputed layer then took other kernels (a Linear on a contiguous input
    saves other tensors than on a transposed one) and torch refused the recomputation ("Recomputed values ...
    have different metadata"). fairseq's own offloading moves the inputs with ``.to``, which keeps the layout;
    this does the same, into pinned memory where a GPU can copy asynchronously."""

    def __init__(self):
        def pack(tensor):
            if tensor.device.type == "cpu":
                return None, tensor  # already there: nothing to move, nothing to copy
            pinned = tensor.is_cuda and not tensor.is_sparse
            packed = torch.empty_like(tensor, device="cpu", pin_memory=pinned)  # same strides where dense
            packed.copy_(tensor, non_blocking=pinned)
            return tensor.device, packed

        def unpack(packed):
            device, tensor = packed
            return tensor if device is None else tensor.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def _layer_layout(x):
    """The stack's input in the layout every layer hands on: T x B x C contiguous, not the B x T x C transpose.

    With a transposed input, a method whose layers end in ``x + F(...)`` (pre-ln, tfixup, rezero, sub-ln) returns
    transposed outputs too. Under ``--compile-layers``, AOT autograd then traces the layer's backward with that
    layout for the incoming gradient, and its stride rule for dropout's backward disagrees with the kernel's on
    such a gradient: the ``.view`` of the next Linear's backward fails on the first real batch. A contiguous
    input keeps every layer on the layout a layer norm's output has, for all methods alike."""
    return x.contiguous()


class ConnectedEncoderLoop(_LayerCalls):
    """The layer loop of an encoder (text or speech): the method's stack hooks around every layer call.

    The stack has ``connection``, ``layers`` (ConnectedEncoderLayer) and ``layer_norm`` (None unless the method
    has ``final_norm``)."""

    def run_layers(self, x, padding_mask: Optional[Tensor], states: Optional[List[Tensor]] = None):
        """``x`` (T x B x C) through every layer and the method's end of the stack; each layer's output is
        appended to ``states`` when given."""
        connection = self.connection
        x, carry = connection.begin(self, _layer_layout(x))
        for index, layer in enumerate(self.layers):
            x = connection.layer_input(self, index, x, carry)
            x, carry = self._call_layer(layer, x, padding_mask, carry=carry)
            carry = connection.layer_output(self, index, x, carry)
            if states is not None:
                states.append(x)
        return connection.end(self, x, carry)

    def reorder_encoder_out(self, encoder_out: Dict[str, List[Tensor]], new_order: Tensor):
        """fairseq's reordering, but an order that leaves every row with an output of the same source sentence
        (a beam search's step: it only reorders a sentence's beams, copies of one encoder output) returns the
        output as it is instead of copying it. Which sentence each row holds travels in ``b2t_row_source``."""
        rows = encoder_out.get(ROW_SOURCE)
        if rows:
            source = rows[0]
        elif encoder_out["encoder_padding_mask"]:
            source = torch.arange(encoder_out["encoder_padding_mask"][0].size(0), device=new_order.device)
        elif encoder_out["encoder_out"]:
            source = torch.arange(encoder_out["encoder_out"][0].size(1), device=new_order.device)
        else:
            return super().reorder_encoder_out(encoder_out, new_order)
        new_source = source.index_select(0, new_order)
        if torch.equal(new_source, source):
            return encoder_out
        reordered = super().reorder_encoder_out(encoder_out, new_order)
        reordered[ROW_SOURCE] = [new_source]
        return reordered


ROW_SOURCE = "b2t_row_source"
# the rows of a decoder's last incremental step, as the identity order over them (reorder_incremental_state_scripting)
ROWS = "b2t_decoder_rows"


def _note_rows(incremental_state: Dict[str, Dict[str, Optional[Tensor]]], rows: int, device):
    noted = incremental_state.get(ROWS, {}).get("rows")
    if noted is None or noted.numel() != rows or noted.device != device:
        incremental_state[ROWS] = {"rows": torch.arange(rows, device=device)}


def _wrap_layer(layer, cfg):
    """FSDP wrapping, as fairseq applies it to its own layers (every layer when checkpointing)."""
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0)


class B2TTransformerEncoder(ConnectedEncoderLoop, TransformerEncoderBase):
    """A final layer norm exists only for methods with ``final_norm`` (options.resolve_options sets fairseq's
    normalize_before from it)."""

    def __init__(self, cfg, dictionary, embed_tokens, return_fc=False):
        if return_fc:
            raise ValueError("return_fc is not supported by b2t_fairseq encoders")
        # set before fairseq's __init__, which builds the layers
        self.connection = get_connection(cfg.connection)(stack_shape(cfg, "encoder"))
        super().__init__(cfg, dictionary, embed_tokens)
        self.connection.build_stack(self)
        self._setup_layer_calls(cfg)
        self.word_dropout_p = word_dropout_rate(cfg, "enc")
        # fairseq's name, which --retain-dropout-modules (Monte-Carlo dropout) selects modules by
        self.dropout_module.module_name = "TransformerEncoder"

    def build_encoder_layer(self, cfg):
        return _wrap_layer(ConnectedEncoderLayer(cfg, self.connection), cfg)

    def forward_scriptable(
        self,
        src_tokens,
        src_lengths: Optional[Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[Tensor] = None,
    ):
        padding_mask = src_tokens.eq(self.padding_idx)
        has_pads = bool(padding_mask.any())
        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)
        if has_pads:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)  # B x T x C -> T x B x C

        states: List[Tensor] = [x] if return_all_hiddens else []
        x = self.run_layers(x, padding_mask if has_pads else None, states if return_all_hiddens else None)

        src_lengths = src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1).contiguous()
        return {
            "encoder_out": [x],  # T x B x C
            "encoder_padding_mask": [padding_mask],  # B x T
            "encoder_embedding": [encoder_embedding],  # B x T x C
            "encoder_states": states,  # List[T x B x C]
            "fc_results": [None] * max(len(states) - 1, 0),
            "src_tokens": [],
            "src_lengths": [src_lengths],
        }

    def forward_embedding(self, src_tokens, token_embedding=None):
        if token_embedding is None:
            token_embedding = self.embed_tokens(src_tokens)
        if self.training:
            token_embedding = word_dropout(token_embedding, src_tokens, self.word_dropout_p)
        return super().forward_embedding(src_tokens, token_embedding)


class B2TTransformerDecoder(_LayerCalls, TransformerDecoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        side = "decoder-only" if no_encoder_attn else "decoder"
        self.connection = get_connection(cfg.connection)(stack_shape(cfg, side))
        super().__init__(
            cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn, output_projection=output_projection
        )
        self.connection.build_stack(self)
        self._setup_layer_calls(cfg)
        self.word_dropout_p = word_dropout_rate(cfg, "dec")
        self.dropout_module.module_name = "TransformerDecoder"  # fairseq's, for --retain-dropout-modules

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        return _wrap_layer(ConnectedDecoderLayer(cfg, self.connection, no_encoder_attn=no_encoder_attn), cfg)

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out,
        incremental_state=None,
        full_context_alignment=False,
        alignment_layer=None,
        alignment_heads=None,
    ):
        p = self.word_dropout_p if self.training else 0.0
        # position 0 is the start-of-sentence token: never dropped
        with dropping_words(self.embed_tokens, p, keep_first=True):
            x = self._embed(prev_output_tokens, incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            _note_rows(incremental_state, prev_output_tokens.size(0), prev_output_tokens.device)
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        enc: Optional[Tensor] = None
        encoder_padding_mask: Optional[Tensor] = None
        if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
            enc = encoder_out["encoder_out"][0]
        if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
            encoder_padding_mask = encoder_out["encoder_padding_mask"][0]
        self_attn_padding_mask: Optional[Tensor] = None
        if prev_output_tokens.eq(self.padding_idx).any():
            self_attn_padding_mask = prev_output_tokens.eq(self.padding_idx)
        self_attn_mask: Optional[Tensor] = None
        if incremental_state is None and not full_context_alignment:
            self_attn_mask = self.buffered_future_mask(x)

        attn: Optional[Tensor] = None
        inner_states: List[Optional[Tensor]] = [x]
        connection = self.connection
        x, carry = connection.begin(self, _layer_layout(x))
        for index, layer in enumerate(self.layers):
            x = connection.layer_input(self, index, x, carry)
            aligned = index == alignment_layer
            x, layer_attn, carry = self._call_layer(
                layer,
                x,
                enc,
                encoder_padding_mask,
                incremental_state,
                self_attn_mask=self_attn_mask,
                self_attn_padding_mask=self_attn_padding_mask,
                need_attn=aligned,
                need_head_weights=aligned,
                carry=carry,
            )
            carry = connection.layer_output(self, index, x, carry)
            inner_states.append(x)
            if layer_attn is not None and aligned:
                attn = layer_attn.float().to(x)
        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = attn.mean(dim=0)  # average over heads
        x = connection.end(self, x, carry)

        x = x.transpose(0, 1)  # T x B x C -> B x T x C
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x, {"attn": [attn], "inner_states": inner_states}

    def reorder_incremental_state_scripting(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]],
                                            new_order: Tensor):  # fmt: skip
        """fairseq's entry point for a search's reordering (each module that keeps incremental state reorders it),
        with two savings at every step of a search: an order that leaves every row where it is (beam 1 while no
        sentence has finished) changes nothing and is skipped, and the modules that reorder are found once, not by
        walking every module of the decoder."""
        rows = incremental_state.get(ROWS, {}).get("rows")
        if rows is not None and rows.numel() == new_order.numel() and torch.equal(rows, new_order):
            return
        modules = self.__dict__.get("_b2t_reordering")
        if modules is None:
            modules = [m for m in self.modules() if hasattr(m, "reorder_incremental_state")]
            self.__dict__["_b2t_reordering"] = modules
        for module in modules:
            result = module.reorder_incremental_state(incremental_state, new_order)
            if result is not None:
                incremental_state = result

    def _embed(self, prev_output_tokens, incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]]):
        """Token and position embeddings of the decoder input (the last position when decoding step by step),
        T x B x C, as fairseq computes them."""
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        x = self.embed_scale * self.embed_tokens(prev_output_tokens.contiguous())
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x = x + positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        return x.transpose(0, 1)  # B x T x C -> T x B x C
