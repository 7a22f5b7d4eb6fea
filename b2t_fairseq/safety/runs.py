"""What keeps a run from being lost or silently mixed with another (issue 9), where fairseq itself reads and
writes checkpoints. Installed when the plugin is imported; each piece is narrow and leaves fairseq's files alone.

* A damaged checkpoint (empty, truncated, not a checkpoint at all) is one line naming the file and what to do,
  never torch's traceback, and never torch's advice to switch the safe unpickler off.
* fairseq copies its newest checkpoint to ``checkpoint_last.pt`` / ``checkpoint_best.pt`` with a plain copy;
  killed during that copy, the file is left half-written. The copy now goes to a temporary name in the same
  directory and is renamed when complete.
* ``--fp16`` / ``--bf16`` on a machine without a CUDA GPU is one line before fairseq's trainer fails on it, and
  ``--bf16`` on a CUDA GPU trains in bf16 there (fairseq 0.12's argparse front end would switch to TPU mode).
* A model of this plugin records its identity (the options that define what is trained: method, depths, init,
  word dropout, the methods' knobs). Loading a checkpoint whose identity differs (resuming a b2t save dir with
  ``--connection post-ln``, decoding with ``--model-overrides`` that change the method) is refused with the
  fix, unless ``--allow-changed-identity`` says it is meant.
"""
import logging
import os
import re
import shutil
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

from b2t_fairseq.modules.connections import METHOD_OPTIONS
from b2t_fairseq.safety.errors import B2TConfigError

logger = logging.getLogger(__name__)

# the model options that define a run; a checkpoint without one of them (a stock fairseq model) is compared on
# what it has, with its connection read from fairseq's normalize_before
IDENTITY = (
    "connection", "init_scaling", *METHOD_OPTIONS, "norm_type", "dyt_alpha_init", "sampling_method",
    "enc_replace_rate", "dec_replace_rate", "encoder_layers", "decoder_layers",
)  # fmt: skip
_FLOATS = ("enc_replace_rate", "dec_replace_rate", "dyt_alpha_init",
           *(k for k, v in METHOD_OPTIONS.items() if isinstance(v, float)))  # fmt: skip
# attribute of a loaded state["model"] dict: (path, the checkpoint's identity, the --model-overrides it was loaded with)
_TAG = "_b2t_checkpoint"


def identity(cfg):
    """The identity of a model config (argparse Namespace, DictConfig or dict)."""
    from fairseq.utils import safe_getattr

    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: safe_getattr(cfg, k, d))
    out = {k: get(k) for k in IDENTITY if get(k) is not None}
    if "connection" not in out and get("arch") is not None:  # a stock fairseq transformer
        before = get("decoder_normalize_before", get("encoder_normalize_before", False))
        out["connection"] = "pre-ln" if before else "post-ln"
    for k in _FLOATS:
        if k in out:
            out[k] = float(out[k])
    return out


def describe_difference(theirs, ours, labels=("there", "here")):
    """'' when the identities agree on every option both have, else what differs, e.g.
    "connection 'b2t' there, 'post-ln' here"."""
    keys = [k for k in IDENTITY if k in theirs and k in ours and theirs[k] != ours[k]]
    return ", ".join(f"{k} {theirs[k]!r} {labels[0]}, {ours[k]!r} {labels[1]}" for k in keys)


DATA_KEY = "b2t_data"  # in a checkpoint's extra_state: the fingerprint of the dictionaries the run trained with


def data_fingerprint(model):
    """A hash of the model's dictionaries, in id order: the same vocabulary in another order (a data dir from
    another prepare) maps the model's ids to other words, and has the same size."""
    import hashlib

    digest, found = hashlib.sha256(), False
    for name in ("encoder", "decoder"):
        symbols = getattr(getattr(getattr(model, name, None), "dictionary", None), "symbols", None)
        if symbols is not None:
            digest.update(f"{name} {len(symbols)}\n".encode())
            digest.update("\n".join(symbols).encode("utf-8", "surrogatepass"))
            found = True
    return digest.hexdigest()[:16] if found else None


def _how_to_allow(overrides):
    """The flag that loads a changed identity on purpose: fairseq-train's option, or for the decoding tools
    (fairseq-generate, -interactive, -eval-lm, the hub), which take model options only through
    --model-overrides, that dict with the key added."""
    if overrides is None:
        return "pass --allow-changed-identity"
    merged = {**overrides, "allow_changed_identity": True}
    return f'pass --model-overrides "{merged}"'


