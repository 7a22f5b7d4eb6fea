"""fairseq's Transformer encoder and decoder with our layers and word dropout plugged in."""
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from b2t_fairseq.modules import ConnectedDecoderLayer, ConnectedEncoderLayer, dropping_words, get_connection, stack_shape
from b2t_fairseq.modules.word_dropout import word_dropout
from b2t_fairseq.options import word_dropout_rate


def _wrap_layer(layer, cfg):
    """Activation checkpointing and FSDP wrapping, as fairseq applies them to its own layers."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


class B2TTransformerEncoder(TransformerEncoderBase):
    """Stack-level behaviour is fairseq's: a final layer norm exists only for methods with ``final_norm``
    (options.resolve_options sets fairseq's normalize_before from it)."""

    def __init__(self, cfg, dictionary, embed_tokens, return_fc=False):
        if return_fc:
            raise ValueError("return_fc is not supported by b2t_fairseq encoders")
        # set before fairseq's __init__, which builds the layers
        self.connection = get_connection(cfg.connection)(stack_shape(cfg, "encoder"))
        super().__init__(cfg, dictionary, embed_tokens)
        self.word_dropout_p = word_dropout_rate(cfg, "enc")

    def build_encoder_layer(self, cfg):
        return _wrap_layer(ConnectedEncoderLayer(cfg, self.connection), cfg)

    def forward_embedding(self, src_tokens, token_embedding=None):
        if token_embedding is None:
            token_embedding = self.embed_tokens(src_tokens)
        if self.training:
            token_embedding = word_dropout(token_embedding, src_tokens, self.word_dropout_p)
        return super().forward_embedding(src_tokens, token_embedding)


class B2TTransformerDecoder(TransformerDecoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        side = "decoder-only" if no_encoder_attn else "decoder"
        self.connection = get_connection(cfg.connection)(stack_shape(cfg, side))
        super().__init__(
            cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn, output_projection=output_projection
        )
        self.word_dropout_p = word_dropout_rate(cfg, "dec")

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
            return super().extract_features_scriptable(
                prev_output_tokens,
                encoder_out,
                incremental_state,
                full_context_alignment,
                alignment_layer,
                alignment_heads,
            )
