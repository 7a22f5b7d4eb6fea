"""Command-line options of the b2t_fairseq models, and the one place where they are checked.

The options are a fairseq dataclass, so ``fairseq-train --help`` lists them, the language model's config
inherits them, and they are saved in every checkpoint like fairseq's own model options.
"""
import argparse
import math
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.utils import safe_getattr
from omegaconf import OmegaConf

from b2t_fairseq.safety.errors import B2TConfigError
from b2t_fairseq.modules.connections import CONNECTIONS, INIT_RULES, get_connection
from b2t_fairseq.modules.norms import NORM_TYPES

# NormFormer options of fairseq's layers that rewire the residual path in ways our layers do not.
_UNSUPPORTED = ("cross_self_attention", "scale_attn", "scale_heads", "scale_fc", "scale_resids")


@dataclass
class B2TOptions(FairseqDataclass):
    connection: ChoiceEnum(list(CONNECTIONS)) = field(
        default="b2t",
        metadata={
            "help": "the residual method of every layer: b2t (Post-LN plus a bottom-to-top residual, the default), "
            "post-ln (fairseq's --arch transformer), pre-ln (fairseq's --*-normalize-before), deepnorm (DeepNet), "
            "admin, tfixup, dlcl, realformer, resi-dual, peri-ln, rezero, sub-ln, and the newer mix-ln, lns "
            "(LayerNorm Scaling), layerscale, siamese (SiameseNorm), hybridnorm; formulas in README and "
            "b2t_fairseq/modules/connections.py"
        },
    )
    residual_bottom_to_top: bool = field(
        default=False, metadata={"help": "the authors' spelling of --connection b2t (accepted for their commands)"}
    )
    init_scaling: ChoiceEnum(["auto", "none", *INIT_RULES]) = field(
        default="auto",
        metadata={
            "help": "initialisation applied after fairseq's: auto (default) = the method's own (b2t: depth, "
            "deepnorm: deepnorm, tfixup: tfixup, sub-ln: subln, the others none); depth = B2T's N^-1/2 on every "
            "non-LN weight matrix of each layer (the authors' current code); deepnorm / tfixup / subln = those "
            "methods' rules; "
            "none = fairseq's init unchanged. A rule that is not the method's own is allowed and logged"
        },
    )
    admin_output_change: ChoiceEnum(["O(logn)", "O(n)", "O(1)"]) = field(
        default="O(logn)",
        metadata={
            "help": "--connection admin only: admin-torch's output_change_scale, which sets omega's initial value "
            "(O(logn), the default: sqrt((n+1)/ln(n+1)-1); O(n): 1; O(1): sqrt(n); n = residual sub-layers)"
        },
    )
    resi_dual_alpha: float = field(
        default=1.0,
        metadata={
            "help": "--connection resi-dual only: the weight of the Post-LN stream in each stack's output "
            "alpha * x + LN(dual stream) (1, the default, as the reference's enc_alpha/dec_alpha)"
        },
    )
    mix_ln_post_fraction: float = field(
        default=0.25,
        metadata={
            "help": "--connection mix-ln only: the fraction alpha of each stack's layers that are Post-LN (the first "
            "floor(alpha L)); the others are Pre-LN (0.25, the default, as the reference: 1 of 6 layers, 4 of 18)"
        },
    )
    layerscale_init: float = field(
        default=0.0,
        metadata={
            "help": "--connection layerscale only: the value every lambda starts at; 0 (the default): by the "
            "stack's depth L as CaiT, 0.1 for L <= 18, 1e-5 for L <= 24, 1e-6 deeper"
        },
    )
    hybridnorm_first_pre: bool = field(
        default=False,
        metadata={
            "help": "--connection hybridnorm only: HybridNorm*, whose first layer is Pre-LN (q/k/v norms kept)"
        },
    )
    norm_type: ChoiceEnum(list(NORM_TYPES)) = field(
        default="layernorm",
        metadata={
            "help": "the type of every norm the model builds (sub-layers', final, embedding, each method's own), "
            "orthogonal to --connection: layernorm (fairseq's, the default), rmsnorm, dyt (Dynamic Tanh), derf "
            "(Dynamic erf); b2t_fairseq/modules/norms.py"
        },
    )
    dyt_alpha_init: float = field(
        default=0.5,
        metadata={"help": "--norm-type dyt or derf only: the initial value of each norm's alpha (0.5, the default)"},
    )
    sampling_method: ChoiceEnum(["none", "worddrop"]) = field(
        default="none",
        metadata={"help": "worddrop: zero input token embeddings at random while training (Takase & Kiyono 2021)"},
    )
    enc_replace_rate: float = field(
        default=0.0, metadata={"help": "encoder word-dropout probability, in [0, 1); needs --sampling-method worddrop"}
    )
    dec_replace_rate: float = field(
        default=0.0, metadata={"help": "decoder word-dropout probability, in [0, 1); needs --sampling-method worddrop"}
    )
    decay_val: float = field(
        default=0.0, metadata={"help": "accepted for the authors' command lines; worddrop does not use it"}
    )
    allow_changed_identity: bool = field(
        default=False,
        metadata={
            "help": "load weights of a run whose method, depths, init or word dropout differ from this model's "
            "(refused otherwise, so that resuming or decoding never mixes two runs by accident)"
        },
    )
    compile_layers: str = field(
        default="",
        metadata={
            "help": "compile every encoder/decoder layer with this torch.compile backend (inductor: fused kernels; "
            "aot_eager: tracing only), for training and decoding; state dicts are unchanged. TorchScript is not "
            "supported (b2t_fairseq/fast_paths/compiling.py says why). Default '': off"
        },
    )
    int8_decoding: ChoiceEnum(["none", "decoder", "all"]) = field(
        default="none",
        metadata={
            "help": "CPU decoding: dynamic int8 quantization of the Linear layers of the decoder (decoder: its layers "
            "and output projection; all: the encoder's layers too), applied when fairseq-generate/-interactive or "
            "the hub prepares a loaded model; checkpoints keep float32 weights. For a trained model: "
            "--model-overrides \"{'int8_decoding': 'decoder'}\" (b2t_fairseq/fast_paths/int8.py)"
        },
    )
    log_layer_grad_norms: int = field(
        default=0,
        metadata={
            "help": "every N updates, log each layer's parameter-gradient L2 norm per target token as "
            "gnorm_enc{i}/gnorm_dec{i} in the training log (b2t_fairseq/analysis/live.py); 0 (default): off"
        },
    )


