"""``s2t_transformer_b2t``: fairseq's speech-to-text Transformer (``s2t_transformer``: conv subsampler, Transformer
encoder, Transformer decoder) with a selectable residual connection.

Architectures mirror fairseq's one for one (``s2t_transformer_s`` -> ``s2t_transformer_b2t_s``, ..., ``_lp``).
fairseq's s2t presets are Pre-LN (``--encoder/decoder-normalize-before`` default to True there); here, as in
every model of the plugin, ``--connection`` decides (default ``b2t``), so ``--connection pre-ln`` is fairseq's
``s2t_transformer*`` and ``--connection post-ln`` is it with Post-LN layers. State-dict keys are fairseq's
(the encoder's layers stay ``encoder.transformer_layers.<i>``), so a stock ``s2t_transformer`` checkpoint loads
into the same-dimension model with the matching ``--connection``, and a pre-ln/post-ln model of ours into fairseq.

Not offered: T-Fixup's initialisation (``--init-scaling tfixup``, the default of ``--connection tfixup``) rescales
the encoder's token embeddings, and a speech encoder has none; ``--connection tfixup --init-scaling none`` (or
another rule) builds. Word dropout (``--enc-replace-rate``) drops source tokens, and there are none either; the
decoder's (``--dec-replace-rate``) applies.
"""
import copy
import logging
from collections import OrderedDict
from pathlib import Path

from torch import nn

from fairseq import checkpoint_utils
from fairseq.data.data_utils import lengths_to_padding_mask
from fairseq.models import register_model
from fairseq.models.speech_to_text import s2t_transformer as fs
from fairseq.models.transformer import TransformerConfig
from fairseq.utils import safe_getattr

from b2t_fairseq.analysis.live import attach_layer_grad_norm_logger
from b2t_fairseq.fast_paths.compiling import compile_layers
from b2t_fairseq.safety.errors import B2TConfigError
from b2t_fairseq.fast_paths.decoding import FastDecoding
from b2t_fairseq.models.stacks import B2TTransformerDecoder, ConnectedEncoderLoop, _wrap_layer
from b2t_fairseq.models.transformer_b2t import mirror_architecture
from b2t_fairseq.modules import ConnectedEncoderLayer, INIT_RULES, apply_init_scaling, get_connection, stack_shape
from b2t_fairseq.modules.connections import METHOD_OPTIONS
from b2t_fairseq.options import add_b2t_args, as_namespace, resolve_options
from b2t_fairseq.safety.runs import IdentityChecked, describe_difference, identity

logger = logging.getLogger(__name__)

# what a pretrained encoder (--load-pretrained-encoder-from) must share with this one
ENCODER_IDENTITY = ("connection", *METHOD_OPTIONS, "norm_type", "dyt_alpha_init", "encoder_layers")


