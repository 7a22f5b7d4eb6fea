"""Nothing lost, nothing silently mixed (issue 9): damaged checkpoints, interrupted checkpoint copies, and runs
whose identity changes, through fairseq's real entry points."""
import os
import shutil

import pytest

from conftest import PLUGIN_DIR, TINY_MODEL, TINY_OPTIM, run


def _train(data_bin, save_dir, *flags, check=True):
    return run(
        "fairseq-train", data_bin, "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t", *TINY_MODEL, *TINY_OPTIM,
        "--save-dir", save_dir, *flags, check=check,
    )  # fmt: skip


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("b2t_fairseq: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def b2t_run(toy_corpus, tmp_path_factory):
    """A b2t run of two epochs: checkpoint1.pt, checkpoint2.pt, checkpoint_last.pt."""
    save_dir = tmp_path_factory.mktemp("b2t_run") / "ckpt"
    _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 2)
    return save_dir


def _copy_run(b2t_run, tmp_path):
    save_dir = tmp_path / "ckpt"
    shutil.copytree(b2t_run, save_dir)
    return save_dir


# ------------------------------------------------------------------ identity
def test_resuming_with_another_method_is_refused(toy_corpus, b2t_run, tmp_path):
    save_dir = _copy_run(b2t_run, tmp_path)
    proc = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 3, "--connection", "post-ln", check=False)
    _one_line_error(proc, "checkpoint_last.pt", "connection 'b2t' there, 'post-ln' here", "--allow-changed-identity")
    assert not (save_dir / "checkpoint3.pt").exists()
    # word dropout is part of the identity too
    proc = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 3, "--sampling-method", "worddrop",
                  "--enc-replace-rate", "0.1", check=False)  # fmt: skip
    _one_line_error(proc, "sampling_method 'none' there, 'worddrop' here")
    # said on purpose, it goes ahead; the same identity resumes as before
    allowed = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 3, "--connection", "post-ln",
                     "--allow-changed-identity")  # fmt: skip
    assert "Loaded checkpoint" in allowed.stdout and (save_dir / "checkpoint3.pt").is_file()


def test_decoding_with_an_override_that_changes_the_method_is_refused(toy_corpus, b2t_run):
    common = ["fairseq-generate", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--path",
              b2t_run / "checkpoint_last.pt", "--gen-subset", "valid", "--beam", 2, "--cpu", "--max-sentences", 50]  # fmt: skip
    proc = run(*common, "--model-overrides", "{'connection': 'pre-ln'}", check=False)
    _one_line_error(proc, "connection 'b2t' there, 'pre-ln' here")
    ok = run(*common, "--model-overrides", "{'dropout': 0.2}")  # not part of the identity
    assert any(line.startswith("H-") for line in ok.stdout.splitlines())


def test_averaging_two_runs_is_refused(toy_corpus, b2t_run, tmp_path):
    other = tmp_path / "post"
    _train(toy_corpus["data_bin"], other, "--max-epoch", 1, "--connection", "post-ln")
    proc = run("b2t-average-checkpoints", "--inputs", b2t_run / "checkpoint2.pt", other / "checkpoint1.pt",
               "--output", tmp_path / "avg.pt", check=False)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "different runs" in proc.stderr and "connection 'post-ln' in checkpoint1.pt" in proc.stderr
    assert not (tmp_path / "avg.pt").exists()


# ------------------------------------------------------------------ damaged checkpoints
@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_checkpoint_last_names_the_file_and_the_fix(toy_corpus, b2t_run, tmp_path, damage):
    save_dir = _copy_run(b2t_run, tmp_path)
    last = save_dir / "checkpoint_last.pt"
    data = last.read_bytes()
    last.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(4096)}[damage])
    proc = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 3, check=False)
    line = _one_line_error(proc, str(last), "copy the newest intact one over it", "checkpoint")
    assert "weights_only" not in proc.stderr  # never torch's advice to switch the safe unpickler off
    assert "checkpoint2.pt" in line or "checkpoint1.pt" in line
    # the fix it names works: the run resumes from the copied checkpoint
    shutil.copyfile(save_dir / "checkpoint2.pt", last)
    resumed = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 3)
    assert "Loaded checkpoint" in resumed.stdout


def test_damaged_checkpoint_in_generate_and_average_is_one_line(toy_corpus, b2t_run, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes((b2t_run / "checkpoint1.pt").read_bytes()[:1000])
    proc = run("fairseq-generate", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--path", broken,
               "--gen-subset", "valid", "--cpu", check=False)  # fmt: skip
    _one_line_error(proc, str(broken), "use another checkpoint")
    proc = run("b2t-average-checkpoints", "--inputs", b2t_run / "checkpoint1.pt", broken, "--output",
               tmp_path / "avg.pt", check=False)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and str(broken) in proc.stderr
    assert "weights_only" not in proc.stderr


# ------------------------------------------------------------------ interrupted copies
def test_checkpoint_copy_is_atomic(tmp_path, monkeypatch):
    """fairseq copies checkpoint_N.pt to checkpoint_last.pt; a copy killed half-way leaves the old file whole."""
    import b2t_fairseq  # noqa: F401  (installs the copy)
    from fairseq.file_io import PathManager

    src, dst = tmp_path / "checkpoint3.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old" * 1000)

    def killed_half_way(a, b):
        with open(b, "wb") as f:
            f.write(open(a, "rb").read()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old" * 1000
    monkeypatch.undo()
    assert PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"new" * 1000
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("flag", ["--fp16", "--bf16"])
def test_half_precision_without_a_gpu_is_one_line(toy_corpus, tmp_path, flag):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the flags are valid here")
    proc = _train(toy_corpus["data_bin"], tmp_path / "ckpt", "--max-update", 1, flag, check=False)
    _one_line_error(proc, f"{flag} needs a CUDA GPU", f"drop {flag}")


@pytest.mark.parametrize("argv, cuda, tpu", [
    (["--bf16"], True, False),   # a GPU machine: bf16 on the GPU
    (["--bf16", "--tpu"], True, True),  # asked for a TPU
    (["--bf16"], False, True),   # no GPU: left to the trainer's one-line error (test above)
])  # fmt: skip
def test_bf16_on_a_cuda_machine_is_not_tpu_mode(data_dir, monkeypatch, argv, cuda, tpu):
    """fairseq 0.12's argparse sets tpu with --bf16; what fairseq-train's main then sees (issue 11)."""
    import sys

    import torch
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils

    from conftest import parse_args

    args = parse_args(data_dir, ["--arch", "transformer_b2t", *argv])
    assert args.tpu  # fairseq's own option handling
    cfg = convert_namespace_to_omegaconf(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(sys, "argv", ["fairseq-train", str(data_dir), *argv])
    seen = {}
    distributed_utils.call_main(cfg, lambda c: seen.update(tpu=c.common.tpu, bf16=c.common.bf16))
    assert seen == {"tpu": tpu, "bf16": True}