def add_b2t_args(parser):
    # no defaults on the parser, so architecture presets can still choose them (fairseq's convention)
    gen_parser_from_dataclass(parser, B2TOptions(), delete_default=True, with_prefix="")


# fairseq options of the same name defined by a task: translation_multi_simple_epoch's --sampling-method (how to
# sample language pairs) is not our word-dropout switch. fairseq adds the model's options first, so that task's
# add_args would fail on ours; it gets the flag instead, and such a run has no word dropout.
_SHARED_NAMES = ("--sampling-method",)


def _drop_shared_names(parser):
    """Remove our options named in _SHARED_NAMES from ``parser`` (and its groups), for a task to add its own."""
    for name in _SHARED_NAMES:
        action = parser._option_string_actions.get(name)
        if action is None:
            continue
        for container in (parser, *parser._action_groups):
            container._option_string_actions.pop(name, None)
            if action in getattr(container, "_group_actions", ()):
                container._group_actions.remove(action)
        if action in parser._actions:
            parser._actions.remove(action)


def _yield_shared_names(task_cls):
    raw = task_cls.__dict__.get("add_args")
    if raw is None or getattr(raw, "_b2t_yields", False):
        return
    function = raw.__func__
    if isinstance(raw, staticmethod):

        def add_args(parser):
            _drop_shared_names(parser)
            return function(parser)

        wrapped = staticmethod(add_args)
    else:

        def add_args(cls, parser):
            _drop_shared_names(parser)
            return function(cls, parser)

        wrapped = classmethod(add_args)
    wrapped._b2t_yields = True
    task_cls.add_args = wrapped


def install_shared_name_handling():
    """Called when the plugin is imported."""
    try:
        from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask
    except ImportError:  # pragma: no cover - a fairseq without that task
        return
    _yield_shared_names(TranslationMultiSimpleEpochTask)