class B2TS2TTransformerEncoder(ConnectedEncoderLoop, fs.S2TTransformerEncoder):
    """fairseq's S2TTransformerEncoder (subsampler, embedding scale, positions, dropout, CTC projection, encoder
    freezing, ``reorder_encoder_out``) with our layers and layer loop. A final layer norm exists only for methods
    with ``final_norm`` (s2t_transformer_b2t's architectures set fairseq's encoder_normalize_before from it).

    No word dropout: the input is speech features, not tokens."""

    def __init__(self, args):
        cfg = TransformerConfig.from_namespace(args)
        self.connection = get_connection(cfg.connection)(stack_shape(cfg, "encoder"))
        # fairseq's __init__ without its layers and CTC projection, which are built here in fairseq's order, so
        # that a seed draws the same initial weights as fairseq's model
        front = copy.copy(args)
        front.encoder_layers, front.ctc_weight = 0, 0.0
        super().__init__(front)
        self.transformer_layers.extend(
            _wrap_layer(ConnectedEncoderLayer(cfg, self.connection), cfg) for _ in range(cfg.encoder.layers)
        )
        if safe_getattr(args, "ctc_weight", 0.0) > 0.0:
            self.ctc_proj = nn.Linear(args.encoder_embed_dim, args.tgt_dict_size)
        self.connection.build_stack(self)
        self._setup_layer_calls(cfg)
        # fairseq's names, which --retain-dropout-modules (Monte-Carlo dropout) selects modules by
        self.dropout_module.module_name = "S2TTransformerEncoder"
        for layer in self.transformer_layers:
            layer.dropout_module.module_name = layer.activation_dropout_module.module_name = "TransformerEncoderLayer"

    @property
    def layers(self):
        """The layers under the plugin's name for them (init rules, layer loop, logging, compiling, int8); they
        are registered under fairseq's, ``transformer_layers``, which checkpoints keep."""
        return self.transformer_layers

    def _forward(self, src_tokens, src_lengths, return_all_hiddens=False):
        x, input_lengths = self.subsample(src_tokens, src_lengths)
        x = self.embed_scale * x
        encoder_padding_mask = lengths_to_padding_mask(input_lengths)
        positions = self.embed_positions(encoder_padding_mask).transpose(0, 1)
        x = self.dropout_module(x + positions)

        encoder_states = [] if return_all_hiddens else None
        x = self.run_layers(x, encoder_padding_mask, encoder_states)
        return {
            "encoder_out": [x],  # T x B x C
            "encoder_padding_mask": [encoder_padding_mask] if encoder_padding_mask.any() else [],  # B x T
            "encoder_embedding": [],
            "encoder_states": encoder_states or [],  # List[T x B x C]
            "src_tokens": [],
            "src_lengths": [],
        }


class B2TS2TTransformerDecoder(B2TTransformerDecoder):
    """Our decoder; like fairseq's TransformerDecoderScriptable it also returns the encoder output of a full
    (not incremental) forward, which the CTC criterion reads (``get_ctc_output``)."""

    def __init__(self, cfg, dictionary, embed_tokens):
        super().__init__(cfg, dictionary, embed_tokens)
        self.dropout_module.module_name = "TransformerDecoderScriptable"  # fairseq's, for --retain-dropout-modules

    def extract_features(
        self,
        prev_output_tokens,
        encoder_out=None,
        incremental_state=None,
        full_context_alignment=False,
        alignment_layer=None,
        alignment_heads=None,
    ):
        x, extra = self.extract_features_scriptable(
            prev_output_tokens, encoder_out, incremental_state, full_context_alignment, alignment_layer,
            alignment_heads,
        )  # fmt: skip
        if incremental_state is None:
            extra["encoder_out"] = encoder_out
        return x, extra


@register_model("s2t_transformer_b2t")
class S2TTransformerB2TModel(FastDecoding, IdentityChecked, fs.S2TTransformerModel):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_b2t_args(parser)

    @classmethod
    def build_model(cls, args, task):
        args = as_namespace(args)
        s2t_transformer_b2t(args)
        model = super().build_model(args, task)
        if getattr(model.encoder, "b2t_pretrained_from", None) is None:
            apply_init_scaling(model.encoder, args.init_scaling)
        else:  # trained weights: an init rule would rescale them
            logger.info(f"encoder loaded from {model.encoder.b2t_pretrained_from}: --init-scaling not applied to it")
        apply_init_scaling(model.decoder, args.init_scaling)
        compile_layers(model, safe_getattr(args, "compile_layers", ""))
        model.b2t_int8_decoding = safe_getattr(args, "int8_decoding", "none")
        return attach_layer_grad_norm_logger(model.record_identity(args), args)

    @classmethod
    def build_encoder(cls, args):
        encoder = B2TS2TTransformerEncoder(args)
        path = safe_getattr(args, "load_pretrained_encoder_from", None)
        if path is None:
            return encoder
        if not Path(path).exists():  # fairseq's behaviour
            logger.warning(f"skipped pretraining because {path} does not exist")
            return encoder
        load_pretrained_encoder(encoder, path, args)
        logger.info(f"loaded pretrained encoder from: {path}")
        return encoder

    @classmethod
    def build_decoder(cls, args, task, embed_tokens):
        return B2TS2TTransformerDecoder(TransformerConfig.from_namespace(args), task.target_dictionary, embed_tokens)


