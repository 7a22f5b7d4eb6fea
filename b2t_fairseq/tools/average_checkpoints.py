"""Average the parameters of several fairseq checkpoints into one that fairseq-generate can load.

    b2t-average-checkpoints --inputs checkpoints/ --num-epoch-checkpoints 5 --output checkpoints/avg5.pt
    b2t-average-checkpoints --inputs ckpts/ --num-update-checkpoints 10 --checkpoint-upper-bound 30000 --output avg.pt
    b2t-average-checkpoints --inputs a.pt b.pt c.pt --output avg.pt
"""
import argparse
import os
import re
import sys
import zipfile
from pathlib import Path

import torch

from b2t_fairseq.safety import atomic
from b2t_fairseq.compat.checkpoints import load_checkpoint
from b2t_fairseq.safety.errors import B2TConfigError
from b2t_fairseq.safety.runs import damaged_checkpoint_error, describe_difference, identity, is_training_checkpoint_name, run_of

EPOCH_PATTERN = re.compile(r"checkpoint(\d+)\.pt")
UPDATE_PATTERN = re.compile(r"checkpoint_\d+_(\d+)\.pt")


def _load(path):
    try:
        state = load_checkpoint(path)
    except Exception as e:  # a truncated or foreign file fails deep inside the unpickler
        if zipfile.is_zipfile(path):  # a whole archive: say what torch said (e.g. a class it refuses)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise B2TConfigError(f"cannot load checkpoint {path}: {first_line}") from None
        raise damaged_checkpoint_error(str(path), e) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise B2TConfigError(f"{path} is not a fairseq checkpoint (it has no 'model' state dict)")
    return state


def _identity(state):
    cfg = state.get("cfg") or {}
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
    if model_cfg is None and state.get("args") is not None:  # a checkpoint of fairseq < 0.10
        model_cfg = state["args"]
    return identity(model_cfg) if model_cfg is not None else {}


def _alias_key(tensor):
    # Tied weights (--share-all-embeddings) are one storage under several names; keeping them tied keeps the file small.
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride()


