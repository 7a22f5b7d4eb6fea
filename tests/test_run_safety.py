"""Nothing lost, nothing silently mixed (issue 9): damaged checkpoints, interrupted checkpoint copies, and runs
whose identity changes, through fairseq's real entry points."""
import io
import os
import random
import shutil
import warnings

import pytest
import torch

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


def test_checkpoints_name_no_class_of_ours(b2t_run):
    """What a checkpoint pickles is fairseq's, torch's and the standard library's: moving a module of the plugin
    (issue 20) cannot break loading a checkpoint written before."""
    import io
    import pickletools
    import zipfile

    for path in sorted(b2t_run.glob("checkpoint*.pt")):
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        ops = list(pickletools.genops(io.BytesIO(data)))
        names = {str(arg) for op, arg, _ in ops if op.name == "GLOBAL"}
        names |= {str(ops[i - 2][1]) for i, (op, _, _) in enumerate(ops) if op.name == "STACK_GLOBAL"}
        assert names and not [n for n in names if n.startswith("b2t_fairseq")], (path.name, sorted(names))


def _generate(data_bin, checkpoint, *flags, check=True):
    return run("fairseq-generate", data_bin, "--user-dir", PLUGIN_DIR, "--path", checkpoint, "--gen-subset", "valid",
               "--beam", 2, "--cpu", "--max-sentences", 50, *flags, check=check)  # fmt: skip


def _hypotheses(proc):
    return [line for line in proc.stdout.splitlines() if line.startswith("H-")]


def test_decoding_with_an_override_that_changes_the_method_is_refused(toy_corpus, b2t_run):
    import shlex

    data_bin, last = toy_corpus["data_bin"], b2t_run / "checkpoint_last.pt"
    proc = _generate(data_bin, last, "--model-overrides", "{'connection': 'realformer'}", check=False)
    line = _one_line_error(proc, "connection 'b2t' there, 'realformer' here", "decode it with the options it was")
    # the fix it names is a flag the decoding tools take (fairseq-generate has no --allow-changed-identity)
    fix = shlex.split(line.split(" or pass ", 1)[1].removesuffix(" if the change is meant"))
    assert fix == ["--model-overrides", "{'connection': 'realformer', 'allow_changed_identity': True}"]
    assert _hypotheses(_generate(data_bin, last, *fix))  # RealFormer's weights are named as B2T's
    # a method whose weights differ is one line naming what does not fit, never a partial load
    proc = _generate(data_bin, last, "--model-overrides", "{'connection': 'rezero', 'allow_changed_identity': True}",
                     check=False)  # fmt: skip
    _one_line_error(proc, "does not fit this model", "rezero_a", "layer_norm", "options it was trained with")
    ok = _generate(data_bin, last, "--model-overrides", "{'dropout': 0.2}")  # not part of the identity
    assert _hypotheses(ok)


@pytest.mark.parametrize("keep", [{"encoder_layers_to_keep": "1"}, {"decoder_layers_to_keep": "0"},
                                  {"encoder_layers_to_keep": "0", "decoder_layers_to_keep": "1"}])  # fmt: skip
def test_layerdrop_pruning_at_decoding_keeps_the_named_layers(toy_corpus, b2t_run, keep):
    """fairseq's documented use of a LayerDrop model: the same run with fewer layers, not another run."""
    proc = _generate(toy_corpus["data_bin"], b2t_run / "checkpoint_last.pt", "--model-overrides", str(keep))
    assert "Pruning model to specified layer configuration" in proc.stdout + proc.stderr
    assert _hypotheses(proc)