def check_loaded_identity(model, state_dict):
    """Called by our models' load_state_dict: refuse weights of a run with another identity, or trained on other
    dictionaries. Returns the checkpoint's path when they differ and the model allows it (None otherwise)."""
    tag = getattr(state_dict, _TAG, None)
    ours = getattr(model, "b2t_identity", None)
    if tag is None or ours is None:
        return None
    path, theirs, overrides = tag
    diff = describe_difference(theirs, ours)
    other_data = theirs.get("data") and ours.get("data") and theirs["data"] != ours["data"]
    if not (diff or other_data):
        return None
    if getattr(model, "b2t_allow_changed_identity", False):
        return path
    if diff:
        instead = ("decode it with the options it was trained with" if overrides is not None else
                   "use another --save-dir (or checkpoint) for this run")  # fmt: skip
        raise B2TConfigError(
            f"{path} was trained as another run ({diff}); loading it into this model would mix two runs: {instead}, "
            f"or {_how_to_allow(overrides)} if the change is meant"
        )
    raise B2TConfigError(
        f"{path} was trained with other dictionaries than this data's (dictionary fingerprint {theirs['data']} "
        f"there, {ours['data']} here: other words, or the same words in another order); its ids would map to other "
        f"words. Use the data dir it was trained with, or {_how_to_allow(overrides)} if the change is meant"
    )


def check_weights_fit(model, state_dict, path):
    """An identity change that was allowed still needs weights that fit: never a silent partial load."""
    ours, theirs = set(model.state_dict()), set(state_dict)
    missing, extra = sorted(ours - theirs), sorted(theirs - ours)
    if missing or extra:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                 ((missing, "weights this model needs are not in it"), (extra, "weights in it have no place here"))
                 if keys]  # fmt: skip
        raise B2TConfigError(
            f"{path} does not fit this model: {'; '.join(parts)}. A changed method, depth or init can load only "
            "weights of the same shape and names; decode or resume it with the options it was trained with"
        )


# ------------------------------------------------------------------ damaged checkpoints
def _intact_neighbours(path):
    """Other non-empty checkpoints beside ``path``: the numbered ones (checkpoint3.pt, checkpoint_3_500.pt) newest
    first, then checkpoint_best.pt / checkpoint_last.pt (which may hold an older state)."""
    directory = Path(path).parent
    others = [p for p in directory.glob("checkpoint*.pt") if p.name != Path(path).name and p.stat().st_size > 0]
    named = {"checkpoint_best.pt", "checkpoint_last.pt"}
    numbered = sorted((p for p in others if p.name not in named), key=lambda p: p.stat().st_mtime, reverse=True)
    return numbered + [p for p in others if p.name in named]


