"""Preemption loses at most one update (issue 19): fairseq-train stopped by SIGTERM or SIGUSR1, as schedulers send
them, saves checkpoint_last.pt after the update in progress, exits with 128 + the signal, and the rerun ends
with the weights of an uninterrupted run."""
import signal
import subprocess

import pytest
import torch

from conftest import BIN, PLUGIN_DIR, TINY_MODEL, TINY_OPTIM, cli_env

pytestmark = pytest.mark.slow

MAX_UPDATE = 20  # the toy corpus makes 9 updates per epoch: the run crosses two epoch boundaries


def _cmd(data_bin, save_dir):
    return [str(BIN / "fairseq-train"), str(data_bin), "--user-dir", str(PLUGIN_DIR), "--arch", "transformer_b2t",
            *TINY_MODEL, *TINY_OPTIM, "--log-interval", "1", "--save-dir", str(save_dir),
            "--max-update", str(MAX_UPDATE)]  # fmt: skip


def _interrupted(cmd, signum, after_update):
    """Run ``cmd`` and send it ``signum`` once it has logged update ``after_update``; (return code, output)."""
    proc = subprocess.Popen(cmd, env=cli_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out, sent = [], False
    for line in proc.stdout:
        out.append(line)
        if not sent and f'"num_updates": "{after_update}"' in line:
            proc.send_signal(signum)
            sent = True
    proc.wait(timeout=300)
    return proc.returncode, "".join(out)


def _updates(path):
    from b2t_fairseq.compat.checkpoints import load_checkpoint

    state = load_checkpoint(path)
    return state["optimizer_history"][-1]["num_updates"], state


def test_signals_stop_after_an_update_and_the_rerun_continues_exactly(toy_corpus, tmp_path):
    data_bin = toy_corpus["data_bin"]
    subprocess.run(_cmd(data_bin, tmp_path / "whole"), env=cli_env(), check=True, capture_output=True)
    save = tmp_path / "preempted"

    code, out = _interrupted(_cmd(data_bin, save), signal.SIGTERM, after_update=3)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    stopped, _ = _updates(save / "checkpoint_last.pt")
    assert 3 <= stopped < 9, out[-2000:]  # mid-epoch: at most the update in progress was added
    assert f"stopped after update {stopped}" in out and not list(save.glob("*.tmp*"))

    code, out = _interrupted(_cmd(data_bin, save), signal.SIGUSR1, after_update=stopped + 8)  # in epoch 2
    assert code == 128 + signal.SIGUSR1, out[-3000:]
    assert f"(epoch 1 @ {stopped} updates)" in out  # it resumed rather than starting over
    second, _ = _updates(save / "checkpoint_last.pt")
    assert stopped + 8 <= second < MAX_UPDATE

    subprocess.run(_cmd(data_bin, save), env=cli_env(), check=True, capture_output=True)
    final, resumed = _updates(save / "checkpoint_last.pt")
    whole_updates, whole = _updates(tmp_path / "whole" / "checkpoint_last.pt")
    assert final == whole_updates == MAX_UPDATE
    assert resumed["model"].keys() == whole["model"].keys()
    for name, weight in whole["model"].items():
        torch.testing.assert_close(resumed["model"][name], weight, rtol=0, atol=0, msg=name)
