"""``--norm-type`` (rmsnorm, dyt, derf beside fairseq's layernorm): each norm against its formula and the
references (torch.nn.RMSNorm; x-transformers' DynamicTanh and Derf, a test-only dependency); every norm a model
builds is of the chosen type, under fairseq's names, for every method that has norms; methods defined without
norms refuse another type; models train and decode incrementally with each type."""
import pytest
import torch
from torch import nn

import b2t_fairseq  # noqa: F401
from b2t_fairseq.modules.norms import DynamicErf, DynamicTanh, RMSNorm
from b2t_fairseq.safety.errors import B2TConfigError
from b2t_fairseq.safety.runs import describe_difference, identity
from conftest import build_model
from test_layers import assert_incremental_equals_full, randomize
from test_methods import assert_trains_at_18_layers, lm, nmt

TYPES = {"rmsnorm": RMSNorm, "dyt": DynamicTanh, "derf": DynamicErf}


def _randomized(norm):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return norm


def test_each_norm_equals_its_formula_and_the_references():
    from x_transformers.x_transformers import Derf, DynamicTanh as XDynamicTanh

    x = torch.randn(5, 3, 16, dtype=torch.float64) * 3
    rms = _randomized(RMSNorm(16).double())
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * rms.weight
    torch.testing.assert_close(rms(x), expected, rtol=1e-12, atol=1e-12)
    torch_rms = nn.RMSNorm(16, eps=1e-5).double()
    torch_rms.weight.data.copy_(rms.weight)
    torch.testing.assert_close(rms(x), torch_rms(x), rtol=1e-12, atol=1e-12)

    dyt = _randomized(DynamicTanh(16).double())
    torch.testing.assert_close(dyt(x), torch.tanh(dyt.alpha * x) * dyt.weight + dyt.bias, rtol=1e-12, atol=1e-12)
    ref = XDynamicTanh(16, init_alpha=0.5).double()
    with torch.no_grad():
        ref.pre_tanh_scale.copy_(dyt.alpha[0]), ref.gamma.copy_(dyt.weight), ref.beta.copy_(dyt.bias)
    torch.testing.assert_close(dyt(x), ref(x), rtol=1e-12, atol=1e-12)

    derf = _randomized(DynamicErf(16).double())
    expected = torch.erf(derf.alpha * x + derf.shift) * derf.weight + derf.bias
    torch.testing.assert_close(derf(x), expected, rtol=1e-12, atol=1e-12)
    ref = Derf(16).double()
    with torch.no_grad():
        ref.alpha.copy_(derf.alpha[0]), ref.s.copy_(derf.shift[0])
        ref.gamma.copy_(derf.weight), ref.beta.copy_(derf.bias)
    torch.testing.assert_close(derf(x), ref(x), rtol=1e-12, atol=1e-12)


def test_initial_values():
    for cls in (DynamicTanh, DynamicErf):
        norm = cls(8, alpha=0.25)
        assert norm.alpha.tolist() == [0.25] and norm.weight.tolist() == [1.0] * 8 and norm.bias.tolist() == [0.0] * 8
    assert DynamicErf(8).shift.tolist() == [0.0] and RMSNorm(8).weight.tolist() == [1.0] * 8


def _norms(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, *TYPES.values()))}


# every method that has norms, each with its own extras (Peri-LN's, DLCL's, Sub-LN's inside Linear layers,
# ResiDual's final, SiameseNorm's per sub-layer and per stack, HybridNorm's q/k/v), and the embedding norm
WITH_NORMS = ["b2t", "pre-ln", "peri-ln", "dlcl", "sub-ln", "resi-dual", "siamese", "hybridnorm", "mix-ln"]


@pytest.mark.parametrize("norm_type", list(TYPES))
def test_every_norm_of_every_method_is_of_the_type(data_dir, norm_type):
    for method in WITH_NORMS:
        argv = nmt(method, 2, 1, extra=["--layernorm-embedding"])
        layer_norms = _norms(build_model(data_dir, argv)[0])
        assert set(layer_norms.values()) == {nn.LayerNorm}
        model = build_model(data_dir, argv + ["--norm-type", norm_type])[0]
        assert _norms(model) == dict.fromkeys(layer_norms, TYPES[norm_type]), method  # same names, all replaced
        assert {"encoder.layernorm_embedding.weight", "decoder.layers.0.final_layer_norm.weight"} <= set(
            model.state_dict())
    language_model = build_model(data_dir, lm("siamese", 2, extra=["--norm-type", norm_type]), task="language_modeling")
    norms = _norms(language_model[0])
    assert len(norms) == 2 * 2 * 3 + 3 and set(norms.values()) == {TYPES[norm_type]}  # 3 per sub-layer, 3 per stack


@pytest.mark.parametrize("method", ["tfixup", "rezero"])
def test_methods_without_norms_refuse_another_type(data_dir, method):
    with pytest.raises(B2TConfigError, match=f"--norm-type rmsnorm: --connection {method} is defined without any"):
        build_model(data_dir, nmt(method, 2, extra=["--norm-type", "rmsnorm"]))


def test_dyt_alpha_init(data_dir):
    model = build_model(data_dir, nmt("b2t", 2, extra=["--norm-type", "dyt", "--dyt-alpha-init", "0.8"]))[0]
    alphas = [m.alpha.item() for m in model.modules() if isinstance(m, DynamicTanh)]
    assert len(alphas) == 2 * 2 + 3 * 2 and alphas == pytest.approx([0.8] * len(alphas))
    with pytest.raises(B2TConfigError, match="--dyt-alpha-init only applies to --norm-type dyt or derf"):
        build_model(data_dir, nmt("b2t", 2, extra=["--dyt-alpha-init", "0.8"]))


def test_the_norm_type_is_part_of_a_runs_identity(data_dir):
    ours = build_model(data_dir, nmt("b2t", 2, extra=["--norm-type", "rmsnorm"]))[2]
    theirs = build_model(data_dir, nmt("b2t", 2))[2]
    assert "norm_type 'layernorm' there, 'rmsnorm' here" in describe_difference(identity(theirs), identity(ours))


@pytest.mark.parametrize("method, norm_type", [("siamese", "rmsnorm"), ("hybridnorm", "dyt"), ("b2t", "derf")])
def test_incremental_decoding_with_a_norm_type(data_dir, method, norm_type):
    model, task, _ = build_model(data_dir, nmt(method, 3, extra=["--norm-type", norm_type]))
    model.double()
    randomize(model)
    model.eval()
    assert_incremental_equals_full(model, task)


@pytest.mark.parametrize("method, norm_type", [("b2t", "rmsnorm"), ("b2t", "dyt"), ("b2t", "derf"), ("post-ln", "dyt")])
def test_trains_at_18_layers(data_dir, method, norm_type):
    """B2T with each norm type, and Post-LN with DyT (DyT's one published Post-LN use). With DyT and Derf the loss
    falls more slowly in these 40 steps (their gradients vanish towards the lower layers at init:
    docs/stability/methods-2025): asserted as falling by a tenth, not by the layer norms' 30%."""
    falls_to = 0.7 if norm_type == "rmsnorm" else 0.9
    assert_trains_at_18_layers(data_dir, method, extra=["--norm-type", norm_type], falls_to=falls_to)