def damaged_checkpoint_error(path, exc):
    """One line for a checkpoint file torch cannot read, with the fix."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    what = "empty" if size == 0 else f"{size:,} bytes, truncated or not a checkpoint"
    fix = "use another checkpoint"
    if Path(path).name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        neighbours = _intact_neighbours(path)
        if neighbours:
            fix = f"copy the newest intact one over it (e.g. {neighbours[0]}), or delete it to start that run over"
        else:
            fix = "delete it to start that run over"
    return B2TConfigError(f"cannot read checkpoint {path} ({what}: an interrupted write?); {fix}")


def _guarded_loader(original):
    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        try:
            # overrides (fairseq-generate --model-overrides) are applied after the identity is read, so that one
            # that changes the method is seen as a change
            state = original(path, None, load_on_all_ranks)
        except Exception as exc:
            # bytes that are not a checkpoint fail anywhere inside the unpickler, with whatever error the opcode
            # it misread raises (UnpicklingError, EOFError, IndexError, KeyError, UnicodeDecodeError, ...)
            local = str(path)
            if not os.path.isfile(local) or zipfile.is_zipfile(local):
                raise  # missing, or a whole archive that failed for another reason: fairseq's / torch's message
            raise damaged_checkpoint_error(local, exc) from None
        from b2t_fairseq.compat.checkpoints import adopt_authors_checkpoint

        adopt_authors_checkpoint(state, str(path))
        model_cfg = (state.get("cfg") or {}).get("model") if isinstance(state, dict) else None
        if model_cfg is not None and isinstance(state.get("model"), dict):
            try:
                theirs = identity(model_cfg)
                if (state.get("extra_state") or {}).get(DATA_KEY):
                    theirs["data"] = state["extra_state"][DATA_KEY]
                if type(state["model"]) is dict:  # a plain dict (written by another averaging tool) takes no tag
                    state["model"] = OrderedDict(state["model"])
                setattr(state["model"], _TAG, (str(path), theirs, arg_overrides))
            except AttributeError:  # a state dict of another kind cannot carry the tag; nothing to compare then
                pass
        if arg_overrides is not None and state.get("cfg") is not None:
            from fairseq.dataclass.utils import overwrite_args_by_name

            overwrite_args_by_name(state["cfg"], arg_overrides)
        return state

    load_checkpoint_to_cpu.__wrapped__ = original
    return load_checkpoint_to_cpu


def _checked_model_values(original):
    """A model with a typed config (the language model's, fairseq's dataclass models) validates every value when
    fairseq builds it; a bad one (``--model-overrides "{'connection': 'nonsense'}"`` at fairseq-eval-lm) ended in
    omegaconf's traceback."""

    def build_model(cfg, task, *args, **kwargs):
        from omegaconf.errors import OmegaConfBaseException

        try:
            return original(cfg, task, *args, **kwargs)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "key", None)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise B2TConfigError(
                f"model option {key!r}: {reason}; correct it where it was given (the command line, or the "
                "--model-overrides of a decoding tool)"
            ) from None

    build_model.__wrapped__ = original
    return build_model


def _prune_only_what_is_named(original):
    """LayerDrop pruning at load time (``--model-overrides "{'encoder_layers_to_keep': '0,2'}"``): fairseq 0.12's
    prune_state_dict keeps only the layers of the stacks it is told to prune, so naming the encoder's layers alone
    dropped every decoder layer's weights and the load failed (our models and fairseq's alike). A stack without a
    list keeps all of its layers."""

    def prune_state_dict(state_dict, model_cfg):
        from fairseq.utils import safe_getattr

        # read before fairseq's pruning, which clears the lists
        named = {stack: safe_getattr(model_cfg, f"{stack}_layers_to_keep", None) for stack in ("encoder", "decoder")}
        pruned = original(state_dict, model_cfg)
        if pruned is state_dict:
            return pruned
        for stack, keep in named.items():
            if not keep:
                for key, value in state_dict.items():
                    if key.startswith(f"{stack}.") and re.search(r"\.layers\.\d+\.", key):
                        pruned.setdefault(key, value)
        return pruned

    prune_state_dict.__wrapped__ = original
    return prune_state_dict


# ------------------------------------------------------------------ atomic copies, full disks
def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _disk_full(exc, directory):
    """Whether a failed write ran out of space: an errno says so, or (torch's writer keeps no errno) the file
    system has less than 1 MiB left."""
    import errno

    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    try:
        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False


def _no_space_error(path):
    directory = os.path.dirname(os.path.abspath(path))
    last = os.path.join(directory, "checkpoint_last.pt")
    kept = f"{last} still holds the previous state" if os.path.exists(last) else "no checkpoint_last.pt was written yet"
    return B2TConfigError(
        f"no space left on the device of {directory} while writing {os.path.basename(path)}; {kept}. Free space "
        "(e.g. delete epoch checkpoints you will not average) and rerun the same command to continue; "
        "--keep-last-epochs N keeps fewer of them from then on"
    )


def _atomic_copy(original):
    def copy(src_path, dst_path, overwrite=False):
        if not (os.path.isfile(src_path) and os.path.isdir(os.path.dirname(os.path.abspath(dst_path)))):
            return original(src_path, dst_path, overwrite)  # a remote path: fairseq's own copy
        if os.path.exists(dst_path) and not overwrite:
            return original(src_path, dst_path, overwrite)
        tmp = f"{dst_path}.tmp-copy"
        _remove_quietly(tmp)
        try:
            try:
                # fairseq only ever replaces checkpoint files by renaming new ones over them, so a second name for
                # the same bytes is as good as a copy, and needs neither the space nor the time of one
                os.link(src_path, tmp)
            except OSError:
                shutil.copyfile(src_path, tmp)
            os.replace(tmp, dst_path)
        except BaseException as exc:
            _remove_quietly(tmp)
            if isinstance(exc, Exception) and _disk_full(exc, os.path.dirname(os.path.abspath(dst_path))):
                raise _no_space_error(dst_path) from None
            raise
        return True

    copy.__wrapped__ = original
    return copy


