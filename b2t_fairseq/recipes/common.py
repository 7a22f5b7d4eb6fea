"""Pieces every paper recipe shares (WMT En-De, Gigaword, WikiText-103): layered YAML configs, the token budget
per update, reserved fairseq-train flags, data-bin checks, checkpoint averaging and the recipe.json marker.

A recipe's configs/<name>/ holds base.yaml, one file per depth (``6l.yaml``, ``18l.yaml``, ...) and one per scale
(``smoke.yaml``); ``load_config`` merges them in that order, so each number is written once.
"""
import json
from pathlib import Path

import yaml

PLUGIN_DIR = Path(__file__).resolve().parents[1]
METHODS = ("post-ln", "pre-ln", "b2t")  # table order: baselines first
METHOD_NAMES = {"post-ln": "Post-LN", "pre-ln": "Pre-LN", "b2t": "B2T"}
RECIPE_FILE = "recipe.json"  # written by `train` into the save dir, so `evaluate` knows which row it scores
# Set by a recipe itself; changing them through `-- extra` would break the identical-settings or token-budget
# guarantees, so they are refused there with the option to use instead.
RESERVED_EXTRA = {
    "--connection": "--method",
    "--residual-bottom-to-top": "--method",
    "--arch": "--depth (or the depth's config file)",
    "-a": "--depth (or the depth's config file)",
    "--update-freq": "--gpus (update-freq is derived from it)",
    "--max-tokens": "--max-tokens of this recipe",
    "--distributed-world-size": "--gpus",
    "--save-dir": "--save-dir of this recipe",
    "--user-dir": "nothing (the recipe sets it)",
}


class RecipeError(Exception):
    pass


def default_config_dir(name):
    """configs/<name> beside the package in a checkout; an installed copy has none, so fall back to the cwd's."""
    candidates = (PLUGIN_DIR.parent / "configs" / name, Path("configs") / name)
    return next((d for d in candidates if d.is_dir()), candidates[0])


# ------------------------------------------------------------------ configuration
def merge(base, override):
    """Recursive dict merge; ``None`` in ``override`` deletes the key, so an override can drop a base flag."""
    out = dict(base)
    for key, value in (override or {}).items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"config {path} does not exist (pass --config-dir DIR holding base.yaml, 6l.yaml, ...)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise RecipeError(f"config {path} must be a mapping, not {type(data).__name__}")
    return data or {}


def load_config(config_dir, depth=None, scale=None, required=("train", "tokens_per_update", "evaluate")):
    """base.yaml, then ``{depth}l.yaml``, then ``{scale}.yaml`` merged over it; ``required`` keys must be present."""
    config_dir = Path(config_dir)
    config = read_yaml(config_dir / "base.yaml")
    if depth is not None:
        config = merge(config, read_yaml(config_dir / f"{depth}l.yaml"))
    if scale is not None:
        config = merge(config, read_yaml(config_dir / f"{scale}.yaml"))
    for key in required:
        if key not in config:
            raise RecipeError(f"config in {config_dir} has no '{key}' entry")
    return config


# ------------------------------------------------------------------ train
def update_freq(tokens_per_update, max_tokens, workers):
    """update-freq with workers x max_tokens x update-freq == tokens_per_update, or RecipeError saying why not."""
    per_step = workers * max_tokens
    if tokens_per_update % per_step:
        lo = tokens_per_update // per_step
        options = [f"update-freq {f} would give {f * per_step:,}" for f in (lo, lo + 1) if f > 0]
        raise RecipeError(
            f"{tokens_per_update:,} tokens per update is not a multiple of {workers} worker(s) x {max_tokens} "
            f"max-tokens = {per_step:,} ({'; '.join(options)} tokens per update); use a GPU count or --max-tokens "
            f"that divides {tokens_per_update:,}"
        )
    return tokens_per_update // per_step


def check_extra(extra, reserved=RESERVED_EXTRA):
    """Refuse pass-through fairseq-train flags that the recipe sets itself."""
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name in reserved:
            raise RecipeError(f"{name} cannot be passed to fairseq-train here; use {reserved[name]}")


