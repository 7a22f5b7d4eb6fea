"""Pieces every paper recipe shares (WMT En-De, Gigaword, WikiText-103): layered YAML configs, the fairseq-train
command with its token budget per update and reserved flags, fairseq's tools run in this process, data-bin checks,
checkpoint averaging, the recipe.json marker and the command line.

A recipe's configs/<name>/ holds base.yaml, one file per depth (``6l.yaml``, ``18l.yaml``, ...) and one per scale
(``smoke.yaml``); ``load_config`` merges them in that order, so each number is written once.
"""
import argparse
import contextlib
import importlib
import json
import shlex
import sys
from pathlib import Path

import yaml

from b2t_fairseq.safety import atomic
from b2t_fairseq.safety.errors import B2TConfigError, own_error
from b2t_fairseq.tools.pipeline import as_flags, split_passthrough

PLUGIN_DIR = Path(__file__).resolve().parents[1]
# table order: the baselines, the other deep-Transformer methods (the order of the B2T paper's comparison, then
# the newer ones), B2T last
METHODS = ("post-ln", "pre-ln", "dlcl", "admin", "tfixup", "realformer", "deepnorm", "resi-dual", "rezero", "sub-ln",
           "peri-ln", "layerscale", "mix-ln", "lns", "hybridnorm", "siamese", "b2t")  # fmt: skip
METHOD_NAMES = {"post-ln": "Post-LN", "pre-ln": "Pre-LN", "dlcl": "DLCL", "admin": "Admin", "tfixup": "T-Fixup",
                "realformer": "RealFormer", "deepnorm": "DeepNet", "resi-dual": "ResiDual", "rezero": "ReZero",
                "sub-ln": "Sub-LN", "peri-ln": "Peri-LN", "layerscale": "LayerScale", "mix-ln": "Mix-LN",
                "lns": "LNS", "hybridnorm": "HybridNorm", "siamese": "SiameseNorm", "b2t": "B2T"}  # fmt: skip
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
    "--distributed-world-size": "--gpus and --nodes",
    "--save-dir": "--save-dir of this recipe",
    "--user-dir": "nothing (the recipe sets it)",
}
# fairseq-train options the recipe derives from --method, --gpus and the token budget; a config must not set them
DERIVED = ("connection", "update-freq", "cpu", "fp16", "distributed-world-size")


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
            f"max-tokens = {per_step:,} ({'; '.join(options)} tokens per update); use a worker count (--gpus x "
            f"--nodes) or --max-tokens that divides {tokens_per_update:,}"
        )
    return tokens_per_update // per_step


def check_extra(extra, reserved=RESERVED_EXTRA):
    """Refuse pass-through fairseq-train flags that the recipe sets itself."""
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name in reserved:
            raise RecipeError(f"{name} cannot be passed to fairseq-train here; use {reserved[name]}")


