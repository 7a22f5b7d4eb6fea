"""fairseq-hydra-train configs of the recipes' rows, generated from what `train` runs.

A config is derived from the recipe's own fairseq-train command (the same configs/<recipe>/*.yaml merged by the same
code), parsed by fairseq's argparse front end and converted by fairseq into its structured config; each section
keeps the settings that differ from what fairseq would use without them, and the model section every model option
as the architecture resolved it. So every setting is still written once,
in the recipe YAML, and ``tests/test_hydra.py`` trains both ways and gets the same config and the same weights.

    python -m b2t_fairseq.recipes.catalog                   # regenerate configs/hydra/ (the shipped configs)
    scripts/wmt_en_de/train.sh ... --hydra-config row.yaml  # one row, for this machine's GPUs and paths
    fairseq-hydra-train --config-dir configs/hydra/wmt_en_de --config-name 18l task.data=DATA-BIN \\
        checkpoint.save_dir=ckpt/b2t-18l [model.connection=pre-ln] [distributed_training.distributed_world_size=...]

fairseq composes a hydra config before it imports ``common.user_dir``, so a config group the plugin would register
in Python (``model=transformer_b2t``) cannot be selected from the command line; the model section therefore lives
in the config file itself (``model: {_name: transformer_b2t_wmt_en_de_18l, ...}``). For the same reason
``transformer_b2t`` is not registered with a dataclass: fairseq would then save only that dataclass's fields as the
model options of argparse runs (its own ``transformer`` is not registered with one either).
"""
import argparse
import dataclasses
import typing
from pathlib import Path

import yaml

from b2t_fairseq.safety import atomic

# sections fairseq fills from a registry by name (task, model, criterion, ...) hold their "_name"
NAMED = "_name"
# sections written with their "_name" even when nothing else in them changed (they name the run's components)
COMPONENTS = ("task", "criterion", "optimizer", "lr_scheduler", "scoring")
# written even when equal to the bare command's (they are the bare command's inputs too)
ALWAYS = (("task", "data"), ("checkpoint", "save_dir"), ("common", "user_dir"))
# what shipped configs leave to the user (hydra's mandatory value) or name portably
PORTABLE = {("task", "data"): "???", ("checkpoint", "save_dir"): "???", ("common", "user_dir"): "b2t_fairseq"}


def _parse(argv):
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, [str(a) for a in argv])


# model options the plugin derives from --connection when the model is built (b2t_fairseq/options.py): written as the
# command gives them, so that `model.connection=NAME` on the hydra command line still brings the method's own
DERIVED_FROM_METHOD = ("init_scaling", "encoder_normalize_before", "decoder_normalize_before")


