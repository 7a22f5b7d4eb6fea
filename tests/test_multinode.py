"""Training on several nodes from the recipes (issue 10): ``train --nodes N`` keeps the config's tokens per update
and writes a per-node torchrun script and an sbatch file; two CPU "nodes" of one worker each, on the loopback
interface, train exactly as one process with the same total batch."""
import os
import shutil
import signal
import socket
import stat
import subprocess

import pytest
import torch

from conftest import cli_env, train_flags
from b2t_fairseq.recipes.common import LAUNCH_FILE, SBATCH_FILE
from b2t_fairseq.recipes.wmt_en_de import build_train_command, main as wmt_main


def test_nodes_multiply_the_workers_and_keep_the_token_budget():
    one, info_one = build_train_command("b2t", 18, 8, "data", "ckpt")
    two, info_two = build_train_command("b2t", 18, 8, "data", "ckpt", nodes=2)
    sixteen, _ = build_train_command("b2t", 18, 16, "data", "ckpt")
    assert info_one["tokens_per_update"] == info_two["tokens_per_update"] == 3584 * 128
    assert train_flags(two)["--update-freq"] == "8" and train_flags(one)["--update-freq"] == "16"
    assert train_flags(two)["--distributed-world-size"] == "16"
    assert two == sixteen  # the fairseq-train flags of 2 x 8 GPUs are those of 16 GPUs; only the launch differs
    cpu = train_flags(build_train_command("b2t", 6, 0, "data", "ckpt", scale="smoke", nodes=2)[0])
    assert (cpu["--distributed-world-size"], cpu["--distributed-backend"], cpu["--ddp-backend"]) == ("2", "gloo",
                                                                                                     "legacy_ddp")
    with pytest.raises(Exception, match="--nodes must be >= 1"):
        build_train_command("b2t", 6, 1, "data", "ckpt", nodes=0)


def test_launch_files_for_a_slurm_allocation(toy_corpus, tmp_path, capsys):
    save = tmp_path / "ckpt"
    assert wmt_main(["train", "--method", "b2t", "--depth", "18", "--gpus", "4", "--nodes", "4",
                     "--data-bin", str(toy_corpus["data_bin"]), "--save-dir", str(save)]) == 0  # fmt: skip
    launch, sbatch = (save / LAUNCH_FILE).read_text(), (save / SBATCH_FILE).read_text()
    assert "--nnodes 4 --nproc-per-node 4" in launch and "--distributed-world-size 16" in launch
    assert "#SBATCH --nodes=4" in sbatch and "#SBATCH --gpus-per-node=4" in sbatch
    assert f"srun bash {save.resolve() / LAUNCH_FILE}" in sbatch
    assert not list(save.glob("checkpoint*.pt"))  # nothing was trained by the recipe process itself
    assert "bash " + str(save / LAUNCH_FILE) in capsys.readouterr().out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_nodes_train_as_one_process_with_the_same_batch(toy_corpus, tmp_path, monkeypatch):
    """Node 0 started by hand (NODE_RANK, MASTER_ADDR), node 1 as SLURM starts it (SLURM_NODEID, the node list
    resolved by scontrol: a stand-in here that names the loopback address). The recipe is given relative paths and
    the nodes start launch.sh from another directory; SIGTERM (a scheduler's preemption) stops both after the
    same update, and rerunning launch.sh resumes on both workers and ends with one process's weights."""
    extra = ["--", "--dropout", "0", "--max-update", "8", "--log-format", "json", "--log-interval", "1"]
    base = ["train", "--method", "b2t", "--depth", "6", "--scale", "smoke", "--data-bin", str(toy_corpus["data_bin"])]
    assert wmt_main([*base, "--save-dir", str(tmp_path / "one"), *extra]) == 0
    shutil.copytree(toy_corpus["data_bin"], tmp_path / "data-bin")
    monkeypatch.chdir(tmp_path)
    assert wmt_main([*base[:-1], "data-bin", "--nodes", "2", "--save-dir", "two", *extra]) == 0
    monkeypatch.undo()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[7-8]" ] && printf "127.0.0.1\\nnode8\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)

    def start_nodes():
        port = str(_free_port())
        nodes = [
            dict(NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            dict(SLURM_NODEID="1", SLURM_JOB_NODELIST="node[7-8]", MASTER_PORT=port,
                 PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}"),
        ]  # fmt: skip
        return [
            subprocess.Popen(["bash", str(tmp_path / "two" / LAUNCH_FILE)], cwd=elsewhere,
                             env=cli_env(PYTHONUNBUFFERED="1", **env), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
            for env in nodes
        ]

    procs, sent = start_nodes(), False
    first = []
    for line in procs[0].stdout:  # preempted once both workers have made two updates
        first.append(line)
        if not sent and '"num_updates": "2"' in line:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            sent = True
    outs = ["".join(first), procs[1].communicate(timeout=600)[0]]
    for p, out in zip(procs, outs):
        assert p.wait(timeout=600) != 0 and "stopped after update" in out, out[-3000:]

    from b2t_fairseq.compat.checkpoints import load_checkpoint

    stopped = load_checkpoint(tmp_path / "two" / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"]
    assert 2 <= stopped < 8
    assert all(f"stopped after update {stopped} " in out for out in outs)  # the same update on both workers
    assert not list(elsewhere.iterdir())  # nothing was written beside the caller

    procs = start_nodes()
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "distributed init (rank 1)" in outs[1] and f"(epoch 1 @ {stopped} updates)" in outs[0]

    one = load_checkpoint(tmp_path / "one" / "checkpoint_last.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoint_last.pt")
    assert one["optimizer_history"][-1]["num_updates"] == two["optimizer_history"][-1]["num_updates"] == 8
    assert one["model"].keys() == two["model"].keys()
    for name, weight in one["model"].items():
        torch.testing.assert_close(two["model"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_sbatch_requeues_a_job_that_stopped_after_saving(tmp_path):
    """train.sbatch puts the job back in the queue when its nodes stopped (a signal, or a failure) after saving a
    checkpoint in this allocation, and not when nothing was saved (a failure that a rerun would repeat)."""
    from b2t_fairseq.recipes.common import sbatch_script

    save = tmp_path / "ckpt"
    save.mkdir()
    sbatch = save / SBATCH_FILE
    sbatch.write_text(sbatch_script({"recipe": "wmt_en_de", "method": "b2t", "depth": 6, "nodes": 2, "gpus": 8}, save))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, body in {"srun": '[ -n "$SAVES" ] && touch "$SAVES"\nexit "$STATUS"',
                       "scontrol": 'echo "$@" >> "$CALLS"'}.items():  # fmt: skip
        tool = fake_bin / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls"
    path = f"{fake_bin}{os.pathsep}{os.environ['PATH']}"

    def submit(status, saves):
        env = dict(os.environ, PATH=path, STATUS=str(status), SAVES=saves, CALLS=str(calls), SLURM_JOB_ID="42")
        return subprocess.run(["bash", str(sbatch)], env=env).returncode

    assert submit(143, str(save / "checkpoint_last.pt")) == 143
    assert calls.read_text() == "requeue 42\n"
    calls.unlink()
    os.utime(save / "checkpoint_last.pt", (1, 1))  # saved long before this allocation
    assert submit(1, "") == 1 and not calls.exists()
    assert submit(0, str(save / "checkpoint_last.pt")) == 0 and not calls.exists()  # finished: nothing to requeue
