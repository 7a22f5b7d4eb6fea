"""Our beam search (fast_paths/search.py, issue 22) against fairseq's SequenceGenerator loop on the same generator:
the same hypotheses, scores, positional scores and attention, bitwise, over the options it takes; the calls it
leaves to fairseq; and fairseq-generate's output with it switched on and off."""
import pytest
import torch

import b2t_fairseq  # noqa: F401  (registers the models, installs the search)
from b2t_fairseq.fast_paths import search
from b2t_fairseq.modules import norms
from b2t_fairseq.modules.norms import NORM_TYPES
from conftest import PLUGIN_DIR, TINY_MODEL, TINY_OPTIM, build_model, run
from test_fast_paths import _inference_cfg
from test_layers import DIMS, batch, randomize


# ------------------------------------------------------------------------------------------ top_candidates
@pytest.mark.parametrize("rows, n, k", [(3, 8000, 2), (5, 4 * 8000, 8), (2, 1000, 10), (4, 64 * 3 + 5, 2), (3, 90, 4)])
def test_top_candidates_equal_torchs_topk(rows, n, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(rows, n, generator=g)
    x[0, : n // 2] = -float("inf")  # masked entries, as pad and a too-early EOS are
    x[-1, -3:] += 10  # the best in the remainder that fills no chunk
    values, indices = search.top_candidates(x, k)
    expected = torch.topk(x, k, dim=1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


# ------------------------------------------------------------------------------------------ stay_in_place
@pytest.mark.parametrize("parents, rows", [
    ([1, 0, 0, 2], [1, 0, 3, 2]),  # the second continuation of beam 0 takes the row beam 3 left free
    ([0, 0, 0, 0], [0, 1, 2, 3]),  # the first step: every beam continues beam 0, in the search's order
    ([3, 2, 1, 0], [3, 2, 1, 0]),  # each beam back in its parent's row: nothing moves
    ([2, 2, 3, 3], [1, 3, 0, 2]),  # two continuations each of beams 2 and 3: rows 0 and 1 take the second ones
    ([0, 1, 2, 3], [0, 1, 2, 3]),
])  # fmt: skip
def test_stay_in_place_gives_each_row_its_beam(parents, rows):
    assert search.stay_in_place(torch.tensor([parents])).tolist() == [rows]


def test_stay_in_place_moves_only_the_rows_it_must():
    g = torch.Generator().manual_seed(3)
    for beam in (1, 2, 4, 5, 8):
        parents = torch.randint(0, beam, (200, beam), generator=g)
        order = search.stay_in_place(parents)
        assert torch.equal(order.sort(dim=1).values, torch.arange(beam).expand(200, beam))  # a permutation per row
        after = parents.gather(1, order)  # the parent of the beam each row takes
        assert torch.equal(after.sort(dim=1).values, parents.sort(dim=1).values)  # the same beams
        for p, a in zip(parents.tolist(), after.tolist()):
            assert set(p) <= {r for r in range(beam) if a[r] == r}  # every parent keeps a continuation in its row
            assert sum(a[r] != r for r in range(beam)) == beam - len(set(p))  # the fewest rows that must move


# ------------------------------------------------------------------------------------------ beam search
def _model(data_dir, connection="b2t", seed=5, extra=()):
    model, tk, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--connection", connection,
                                          "--encoder-layers", "2", "--decoder-layers", "2", *DIMS, *extra])  # fmt: skip
    randomize(model, seed=seed)
    with torch.no_grad():  # EOS likelier, so that greedy and beam hypotheses end at several steps
        model.decoder.output_projection.weight[tk.target_dictionary.eos()] *= -3.5
    model.eval()
    model.prepare_for_inference_(_inference_cfg())
    return model, tk


def _both(model, tk, sample, **options):
    """(fairseq's loop, ours) on one generator with ``options``; asserts that ours was used."""
    from fairseq.sequence_generator import SequenceGenerator

    gen = SequenceGenerator([model], tk.target_dictionary, **options)
    assert search.handles(gen, sample, None, None)
    with torch.no_grad():
        theirs = SequenceGenerator._generate.__wrapped__(gen, sample)
        ours = search.beam_search(gen, sample)
    return theirs, ours


def _assert_identical(theirs, ours):
    assert len(theirs) == len(ours)
    for sent_t, sent_o in zip(theirs, ours):
        assert len(sent_t) == len(sent_o)
        for t, o in zip(sent_t, sent_o):
            assert t.keys() == o.keys()
            for key in t:
                assert torch.equal(t[key], o[key]), key


def _sample(tk, bsz=5, src_len=9):
    src, lengths, _ = batch(tk.source_dictionary, bsz=bsz, src_len=src_len)
    return {"net_input": {"src_tokens": src, "src_lengths": lengths}}


OPTIONS = [
    dict(beam_size=1, max_len_b=12),
    dict(beam_size=2, max_len_b=12),
    dict(beam_size=4, max_len_b=12),
    dict(beam_size=5, max_len_b=6, len_penalty=0.6),  # the length limit ends most hypotheses
    dict(beam_size=4, max_len_b=12, len_penalty=2.0, unk_penalty=1.5, min_len=3),
    dict(beam_size=3, max_len_b=12, normalize_scores=False, no_repeat_ngram_size=2),
    dict(beam_size=4, max_len_a=1.2, max_len_b=2, temperature=0.7),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_beam_search_equals_fairseqs_loop(data_dir, options, monkeypatch):
    model, tk = _model(data_dir)
    sample = _sample(tk)
    placed = []  # the steps where beams kept their parents' rows against the search's order
    stay_in_place = search.stay_in_place
    monkeypatch.setattr(search, "stay_in_place", lambda parents: placed.append(stay_in_place(parents)) or placed[-1])
    theirs, ours = _both(model, tk, sample, **options)
    _assert_identical(theirs, ours)
    if options["beam_size"] > 2:
        assert any(not torch.equal(o, torch.arange(o.size(1)).expand_as(o)) for o in placed)
    beam = min(options["beam_size"], len(tk.target_dictionary) - 1)
    assert all(len(sent) == beam for sent in ours)
    lengths = {len(h["tokens"]) for sent in ours for h in sent}
    assert len(lengths) > 1  # hypotheses of several lengths: EOS chosen at several steps, sentences left early


@pytest.mark.parametrize("connection", sorted(set(b2t_fairseq.modules.CONNECTIONS) - {"b2t"}))
def test_beam_search_equals_fairseqs_loop_for_every_other_method(data_dir, connection):
    model, tk = _model(data_dir, connection, seed=7)
    _assert_identical(*_both(model, tk, _sample(tk, bsz=4), beam_size=4, max_len_b=10))


@pytest.mark.parametrize("norm_type", sorted(set(NORM_TYPES) - {"layernorm"}))
def test_beam_search_equals_fairseqs_loop_for_every_norm_type(data_dir, norm_type):
    model, tk = _model(data_dir, "b2t", seed=9, extra=["--norm-type", norm_type])
    expected = {"rmsnorm": norms.RMSNorm, "dyt": norms.DynamicTanh, "derf": norms.DynamicErf}[norm_type]
    assert any(isinstance(m, expected) for m in model.decoder.modules())  # the norm type is in use
    _assert_identical(*_both(model, tk, _sample(tk, bsz=4), beam_size=4, max_len_b=10))


def test_ensemble_and_int8_decoding_search_alike(data_dir):
    from fairseq.sequence_generator import SequenceGenerator

    first, tk = _model(data_dir, seed=5)
    second, _ = _model(data_dir, seed=6)
    sample = _sample(tk, bsz=4)
    gen = SequenceGenerator([first, second], tk.target_dictionary, beam_size=4, max_len_b=10)
    assert search.handles(gen, sample, None, None)
    with torch.no_grad():
        _assert_identical(SequenceGenerator._generate.__wrapped__(gen, sample), search.beam_search(gen, sample))
    int8, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", "--encoder-layers", "2", "--decoder-layers", "2",
                                     "--int8-decoding", "all", *DIMS])  # fmt: skip
    randomize(int8, seed=5)
    int8.eval()
    int8.prepare_for_inference_(_inference_cfg())
    _assert_identical(*_both(int8, tk, sample, beam_size=4, max_len_b=10))