def as_namespace(args):
    """fairseq hands models a DictConfig when it loads a checkpoint; our code wants the CLI's Namespace."""
    if OmegaConf.is_config(args):
        return argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
    return args


def resolve_options(args, stacks=("encoder", "decoder")):
    """Fill in our defaults on ``args`` and reject combinations that make no sense. Idempotent.

    Runs inside every architecture function, i.e. before fairseq fills its own defaults, so we can tell
    a user's explicit ``--encoder-normalize-before`` from fairseq's default.
    """
    connection = safe_getattr(args, "connection", None) or "b2t"
    if connection not in CONNECTIONS:
        raise B2TConfigError(f"unknown --connection {connection!r}; choose one of {', '.join(CONNECTIONS)}")
    if safe_getattr(args, "residual_bottom_to_top", False) and connection != "b2t":
        raise B2TConfigError(
            f"--residual-bottom-to-top means --connection b2t, but --connection {connection} was given; drop one"
        )
    conn = get_connection(connection)
    if stacks == ("decoder",) and not conn.decoder_only:
        raise B2TConfigError(
            f"--connection {connection} defines its initialisation for encoder-decoder models only, so "
            "transformer_lm_b2t does not offer it; choose another --connection"
        )
    for stack in stacks:
        flag = f"{stack}_normalize_before"
        if conn.final_norm:
            setattr(args, flag, True)
        elif safe_getattr(args, flag, False):
            raise B2TConfigError(
                f"--{flag.replace('_', '-')} makes a Pre-LN layer, which contradicts --connection {connection}; "
                "drop it, or use --connection pre-ln"
            )
    if not conn.layer_norms and safe_getattr(args, "layernorm_embedding", False):
        raise B2TConfigError(
            f"--layernorm-embedding adds a layer norm, which --connection {connection} removes; drop it"
        )
    # a method's own options: refused on the others (the default passes: a language model's dataclass
    # config carries every option for every method)
    for method in CONNECTIONS.values():
        for knob, default in method.knobs.items():
            value = safe_getattr(args, knob, None)
            flag = f"--{knob.replace('_', '-')}"
            # nan != default too: checked first, so that nan is named as such on any method
            if isinstance(default, float) and value is not None and not math.isfinite(float(value)):
                raise B2TConfigError(f"{flag} {value}: must be a finite number (the default is {default})")
            if value is not None and value != default and method is not conn:
                raise B2TConfigError(f"{flag} only applies to --connection {method.name}, not {connection}; drop it")
    _check_norm_type(args, conn)
    problem = conn.check_options(lambda knob: _or_default(safe_getattr(args, knob, None), conn.knobs[knob]))
    if problem:
        raise B2TConfigError(problem)
    if not conn.layerdrop:
        for stack in stacks:
            if float(safe_getattr(args, f"{stack}_layerdrop", 0.0) or 0.0) > 0:
                raise B2TConfigError(
                    f"--connection {connection} weighs the output of every layer, so --{stack}-layerdrop cannot "
                    "drop layers; drop the flag"
                )
    for name in _UNSUPPORTED:
        if safe_getattr(args, name, False):
            raise B2TConfigError(f"--{name.replace('_', '-')} is not supported by b2t_fairseq models; drop it")

    init_scaling = safe_getattr(args, "init_scaling", None) or "auto"
    if init_scaling == "auto":
        init_scaling = conn.default_init_scaling
    if init_scaling != "none" and init_scaling not in INIT_RULES:
        raise B2TConfigError(
            f"unknown --init-scaling {init_scaling!r}; choose auto, none, {', '.join(INIT_RULES)}"
        )
    _check_depths(args, stacks, conn, init_scaling)

    sampling_method = safe_getattr(args, "sampling_method", None) or "none"
    ours = sampling_method in ("none", "worddrop")  # else a task's own --sampling-method (see _SHARED_NAMES)
    if not ours:
        sampling_method = "none"
    rates = {}
    for name in ("enc_replace_rate", "dec_replace_rate"):
        rate = float(safe_getattr(args, name, None) or 0.0)
        if not 0.0 <= rate < 1.0:
            raise B2TConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {rate}")
        if rate > 0 and sampling_method != "worddrop":
            raise B2TConfigError(f"--{name.replace('_', '-')} {rate} has no effect; add --sampling-method worddrop")
        rates[name] = rate
    if sampling_method == "worddrop" and not any(rates.values()):
        raise B2TConfigError(
            "--sampling-method worddrop drops nothing with --enc-replace-rate and --dec-replace-rate both 0; give "
            "a rate (the paper's deep rows use 0.1 on both sides)"
        )

    args.connection = connection
    args.residual_bottom_to_top = bool(safe_getattr(args, "residual_bottom_to_top", False))
    args.init_scaling = init_scaling
    for method in CONNECTIONS.values():
        for knob, default in method.knobs.items():
            if safe_getattr(args, knob, None) is None:
                setattr(args, knob, default)
    if ours:
        args.sampling_method = sampling_method
    args.enc_replace_rate = rates["enc_replace_rate"]
    args.dec_replace_rate = rates["dec_replace_rate"]
    args.decay_val = float(safe_getattr(args, "decay_val", None) or 0.0)
    return args