def _whole_or_no_save(original):
    """fairseq writes a checkpoint to NAME.tmp and renames it; a failed write (a full disk) left the .tmp behind
    and ended training with torch's traceback."""

    def torch_persistent_save(obj, filename, async_write=False):
        try:
            return original(obj, filename, async_write)
        except Exception as exc:
            if isinstance(filename, str) and not async_write:
                full = _disk_full(exc, os.path.dirname(os.path.abspath(filename)))
                _remove_quietly(filename + ".tmp")
                if full:
                    raise _no_space_error(filename) from None
            raise

    torch_persistent_save.__wrapped__ = original
    return torch_persistent_save


# ------------------------------------------------------------------ one run per save dir
LOCK_FILE = "train.lock"
RUN_KEY = "b2t_run"  # in a checkpoint's extra_state: which run wrote it ({"id", "started"})
_held_locks = {}  # save dir -> the open lock file, held for the life of the process
_CHECKPOINT_NAME = re.compile(r"checkpoint(?:(\d+)|_(\d+)_(\d+)|_best|_last|\.best_)(?:[-.\w]*)\.pt")


def is_training_checkpoint_name(name):
    """checkpoint3.pt, checkpoint_3_500.pt, checkpoint_best.pt, checkpoint_last.pt (any --checkpoint-suffix)."""
    return _CHECKPOINT_NAME.fullmatch(name) is not None


