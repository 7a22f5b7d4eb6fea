"""``transformer_lm_b2t``: fairseq's decoder-only language model with a selectable residual connection.

B2T in a decoder-only layer: y = LN2(x + h1 + FFN(h1)), h1 = LN1(x + SelfAttn(x)).
In fairseq 0.12 ``--arch transformer_lm`` itself is Post-LN (its dataclass default) while the named presets
(``transformer_lm_big``, ``_wiki103``, ...) force Pre-LN; here ``--connection`` decides for every preset, so
``post-ln`` reproduces ``transformer_lm`` and ``pre-ln`` reproduces it with ``--decoder-normalize-before``.
"""
from dataclasses import dataclass

from fairseq import options as fairseq_options
from fairseq.models import ARCH_CONFIG_REGISTRY, register_model, register_model_architecture
from fairseq.models import transformer_lm as fs
from fairseq.models.transformer import TransformerConfig
from fairseq.modules import AdaptiveInput
from fairseq.utils import safe_getattr

from b2t_fairseq.analysis.live import attach_layer_grad_norm_logger
from b2t_fairseq.fast_paths.compiling import compile_layers
from b2t_fairseq.fast_paths.decoding import FastDecoding
from b2t_fairseq.safety.errors import B2TConfigError
from b2t_fairseq.models.stacks import B2TTransformerDecoder
from b2t_fairseq.modules import apply_init_scaling, get_connection
from b2t_fairseq.options import B2TOptions, as_namespace, resolve_options
from b2t_fairseq.safety.runs import IdentityChecked


@dataclass
class TransformerLMB2TConfig(fs.TransformerLanguageModelConfig, B2TOptions):
    pass


@register_model("transformer_lm_b2t", dataclass=TransformerLMB2TConfig)
class TransformerLMB2TModel(FastDecoding, IdentityChecked, fs.TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        args = as_namespace(args)
        transformer_lm_b2t(args)
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample", fs.DEFAULT_MAX_TARGET_POSITIONS)
        if args.character_embeddings:
            raise B2TConfigError("--character-embeddings is not supported by transformer_lm_b2t; drop it")
        if args.tie_adaptive_weights and not (
            args.adaptive_input
            and args.adaptive_input_factor == args.adaptive_softmax_factor
            and args.adaptive_softmax_cutoff == args.adaptive_input_cutoff
            and args.decoder_input_dim == args.decoder_output_dim
        ):
            raise B2TConfigError(
                "--tie-adaptive-weights needs --adaptive-input with the same factor and cutoff as the adaptive "
                "softmax, and --decoder-input-dim equal to --decoder-output-dim"
            )

        dictionary = task.source_dictionary
        if args.adaptive_input:
            embed_tokens = AdaptiveInput(
                len(dictionary),
                dictionary.pad(),
                args.decoder_input_dim,
                args.adaptive_input_factor,
                args.decoder_embed_dim,
                fairseq_options.eval_str_list(args.adaptive_input_cutoff, type=int),
                args.quant_noise_pq,
                args.quant_noise_pq_block_size,
            )
        else:
            embed_tokens = cls.build_embedding(args, dictionary, args.decoder_input_dim)

        cfg = TransformerConfig.from_namespace(args)
        decoder = B2TTransformerDecoder(cfg, task.target_dictionary, embed_tokens, no_encoder_attn=True)
        apply_init_scaling(decoder, args.init_scaling)
        model = compile_layers(cls(decoder), safe_getattr(args, "compile_layers", ""))
        model.b2t_int8_decoding = safe_getattr(args, "int8_decoding", "none")
        return attach_layer_grad_norm_logger(model.record_identity(args), args)


def _mirror(name, fairseq_arch):
    def arch(args):
        resolve_options(args, stacks=("decoder",))
        fairseq_arch(args)
        # fairseq's LM presets hard-wire Pre-LN; the connection decides instead
        args.decoder_normalize_before = get_connection(args.connection).final_norm

    arch.__name__ = name
    if name == "transformer_lm_b2t":
        # register_model(dataclass=...) already registered a no-op architecture under the model's own name
        ARCH_CONFIG_REGISTRY[name] = arch
        return arch
    return register_model_architecture("transformer_lm_b2t", name)(arch)


transformer_lm_b2t = _mirror("transformer_lm_b2t", fs.base_lm_architecture)
transformer_lm_b2t_big = _mirror("transformer_lm_b2t_big", fs.transformer_lm_big)
transformer_lm_b2t_wiki103 = _mirror("transformer_lm_b2t_wiki103", fs.transformer_lm_baevski_wiki103)
transformer_lm_b2t_gbw = _mirror("transformer_lm_b2t_gbw", fs.transformer_lm_baevski_gbw)