def test_what_it_leaves_to_fairseq(data_dir, monkeypatch):
    """Prefix tokens, another search strategy, --match-source-len, a model not ours and B2T_FAST_SEARCH=off go to
    fairseq's loop; a plain call goes to ours (counted through SequenceGenerator.generate, as fairseq-generate
    calls it)."""
    from fairseq import search as fairseq_search
    from fairseq.sequence_generator import SequenceGenerator

    model, tk = _model(data_dir)
    sample = _sample(tk, bsz=2)
    calls = []
    ours = search.beam_search
    monkeypatch.setattr(search, "beam_search", lambda *a, **k: calls.append(1) or ours(*a, **k))

    def generate(models, call=None, **options):
        gen = SequenceGenerator(models, tk.target_dictionary, max_len_b=6, **options)
        with torch.no_grad():
            return gen.generate(models, sample, **(call or {}))

    generate([model], beam_size=2)
    assert len(calls) == 1
    prefix = sample["net_input"]["src_tokens"][:, -2:-1]
    generate([model], beam_size=2, call={"prefix_tokens": prefix})
    generate([model], beam_size=2, match_source_len=True)
    generate([model], beam_size=2, search_strategy=fairseq_search.Sampling(tk.target_dictionary, sampling_topk=3))
    stock, _, _ = build_model(data_dir, ["--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2",
                                         *DIMS])  # fmt: skip
    stock.eval()
    generate([stock], beam_size=2)
    monkeypatch.setenv(search.ENV, "off")
    generate([model], beam_size=2)
    assert len(calls) == 1