def average_checkpoints(paths):
    """Checkpoint state whose "model" is the elementwise mean of the inputs; the rest comes from the last input."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise B2TConfigError("no checkpoints to average")
    sums, first, state = {}, None, None
    for path in paths:
        state = _load(path)
        model = state["model"]
        if first is None:
            first, first_identity, first_state = (path, model), _identity(state), state
            sums = {k: v.to(torch.float64, copy=True) if v.is_floating_point() else v for k, v in model.items()}
            continue
        ref_path, ref_model = first
        diff = describe_difference(_identity(state), first_identity, (f"in {path.name}", f"in {ref_path.name}"))
        if diff:
            raise B2TConfigError(
                f"{path} and {ref_path} are checkpoints of different runs ({diff}); average checkpoints of one run"
            )
        run, ref_run = run_of(state), run_of(first_state)
        if run and ref_run and run.get("id") != ref_run.get("id"):
            raise B2TConfigError(
                f"{path} and {ref_path} were written by two runs (run {run.get('id')} started {run.get('started')}, "
                f"run {ref_run.get('id')} started {ref_run.get('started')}); average checkpoints of one "
                "run"
            )
        if model.keys() != ref_model.keys():
            diff = sorted(model.keys() ^ ref_model.keys())
            raise B2TConfigError(
                f"{path} and {ref_path} hold different models: parameters differ ({', '.join(diff[:3])}"
                f"{', ...' if len(diff) > 3 else ''})"
            )
        for key, value in model.items():
            ref = ref_model[key]
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise B2TConfigError(
                    f"{path} and {ref_path} hold different models: {key} is {value.dtype}{list(value.shape)} "
                    f"vs {ref.dtype}{list(ref.shape)}"
                )
            if value.is_floating_point():
                sums[key] += value.to(torch.float64)
            elif not torch.equal(value, ref):
                raise B2TConfigError(f"non-float tensor {key} differs between {path} and {ref_path}; cannot average it")
    averaged, done = {}, {}
    for key, newest in state["model"].items():
        alias = _alias_key(newest)
        if alias not in done:
            value = sums[key]
            done[alias] = (value / len(paths)).to(newest.dtype) if newest.is_floating_point() else newest
        averaged[key] = done[alias]
    # The newest input's cfg/args/extra_state describe the model we hand out; its optimizer state would only
    # triple the file size and is meaningless for averaged weights.
    result = {k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")}
    result["model"] = averaged
    return result


def select_checkpoints(directory, num_epoch_checkpoints=None, num_update_checkpoints=None, upper_bound=None):
    """The newest N checkpoint{epoch}.pt or checkpoint_{epoch}_{update}.pt files, oldest first."""
    directory = Path(directory)
    if (num_epoch_checkpoints is None) == (num_update_checkpoints is None):
        raise B2TConfigError("give exactly one of num_epoch_checkpoints and num_update_checkpoints")
    if not directory.is_dir():
        raise B2TConfigError(f"checkpoint directory {directory} does not exist")
    by_epoch = num_epoch_checkpoints is not None
    pattern, wanted = (EPOCH_PATTERN, num_epoch_checkpoints) if by_epoch else (UPDATE_PATTERN, num_update_checkpoints)
    if wanted < 1:
        raise B2TConfigError(f"the number of checkpoints to average must be at least 1, not {wanted}")
    # Sort on the number, not the name (checkpoint10 > checkpoint9) nor the mtime (copies and resumes reset it).
    found = sorted(
        (int(m.group(1)), directory / name)
        for name in os.listdir(directory)
        if (m := pattern.fullmatch(name)) and (upper_bound is None or int(m.group(1)) <= upper_bound)
    )
    if len(found) < wanted:
        kind = "checkpoint{epoch}.pt" if by_epoch else "checkpoint_{epoch}_{update}.pt"
        bound = f" with number <= {upper_bound}" if upper_bound is not None else ""
        raise B2TConfigError(f"found only {len(found)} {kind} files{bound} in {directory}, need {wanted}")
    return [path for _, path in found[-wanted:]]


def check_output(output, inputs):
    """The average never replaces one of its inputs, nor a file fairseq-train resumes from or averages: a
    weights-only file there would restart the run's schedule (or be averaged into the next average)."""
    output = Path(output)
    if any(output.resolve() == Path(p).resolve() for p in inputs):
        raise B2TConfigError(f"--output {output} is one of the checkpoints being averaged; name the average e.g. "
                             f"{output.with_name('averaged.pt')}")  # fmt: skip
    if is_training_checkpoint_name(output.name):
        raise B2TConfigError(
            f"--output {output}: fairseq-train resumes from or averages files of that name, and an average holds no "
            f"training state; name it e.g. {output.with_name('averaged.pt')}"
        )


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="b2t-average-checkpoints",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--inputs", nargs="+", required=True, type=Path, help="one directory, or checkpoint files")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--num-epoch-checkpoints", type=int, metavar="N", help="average the last N checkpoint{epoch}.pt")
    count.add_argument(
        "--num-update-checkpoints", type=int, metavar="N", help="average the last N checkpoint_{epoch}_{update}.pt"
    )
    parser.add_argument(
        "--checkpoint-upper-bound", type=int, metavar="K", help="ignore checkpoints past epoch (or update) K"
    )
    parser.add_argument("--output", required=True, type=Path, help="where to write the averaged checkpoint")
    args = parser.parse_args(argv)

    counted = args.num_epoch_checkpoints is not None or args.num_update_checkpoints is not None
    try:
        if len(args.inputs) == 1 and args.inputs[0].is_dir():
            if not counted:
                parser.error("with a directory as --inputs, give --num-epoch-checkpoints or --num-update-checkpoints")
            paths = select_checkpoints(
                args.inputs[0], args.num_epoch_checkpoints, args.num_update_checkpoints, args.checkpoint_upper_bound
            )
        else:
            if counted or args.checkpoint_upper_bound is not None:
                parser.error("--num-*-checkpoints and --checkpoint-upper-bound need a single directory as --inputs")
            missing = [str(p) for p in args.inputs if not p.is_file()]
            if missing:
                parser.error(f"no such file or directory: {', '.join(missing)}")
            if len({p.resolve() for p in args.inputs}) != len(args.inputs):
                parser.error("a checkpoint is listed twice in --inputs; it would count double")
            paths = args.inputs
        check_output(args.output, paths)
        print(f"averaging {len(paths)} checkpoints:", *map(str, paths), sep="\n  ", flush=True)
        state = average_checkpoints(paths)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(args.output) as tmp:
            torch.save(state, tmp)
    except (B2TConfigError, OSError) as e:
        parser.exit(1, f"b2t-average-checkpoints: error: {e}\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(cli_main())