def _check_norm_type(args, conn):
    norm_type = safe_getattr(args, "norm_type", None) or "layernorm"
    if norm_type not in NORM_TYPES:
        raise B2TConfigError(f"unknown --norm-type {norm_type!r}; choose one of {', '.join(NORM_TYPES)}")
    if norm_type != "layernorm" and not conn.layer_norms:
        raise B2TConfigError(
            f"--norm-type {norm_type}: --connection {conn.name} is defined without any norm, so there is none to "
            "make of that type; drop --norm-type"
        )
    alpha = safe_getattr(args, "dyt_alpha_init", None)
    if alpha is not None and not math.isfinite(float(alpha)):
        raise B2TConfigError(f"--dyt-alpha-init {alpha}: must be a finite number (the default is 0.5)")
    if alpha is not None and float(alpha) != 0.5 and norm_type not in ("dyt", "derf"):
        raise B2TConfigError(f"--dyt-alpha-init only applies to --norm-type dyt or derf, not {norm_type}; drop it")
    args.norm_type = norm_type
    args.dyt_alpha_init = 0.5 if alpha is None else float(alpha)


def _or_default(value, default):
    return default if value is None else value


def _check_depths(args, stacks, conn, init_scaling):
    """A stack may have no layers (fairseq trains an encoder of embeddings alone), except under a method or init
    rule whose constants are defined for at least one layer in each stack (``empty_stacks`` False)."""
    for stack in stacks:
        layers = safe_getattr(args, f"{stack}_layers", None)
        if layers is None or int(layers) > 0:
            continue
        flag = f"--{stack}-layers {layers}"
        if int(layers) < 0:
            raise B2TConfigError(f"{flag}: a stack has 0 or more layers")
        rule = INIT_RULES.get(init_scaling)
        for owner, how in ((conn, f"--connection {conn.name}"), (rule, f"--init-scaling {init_scaling}")):
            if owner is not None and not owner.empty_stacks:
                raise B2TConfigError(
                    f"{flag} leaves the {stack} without layers, but {how} defines its constants for at least one "
                    f"layer in each stack (they involve N and M: README, 'What the layers compute'); give the "
                    f"{stack} layers, or choose another {how.split()[0]}"
                )


def check_task(args, task):
    """What only the task's data can tell: called by a model's build_model before fairseq's."""
    if safe_getattr(args, "share_all_embeddings", False):
        source, target = task.source_dictionary, task.target_dictionary
        if source is not None and target is not None and source != target:
            data = safe_getattr(args, "data", "") or "the data"
            raise B2TConfigError(
                f"--share-all-embeddings needs one dictionary for source and target, but {data} has two different "
                "ones; binarize the data with fairseq-preprocess --joined-dictionary, or drop --share-all-embeddings"
            )


def word_dropout_rate(cfg, side):
    """The word-dropout probability a built encoder ('enc') or decoder ('dec') should use."""
    if safe_getattr(cfg, "sampling_method", "none") != "worddrop":
        return 0.0
    return float(safe_getattr(cfg, f"{side}_replace_rate", 0.0))