def test_a_run_and_its_checkpoints_refuse_other_dictionaries(toy_corpus, b2t_run, tmp_path):
    """The same vocabulary in another order (another prepare of the same corpus) has the same size; the model's ids
    would map to other words."""
    data_bin = tmp_path / "data-bin"
    shutil.copytree(toy_corpus["data_bin"], data_bin)
    for name in ("dict.src.txt", "dict.tgt.txt"):
        lines = (data_bin / name).read_text().splitlines(keepends=True)
        lines[0], lines[1] = lines[1], lines[0]
        (data_bin / name).write_text("".join(lines))
    proc = _generate(data_bin, b2t_run / "checkpoint_last.pt", check=False)
    _one_line_error(proc, "trained with other dictionaries than this data's", "Use the data dir it was trained with")
    save_dir = _copy_run(b2t_run, tmp_path)
    proc = _train(data_bin, save_dir, "--max-epoch", 3, check=False)
    _one_line_error(proc, "checkpoint_last.pt was trained with other dictionaries", "--allow-changed-identity")
    assert not (save_dir / "checkpoint3.pt").exists()


def test_averaging_two_runs_is_refused(toy_corpus, b2t_run, tmp_path):
    other = tmp_path / "post"
    _train(toy_corpus["data_bin"], other, "--max-epoch", 1, "--connection", "post-ln")
    proc = run("b2t-average-checkpoints", "--inputs", b2t_run / "checkpoint2.pt", other / "checkpoint1.pt",
               "--output", tmp_path / "avg.pt", check=False)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "different runs" in proc.stderr and "connection 'post-ln' in checkpoint1.pt" in proc.stderr
    assert not (tmp_path / "avg.pt").exists()


# ------------------------------------------------------------------ damaged checkpoints
def test_damaged_checkpoint_last_names_the_file_and_the_fix(toy_corpus, b2t_run, tmp_path):
    save_dir = _copy_run(b2t_run, tmp_path)
    last = save_dir / "checkpoint_last.pt"
    data = last.read_bytes()
    # random bytes of seed 2 stop torch's unpickler with an IndexError (CI once drew such bytes from os.urandom)
    damages = {"empty": b"", "truncated": data[: len(data) // 2], "random": random.Random(2).randbytes(4096)}
    for damage, damaged in damages.items():
        last.write_bytes(damaged)
        proc = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 3, check=False)
        line = _one_line_error(proc, str(last), "copy the newest intact one over it", "checkpoint")
        assert "weights_only" not in proc.stderr, damage  # never torch's advice to switch the safe unpickler off
        assert "checkpoint2.pt" in line or "checkpoint1.pt" in line, damage
    # the fix it names works: the run resumes from the copied checkpoint
    shutil.copyfile(save_dir / "checkpoint2.pt", last)
    resumed = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 3)
    assert "Loaded checkpoint" in resumed.stdout


def test_any_unreadable_bytes_are_a_damaged_checkpoint(tmp_path):
    """Bytes that are not a checkpoint fail wherever the unpickler misreads them, each with its own error type; every
    one is the damaged-checkpoint line, in-process over 200 seeded files (the end-to-end test above tries one)."""
    from fairseq import checkpoint_utils

    from b2t_fairseq.safety.errors import B2TConfigError
    from b2t_fairseq.safety.runs import _guarded_loader

    fairseqs = getattr(checkpoint_utils.load_checkpoint_to_cpu, "__wrapped__", checkpoint_utils.load_checkpoint_to_cpu)
    load = _guarded_loader(fairseqs)
    (tmp_path / "checkpoint1.pt").write_bytes(b"an intact one, for the fix to name")
    last = tmp_path / "checkpoint_last.pt"
    torchs_errors = set()
    for seed in range(200):
        damaged = random.Random(seed).randbytes(4096)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the unknown pickle protocols it reads
            with pytest.raises(Exception) as raw:
                torch.load(io.BytesIO(damaged), map_location="cpu")
            torchs_errors.add(type(raw.value).__name__)
            last.write_bytes(damaged)
            with pytest.raises(B2TConfigError) as err:
                load(str(last))
        assert f"cannot read checkpoint {last}" in str(err.value), seed
        assert "copy the newest intact one over it" in str(err.value) and "checkpoint1.pt" in str(err.value), seed
    # the seeds cover more than the unpickler's own error
    assert {"UnpicklingError", "IndexError", "KeyError"} <= torchs_errors, torchs_errors


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

    def no_links_here(a, b):  # a file system without hard links: the copy is a real copy
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links_here)
    monkeypatch.setattr(shutil, "copyfile", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old" * 1000
    monkeypatch.undo()
    assert PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"new" * 1000
    assert not list(tmp_path.glob("*.tmp*"))
    assert os.path.samefile(src, dst)  # where links exist, the "copy" takes no space (a full disk cannot stop it)


def _tmpfs(path, size):
    """A file system of ``size`` at ``path``, or skip (mounting needs root and a kernel that lets us)."""
    import subprocess

    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({proc.stderr.decode().strip() or 'not root'})")
    return path


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_checkpoint_and_the_rerun_continues(toy_corpus, tmp_path):
    """Each checkpoint of the tiny model is 2.3 MB: an 8 MB file system takes three epochs' worth."""
    import subprocess

    save_dir = _tmpfs(tmp_path / "small-disk", "8m")
    try:
        proc = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 5, check=False)
        _one_line_error(proc, "no space left", "checkpoint4.pt", "checkpoint_last.pt still holds the previous state",
                        "rerun the same command")  # fmt: skip
        names = sorted(p.name for p in save_dir.iterdir())
        assert names == ["checkpoint1.pt", "checkpoint2.pt", "checkpoint3.pt", "checkpoint_best.pt",
                         "checkpoint_last.pt", "train.lock"], names  # no .tmp left behind  # fmt: skip
        assert (save_dir / "checkpoint_last.pt").samefile(save_dir / "checkpoint3.pt")  # the newest whole epoch
        for name in ("checkpoint1.pt", "checkpoint2.pt"):  # the fix the line names: free space, rerun
            (save_dir / name).unlink()
        resumed = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 5)
        assert "Loaded checkpoint" in resumed.stdout and (save_dir / "checkpoint5.pt").is_file()
    finally:
        subprocess.run(["umount", str(save_dir)])


