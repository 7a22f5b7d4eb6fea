"""--int8-decoding (issues 11, 22): dynamic int8 quantization of the decoder's (and the encoder's) Linear layers when
fairseq prepares a loaded model for inference; outputs close to float32, beam search runs, 8-bit activations where
the CPU has VNNI, wrong devices are one line."""
import argparse

import pytest
import torch

import b2t_fairseq.modules

from b2t_fairseq.fast_paths import int8
from b2t_fairseq.fast_paths.int8 import FullRangeLinear, Int8Linear, Int8Product, full_range_activations
from b2t_fairseq.fast_paths.packed_linear import PackedLinear
from conftest import PLUGIN_DIR, TINY_MODEL, TINY_OPTIM, build_model, run

SMALL = ("--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim "
         "64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0 "
         "--share-all-embeddings").split()  # fmt: skip
QLinear = torch.ao.nn.quantized.dynamic.Linear


def _generation_cfg():
    return argparse.Namespace(generation=argparse.Namespace(beam=2, print_alignment=False, retain_dropout=False))


@pytest.mark.parametrize("scope, encoder_quantized", [("decoder", False), ("all", True)])
def test_prepare_for_inference_quantizes_the_named_layers(data_dir, scope, encoder_quantized):
    model, task, _ = build_model(data_dir, ["--arch", "transformer_b2t", *SMALL, "--int8-decoding", scope])
    reference, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", *SMALL])  # same seed: same weights
    assert not any(isinstance(m, QLinear) for m in model.modules())  # nothing at build time: checkpoints load
    for m in (model, reference):
        m.eval()
        m.prepare_for_inference_(_generation_cfg())
    assert isinstance(model.decoder.output_projection, QLinear)
    for layer in model.decoder.layers:
        linears = [m for m in layer.modules() if isinstance(m, (torch.nn.Linear, QLinear))]
        assert len(linears) == 10 and all(isinstance(m, QLinear) for m in linears)  # queries and keys included
    for layer in model.encoder.layers:
        assert all(isinstance(m, QLinear) == encoder_quantized for m in (layer.fc1, layer.self_attn.q_proj))
        # float32 Linear layers are packed for the CPU (packed_linear.py)
        assert encoder_quantized or type(layer.fc2) is PackedLinear

    torch.manual_seed(3)
    src, prev, lengths = torch.randint(4, 30, (3, 7)), torch.randint(4, 30, (3, 5)), torch.full((3,), 7)
    with torch.no_grad():
        out, ref = model(src, lengths, prev)[0], reference(src, lengths, prev)[0]
    error = ((out - ref).norm() / ref.norm()).item()
    assert 0 < error < 0.05, error  # quantized, and close

    from fairseq.sequence_generator import SequenceGenerator

    gen = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_b=6)
    with torch.no_grad():
        hyps = gen({"net_input": {"src_tokens": src, "src_lengths": lengths}})
    assert len(hyps) == 3 and all(len(h) == 2 for h in hyps)
    # full-sequence forwards (scoring, alignment) take fairseq's unfused attention with quantized projections
    with torch.no_grad():
        model.decoder(prev, encoder_out=model.encoder(src, lengths))


def test_int8_of_a_half_precision_model_is_one_line(data_dir):
    from b2t_fairseq.safety.errors import B2TConfigError

    model, _, _ = build_model(data_dir, ["--arch", "transformer_b2t", *SMALL, "--int8-decoding", "decoder"])
    model.half()
    with pytest.raises(B2TConfigError, match="--int8-decoding runs on the CPU in float32"):
        model.prepare_for_inference_(_generation_cfg())


@pytest.mark.slow
def test_fairseq_generate_with_int8_model_override(toy_corpus, tmp_path):
    """A checkpoint trained without the option decodes in int8 through --model-overrides."""
    run("fairseq-train", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t", *TINY_MODEL,
        *TINY_OPTIM, "--max-update", 5, "--save-dir", tmp_path / "ckpt")  # fmt: skip
    gen = run("fairseq-generate", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--path",
              tmp_path / "ckpt" / "checkpoint_last.pt", "--gen-subset", "valid", "--beam", 4, "--batch-size", 50,
              "--max-len-b", 5, "--cpu", "--model-overrides", "{'int8_decoding': 'decoder'}")  # fmt: skip
    assert "--int8-decoding decoder: 21 Linear layers quantized" in gen.stderr  # 2 layers x 10 + output
    lines = gen.stdout.splitlines()
    assert sum(line.startswith("H-") for line in lines) == sum(line.startswith("S-") for line in lines) > 0