def write_recipe_facts(save_dir, info):
    """Record which row a save dir trains; refuse to mix two rows (method, depth, scale) in one directory."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / RECIPE_FILE
    if path.is_file():
        # Resuming is fine (fairseq continues from checkpoint_last.pt), mixing two rows in one directory is not.
        old = json.loads(path.read_text())
        keys = ("recipe", "method", "depth", "scale")
        if any(old.get(k, info.get(k)) != info.get(k) for k in keys):
            raise RecipeError(
                f"{save_dir} holds a {old.get('method')} {old.get('depth')}L run (scale {old.get('scale')}); "
                "use another --save-dir"
            )
    path.write_text(json.dumps(info, indent=2) + "\n")


# ------------------------------------------------------------------ data
def subset_pairs(data_bin, subset):
    """Language pairs (src, tgt) for which ``subset`` is binarized in ``data_bin``."""
    pairs = set()
    for path in Path(data_bin).glob(f"{subset}.*-*.*.idx"):
        rest = path.name[len(subset) + 1 : -len(".idx")]
        pair, _, lang = rest.rpartition(".")
        src, _, tgt = pair.partition("-")
        if src and tgt and lang in (src, tgt):
            pairs.add((src, tgt))
    return pairs


def check_data_bin(data_bin, subsets=("train", "valid")):
    """A translation data-bin (fairseq-preprocess output) with the given subsets, or RecipeError saying what lacks."""
    data_bin = Path(data_bin)
    if not data_bin.is_dir():
        raise RecipeError(f"data-bin {data_bin} does not exist (binarize with fairseq-preprocess --joined-dictionary)")
    if not list(data_bin.glob("dict.*.txt")):
        raise RecipeError(f"{data_bin} has no dict.*.txt; is it a fairseq-preprocess output directory?")
    for subset in subsets:
        if not subset_pairs(data_bin, subset):
            raise RecipeError(f"{data_bin} has no '{subset}' subset ({subset}.SRC-TGT.SRC.idx/.bin)")


# ------------------------------------------------------------------ evaluate
def average(save_dir, n):
    """(path, inputs, state) of the averaged last ``n`` epoch checkpoints (reused when newer than all of them)."""
    import torch

    from b2t_fairseq.tools.average_checkpoints import average_checkpoints, select_checkpoints

    inputs = select_checkpoints(save_dir, num_epoch_checkpoints=n)
    output = Path(save_dir) / f"averaged_last{n}.pt"
    if output.is_file() and output.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        from b2t_fairseq.checkpoint_compat import load_checkpoint

        return output, inputs, load_checkpoint(output)
    print(f"averaging {len(inputs)} checkpoints: {', '.join(p.name for p in inputs)}", flush=True)
    state = average_checkpoints(inputs)
    torch.save(state, output)
    return output, inputs, state


def recipe_facts(save_dir, checkpoint_state):
    """method/depth/scale of a run: recipe.json from `train`, else what the checkpoint's model options say."""
    path = Path(save_dir) / RECIPE_FILE
    if path.is_file():
        facts = json.loads(path.read_text())
        return {k: facts.get(k) for k in ("method", "depth", "scale", "extra")}
    cfg = checkpoint_state.get("cfg") or {}
    model = cfg.get("model") if isinstance(cfg, dict) else None
    model = model if model is not None else checkpoint_state.get("args")
    get = (lambda k: model.get(k)) if isinstance(model, dict) else (lambda k: getattr(model, k, None))
    depth = get("encoder_layers")
    return {"method": get("connection"), "depth": depth if depth is not None else get("decoder_layers"),
            "scale": None, "extra": []}  # fmt: skip


def load_results(paths, recipe, required):
    """The JSON results written by ``recipe``'s evaluate, from files or directories (other JSON is skipped)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.json") if p.name != RECIPE_FILE)
        elif path.is_file():
            files.append(path)
        else:
            raise RecipeError(f"no such results file or directory: {path}")
    results = []
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecipeError(f"{path} is not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("recipe") != recipe:
            continue  # directories may hold other JSON (fairseq logs, other recipes)
        missing = [k for k in required if data.get(k) is None]
        if missing:
            raise RecipeError(f"{path} lacks {', '.join(missing)}; was it written by `{recipe} evaluate`?")
        data["_path"] = str(path)
        results.append(data)
    if not results:
        where = ", ".join(map(str, paths))
        raise RecipeError(f'no {recipe} evaluate results (JSON with "recipe": "{recipe}") in {where}')
    return results