def _model_options(args, argv):
    """Every model option as the architecture resolved it. All of them, not only those the command gives: for a model
    registered with a dataclass (the language model) fairseq-hydra-train fills the dataclass defaults in before the
    architecture runs, so an architecture's own defaults (transformer_lm_wiki103's dropout, adaptive input, ...)
    would be lost; fairseq's own LM configs spell them out for the same reason."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY, MODEL_DATACLASS_REGISTRY

    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS, add_help=False, allow_abbrev=False)
    ARCH_MODEL_REGISTRY[args.arch].add_args(parser)
    skip = _interpolated("model", ARCH_MODEL_NAME_REGISTRY[args.arch])
    dests = sorted({a.dest for a in parser._actions if a.dest != argparse.SUPPRESS} - skip - set(DERIVED_FROM_METHOD))
    options = {k: _yaml_value(getattr(args, k)) for k in dests if hasattr(args, k)}
    dc = MODEL_DATACLASS_REGISTRY.get(ARCH_MODEL_NAME_REGISTRY[args.arch])
    for field in dataclasses.fields(dc) if dc is not None else ():
        # fairseq's LM architectures set some int options to booleans (base_shuffle = False), which its own
        # dataclass validation then refuses
        kind = next((t for t in (int, float) if field.type in (t, typing.Optional[t])), None)
        if kind is not None and isinstance(options.get(field.name), bool):
            options[field.name] = kind(options[field.name])
    given = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    given.add_argument("--init-scaling", default="auto")
    options["init_scaling"] = given.parse_known_args(argv)[0].init_scaling
    return options


def _yaml_value(value):
    from enum import Enum

    if isinstance(value, Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


def _plain(node):
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return dict(vars(node)) if isinstance(node, argparse.Namespace) else node


def _interpolated(section, name):
    """Fields of ``section`` (component ``name``) whose default refers to another setting (``${optimization.lr}``):
    fairseq fills them from that setting, so a config must not freeze their resolved value."""
    import dataclasses

    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.registry import REGISTRIES
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    field = FairseqConfig.__dataclass_fields__.get(section)
    default = None if field is None else (field.default_factory if field.default is dataclasses.MISSING else field.default)
    dc = None
    if dataclasses.is_dataclass(default):  # a fixed section (common, dataset, ...): its class or an instance
        dc = default if isinstance(default, type) else type(default)
    elif section == "task":
        dc = TASK_DATACLASS_REGISTRY.get(name)
    elif section == "model":
        dc = MODEL_DATACLASS_REGISTRY.get(name)
    elif section in REGISTRIES:
        dc = REGISTRIES[section]["dataclass_registry"].get(name)
    if dc is None:
        return set()
    return {f.name for f in dataclasses.fields(dc) if isinstance(f.default, str) and f.default.startswith("${")}


def hydra_config(cmd):
    """The fairseq-hydra-train config (a dict) equivalent to the fairseq-train argv ``cmd`` (``cmd[0]`` is the tool)."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [str(a) for a in cmd[1:]]
    args = _parse(argv)
    full = convert_namespace_to_omegaconf(args)
    # what fairseq would use with the same components and none of the other flags
    bare_argv = [argv[0], "--user-dir", args.user_dir, "--task", args.task, "--arch", args.arch, "--optimizer",
                 args.optimizer, "--lr-scheduler", args.lr_scheduler, "--criterion", args.criterion]  # fmt: skip
    bare = convert_namespace_to_omegaconf(_parse(bare_argv))
    out = {}
    for section in full.keys():
        if section == "model" or section.startswith("job_logging"):
            continue
        got, default = _plain(full[section]), _plain(bare[section])
        if not isinstance(got, dict):
            if got != default:
                out[section] = got
            continue
        skip = _interpolated(section, got.get(NAMED)) | {NAMED}
        changed = {k: v for k, v in got.items()
                   if k not in skip and ((section, k) in ALWAYS or not isinstance(default, dict) or default.get(k) != v)}  # fmt: skip
        name = {NAMED: got[NAMED]} if got.get(NAMED) is not None else {}
        if changed or (name and section in COMPONENTS):
            out[section] = name | changed
    out["model"] = {NAMED: args.arch, **_model_options(args, argv)}
    return out


def portable(config):
    """``config`` with the data, save dir and plugin path left to the user / named portably."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for (section, key), value in PORTABLE.items():
        if key in config.get(section, {}):
            config[section][key] = value
    return config


# fairseq's own config keeps the working directory (hydra.run.dir: .); a config named with --config-name replaces it,
# and hydra would then run in outputs/DATE/TIME, where relative paths find nothing and no run ever resumes
KEEP_WORKING_DIR = {"hydra": {"run": {"dir": "."}}}


def render(config, header):
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + yaml.safe_dump({**KEEP_WORKING_DIR, **config}, sort_keys=False, default_flow_style=None, width=100)


def write_row_config(path, cmd, info):
    """`train --hydra-config PATH`: this row's config with its own paths, and the command that trains it."""
    path = Path(path)
    header = (f"{info['recipe']} {info['method']} {info['depth']}L, {info['gpus'] or 'CPU'} x {info['nodes']} node(s), "
              f"{info['tokens_per_update']:,} tokens per update; generated from: {info['command']}")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, render(hydra_config(cmd), header))
    print(f"wrote {path}; train with:\n  fairseq-hydra-train --config-dir {path.parent.resolve()} "
          f"--config-name {path.stem}", flush=True)  # fmt: skip
    return 0