def training_checkpoints(directory):
    """The checkpoint files fairseq-train writes in ``directory`` (numbered, best, last), newest numbered first."""
    found = []
    for path in Path(directory).glob("checkpoint*.pt"):
        m = _CHECKPOINT_NAME.fullmatch(path.name)
        if m:
            epoch, e2, update = m.groups()
            order = (int(epoch), 1 << 62) if epoch else (int(e2), int(update)) if e2 else (-1, -1)
            found.append((order, path))
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def lock_save_dir(save_dir):
    """Hold SAVE_DIR/train.lock for the life of this process; one line naming the holder when another run has it.
    (An advisory flock: it works across nodes where the shared file system supports it, as NFSv4 and Lustre
    mounted with -o flock do.)"""
    import fcntl
    import socket
    import time

    key = os.path.realpath(save_dir)
    if key in _held_locks:
        return
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, LOCK_FILE)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise B2TConfigError(
            f"{save_dir} is being trained by another fairseq-train ({holder}; {path}); two runs in one --save-dir "
            "would write over each other's checkpoints: wait for that run to end, or use another --save-dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _held_locks[key] = f


def release_save_dirs():
    """Release the save dirs this process trained (fairseq-train's main has returned)."""
    while _held_locks:
        _, f = _held_locks.popitem()
        f.close()


def refuse_to_start_over(save_dir, last_name):
    """Starting from scratch in a save dir that holds another run's checkpoints would write over them."""
    if os.path.exists(os.path.join(save_dir, last_name)):
        return
    others = [p for p in training_checkpoints(save_dir) if p.name != last_name]
    if others:
        newest = next((p for p in others if p.name != "checkpoint_best.pt"), others[0])
        names = ", ".join(p.name for p in others[:3]) + (", ..." if len(others) > 3 else "")
        raise B2TConfigError(
            f"{save_dir} holds checkpoints of an earlier run ({names}) but no {last_name}, so this run would start "
            f"from scratch and write over them; to continue that run: cp {newest} {os.path.join(save_dir, last_name)}"
            " (then rerun), or start the new run in another --save-dir"
        )


def new_run():
    import time
    import uuid

    return {"id": uuid.uuid4().hex[:12], "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_of(state):
    """The run record of a loaded checkpoint, or None for one written without the plugin (or before it kept one)."""
    extra = state.get("extra_state") if isinstance(state, dict) else None
    return extra.get(RUN_KEY) if isinstance(extra, dict) else None


def _owned_save_dir(original):
    def load_checkpoint(cfg, trainer, **passthrough_args):
        last_name = f"checkpoint_last{trainer.checkpoint_suffix}.pt"
        own_last = cfg.restore_file == "checkpoint_last.pt"
        resuming = own_last and os.path.exists(os.path.join(cfg.save_dir, last_name))
        if not cfg.no_save:
            if own_last and cfg.finetune_from_model is None and getattr(cfg, "continue_once", None) is None:
                refuse_to_start_over(cfg.save_dir, last_name)
            if trainer.should_save_checkpoint_on_current_rank:
                lock_save_dir(cfg.save_dir)
        extra_state, epoch_itr = original(cfg, trainer, **passthrough_args)
        previous = (extra_state or {}).get(RUN_KEY) if resuming and not cfg.reset_dataloader else None
        trainer.b2t_run = previous or new_run()
        return extra_state, epoch_itr

    load_checkpoint.__wrapped__ = original
    return load_checkpoint


def _recording_the_run(original):
    def state_dict(self):
        state = original(self)
        if getattr(self, "b2t_run", None) is not None:
            state["extra_state"][RUN_KEY] = dict(self.b2t_run)
        fingerprint = data_fingerprint(self.get_model())
        if fingerprint is not None:
            state["extra_state"][DATA_KEY] = fingerprint
        return state

    state_dict.__wrapped__ = original
    return state_dict


# ------------------------------------------------------------------ precision flags without a GPU
PRECISION_FLAGS = ("fp16", "memory_efficient_fp16", "bf16", "memory_efficient_bf16")


def _checked_trainer_init(original):
    def __init__(self, cfg, *args, **kwargs):
        import torch

        common = cfg.common
        given = ["--" + f.replace("_", "-") for f in PRECISION_FLAGS if getattr(common, f, False)]
        # fairseq 0.12's --bf16 switches TPU mode on as well; the plugin reads it as a GPU mode (_bf16_on_cuda)
        if getattr(common, "tpu", False) and ("--tpu" in sys.argv or not any("bf16" in f for f in given)):
            import importlib.util

            if importlib.util.find_spec("torch_xla") is None:
                raise B2TConfigError("--tpu trains on a TPU through torch_xla, which this machine lacks; drop --tpu")
        elif given and not torch.cuda.is_available():
            raise B2TConfigError(
                f"{given[0]} needs a CUDA GPU, and torch sees none on this machine; drop {given[0]} to train in "
                "fp32 here"
            )
        _check_writable_logdir(common, cfg.distributed_training)
        original(self, cfg, *args, **kwargs)
        from b2t_fairseq.safety import preemption

        preemption.install_handlers()

    __init__.__wrapped__ = original
    return __init__


def _check_writable_logdir(common, distributed):
    """fairseq opens --tensorboard-logdir at the first log line, after training has started (on the first worker
    only): a directory it cannot write failed there, with a traceback. Tried by writing into it, as root too."""
    import tempfile

    logdir = getattr(common, "tensorboard_logdir", None)
    if not logdir or (getattr(distributed, "distributed_rank", 0) or 0) != 0:
        return
    try:
        os.makedirs(logdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=logdir):
            pass
    except OSError as exc:
        raise B2TConfigError(
            f"--tensorboard-logdir {logdir}: cannot write there ({exc.strerror or exc}); give a directory this "
            "process can create and write"
        ) from None


def _bf16_on_cuda(original):
    """fairseq 0.12's argparse front end turns ``--bf16`` into TPU mode as well (options.py: ``if args.bf16:
    args.tpu = True``), so ``fairseq-train --bf16`` on a CUDA GPU goes for torch_xla. On a machine with a CUDA GPU,
    and unless ``--tpu`` itself was given, the plugin takes ``--bf16`` as bf16 on that GPU, which is what fairseq's
    trainer, optimizer (no loss scaling in bf16) and hydra front end implement; TPU runs keep ``--tpu --bf16``."""

    def call_main(cfg, main, **kwargs):
        import torch

        common = cfg.common
        bf16 = getattr(common, "bf16", False) or getattr(common, "memory_efficient_bf16", False)
        if bf16 and getattr(common, "tpu", False) and "--tpu" not in sys.argv and torch.cuda.is_available():
            common.tpu = False
            logger.info("--bf16 on a CUDA GPU: bf16 training on the GPU (fairseq 0.12 alone would switch to TPU mode)")
        try:
            return original(cfg, main, **kwargs)
        finally:  # a recipe (or a test) runs fairseq-train in its own process, and goes on after it
            from b2t_fairseq.safety import preemption

            release_save_dirs()
            preemption.restore_handlers()

    call_main.__wrapped__ = original
    return call_main


# ------------------------------------------------------------------ batches of a resumed run
def _resume_batches_as_built(original):
    """fairseq 0.12 builds the training batches once, when it first makes the epoch iterator, ordering the
    examples under the seed ``seed + epoch`` of that moment, and reuses them every later epoch: an uninterrupted
    run orders them with ``seed + 1``, a run resumed at epoch E with ``seed + E``. Equal-length sentences then
    sit in another order inside a batch, so every row gets another dropout mask and the resumed run drifts from
    the uninterrupted one. Here a resumed run orders them as the uninterrupted run did (``seed + 1``), wherever
    fairseq would reuse the batches across epochs anyway; nothing changes for a run that starts at epoch 1."""

    def get_train_iterator(self, epoch, *args, **kwargs):
        from fairseq.data import data_utils

        dataset_cfg, seed = self.cfg.dataset, self.cfg.common.seed
        if epoch <= 1 or getattr(dataset_cfg, "update_ordered_indices_seed", False) or getattr(
            dataset_cfg, "update_epoch_batch_itr", False
        ) or kwargs.get("disable_iterator_cache", False):
            return original(self, epoch, *args, **kwargs)
        numpy_seed, task = data_utils.numpy_seed, self.task

        def first_epoch_seed(value, *rest):
            reusable = task.can_reuse_epoch_itr(task.dataset(dataset_cfg.train_subset))
            return numpy_seed(seed + 1 if value == seed + epoch and reusable else value, *rest)

        data_utils.numpy_seed = first_epoch_seed
        try:
            return original(self, epoch, *args, **kwargs)
        finally:
            data_utils.numpy_seed = numpy_seed

    get_train_iterator.__wrapped__ = original
    return get_train_iterator


def _wrap_once(owner, name, wrapper):
    """``owner.name = wrapper(owner.name)``, unless it is wrapped already (the plugin may be imported twice)."""
    if not hasattr(getattr(owner, name), "__wrapped__"):
        setattr(owner, name, wrapper(getattr(owner, name)))


def install():
    """Wrap fairseq's checkpoint loading and copying, the trainer's start and its training batches of a
    resumed run (idempotent)."""
    import fairseq.models
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils
    from fairseq.file_io import PathManager
    from fairseq.trainer import Trainer

    for owner, name, wrapper in (
        (Trainer, "__init__", _checked_trainer_init),
        (distributed_utils, "call_main", _bf16_on_cuda),
        (Trainer, "get_train_iterator", _resume_batches_as_built),
        (checkpoint_utils, "load_checkpoint", _owned_save_dir),
        (Trainer, "state_dict", _recording_the_run),
        (checkpoint_utils, "load_checkpoint_to_cpu", _guarded_loader),
        (fairseq.models, "build_model", _checked_model_values),
        (checkpoint_utils, "prune_state_dict", _prune_only_what_is_named),
        (checkpoint_utils, "torch_persistent_save", _whole_or_no_save),
        (PathManager, "copy", lambda copy: staticmethod(_atomic_copy(copy))),
    ):
        _wrap_once(owner, name, wrapper)


class IdentityChecked:
    """Mixin of our fairseq models: record the model's identity when built, check it when weights are loaded."""

    def record_identity(self, args):
        from fairseq.utils import safe_getattr

        self.b2t_identity = identity(args)
        for stack in ("encoder", "decoder"):
            if safe_getattr(args, f"{stack}_layers_to_keep", None):
                # LayerDrop pruning at load time (--model-overrides "{'encoder_layers_to_keep': '0,2'}") keeps
                # some of the trained layers: the same run, fewer layers
                self.b2t_identity.pop(f"{stack}_layers", None)
        fingerprint = data_fingerprint(self)
        if fingerprint is not None:
            self.b2t_identity["data"] = fingerprint
        self.b2t_allow_changed_identity = bool(getattr(args, "allow_changed_identity", False))
        return self

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        changed = check_loaded_identity(self, state_dict)
        if changed is not None:
            check_weights_fit(self, state_dict, changed)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
