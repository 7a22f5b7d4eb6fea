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


# b2t: the method's closures; dlcl: stack weights and the carry passed from layer to layer
@pytest.mark.parametrize("connection", ["b2t", "dlcl"])
def test_compiled_layers_train_and_decode_as_eager(data_dir, connection):
    from torch._dynamo.utils import counters

    argv = ["--arch", "transformer_b2t", *SMALL, "--connection", connection]
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
    from b2t_fairseq.errors import B2TConfigError

    with pytest.raises(B2TConfigError, match="--compile-layers no-such: not a torch.compile backend"):
        build_model(data_dir, ["--arch", "transformer_b2t", *SMALL, "--compile-layers", "no-such"])