@pytest.mark.parametrize("value", ["2", "of", "", "fairseq"])
def test_switch_refuses_other_values(data_dir, monkeypatch, value):
    from fairseq.sequence_generator import SequenceGenerator

    from b2t_fairseq.safety.errors import B2TConfigError

    model, tk = _model(data_dir)
    monkeypatch.setenv(search.ENV, value)
    gen = SequenceGenerator([model], tk.target_dictionary, beam_size=2, max_len_b=4)
    with pytest.raises(B2TConfigError, match=f"B2T_FAST_SEARCH='{value}': use 0, false, off or no .* 1, true, on"):
        gen.generate([model], _sample(tk, bsz=2))


def test_fairseq_generate_prints_the_same_with_and_without_it(toy_corpus, tmp_path):
    """fairseq-generate on a toy model trained for two epochs, beam 4 with a length penalty, as users run
    it: every line it prints (hypotheses, scores, positional scores, BLEU) is the same with B2T_FAST_SEARCH=off."""
    run("fairseq-train", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t", *TINY_MODEL,
        *TINY_OPTIM, "--max-epoch", "2", "--save-dir", tmp_path / "ckpt", "--no-epoch-checkpoints")  # fmt: skip
    outputs = {}
    for value in ("on", "off"):
        gen = run("fairseq-generate", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--path",
                  tmp_path / "ckpt" / "checkpoint_last.pt", "--gen-subset", "valid", "--beam", "4", "--lenpen", "1.2",
                  "--batch-size", "16", "--cpu", env={search.ENV: value})  # fmt: skip
        outputs[value] = [line for line in gen.stdout.splitlines() if line[:2] in ("S-", "H-", "P-", "D-", "Ge")]
        assert ("beam search: b2t_fairseq's" in gen.stdout + gen.stderr) == (value == "on")
    assert any(line.startswith("H-") for line in outputs["on"])
    assert outputs["on"] == outputs["off"]
