"""A preempted fairseq-train loses at most one update.

Schedulers end a job with a signal and a grace period: SLURM sends SIGTERM on preemption and at the time limit
(SIGKILL follows ``KillWait`` seconds later), and ``#SBATCH --signal=USR1@180`` asks for SIGUSR1 three minutes
before the limit. fairseq 0.12 dies on either, losing everything since its last checkpoint. With the plugin
loaded, fairseq-train takes SIGTERM and SIGUSR1 as "stop at the next update boundary": the update in progress
finishes (with fairseq's own validation and saving for it, when that update has them), ``checkpoint_last.pt`` is
saved with the data iterator's position inside the epoch, and the process exits with status 128 + the signal's
number (143 for SIGTERM, 138 for SIGUSR1), as a process killed by that signal would. Rerunning the same command
continues from that update exactly as an uninterrupted run would have (tests/test_preemption.py).

With several workers the stop is agreed on: each update ends with a one-number all-reduce of "a signal arrived
here", so every worker stops after the same update even when the signal reaches them at different moments (or
only some of them). torchrun forwards SIGTERM to its workers; the recipes' ``launch.sh`` also asks it to
forward SIGUSR1 and to wait for the save before killing them.
"""
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received = []  # signal numbers seen by this process, in order


def _note(signum, frame):
    if not _received:
        # no logging here: a handler may run inside the logging module's own lock
        os.write(2, f"b2t_fairseq: {signal.Signals(signum).name}: stopping after this update, once "
                    "checkpoint_last.pt is saved\n".encode())  # fmt: skip
    _received.append(signum)


_previous = {}  # signal -> the handler before ours


def install_handlers():
    """Catch the schedulers' signals in this process (the main thread of a fairseq-train worker)."""
    if threading.current_thread() is threading.main_thread() and not _previous:
        for signum in SIGNALS:
            _previous[signum] = signal.signal(signum, _note)


def restore_handlers():
    """fairseq-train's main has returned in a process that goes on (a recipe running it in-process)."""
    if threading.current_thread() is threading.main_thread():
        while _previous:
            signum, handler = _previous.popitem()
            signal.signal(signum, handler)
    _received.clear()


def agreed_signal(trainer):
    """The signal that stops this update on every worker (0 for none). Collective when there are several."""
    mine = _received[0] if _received else 0
    if trainer.data_parallel_world_size <= 1:
        return mine
    import torch
    from fairseq.distributed import utils as distributed_utils

    flag = torch.tensor([mine], dtype=torch.long, device=trainer.device)
    distributed_utils.all_reduce(flag, trainer.data_parallel_process_group, op="max")
    return int(flag.item())


class Preempted(SystemExit):
    """Leaves fairseq-train with status 128 + signal, after the checkpoint is saved."""

    def __init__(self, signum):
        super().__init__(128 + signum)
        self.signum = signum


def _stopping_at_update_boundaries(original, checkpoint_utils):
    def validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch):
        valid_losses, should_stop = original(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch)
        signum = agreed_signal(trainer)
        if signum and not should_stop:
            updates = trainer.get_num_updates()
            if getattr(checkpoint_utils.save_checkpoint, "b2t_last_update", None) != updates:
                # no validation: it would add a best-checkpoint decision the uninterrupted run never made
                checkpoint_utils.save_checkpoint(cfg.checkpoint, trainer, epoch_itr, None)
            name = signal.Signals(signum).name
            logger.warning(f"{name}: stopped after update {updates} with checkpoint_last.pt saved in "
                           f"{os.path.abspath(cfg.checkpoint.save_dir)}; rerun the same command to continue")  # fmt: skip
            raise Preempted(signum)
        return valid_losses, should_stop

    validate_and_save.__wrapped__ = original
    return validate_and_save


def _recording_saved_update(original):
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        out = original(cfg, trainer, epoch_itr, val_loss)
        save_checkpoint.b2t_last_update = trainer.get_num_updates()
        return out

    save_checkpoint.__wrapped__ = original
    for name in ("best",):  # fairseq keeps the best validation loss as an attribute of its function
        if hasattr(original, name):
            setattr(save_checkpoint, name, getattr(original, name))
    return save_checkpoint


def _nothing_left_to_train(original):
    """fairseq 0.12 checks --max-update only after an update: a finished run that is started again (a rerun of the
    same command, a requeued job) trained one more update and wrote it over checkpoint_last.pt. Here an epoch
    that starts with nothing left to train ends at once, as the finished run did."""

    def train(cfg, trainer, task, epoch_itr):
        max_update = cfg.optimization.max_update
        if max_update and trainer.get_num_updates() >= max_update:
            logger.info(f"nothing left to train: {trainer.get_num_updates()} updates done, --max-update {max_update}")
            return [None], True
        return original(cfg, trainer, task, epoch_itr)

    train.__wrapped__ = original
    train.b2t_wrapped = True  # fairseq's own train() carries a __wrapped__ already (its metrics decorator)
    return train


def _train_modules():
    """fairseq_cli.train, and ``__main__`` when that module runs as the script (``python -m fairseq_cli.train``,
    as torchrun starts it): the same functions under two module objects."""
    import fairseq_cli.train as train_module

    modules = [train_module]
    main = sys.modules.get("__main__")
    candidate = getattr(main, "validate_and_save", None)
    if candidate is not None and getattr(candidate, "__module__", None) in ("__main__", "fairseq_cli.train"):
        modules.append(main)
    return modules


def install():
    """Wrap fairseq-train's epoch and per-update step (in fairseq_cli.train, also when it runs as ``__main__``
    under torchrun) and fairseq's checkpoint saving (idempotent)."""
    from fairseq import checkpoint_utils

    if not hasattr(checkpoint_utils.save_checkpoint, "__wrapped__"):
        checkpoint_utils.save_checkpoint = _recording_saved_update(checkpoint_utils.save_checkpoint)
    for module in _train_modules():
        if not hasattr(module.validate_and_save, "__wrapped__"):
            module.validate_and_save = _stopping_at_update_boundaries(module.validate_and_save, checkpoint_utils)
        if not getattr(module.train, "b2t_wrapped", False):
            module.train = _nothing_left_to_train(module.train)