def train_command(recipe, depths, load, method, depth, gpus, data_bin, save_dir, scale=None, extra=(), max_tokens=None,
                  reserved=RESERVED_EXTRA, nodes=1):  # fmt: skip
    """(fairseq-train argv, facts for recipe.json) of one row of ``recipe``; ``load(depth, scale)`` gives its merged
    config. ``gpus`` per node on ``nodes`` nodes (0: one CPU worker per node). Pure: touches no file but the
    configs."""
    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if int(depth) not in depths:
        raise RecipeError(f"unknown depth {depth!r}; choose one of {', '.join(map(str, depths))}")
    if gpus is None:
        if scale is None:
            raise RecipeError(
                "say where to train: --gpus N for N GPUs on this node, or --gpus 0 for the CPU (at full scale that "
                "is hundreds of forward passes per update), or --scale smoke for a CPU test run"
            )
        gpus = 0
    if gpus < 0:
        raise RecipeError(f"--gpus must be >= 0, not {gpus}")
    if nodes < 1:
        raise RecipeError(f"--nodes must be >= 1, not {nodes}")
    if scale is not None and gpus > 0:
        raise RecipeError(f"--scale {scale} runs on the CPU; drop --gpus")
    extra = list(extra)
    check_extra(extra, reserved)
    config = load(int(depth), scale)
    train = method_train_options(config, method)
    if max_tokens is not None:
        train["max-tokens"] = max_tokens
    if "max-tokens" not in train:
        raise RecipeError("the config sets no max-tokens; the token budget per update cannot be derived")
    for key in DERIVED:
        if key in train:
            raise RecipeError(f"the config sets '{key}', which the recipe derives itself; remove it from the config")
    workers = max(gpus, 1) * nodes
    freq = update_freq(int(config["tokens_per_update"]), int(train["max-tokens"]), workers)
    cmd = ["fairseq-train", str(data_bin), "--user-dir", str(PLUGIN_DIR), "--save-dir", str(save_dir),
           "--connection", method, *as_flags(train), "--update-freq", str(freq)]  # fmt: skip
    cmd += as_flags(config.get("gpu_train", {})) if gpus > 0 else ["--cpu"]
    if workers > 1:
        cmd += ["--distributed-world-size", str(workers)]
        if gpus == 0:  # CPU workers on several nodes: gloo, and fairseq's DDP wrapper that takes no device ids
            cmd += ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    cmd += extra
    info = {
        "recipe": recipe, "method": method, "depth": int(depth), "scale": scale, "gpus": gpus, "nodes": nodes,
        "max_tokens": int(train["max-tokens"]), "update_freq": freq,
        "tokens_per_update": workers * int(train["max-tokens"]) * freq, "extra": extra, "command": shlex.join(cmd),
    }  # fmt: skip
    return cmd, info