def load_pretrained_encoder(encoder, path, args):
    """``--load-pretrained-encoder-from``: fairseq's load_pretrained_component_from_model, refusing in one line an
    encoder trained with another method or shape (unless --allow-changed-identity) or whose weights do not fit."""
    state = checkpoint_utils.load_checkpoint_to_cpu(path)
    cfg = (state.get("cfg") or {}).get("model") or state.get("args")
    if cfg is not None and not safe_getattr(args, "allow_changed_identity", False):
        theirs, ours = identity(cfg), identity(args)
        diff = describe_difference(*({k: d[k] for k in ENCODER_IDENTITY if k in d} for d in (theirs, ours)))
        if diff:
            raise B2TConfigError(
                f"--load-pretrained-encoder-from {path}: that encoder was trained as another model ({diff}); drop "
                "the flag, match its method and depth, or pass --allow-changed-identity if the change is meant"
            )
    weights = OrderedDict((k[len("encoder."):], v) for k, v in state["model"].items() if k.startswith("encoder."))
    try:
        missing, unexpected = encoder.load_state_dict(weights, strict=False)
        problem = (missing or unexpected) and (
            f"{len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}"
        )
    except RuntimeError as exc:  # shapes that differ
        problem = str(exc).strip().splitlines()[-1].strip()
    if problem:
        raise B2TConfigError(
            f"--load-pretrained-encoder-from {path}: its encoder's weights do not fit this encoder ({problem}); "
            "build the same dimensions, --connection and CTC projection, or drop the flag"
        )
    encoder.b2t_pretrained_from = path


def resolve_s2t_options(args):
    """resolve_options, plus what a speech encoder changes: fairseq's s2t presets default to Pre-LN, and here the
    connection decides; the encoder has no token embeddings for T-Fixup's init or word dropout."""
    resolve_options(args)
    connection = get_connection(args.connection)
    for stack in ("encoder", "decoder"):
        setattr(args, f"{stack}_normalize_before", connection.final_norm)
    rule = INIT_RULES.get(args.init_scaling)
    if rule is not None and rule.init_scales_embeddings:
        raise B2TConfigError(
            f"--init-scaling {args.init_scaling} (--connection {rule.name}'s own) rescales the encoder's token "
            f"embeddings, which s2t_transformer_b2t's speech encoder does not have; pass --init-scaling none (or "
            "another rule) or choose another --connection"
        )
    if args.enc_replace_rate > 0:
        raise B2TConfigError(
            "--enc-replace-rate drops source tokens, and s2t_transformer_b2t's encoder reads speech features; drop "
            "it (--dec-replace-rate still applies to the decoder)"
        )
    return args


def _mirror(name, fairseq_arch):
    return mirror_architecture("s2t_transformer_b2t", name, fairseq_arch, resolve=resolve_s2t_options)


s2t_transformer_b2t = _mirror("s2t_transformer_b2t", fs.base_architecture)
s2t_transformer_b2t_s = _mirror("s2t_transformer_b2t_s", fs.s2t_transformer_s)
s2t_transformer_b2t_xs = _mirror("s2t_transformer_b2t_xs", fs.s2t_transformer_xs)
s2t_transformer_b2t_sp = _mirror("s2t_transformer_b2t_sp", fs.s2t_transformer_sp)
s2t_transformer_b2t_m = _mirror("s2t_transformer_b2t_m", fs.s2t_transformer_m)
s2t_transformer_b2t_mp = _mirror("s2t_transformer_b2t_mp", fs.s2t_transformer_mp)
s2t_transformer_b2t_l = _mirror("s2t_transformer_b2t_l", fs.s2t_transformer_l)
s2t_transformer_b2t_lp = _mirror("s2t_transformer_b2t_lp", fs.s2t_transformer_lp)
