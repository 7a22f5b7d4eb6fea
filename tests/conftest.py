"""Shared fixtures: a tiny binarized toy corpus, and a runner for fairseq's real console scripts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # test the working tree, not the copy installed in site-packages
    sys.path.insert(0, str(REPO))
PLUGIN_DIR = REPO / "b2t_fairseq"
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    import torch

    torch.set_num_threads(1)
BIN = Path(sys.executable).parent
SHARED_DATA = REPO.parent / "shared" / "data"

# A model small enough to train in seconds on 2 CPU cores.
TINY_MODEL = (
    "--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 64 --decoder-embed-dim 64 "
    "--encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 --encoder-attention-heads 4 "
    "--decoder-attention-heads 4 --share-all-embeddings"
).split()
TINY_OPTIM = (
    "--optimizer adam --adam-betas (0.9,0.98) --lr 2e-3 --lr-scheduler inverse_sqrt --warmup-updates 50 "
    "--criterion label_smoothed_cross_entropy --label-smoothing 0.1 --max-tokens 2000 --cpu --seed 1 "
    "--num-workers 0 --log-format json --log-interval 10"
).split()


def cli_env(**extra):
    """The environment for console scripts: one thread per process (2 cores), and no weights_only override."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # the plugin must not need it
    return env


def run(tool, *args, cwd=None, env=None, check=True, timeout=600):
    """Run a console script of this venv (fairseq-train, b2t-score, ...) and return the CompletedProcess."""
    cmd = [str(BIN / tool), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory):
    """Raw toy corpus (train 1500 / valid 100 / test 100) and its binarized joined-dictionary data-bin."""
    from b2t_fairseq.toy import translation as toy_translation

    root = tmp_path_factory.mktemp("toy")
    raw = root / "raw"
    toy_translation.write_corpus(raw, n_train=1500, n_valid=100, n_test=100, seed=1)
    run(
        "fairseq-preprocess",
        "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
        "--destdir", root / "data-bin", "--joined-dictionary", "--workers", "1",
    )  # fmt: skip
    return {"raw": raw, "data_bin": root / "data-bin"}


def train_flags(cmd):
    """A recipe's fairseq-train argv -> {flag: value or True}, skipping the command and the data-bin."""
    args = cmd[cmd.index("fairseq-train") + 2 :]
    out, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            out[args[i]] = True
            i += 1
    return out


def shared_data(name):
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data sample {path} is not present (it lives in ../shared/data beside the repo)")
    return path


# ------------------------------------------------------------------ models built in-process through fairseq's API
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: thread start-up and contention cost far more than they save on 2 shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory holding only 30-word dictionaries: enough for fairseq to set up a task."""
    from fairseq.data import Dictionary

    d = tmp_path_factory.mktemp("dicts")
    dictionary = Dictionary()
    for i in range(30):
        dictionary.add_symbol(f"w{i}")
    for name in ("dict.src.txt", "dict.tgt.txt", "dict.txt"):
        dictionary.save(str(d / name))
    return d


def parse_args(data_dir, argv, task="translation"):
    """fairseq-train's own argument parsing (architecture functions included) with the plugin loaded."""
    from fairseq import options

    base = [str(data_dir), "--task", task, "--user-dir", str(PLUGIN_DIR)]
    if task == "translation":
        base += ["-s", "src", "-t", "tgt"]
    return options.parse_args_and_arch(options.get_training_parser(), base + [str(a) for a in argv])


def build_model(data_dir, argv, task="translation", seed=0):
    """Returns (model, task, args), the model built the way fairseq-train builds it, after torch.manual_seed."""
    import torch
    from fairseq import tasks

    args = parse_args(data_dir, argv, task)
    tk = tasks.setup_task(args)
    torch.manual_seed(seed)
    return tk.build_model(args), tk, args