def method_train_options(config, method):
    """The config's fairseq-train flags for ``method``: ``train``, with the config's ``method_overrides`` entry
    for that method on top (the exceptions a method itself requires, e.g. T-Fixup's training without warmup).
    An override value may name another train flag in braces: ``"{lr}"`` is the train section's lr."""
    train = dict(config["train"])
    overrides = (config.get("method_overrides") or {}).get(method) or {}
    unknown = sorted(set(config.get("method_overrides") or {}) - set(METHODS))
    if unknown:
        raise RecipeError(f"method_overrides names unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for key, value in overrides.items():
        if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
            ref = value[1:-1]
            if ref not in train:
                raise RecipeError(f"method_overrides: {method}: {key}: {value} names no flag of the train section")
            value = train[ref]
        train[key] = value
    return train


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
        # the flags after `--` are part of the row (the table labels it by them): resuming with others would
        # continue the old weights under a new label
        if list(old.get("extra") or []) != list(info.get("extra") or []):
            raise RecipeError(
                f"{save_dir} holds a run trained with `-- {' '.join(old.get('extra') or []) or '(no extra flags)'}`,"
                f" not `-- {' '.join(info.get('extra') or []) or '(no extra flags)'}`; resume it with the same "
                "flags, or use another --save-dir"
            )
    atomic.write_text(path, json.dumps(info, indent=2) + "\n")


# ------------------------------------------------------------------ many nodes
LAUNCH_FILE, SBATCH_FILE = "launch.sh", "train.sbatch"
SHUTDOWN_TIMEOUT = 600  # seconds torchrun waits for its workers to save after a signal, before SIGKILL


def launch_script(cmd, info, python=None):
    """The per-node script of a multi-node row: torchrun starts one fairseq-train worker per GPU (one per node on
    the CPU); rendezvous at node 0 (MASTER_ADDR/MASTER_PORT), taken from SLURM when it runs the script."""
    nodes, per_node = info["nodes"], max(info["gpus"], 1)
    python = shlex.quote(python or sys.executable)
    return f"""#!/usr/bin/env bash
# {info["recipe"]} {info["method"]} {info["depth"]}L: {nodes} nodes x {per_node} worker(s), \
{info["tokens_per_update"]:,} tokens per update.
# Run it once on every node; the save dir (and the data-bin) must be on a file system all nodes share:
#   NODE_RANK=<0..{nodes - 1}> MASTER_ADDR=<node 0's address> [MASTER_PORT=29500] bash {LAUNCH_FILE}
# or submit {SBATCH_FILE}, which runs it on each node of a SLURM allocation. Rerunning resumes from checkpoint_last.pt.
set -euo pipefail
NODE_RANK=${{NODE_RANK:-${{SLURM_NODEID:?set NODE_RANK to the number of this node, 0..{nodes - 1}}}}}
if [ -z "${{MASTER_ADDR:-}}" ]; then
    if [ -z "${{SLURM_JOB_NODELIST:-}}" ]; then echo "{LAUNCH_FILE}: set MASTER_ADDR to node 0's address" >&2; exit 2; fi
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
# torchrun forwards SIGTERM (and, told so here, SIGUSR1) to the workers and waits for them to save: they stop after
# the update in progress with checkpoint_last.pt written and exit 143/138; rerunning this script continues there.
# (torchrun reads its --signals-to-handle / --shutdown-timeout from these variables; older torch ignores them.)
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 PET_SHUTDOWN_TIMEOUT={SHUTDOWN_TIMEOUT}
exec "${{PYTHON:-{python}}}" -m torch.distributed.run --nnodes {nodes} --nproc-per-node {per_node} \\
    --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${{MASTER_PORT:-29500}}" \\
    -m fairseq_cli.train {shlex.join(cmd[1:])}
"""


def sbatch_script(info, save_dir):
    gpus = f"#SBATCH --gpus-per-node={info['gpus']}\n" if info["gpus"] else ""
    save_dir = Path(save_dir).resolve()
    last_arg, last_ckpt = shlex.quote(str(save_dir / LAUNCH_FILE)), shlex.quote(str(save_dir / "checkpoint_last.pt"))
    return f"""#!/usr/bin/env bash
#SBATCH --job-name=b2t-{info["recipe"]}-{info["method"]}-{info["depth"]}l
#SBATCH --nodes={info["nodes"]}
#SBATCH --ntasks-per-node=1
{gpus}#SBATCH --output={save_dir}/slurm-%j.out
# SIGUSR1 three minutes before the time limit: the workers save checkpoint_last.pt after the update in progress
# and exit; --requeue puts the job back in the queue, where it resumes from that checkpoint
#SBATCH --signal=USR1@180
#SBATCH --requeue
started=$(date +%s)
# one task per node runs {LAUNCH_FILE}, which starts that node's workers with torchrun
srun bash {last_arg} || status=$?
saved=$(stat -c %Y {last_ckpt} 2>/dev/null || echo 0)
if [ "${{status:-0}}" -ne 0 ] && [ -n "${{SLURM_JOB_ID:-}}" ] && [ "$saved" -ge "$started" ]; then
    scontrol requeue "$SLURM_JOB_ID"  # stopped after saving progress in this allocation: continue in the next one
fi
exit "${{status:-0}}"
"""


def write_launch_scripts(save_dir, cmd, info):
    """A multi-node row is not trained by this process: write SAVE_DIR/launch.sh and train.sbatch and say how to
    start them."""
    save_dir = Path(save_dir)
    launch = save_dir / LAUNCH_FILE
    atomic.write_text(launch, launch_script(cmd, info))
    atomic.write_text(save_dir / SBATCH_FILE, sbatch_script(info, save_dir))
    print(f"{info['nodes']} nodes: wrote {launch} and {save_dir / SBATCH_FILE}. Start every node with\n"
          f"  NODE_RANK=<0..{info['nodes'] - 1}> MASTER_ADDR=<node 0's address> bash {launch}\n"
          f"or submit the job with: sbatch {save_dir / SBATCH_FILE}", flush=True)  # fmt: skip
    return 0


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


# ------------------------------------------------------------------ fairseq in this process
@contextlib.contextmanager
def fairseq_errors(tool):
    """fairseq's tools report bad input with plain exceptions; make that one line naming the tool."""
    try:
        yield
    except RecipeError:
        raise
    except Exception as e:
        own = own_error(e)  # ours, perhaps inside fairseq's "please ensure that the architectures match"
        if own is not None:
            raise RecipeError(f"{tool}: {own}") from e
        first = (str(e).strip().splitlines() or [""])[0]
        raise RecipeError(f"{tool} failed: {type(e).__name__}{': ' + first if first else ''} (the command "
                          "printed above shows the full traceback)") from e  # fmt: skip


def run_fairseq(cmd):
    """Run a fairseq console script (``["fairseq-train", ...]``) in this process, through the same ``cli_main`` its
    console entry point calls. The recipe has imported fairseq already (the plugin does); a second interpreter
    would spend several seconds importing it again, at every stage."""
    cmd = [str(arg) for arg in cmd]
    print("+", shlex.join(cmd), flush=True)
    module = importlib.import_module("fairseq_cli." + cmd[0].removeprefix("fairseq-"))
    saved, sys.argv = sys.argv, cmd
    try:
        with fairseq_errors(cmd[0]):
            module.cli_main()
    finally:
        sys.argv = saved


# ------------------------------------------------------------------ evaluate
def average(save_dir, n):
    """(path, inputs, state) of the averaged last ``n`` epoch checkpoints (reused when newer than all of them)."""
    import torch

    from b2t_fairseq.tools.average_checkpoints import average_checkpoints, select_checkpoints

    inputs = select_checkpoints(save_dir, num_epoch_checkpoints=n)
    output = Path(save_dir) / f"averaged_last{n}.pt"
    if output.is_file() and output.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        from b2t_fairseq.compat.checkpoints import load_checkpoint

        return output, inputs, load_checkpoint(output)
    print(f"averaging {len(inputs)} checkpoints: {', '.join(p.name for p in inputs)}", flush=True)
    state = average_checkpoints(inputs)
    with atomic.atomic_path(output) as tmp:
        torch.save(state, tmp)
    return output, inputs, state


def average_run(save_dir, n, scale=None):
    """(averaged checkpoint, the checkpoints averaged, recipe_facts) of the last ``n`` epoch checkpoints of a run,
    evaluated at ``scale`` (refused when the run's recipe.json says it was trained at another)."""
    path = Path(save_dir) / RECIPE_FILE
    if path.is_file():
        trained = json.loads(path.read_text()).get("scale")
        if trained != scale:
            flag = f"--scale {trained}" if trained else "no --scale"
            raise RecipeError(
                f"{save_dir} holds a run trained at {'scale ' + trained if trained else 'full scale'} ({path}); "
                f"evaluate it with {flag}, so that it is decoded and scored as it was trained"
            )
    try:
        checkpoint, inputs, state = average(save_dir, n)
    except B2TConfigError as e:
        raise RecipeError(f"{e} (the recipe averages the last {n} epoch checkpoints; --average-last N to change)")
    return checkpoint, inputs, recipe_facts(save_dir, state)


def default_cpu(scale):
    """Evaluate on the CPU at a test scale (--scale) or when there is no GPU."""
    import torch

    return scale is not None or not torch.cuda.is_available()


def work_dir(out):
    """OUT.work beside the result JSON ``out``: the tools' raw output, kept to check a score by hand."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f"{out.stem}.work"
    work.mkdir(exist_ok=True)
    return work


def result_row(recipe, facts):
    """The first keys of every result JSON: which row of which table it scores."""
    return {
        "recipe": recipe,
        "method": facts["method"],
        "depth": int(facts["depth"]) if facts["depth"] is not None else None,
        "scale": facts["scale"],
        "variant": " ".join(facts.get("extra") or []),
    }


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


def by_row(results, by_scale=False):
    """{(method, depth, variant[, scale]): result}: the table row each result fills; two for one row are an error."""
    ours = {}
    for r in results:
        key = (r["method"], int(r["depth"]), r.get("variant") or "") + ((r.get("scale") or "",) if by_scale else ())
        if key in ours:
            raise RecipeError(f"two results for {key[0]} {key[1]}L: {ours[key]['_path']} and {r['_path']}")
        ours[key] = r
    return ours


def print_table(text, out=None):
    """Print a rendered table, and write it to ``out`` too when given."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out, text)
    print(text, end="")


# ------------------------------------------------------------------ the recipe protocol
class Recipe:
    """One paper table's recipe. The stages (train, evaluate, table), their command line, resumability and the
    identity checks live here once; a recipe declares what differs: its depths and config keys, its data check
    (``check_data``), the inputs evaluation checks before decoding (``plan_evaluation``), its decode-and-score step
    (``decode_and_score``), its table columns (``columns``, ``result_cells``, ``published_cells``), and its own
    ``prepare`` subcommand (``add_prepare_parser``).

    Methods taking ``config_dir`` default to the recipe's configs/<name>/, so the bound methods of a recipe
    instance serve as the functions of its module (``build_train_command = RECIPE.build_train_command``)."""

    name = None  # the module and program name, and the "recipe" key of its result JSON
    doc = ""  # the module docstring: usage and description of the command line
    depths = ()
    depth_help = "layers in each of encoder and decoder"
    smoke_help = "smoke: tiny model, a few dozen CPU updates (tests)"
    eval_smoke_help = "smoke: the settings of the smoke model"
    evaluate_help = "average, decode, score, write one JSON"
    table_help = "Markdown table of evaluate results beside the published numbers"
    device = "decode"  # what --cpu of evaluate runs on the CPU
    default_max_tokens = None  # for the help of --max-tokens
    required = ("train", "tokens_per_update", "evaluate")  # config keys
    result_keys = ("method", "depth")  # result JSON keys the table needs
    reserved = RESERVED_EXTRA
    train_subsets = ("train", "valid")
    hydra = True  # whether `train --hydra-config` can write the row as a fairseq-hydra-train config

    def __init__(self):
        self.config_dir = default_config_dir(self.name)

    # ---------------------------------------------------------- hooks
    def check_data(self, data_bin, subsets):
        """Refuse a data-bin that lacks ``subsets`` with one line (default: a fairseq-preprocess translation one)."""
        check_data_bin(data_bin, subsets)

    def check_train_data(self, data_bin, cmd):
        """Refuse to train ``cmd`` on a data-bin that lacks what it reads."""
        self.check_data(data_bin, self.train_subsets)

    def check_row(self, config, method, depth, scale):
        """Refuse a (method, depth) the recipe cannot train, or a config inconsistent with it."""

    def train_facts(self, data_bin):
        """Facts of the data-bin recorded in recipe.json beside the row's (e.g. where its test split came from)."""
        return {}

    def evaluate_inputs(self):
        """Evaluate's own flags: {flag: add_argument options}; their values reach ``plan_evaluation``."""
        return {}

    def plan_evaluation(self, config, data_bin, **inputs):
        """Check every input of the evaluation before the (long) decoding; returns what decode_and_score needs."""
        raise NotImplementedError

    def decode_and_score(self, plan, config, data_bin, checkpoint, cpu, work):
        """Decode with ``checkpoint``, score, keep the raw outputs in ``work``: the result JSON's own keys."""
        raise NotImplementedError

    def headline(self, summary):
        """One line of scores for the end of evaluate."""
        raise NotImplementedError

    def columns(self, config):
        raise NotImplementedError

    def result_cells(self, result, config):
        raise NotImplementedError

    def published_cells(self, row, config):
        return ["–" if row.get(k) is None else str(row[k]) for k in self.columns(config)]

    def layers(self, depth):
        return f"{depth}L-{depth}L"

    def table_notes(self, results, config):
        """Lines under the table: how the scores were computed, footnotes."""
        return []

    def add_prepare_parser(self, sub):
        raise NotImplementedError

    # ---------------------------------------------------------- config and train
    def load_config(self, config_dir=None, depth=None, scale=None):
        return load_config(config_dir or self.config_dir, depth, scale, required=self.required)

    def build_train_command(self, method, depth, gpus, data_bin, save_dir, scale=None, extra=(), max_tokens=None,
                            config_dir=None, nodes=1):  # fmt: skip
        """(fairseq-train argv, facts for recipe.json). Pure: touches no file but the configs."""

        def load(depth, scale):
            config = self.load_config(config_dir, depth, scale)
            self.check_row(config, method, depth, scale)
            return config

        return train_command(self.name, self.depths, load, method, depth, gpus, data_bin, save_dir, scale, extra,
                             max_tokens, reserved=self.reserved, nodes=nodes)  # fmt: skip

    def run_train(self, args, cmd, info):
        self.check_train_data(args.data_bin, cmd)
        info.update(self.train_facts(args.data_bin))
        write_recipe_facts(args.save_dir, info)
        if info["nodes"] > 1:
            return write_launch_scripts(args.save_dir, cmd, info)
        run_fairseq(cmd)  # fairseq continues from SAVE_DIR/checkpoint_last.pt when rerun
        return 0

    def train(self, args, extra):
        # absolute, so that launch.sh, train.sbatch, a hydra row config and recipe.json mean the same directories
        # from whatever directory they are started
        args.data_bin, args.save_dir = args.data_bin.resolve(), args.save_dir.resolve()
        cmd, info = self.build_train_command(args.method, args.depth, args.gpus, args.data_bin, args.save_dir,
                                             args.scale, extra, args.max_tokens, args.config_dir, nodes=args.nodes)
        if args.dry_run:
            print(launch_script(cmd, info) if args.nodes > 1 else info["command"], end="\n" * (args.nodes == 1))
            return 0
        if args.hydra_config:
            from b2t_fairseq.recipes.hydra_configs import write_row_config

            if not self.hydra:
                raise RecipeError(f"--hydra-config: the {self.name} recipe has no fairseq-hydra-train config; use "
                                  "fairseq-train (drop --hydra-config)")  # fmt: skip
            if args.nodes > 1:
                raise RecipeError("--hydra-config writes a one-node config; drop --nodes (or launch fairseq-train with it)")
            if args.hydra_config.suffix != ".yaml":
                raise RecipeError(f"--hydra-config {args.hydra_config}: the name must end in .yaml (hydra's config name)")
            write_recipe_facts(args.save_dir, info)
            return write_row_config(args.hydra_config, cmd, info)
        return self.run_train(args, cmd, info)

    # ---------------------------------------------------------- evaluate
    def evaluate(self, save_dir, data_bin, out, scale=None, average_last=None, cpu=None, config_dir=None, **inputs):
        """Average the run's last epoch checkpoints, decode and score, write the result JSON ``out`` (raw outputs in
        OUT.work/). Every input is checked before the averaging and the decoding."""
        config = self.load_config(config_dir, scale=scale)
        save_dir, data_bin, out = Path(save_dir), Path(data_bin), Path(out)
        if not save_dir.is_dir():
            raise RecipeError(f"save dir {save_dir} does not exist")
        plan = self.plan_evaluation(config, data_bin, **inputs)
        n = int(average_last or config["evaluate"]["average_last_epochs"])
        checkpoint, averaged, facts = average_run(save_dir, n, scale)
        cpu = default_cpu(scale) if cpu is None else cpu
        scores = self.decode_and_score(plan, config, data_bin, checkpoint, cpu, work_dir(out))
        summary = {**result_row(self.name, facts), **scores, "checkpoint": str(checkpoint),
                   "averaged": [str(p) for p in averaged]}  # fmt: skip
        atomic.write_text(out, json.dumps(summary, indent=2) + "\n")
        print(f"{facts['method']} {facts['depth']}L: {self.headline(summary)} -> {out}", flush=True)
        return summary

    def _evaluate(self, args, extra):
        inputs = {self._dest(flag): getattr(args, self._dest(flag)) for flag in self.evaluate_inputs()}
        self.evaluate(args.save_dir, args.data_bin, args.out, args.scale, args.average_last,
                      True if args.cpu else None, args.config_dir, **inputs)  # fmt: skip
        return 0

    @staticmethod
    def _dest(flag):
        return flag.lstrip("-").replace("-", "_")

    # ---------------------------------------------------------- table
    def load_results(self, paths):
        return load_results(paths, self.name, self.result_keys)

    def render_table(self, results, config):
        """One row per (method, depth, variant, scale) of ours, published rows beside them, by depth then method."""
        ours = by_row(results, by_scale=True)
        published = config.get("published") or {}
        order = {m: i for i, m in enumerate(METHODS)}
        rows = []  # (sort key, method, layers, source, cells)
        for p in published.get("rows", []):
            depth = p.get("depth")
            source = f"published: {p['label']}" + (f" — {p['note']}" if p.get("note") else "")
            layers = self.layers(depth) if depth is not None else "unknown"
            rows.append(((int(depth or 0), order.get(p["method"], 99), 0), p["method"], layers, source,
                         self.published_cells(p, config)))  # fmt: skip
        for (method, depth, variant, scale), r in ours.items():
            source = "ours" + (f" ({variant})" if variant else "") + (f", scale {scale}" if scale else "")
            rows.append(((depth, order.get(method, 99), 1, variant, scale), method, self.layers(depth), source,
                         self.result_cells(r, config)))  # fmt: skip
        rows.sort(key=lambda row: row[0])
        header = ["Method", "Layers", "Source", *self.columns(config)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for _, method, layers, source, cells in rows:
            lines.append(f"| {METHOD_NAMES.get(method, method)} | {layers} | {source} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += self.table_notes(list(ours.values()), config)
        if published.get("source"):
            lines.append(f"Published numbers: {' '.join(str(published['source']).split())}.")
        return "\n".join(lines) + "\n"

    def _table(self, args, extra):
        config = self.load_config(args.config_dir)  # a bad config fails before the results are read
        print_table(self.render_table(self.load_results(args.results), config), args.out)
        return 0

    # ---------------------------------------------------------- command line
    def build_parser(self):
        parser = argparse.ArgumentParser(
            prog=self.name, description=self.doc.split("\n\n")[0], epilog=self.doc.split("\n\n", 1)[1],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        parser.add_argument("--config-dir", type=Path, default=self.config_dir, help=f"default: {self.config_dir}")
        sub = parser.add_subparsers(dest="command", required=True)
        self.add_prepare_parser(sub)

        p = sub.add_parser("train", help="train one (method, depth) row with fairseq-train")
        p.add_argument("--method", required=True, choices=METHODS)
        p.add_argument("--depth", required=True, type=int, choices=self.depths, help=self.depth_help)
        p.add_argument("--gpus", type=int, help="GPUs per node (0: the CPU); update-freq is derived from it. "
                       "Required at full scale; --scale runs on the CPU")  # fmt: skip
        p.add_argument("--nodes", type=int, default=1, help="nodes to train on (default 1): more than one writes a "
                       "per-node torchrun script and an sbatch file into --save-dir instead of training; the tokens "
                       "per update stay those of the config")  # fmt: skip
        p.add_argument("--data-bin", required=True, type=Path)
        p.add_argument("--save-dir", required=True, type=Path)
        p.add_argument("--scale", choices=("smoke",), help=self.smoke_help)
        p.add_argument("--max-tokens", type=int,
                       help=f"per-GPU batch in tokens (default: the config's {self.default_max_tokens})")  # fmt: skip
        p.add_argument("--dry-run", action="store_true", help="print the fairseq-train command and exit")
        p.add_argument("--hydra-config", type=Path, metavar="FILE.yaml", help="write the row as a fairseq-hydra-train "
                       "config instead of training (b2t_fairseq/recipes/hydra_configs.py)")  # fmt: skip
        p.set_defaults(func=self.train)

        p = sub.add_parser("evaluate", help=self.evaluate_help)
        p.add_argument("--save-dir", required=True, type=Path)
        p.add_argument("--data-bin", required=True, type=Path)
        for flag, options in self.evaluate_inputs().items():
            p.add_argument(flag, **options)
        p.add_argument("--out", required=True, type=Path, help="result JSON")
        p.add_argument("--scale", choices=("smoke",), help=self.eval_smoke_help)
        p.add_argument("--average-last", type=int, metavar="N", help="epoch checkpoints to average (default: config's)")
        p.add_argument("--cpu", action="store_true", help=f"{self.device} on the CPU even when a GPU is present")
        p.set_defaults(func=self._evaluate)

        p = sub.add_parser("table", help=self.table_help)
        p.add_argument("--results", required=True, nargs="+", help="result JSON files or directories holding them")
        p.add_argument("--out", type=Path, help="write the table here too")
        p.set_defaults(func=self._table)
        return parser

    def main(self, argv=None):
        """Run the subcommand of ``argv`` (default: the command line; what follows ``--`` reaches `train` as extra
        fairseq-train flags); an error the user can fix ends it with one line and exit status 1."""
        parser = self.build_parser()
        argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        try:
            if extra and args.command != "train":
                raise RecipeError(f"{args.command} takes no extra flags after --")
            return args.func(args, extra)
        except (RecipeError, B2TConfigError, OSError) as e:
            parser.exit(1, f"{parser.prog}: error: {e}\n")


def fmt(value):
    """A score cell: two decimals, or a dash for none."""
    return "–" if value is None else f"{float(value):.2f}"
