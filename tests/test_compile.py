"""--compile-layers (issue 10): torch.compile of the layers gives the eager model's outputs, gradients and beam-search
hypotheses and keeps state dict names. The tests trace with
``aot_eager`` (dynamo + AOT autograd, no code generation: inductor's C++ build would take a minute per test here)
on models built through fairseq's own option parsing and build_model."""
import pytest
import torch

from conftest import build_model

SMALL = ("--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-ffn-embed-dim "
         "32 --decoder-ffn-embed-dim 32 --encoder-attention-heads 2 --decoder-attention-heads 2 --dropout 0").split()  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    # a fallback to eager after too many recompilations would make these comparisons pass without compiling
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


# b2t: the method's closures; dlcl: stack weights and the carry passed from layer to layer; siamese: a second
# stream in the carry and the layer's index; hybridnorm: norms inside the attention's projections; the norm types'
# own modules (RMSNorm, DyT's and Derf's alpha) inside compiled layers
@pytest.mark.parametrize("connection, norm_type", [("b2t", "layernorm"), ("dlcl", "layernorm"),
                                                   ("siamese", "rmsnorm"), ("hybridnorm", "dyt"), ("b2t", "derf")])
def test_compiled_layers_train_and_decode_as_eager(data_dir, connection, norm_type):
    from torch._dynamo.utils import counters

    argv = ["--arch", "transformer_b2t", *SMALL, "--connection", connection, "--norm-type", norm_type]
    eager, task, _ = build_model(data_dir, argv)
    compiled, _, _ = build_model(data_dir, [*argv, "--compile-layers", "aot_eager"])  # same seed, same weights
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(compiled.state_dict().values(), eager.state_dict().values()))
    torch.manual_seed(1)
    src, prev = torch.randint(4, 30, (3, 7)), torch.randint(4, 30, (3, 5))
    lengths = torch.full((3,), 7)
    for model in (eager, compiled):
        model.train()
        model(src, lengths, prev)[0].square().mean().backward()
    torch.testing.assert_close(compiled(src, lengths, prev)[0], eager(src, lengths, prev)[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] > 0

    from fairseq.sequence_generator import SequenceGenerator

    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    hyps = []
    for model in (eager, compiled):
        model.eval()
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_b=6)
        with torch.no_grad():
            hyps.append([[(h["tokens"].tolist(), round(float(h["score"]), 5)) for h in sent] for sent in gen(sample)])
    assert hyps[0] == hyps[1]


def test_unknown_backend_is_one_line(data_dir):
    from b2t_fairseq.safety.errors import B2TConfigError

    with pytest.raises(B2TConfigError, match="--compile-layers no-such: not a torch.compile backend") as info:
        build_model(data_dir, ["--arch", "transformer_b2t", *SMALL, "--compile-layers", "no-such"])
    # the valid choices, the two README recommends first (torch files aot_eager among its debugging backends)
    assert "use inductor (fused kernels) or aot_eager (tracing only)" in str(info.value)
    assert "\n" not in str(info.value)


# fairseq-train's own loop (fairseq_cli.train.cli_main) over these methods in one process, each after a
# torch._dynamo.reset(): a compiled model per method, the interpreter and fairseq imported once
_TRAIN_EACH = """
import sys
import torch._dynamo
from torch._dynamo.utils import counters
from fairseq_cli import train

data, plugin, *methods = sys.argv[1:]
for method in methods:
    torch._dynamo.reset()
    counters.clear()
    sys.argv = ["fairseq-train", data, "--user-dir", plugin, "--arch", "transformer_b2t", "--connection", method,
                "--compile-layers", "aot_eager", *%r]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        train.cli_main()
    print("TRAINED", method, counters["stats"]["unique_graphs"], flush=True)
"""
_TRAIN_FLAGS = (
    "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 16 --decoder-embed-dim 16 --encoder-ffn-embed-dim 32 "
    "--decoder-ffn-embed-dim 32 --encoder-attention-heads 2 --decoder-attention-heads 2 --share-all-embeddings "
    "--optimizer adam --lr 1e-3 --max-tokens 300 --max-update 2 --cpu --num-workers 0 --no-save --disable-validation "
    "--seed 1"
).split()


def test_fairseq_train_compiled_with_residual_sum_outputs(toy_corpus):
    """The methods whose layers end in ``x + F(...)`` failed the first backward of a real (padded) fairseq-train
    batch under aot_eager with "view size is not compatible with input tensor's size and stride": their layers
    passed on the transposed (non-contiguous) stack input's layout (stacks.py, _layer_layout). Two updates each,
    the second batch of another shape (the recompile with dynamic sizes)."""
    import subprocess
    import sys

    from conftest import PLUGIN_DIR, cli_env

    methods = ["pre-ln", "tfixup", "rezero", "sub-ln"]
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN_EACH % (_TRAIN_FLAGS,), str(toy_corpus["data_bin"]), str(PLUGIN_DIR), *methods],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    trained = [line.split() for line in proc.stdout.splitlines() if line.startswith("TRAINED ")]
    assert [t[1] for t in trained] == methods
    assert all(int(t[2]) > 0 for t in trained), trained  # the layers were compiled, not run eagerly
    assert (proc.stdout + proc.stderr).count("| num_updates 2 |") == len(methods)  # each reached its second update