# ------------------------------------------------------------------ one run per save dir
@pytest.mark.slow
def test_a_save_dir_belongs_to_one_run(toy_corpus, b2t_run, tmp_path):
    import signal
    import subprocess

    from conftest import BIN, cli_env

    save_dir = _copy_run(b2t_run, tmp_path)
    # a second fairseq-train in a save dir that is being trained is refused, naming the first
    cmd = [str(BIN / "fairseq-train"), str(toy_corpus["data_bin"]), "--user-dir", str(PLUGIN_DIR), "--arch",
           "transformer_b2t", *TINY_MODEL, *TINY_OPTIM, "--save-dir", str(save_dir), "--max-epoch", "3",
           "--log-interval", "1"]  # fmt: skip
    first = subprocess.Popen(cmd, env=cli_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        for line in first.stdout:
            if "train_inner" in line:
                first.send_signal(signal.SIGSTOP)  # paused mid-epoch, holding its save dir
                break
        second = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 3, check=False)
        _one_line_error(second, "being trained by another fairseq-train", f"pid {first.pid}", "train.lock",
                        "another --save-dir")  # fmt: skip
    finally:
        first.send_signal(signal.SIGCONT)
    first.communicate(timeout=300)
    assert first.returncode == 0

    # starting from scratch beside another run's checkpoints is refused; the fix it names resumes that run
    (save_dir / "checkpoint_last.pt").unlink()
    proc = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 4, check=False)
    line = _one_line_error(proc, "holds checkpoints of an earlier run", "would start from scratch")
    fix = line.split("to continue that run: ", 1)[1].split(" (then rerun)")[0]
    assert fix == f"cp {save_dir / 'checkpoint3.pt'} {save_dir / 'checkpoint_last.pt'}"
    subprocess.run(fix, shell=True, check=True)
    resumed = _train(toy_corpus["data_bin"], save_dir, "--max-epoch", 4)
    assert "Loaded checkpoint" in resumed.stdout and "begin training epoch 4" in resumed.stdout
    assert (save_dir / "checkpoint4.pt").is_file()

    # every checkpoint names its run; averaging checkpoints of two runs with equal settings is refused
    other = tmp_path / "other"
    _train(toy_corpus["data_bin"], other, "--max-epoch", 1)
    proc = run("b2t-average-checkpoints", "--inputs", save_dir / "checkpoint4.pt", other / "checkpoint1.pt",
               "--output", tmp_path / "avg.pt", check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "written by two runs" in proc.stderr and not (tmp_path / "avg.pt").exists()
    ok = run("b2t-average-checkpoints", "--inputs", save_dir, "--num-epoch-checkpoints", 4, "--output",
             tmp_path / "avg.pt")  # the resumed run is one run from its first epoch to its last  # fmt: skip
    assert (tmp_path / "avg.pt").is_file(), ok.stdout


def test_an_average_never_replaces_a_training_checkpoint(b2t_run, tmp_path, capsys):
    from b2t_fairseq.tools.average_checkpoints import cli_main

    save_dir = _copy_run(b2t_run, tmp_path)
    before = {p.name: p.read_bytes() for p in save_dir.iterdir()}
    proc = run("b2t-average-checkpoints", "--inputs", save_dir, "--num-epoch-checkpoints", 2, "--output",
               save_dir / "checkpoint_last.pt", check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--output {save_dir / 'checkpoint_last.pt'}" in proc.stderr and "averaged.pt" in proc.stderr
    for output in ("checkpoint2.pt", "checkpoint_2_18.pt", "checkpoint_best.pt"):  # the same check, in-process
        with pytest.raises(SystemExit) as exit_:
            cli_main(["--inputs", str(save_dir), "--num-epoch-checkpoints", "2", "--output", str(save_dir / output)])
        assert exit_.value.code == 1 and f"--output {save_dir / output}" in capsys.readouterr().err, output
    assert {p.name: p.read_bytes() for p in save_dir.iterdir()} == before
    # the name it suggests is accepted
    run("b2t-average-checkpoints", "--inputs", save_dir, "--num-epoch-checkpoints", 2, "--output",
        save_dir / "averaged.pt")  # fmt: skip
    assert (save_dir / "averaged.pt").is_file()


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


# ------------------------------------------------------------------ one line, not a traceback
def test_an_unwritable_tensorboard_logdir_is_one_line_before_training(toy_corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = _train(toy_corpus["data_bin"], tmp_path / "ckpt", "--max-update", 1, "--tensorboard-logdir",
                  blocker / "tb", check=False)  # fmt: skip
    _one_line_error(proc, f"--tensorboard-logdir {blocker / 'tb'}: cannot write there")
    assert "train_inner" not in proc.stdout and not (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


@pytest.mark.slow
def test_bad_model_override_values_at_eval_lm_are_one_line(toy_corpus, tmp_path):
    data_bin = tmp_path / "lm-bin"
    run("fairseq-preprocess", "--only-source", "--trainpref", toy_corpus["raw"] / "train.tgt", "--validpref",
        toy_corpus["raw"] / "valid.tgt", "--destdir", data_bin, "--workers", 1)  # fmt: skip
    lm = ["--user-dir", PLUGIN_DIR, "--task", "language_modeling", "--tokens-per-sample", 64, "--cpu"]
    run("fairseq-train", data_bin, *lm, "--arch", "transformer_lm_b2t", "--decoder-layers", 1, "--decoder-embed-dim",
        32, "--decoder-ffn-embed-dim", 64, "--decoder-attention-heads", 2, "--optimizer", "adam", "--lr", 1e-3,
        "--max-tokens", 2000, "--max-update", 1, "--save-dir", tmp_path / "lm", "--no-epoch-checkpoints")  # fmt: skip
    evaluate = ["fairseq-eval-lm", data_bin, *lm, "--path", tmp_path / "lm" / "checkpoint_last.pt", "--gen-subset",
                "valid", "--max-tokens", 2000]  # fmt: skip
    for overrides, needle in [("{'connection': 'nonsense'}", "model option 'connection': Invalid value 'nonsense'"),
                              ("{'resi_dual_alpha': 'x'}", "model option 'resi_dual_alpha'")]:  # fmt: skip
        proc = run(*evaluate, "--model-overrides", overrides, check=False)
        _one_line_error(proc, needle, "--model-overrides")
    ok = run(*evaluate)  # the same command without the bad values evaluates
    assert "Perplexity" in ok.stdout + ok.stderr
