"""b2t-average-checkpoints and b2t-score: numerics, checkpoint selection, error reporting, and one real pipeline."""
import argparse
import json
import re

import pytest
import sacrebleu
import torch

from b2t_fairseq.compat.checkpoints import load_checkpoint
from b2t_fairseq.safety.errors import B2TConfigError
from b2t_fairseq.tools.average_checkpoints import average_checkpoints, select_checkpoints
from b2t_fairseq.tools.average_checkpoints import cli_main as average_cli
from b2t_fairseq.tools.score import cli_main as score_cli
from b2t_fairseq.tools.score import postprocess, read_hypotheses, score

from conftest import PLUGIN_DIR, TINY_MODEL, TINY_OPTIM, run


def fake_checkpoint(path, seed, step=7, w_shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    state = {
        "model": {
            "w": torch.randn(w_shape, generator=g),
            "h": torch.randn(5, generator=g).half(),
            "step": torch.tensor([step, 2], dtype=torch.long),
        },
        "cfg": {"model": {"name": f"model{seed}"}},
        "args": argparse.Namespace(arch="transformer_b2t", seed=seed),
        "extra_state": {"epoch": seed},
        "optimizer_history": [{"optimizer_name": "Adam", "num_updates": seed * 10}],
        "last_optimizer_state": {"state": {0: torch.zeros(1000)}},
    }
    torch.save(state, path)
    return state


@pytest.fixture
def three_checkpoints(tmp_path):
    paths = [tmp_path / f"checkpoint{i}.pt" for i in (1, 2, 3)]
    return paths, [fake_checkpoint(p, seed=i) for i, p in enumerate(paths, start=1)]


def test_average_is_the_mean_and_metadata_comes_from_the_newest(three_checkpoints):
    paths, states = three_checkpoints
    avg = average_checkpoints(paths)
    for key in ("w", "h"):
        expected = sum(s["model"][key].double() for s in states) / 3
        assert avg["model"][key].dtype == states[0]["model"][key].dtype
        torch.testing.assert_close(avg["model"][key], expected.to(states[0]["model"][key].dtype), rtol=0, atol=0)
    assert torch.equal(avg["model"]["step"], states[0]["model"]["step"])
    assert avg["cfg"] == states[2]["cfg"] and avg["extra_state"] == {"epoch": 3}
    assert avg["args"].seed == 3 and avg["optimizer_history"] == states[2]["optimizer_history"]
    assert "last_optimizer_state" not in avg


def test_average_of_tied_weights_stays_tied(tmp_path):
    paths = []
    for i in range(2):
        emb = torch.full((4, 2), float(i))
        torch.save({"model": {"enc.emb": emb, "dec.emb": emb}, "optimizer_history": []}, tmp_path / f"{i}.pt")
        paths.append(tmp_path / f"{i}.pt")
    model = average_checkpoints(paths)["model"]
    assert torch.equal(model["enc.emb"], torch.full((4, 2), 0.5)) and model["enc.emb"] is model["dec.emb"]


def test_average_refuses_different_models(three_checkpoints, tmp_path):
    paths, _ = three_checkpoints
    fake_checkpoint(tmp_path / "wide.pt", seed=9, w_shape=(3, 5))
    with pytest.raises(B2TConfigError, match=r"different models: w is torch.float32\[3, 5\]"):
        average_checkpoints([*paths, tmp_path / "wide.pt"])
    extra = fake_checkpoint(tmp_path / "extra.pt", seed=9)
    torch.save({**extra, "model": {**extra["model"], "b2t.gate": torch.ones(1)}}, tmp_path / "extra.pt")
    with pytest.raises(B2TConfigError, match=r"different models: parameters differ \(b2t.gate\)"):
        average_checkpoints([*paths, tmp_path / "extra.pt"])
    fake_checkpoint(tmp_path / "step.pt", seed=9, step=8)
    with pytest.raises(B2TConfigError, match="non-float tensor step differs"):
        average_checkpoints([*paths, tmp_path / "step.pt"])


def touch(directory, *names):
    directory.mkdir(exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")


def test_select_newest_by_number_not_by_name_or_mtime(tmp_path):
    # Written newest-first so that mtime order is the reverse of epoch order.
    touch(tmp_path, *(f"checkpoint{i}.pt" for i in range(12, 0, -1)), "checkpoint_best.pt", "checkpoint_last.pt")
    assert [p.name for p in select_checkpoints(tmp_path, num_epoch_checkpoints=3)] == [
        "checkpoint10.pt", "checkpoint11.pt", "checkpoint12.pt",
    ]  # fmt: skip
    assert [p.name for p in select_checkpoints(tmp_path, num_epoch_checkpoints=2, upper_bound=9)] == [
        "checkpoint8.pt", "checkpoint9.pt",
    ]  # fmt: skip


def test_select_update_checkpoints(tmp_path):
    touch(tmp_path, "checkpoint3.pt", "checkpoint_1_500.pt", "checkpoint_2_1000.pt", "checkpoint_10_5000.pt",
          "checkpoint_9_4500.pt")  # fmt: skip
    names = [p.name for p in select_checkpoints(tmp_path, num_update_checkpoints=2)]
    assert names == ["checkpoint_9_4500.pt", "checkpoint_10_5000.pt"]
    names = [p.name for p in select_checkpoints(tmp_path, num_update_checkpoints=2, upper_bound=1000)]
    assert names == ["checkpoint_1_500.pt", "checkpoint_2_1000.pt"]


def test_select_too_few_says_how_many_and_where(tmp_path):
    touch(tmp_path, "checkpoint1.pt", "checkpoint2.pt", "checkpoint_1_100.pt")
    with pytest.raises(B2TConfigError, match=rf"found only 2 checkpoint\{{epoch\}}\.pt files in {re.escape(str(tmp_path))}, need 5"):
        select_checkpoints(tmp_path, num_epoch_checkpoints=5)
    with pytest.raises(B2TConfigError, match="found only 0 .* with number <= 50"):
        select_checkpoints(tmp_path, num_update_checkpoints=1, upper_bound=50)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing dir", "no such file or directory"),
        ("empty dir", "found only 0"),
        ("no count", "give --num-epoch-checkpoints or --num-update-checkpoints"),
        ("count with files", "need a single directory"),
        ("both counts", "not allowed with argument"),
        ("different models", "different models"),
        ("not a checkpoint", "cannot read checkpoint"),
    ],
)
def test_average_cli_bad_input_is_one_line(tmp_path, three_checkpoints, capsys, case, message):
    paths, _ = three_checkpoints
    (tmp_path / "empty").mkdir()
    fake_checkpoint(tmp_path / "wide.pt", seed=9, w_shape=(2, 2))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    inputs = {
        "missing dir": [tmp_path / "nope"],
        "empty dir": [tmp_path / "empty", "--num-epoch-checkpoints", 2],
        "no count": [tmp_path],
        "count with files": [*paths, "--num-epoch-checkpoints", 2],
        "both counts": [tmp_path, "--num-epoch-checkpoints", 2, "--num-update-checkpoints", 2],
        "different models": [paths[0], tmp_path / "wide.pt"],
        "not a checkpoint": [paths[0], tmp_path / "junk.pt"],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        average_cli(["--inputs", *map(str, inputs), "--output", str(tmp_path / "avg.pt")])
    assert exit_info.value.code != 0
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not (tmp_path / "avg.pt").exists()


def test_average_console_script_reports_errors_without_traceback(tmp_path, three_checkpoints):
    # One real subprocess (fairseq's import costs seconds): the in-process tests above cannot see tracebacks.
    paths, _ = three_checkpoints
    fake_checkpoint(tmp_path / "wide.pt", seed=9, w_shape=(2, 2))
    proc = run("b2t-average-checkpoints", "--inputs", *paths, tmp_path / "wide.pt", "--output", tmp_path / "a.pt",
               check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("b2t-average-checkpoints: error: ")
    assert "different models" in proc.stderr


GENERATE_OUTPUT = """\
2024-01-01 12:00:00 | INFO | fairseq_cli.generate | loading model
S-2\tdrei
T-2\tthree
H-2\t-0.31\tthr@@ ee
D-2\t-0.31\tthree
P-2\t-0.1 -0.2 -0.3
S-0\teins
H-0\t-0.12\tone
H-0\t-0.50\twon
S-1\tzwei
H-1\t-0.25\t
Generate test with beam=4: BLEU4 = 1.00
"""


def test_read_hypotheses_sorts_by_id_and_keeps_only_h_lines():
    assert read_hypotheses(GENERATE_OUTPUT.splitlines(keepends=True)) == ["one", "", "thr@@ ee"]


def test_postprocess_bpe_and_detok():
    assert postprocess("the new@@ est mo@@ del@@", "subword_nmt") == "the newest model"
    assert postprocess("\u2581the \u2581new est \u2581model", "sentencepiece") == "the newest model"
    assert postprocess("a@@ b \u2581c", "none") == "a@@ b \u2581c"
    assert postprocess("Hello , world !", "none", "en") == "Hello, world!"
    assert postprocess("Hello , world !", "none", "none") == "Hello , world !"
    assert postprocess("\u2581Hello \u2581, \u2581world \u2581!", "sentencepiece", "en") == "Hello, world!"


def test_score_matches_sacrebleu_and_reports_its_signature():
    raw = ["\u2581the \u2581cat \u2581sat \u2581on \u2581the \u2581mat \u2581.", "\u2581a \u2581dog \u2581bark s"]
    hyps = [postprocess(h, "sentencepiece") for h in raw]
    refs = ["The cat sat on the mat.", "A dog barked loudly."]
    result = score(hyps, refs)
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert result["n"] == 2 and "tok:13a" in result["signature"] and "case:mixed" in result["signature"]
    lower = score(hyps, refs, lowercase=True)
    assert lower["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score)
    assert lower["bleu"] > result["bleu"] and "case:lc" in lower["signature"]
    assert score(refs, refs)["bleu"] == pytest.approx(100.0)


def test_score_count_mismatch_says_both_counts():
    with pytest.raises(B2TConfigError, match="2 hypotheses but 3 references; the generate output may be incomplete"):
        score(["a", "b"], ["a", "b", "c"])
    with pytest.raises(B2TConfigError, match="--required-batch-size-multiple 1"):
        score(["a"] * 96, ["a"] * 100)


def test_score_cli(tmp_path, capsys):
    gen, ref = tmp_path / "gen.out", tmp_path / "ref.txt"
    gen.write_text(GENERATE_OUTPUT)
    ref.write_text("one\nzwei\nthree\n")
    score_cli([f"--generate-output={gen}", f"--ref={ref}", "--remove-bpe=subword_nmt",
               f"--output-hyp={tmp_path / 'hyp.txt'}", f"--json={tmp_path / 'r.json'}"])  # fmt: skip
    out = capsys.readouterr().out
    assert re.fullmatch(r"BLEU = \d+\.\d\d .* \| nrefs:1\|case:mixed\|eff:no\|tok:13a\|.*\n", out)
    assert (tmp_path / "hyp.txt").read_text() == "one\n\nthree\n"
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n"] == 3 and result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(["one", "", "three"], [
        ["one", "zwei", "three"]]).score)  # fmt: skip

    ref.write_text("one\nthree\n")
    for args, message in [
        ([f"--generate-output={gen}", f"--ref={ref}"], "3 hypotheses but 2 references"),
        ([f"--generate-output={tmp_path / 'missing'}", f"--ref={ref}"], "missing"),
        ([f"--generate-output={ref}", f"--ref={ref}"], "no H-<id> lines"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            score_cli(args)
        assert exit_info.value.code == 1 and message in capsys.readouterr().err


@pytest.mark.slow
def test_train_average_generate_score(toy_corpus, tmp_path):
    save = tmp_path / "ckpt"
    run("fairseq-train", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--arch", "transformer_b2t",
        *TINY_MODEL, *TINY_OPTIM, "--max-update", 40, "--save-dir", save, "--dropout", 0)  # fmt: skip
    epochs = sorted(save.glob("checkpoint[0-9]*.pt"), key=lambda p: int(p.stem[len("checkpoint"):]))
    assert len(epochs) >= 3, f"expected >= 3 epoch checkpoints, got {[p.name for p in epochs]}"

    avg = tmp_path / "avg.pt"
    proc = run("b2t-average-checkpoints", "--inputs", save, "--num-epoch-checkpoints", 3, "--output", avg)
    assert [line.strip() for line in proc.stdout.splitlines()[1:4]] == [str(p) for p in epochs[-3:]]
    averaged = load_checkpoint(avg)["model"]
    inputs = [load_checkpoint(p)["model"] for p in epochs[-3:]]
    assert averaged.keys() == inputs[0].keys()
    for key, value in averaged.items():
        expected = torch.stack([m[key].double() for m in inputs]).mean(0).to(value.dtype)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)

    # --required-batch-size-multiple 1: by default fairseq 0.12 silently drops the last batch when its size is not
    # a multiple of 8 (100 = 64 + 32 + 4, so 96 lines; fairseq issue #5036). --max-len-*: the barely trained model
    # otherwise babbles up to 200 tokens per sentence, which triples the decoding time.
    gen = run("fairseq-generate", toy_corpus["data_bin"], "--user-dir", PLUGIN_DIR, "--path", avg,
              "--gen-subset", "test", "--beam", 4, "--batch-size", 64, "--cpu", "--required-batch-size-multiple", 1,
              "--max-len-a", 1.5, "--max-len-b", 5)  # fmt: skip
    (tmp_path / "gen.out").write_text(gen.stdout)
    assert len(re.findall(r"^H-\d+\t", gen.stdout, re.M)) == 100

    proc = run("b2t-score", "--generate-output", tmp_path / "gen.out", "--ref", toy_corpus["raw"] / "test.tgt")
    assert re.search(r"^BLEU = \d+\.\d\d .*\| nrefs:1\|case:mixed\|eff:no\|tok:13a\|", proc.stdout, re.M), proc.stdout