@pytest.mark.skipif(not full_range_activations(), reason="this CPU has no VNNI: activations keep torch's 7 bits")
def test_full_range_activations_halve_the_error_of_torchs_dynamic_linear():
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 256)
    x = torch.nn.functional.layer_norm(torch.randn(64, 256), (256,))
    x[:, :4] *= 8  # a few large channels, as trained models have
    torchs = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig})[0]
    ours = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig})[0]
    ours.__class__ = FullRangeLinear
    with torch.no_grad():
        ref = linear(x)
        errors = [((m(x) - ref).norm() / ref.norm()).item() for m in (torchs, ours)]
    assert 0 < errors[1] < 0.6 * errors[0], errors


def test_int8_products_go_through_torchscript_and_give_torchs_numbers(monkeypatch):
    """int8.int8_product: the packed weights reach the operator through a TorchScript function (the slow hand-over
    from Python skipped), with torch's own dynamic Linear's numbers; without TorchScript, the same numbers from
    Python."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    assert isinstance(int8.int8_product, torch.jit.ScriptFunction)
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    x = torch.randn(2, 7, 48)
    torchs = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig})[0]
    ours = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig})[0]
    ours.__class__ = Int8Linear
    packed = ours._packed_params._packed_params
    with torch.no_grad():
        assert torch.equal(ours(x), torchs(x))  # torch's 7-bit activations, as its own module
        for reduce_range in (True, False):
            expected = torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
            assert torch.equal(int8.int8_product(x, packed, reduce_range), expected)

    def no_torchscript(fn):
        raise RuntimeError("TorchScript is gone")

    monkeypatch.setattr(torch.jit, "script", no_torchscript)
    fallback = int8._compiled_product()
    assert fallback is int8._int8_product
    with torch.no_grad():
        assert torch.equal(fallback(x, packed, True), torchs(x))


def test_fused_int8_self_attention_projections_give_the_same_numbers(data_dir):
    """int8.FusedProjections: one product for a decoder self-attention's int8 query, key and value projections,
    equal to the three it replaces, and a decode through it equal to one without it (bitwise)."""
    model, task, _ = build_model(data_dir, ["--arch", "transformer_b2t", *SMALL, "--int8-decoding", "decoder"])
    model.eval()
    model.prepare_for_inference_(_generation_cfg())
    attentions = [layer.self_attn for layer in model.decoder.layers]
    assert all(hasattr(a, "b2t_qkv") for a in attentions)
    torch.manual_seed(3)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        fused = attentions[0].b2t_qkv(x)
        for got, projection in zip(fused, (attentions[0].q_proj, attentions[0].k_proj, attentions[0].v_proj)):
            assert torch.equal(got, projection(x))
        src, lengths = torch.randint(4, 30, (3, 7)), torch.full((3,), 7)
        prev = torch.randint(4, 30, (3, 5))

        def steps():
            enc, state = model.encoder(src, lengths), {}
            return torch.cat([model.decoder(prev[:, : t + 1], enc, incremental_state=state)[0] for t in range(5)], 1)

        calls = []
        real = attentions[0].b2t_qkv
        attentions[0].b2t_qkv = lambda h: calls.append(1) or real(h)
        with_fused = steps()
        assert len(calls) == 5  # every step took the fused product
        for a in attentions:
            del a.b2t_qkv
        assert torch.equal(with_fused, steps())


@pytest.mark.parametrize("connection", tuple(b2t_fairseq.modules.CONNECTIONS))
def test_every_method_decodes_with_int8_layers(data_dir, connection):
    """--int8-decoding all on every method: every Linear layer of the layers multiplies in int8 (a method's own
    Linear classes around an int8 product), step-by-step decoding stays close to the float32 model's, beam search
    runs."""
    argv = ["--arch", "transformer_b2t", *SMALL, "--connection", connection]
    model, task, _ = build_model(data_dir, [*argv, "--int8-decoding", "all"])
    reference, _, _ = build_model(data_dir, argv)
    for m in (model, reference):
        m.eval()
        m.prepare_for_inference_(_generation_cfg())
    layers = [*model.encoder.layers, *model.decoder.layers]
    assert all(isinstance(layer.fc1, QLinear) for layer in layers)
    assert isinstance(model.decoder.output_projection, QLinear)
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, (torch.nn.Linear, QLinear))]
    # a method's own Linear classes (Sub-LN's, HybridNorm's) keep their steps around an int8 product
    assert all(isinstance(m, (QLinear, Int8Product)) for m in linears), {type(m) for m in linears}
    torch.manual_seed(3)
    src, lengths, prev = torch.randint(4, 30, (3, 7)), torch.full((3,), 7), torch.randint(4, 30, (3, 5))
    with torch.no_grad():
        outs = []
        for m in (model, reference):
            enc, state = m.encoder(src, lengths), {}
            outs.append(torch.cat([m.decoder(prev[:, : t + 1], enc, incremental_state=state)[0] for t in range(5)], 1))
    error = ((outs[0] - outs[1]).norm() / outs[1].norm()).item()
    assert 0 < error < 0.05, error
    from fairseq.sequence_generator import SequenceGenerator

    gen = SequenceGenerator([model], task.target_dictionary, beam_size=2, max_len_b=6)
    with torch.no_grad():
        hyps = gen.generate([model], {"net_input": {"src_tokens": src, "src_lengths": lengths}})
    assert len(hyps) == 3 and all(len(h) == 2 for h in hyps)


@pytest.mark.parametrize("given", ["corpus", "corpus/", "corpus/news-"])
def test_int8_experiment_finds_the_references_of_a_real_data_demo(tmp_path, given):
    """experiments/int8_decoding.py scores against the test references of the corpus the demo was made from: the
    pipeline records a corpus directory without its trailing slash (it did not find demo-out/real's references)."""
    import importlib.util
    import json
    from pathlib import Path

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("int8_decoding", REPO / "experiments" / "int8_decoding.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    name = "news-" if given.endswith("news-") else ""
    for split in ("train", "valid", "test"):
        for lang in ("en", "de"):
            (corpus / f"{name}{split}.{lang}").write_text("a\n")
    work = tmp_path / "work"
    work.mkdir()
    from b2t_fairseq.tools.pipeline import find_corpus

    recorded = str(Path(find_corpus(tmp_path / given, "en", "de")[0]).resolve())  # as the pipeline records it
    (work / "pipeline.json").write_text(json.dumps({"config": {}, "data": recorded, "src": "en", "tgt": "de"}))
    (work / "result.json").write_text(json.dumps({"checkpoint": str(work / "checkpoint.pt")}))
    reference, remove_bpe = experiment.demo_facts(work)[3:5]
    assert reference == corpus / f"{name}test.de" and reference.is_file() and remove_bpe == "sentencepiece"


def test_int8_experiment_reuses_outputs_only_of_the_same_checkpoint_and_code(tmp_path, monkeypatch):
    """experiments/int8_decoding.py continues an interrupted run from the outputs it finds, but outputs made by
    another checkpoint or other plugin code would mix two runs in one table (a rerun after a code change reused
    every output and recorded the new commit beside the old numbers): it stops with one line saying what to
    delete."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("int8_decoding", REPO / "experiments" / "int8_decoding.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    out_dir, checkpoint = tmp_path / "int8", tmp_path / "checkpoint.pt"
    out_dir.mkdir()
    checkpoint.write_bytes(b"weights")
    experiment.check_earlier_outputs(out_dir, checkpoint)  # a first run stamps the directory
    experiment.check_earlier_outputs(out_dir, checkpoint)  # the same checkpoint and code: continue
    monkeypatch.setattr(experiment, "code_digest", lambda: "other code")
    with pytest.raises(SystemExit, match=f"outputs made with other b2t_fairseq code.*delete {out_dir} and rerun"):
        experiment.check_earlier_outputs(out_dir, checkpoint)
    monkeypatch.undo()
    checkpoint.write_bytes(b"retrained weights")
    with pytest.raises(SystemExit, match=f"outputs of another checkpoint; delete {out_dir} and rerun"):
        experiment.check_earlier_outputs(out_dir, checkpoint)
    assert experiment.code_digest() == experiment.code_digest() != "other code"
