"""``transformer_b2t``: fairseq's encoder-decoder Transformer with a selectable residual connection.

Architectures mirror fairseq's one for one (``transformer_wmt_en_de`` -> ``transformer_b2t_wmt_en_de``),
plus the paper's deep WMT settings. ``--connection post-ln`` / ``pre-ln`` give fairseq's baselines through
the same code path and flags.
"""
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer import transformer_legacy as fs
from fairseq.utils import safe_getattr

from b2t_fairseq.analysis.live import attach_layer_grad_norm_logger
from b2t_fairseq.fast_paths.compiling import compile_layers
from b2t_fairseq.fast_paths.decoding import FastDecoding
from b2t_fairseq.safety.errors import B2TConfigError
from b2t_fairseq.models.stacks import B2TTransformerDecoder, B2TTransformerEncoder
from b2t_fairseq.modules import apply_init_scaling
from b2t_fairseq.options import add_b2t_args, as_namespace, check_task, resolve_options
from b2t_fairseq.safety.runs import IdentityChecked


@register_model("transformer_b2t")
class TransformerB2TModel(FastDecoding, IdentityChecked, TransformerModel):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_b2t_args(parser)

    @classmethod
    def build_model(cls, args, task):
        args = as_namespace(args)
        transformer_b2t(args)
        check_task(args, task)
        model = super().build_model(args, task)
        apply_init_scaling(model.encoder, args.init_scaling)
        apply_init_scaling(model.decoder, args.init_scaling)
        compile_layers(model, safe_getattr(args, "compile_layers", ""))
        model.b2t_int8_decoding = safe_getattr(args, "int8_decoding", "none")
        return attach_layer_grad_norm_logger(model.record_identity(args), args)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return B2TTransformerEncoder(cfg, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        return B2TTransformerDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)


def mirror_architecture(model, name, fairseq_arch, resolve=resolve_options):
    """Register architecture ``name`` of our ``model`` as fairseq's ``fairseq_arch`` with our options resolved
    first (by ``resolve``, which may add a model's own checks to resolve_options)."""

    def arch(args):
        resolve(args)
        fairseq_arch(args)

    arch.__name__ = name
    return register_model_architecture(model, name)(arch)


def _mirror(name, fairseq_arch):
    return mirror_architecture("transformer_b2t", name, fairseq_arch)


transformer_b2t = _mirror("transformer_b2t", fs.base_architecture)
transformer_b2t_tiny = _mirror("transformer_b2t_tiny", fs.tiny_architecture)
transformer_b2t_iwslt_de_en = _mirror("transformer_b2t_iwslt_de_en", fs.transformer_iwslt_de_en)
transformer_b2t_wmt_en_de = _mirror("transformer_b2t_wmt_en_de", fs.transformer_wmt_en_de)
transformer_b2t_vaswani_wmt_en_de_big = _mirror(
    "transformer_b2t_vaswani_wmt_en_de_big", fs.transformer_vaswani_wmt_en_de_big
)
transformer_b2t_wmt_en_de_big = _mirror("transformer_b2t_wmt_en_de_big", fs.transformer_wmt_en_de_big)


def _deep_wmt_preset(layers):
    """The paper's deep WMT En-De rows: transformer_wmt_en_de dims, ``layers``-``layers``, dropout 0.5 and
    word dropout 0.1 on both sides (the authors' README). Any of them can still be overridden, except depth."""

    def arch(args):
        for stack in ("encoder", "decoder"):
            given = safe_getattr(args, f"{stack}_layers", None)
            if given is not None and int(given) != layers:
                raise B2TConfigError(
                    f"--arch transformer_b2t_wmt_en_de_{layers}l has {layers} {stack} layers, but "
                    f"--{stack}-layers {given} was given; use --arch transformer_b2t_wmt_en_de "
                    f"--encoder-layers N --decoder-layers N for other depths"
                )
            setattr(args, f"{stack}_layers", layers)
        args.dropout = safe_getattr(args, "dropout", 0.5)
        # an explicit "none" switches word dropout off; "worddrop" without rates gets the preset's
        if safe_getattr(args, "sampling_method", None) in (None, "worddrop"):
            args.sampling_method = "worddrop"
            args.enc_replace_rate = safe_getattr(args, "enc_replace_rate", 0.1)
            args.dec_replace_rate = safe_getattr(args, "dec_replace_rate", 0.1)
        transformer_b2t_wmt_en_de(args)

    name = f"transformer_b2t_wmt_en_de_{layers}l"
    arch.__name__ = name
    return register_model_architecture("transformer_b2t", name)(arch)


transformer_b2t_wmt_en_de_18l = _deep_wmt_preset(18)
transformer_b2t_wmt_en_de_100l = _deep_wmt_preset(100)
