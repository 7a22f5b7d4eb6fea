"""The LibriSpeech recipe: train commands, features, manifests, CMVN and vocabulary of `prepare`, WER, the table,
and the four scripts end to end on a spoken-digit corpus that espeak-ng synthesises here (nothing downloaded)."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import REPO, cli_env, train_flags
from b2t_fairseq.toy import speech as toy_speech
from b2t_fairseq.recipes import librispeech as recipe
from b2t_fairseq.recipes.librispeech import RecipeError, build_train_command, main

SCRIPTS = REPO / "scripts" / "librispeech"
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (`make setup` installs it with apt-get)"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A synthetic LibriSpeech directory: 240 training utterances, 20 in each dev/test split."""
    root = tmp_path_factory.mktemp("librispeech") / "LibriSpeech"
    return root, toy_speech.write_corpus(root, n_train=240, n_eval=20, seed=1)


NOISE_WORDS = "one two three four five six seven eight nine".split()
QUOTED = ('21-101-0001', 'SAID "NINE" BACK\\SLASH')  # a transcript line with the characters a TSV writer escapes


def write_noise_corpus(root, per_chapter=3, seed=0):
    """A LibriSpeech tree without espeak: in each split two speakers with one chapter of PER_CHAPTER utterances (four
    times as many in training), each a fraction of a second of noise as 16 kHz FLAC with three digit words as its
    transcript; one dev-clean line is QUOTED; and a stray README that is neither audio nor transcript.
    Returns {split: {id: transcript}}."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    texts = {}
    for number, split in enumerate(toy_speech.SPLITS):
        texts[split] = {}
        for speaker in (10 * number + 11, 10 * number + 12):
            chapter = root / split / str(speaker) / str(100 + number)
            chapter.mkdir(parents=True)
            lines = []
            for i in range(per_chapter * (4 if split.startswith("train") else 1)):
                utt = f"{speaker}-{100 + number}-{i:04d}"
                samples = 0.1 * rng.standard_normal(4000 + 400 * int(rng.integers(10)))
                sf.write(chapter / f"{utt}.flac", samples.astype(np.float32), 16000, format="FLAC")
                text = QUOTED[1] if utt == QUOTED[0] else " ".join(rng.choice(NOISE_WORDS, 3)).upper()
                texts[split][utt] = text
                lines.append(f"{utt} {text}\n")
            (chapter / f"{speaker}-{100 + number}.trans.txt").write_text("".join(lines), encoding="utf-8")
    (root / "dev-clean" / "README").write_text("not part of the corpus\n")
    return texts


@pytest.fixture(scope="module")
def noise_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise") / "LibriSpeech"
    return root, write_noise_corpus(root)


@pytest.fixture
def noise(noise_corpus, tmp_path):
    """A copy of the noise corpus to damage."""
    root = tmp_path / "LibriSpeech"
    shutil.copytree(noise_corpus[0], root)
    return root, noise_corpus[1]


@pytest.fixture(scope="module")
def noise_prepared(noise_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("noise-prepared")
    recipe.prepare(noise_corpus[0], out, scale="smoke")
    return out


def run_prepare(capsys, root, out, *flags):
    """(exit status, stdout, stderr) of `librispeech prepare --scale smoke`."""
    capsys.readouterr()
    try:
        code = main(["prepare", "--scale", "smoke", "--data", str(root), "--out", str(out), *flags])
    except SystemExit as e:
        code = e.code
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def refused(capsys, root, out, *names):
    """The one-line error of a prepare that must refuse before writing anything; it names ``names``."""
    code, _, err = run_prepare(capsys, root, out)
    assert code == 1 and err.count("\n") == 1 and err.startswith("librispeech: error: "), err
    assert all(str(name) in err for name in names), err
    assert not (out / "data").exists()
    return err


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    facts = recipe.prepare(corpus[0], out, scale="smoke")
    return out, facts


def levenshtein(a, b):
    """Word edit distance, written out (the recipe uses fairseq's scorer on editdistance)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


# ------------------------------------------------------------------ train
@pytest.mark.parametrize("depth, gpus", [(12, 8), (36, 8), (12, 0)])
def test_methods_differ_only_in_connection(depth, gpus):
    methods = [m for m in recipe.METHODS if m != "tfixup"]  # its init needs token embeddings (refused below)
    flags = {m: train_flags(build_train_command(m, depth, gpus, "data", "ckpt")[0]) for m in methods}
    base = dict(flags["b2t"])
    base.pop("--connection")
    for method, f in flags.items():
        assert f.pop("--connection") == method
        assert f == base, method
    assert base["--task"] == "speech_to_text" and base["--arch"] == "s2t_transformer_b2t_s"
    assert base["--encoder-layers"] == str(depth) and base["--decoder-layers"] == "6"


@pytest.mark.parametrize("gpus, nodes, freq", [(1, 1, 8), (2, 1, 4), (4, 1, 2), (8, 1, 1), (4, 2, 1)])
def test_frames_per_update_do_not_depend_on_the_gpu_count(gpus, nodes, freq):
    cmd, info = build_train_command("b2t", 12, gpus, "data", "ckpt", nodes=nodes)
    f = train_flags(cmd)
    assert f["--update-freq"] == str(freq) and f["--max-tokens"] == "40000"
    assert info["tokens_per_update"] == 320000


def test_tfixup_is_refused_before_training():
    with pytest.raises(RecipeError, match="--method tfixup: its initialisation scales the source token embeddings"):
        build_train_command("tfixup", 12, 8, "data", "ckpt")


def test_depth_and_encoder_layers_are_one_flag(tmp_path):
    with pytest.raises(RecipeError, match="--encoder-layers cannot be passed"):
        build_train_command("b2t", 12, 8, "data", "ckpt", extra=["--encoder-layers", "18"])
    for name in ("base", "12l", "36l", "smoke"):
        shutil.copy(REPO / "configs" / "librispeech" / f"{name}.yaml", tmp_path)
    (tmp_path / "36l.yaml").write_text("train: {encoder-layers: 24}\n")
    with pytest.raises(RecipeError, match="36l.yaml must set encoder-layers: 36, not 24"):
        build_train_command("b2t", 36, 8, "data", "ckpt", config_dir=tmp_path)


# ------------------------------------------------------------------ prepare
def test_read_split_names_the_file_at_fault(tmp_path):
    with pytest.raises(RecipeError, match=r"dev-clean does not exist \(--data must hold the LibriSpeech splits"):
        recipe.read_split(tmp_path, "dev-clean")
    chapter = tmp_path / "dev-clean" / "1" / "2"
    chapter.mkdir(parents=True)
    (chapter / "1-2.trans.txt").write_text("1-2-0000 HELLO WORLD\n")
    with pytest.raises(RecipeError, match=r"1-2.trans.txt:1: .*1-2-0000.flac does not exist"):
        recipe.read_split(tmp_path, "dev-clean")


@needs_espeak
def test_features_manifests_cmvn_and_vocabulary(corpus, prepared):
    import soundfile as sf
    from fairseq.data.audio.audio_utils import get_features_or_waveform
    from fairseq.data.audio.data_cfg import S2TDataConfig
    from fairseq.data.encoders import build_bpe

    root, texts = corpus
    out, facts = prepared
    data = out / "data"
    assert facts["utterances"] == {s: len(u) for s, u in texts.items()}
    rows = recipe.read_manifest(data / "dev-clean.tsv")
    assert [(r["id"], r["tgt_text"]) for r in rows] == sorted(texts["dev-clean"])  # lower-cased transcripts
    for row in rows[:5]:
        speaker, chapter, _ = row["id"].split("-")
        flac = root / "dev-clean" / speaker / chapter / f"{row['id']}.flac"
        stored = get_features_or_waveform(row["audio"])  # fairseq's reader of zip:offset:length
        assert np.array_equal(stored, recipe.fbank(flac, 80))
        samples = sf.info(str(flac)).frames
        assert stored.shape == (1 + (samples - 400) // 160, 80) and int(row["n_frames"]) == stored.shape[0]

    train = np.concatenate([get_features_or_waveform(r["audio"]) for r in recipe.read_manifest(data / "train-clean-100.tsv")])
    train = train.astype(np.float64)
    stats = np.load(data / "gcmvn.npz")
    assert np.allclose(stats["mean"], train.mean(0), atol=1e-4) and np.allclose(stats["std"], train.std(0), atol=1e-3)

    cfg = S2TDataConfig(data / "config.yaml")
    assert cfg.input_feat_per_channel == 80
    assert cfg.get_feature_transforms("train-clean-100", True)["feature_transforms"] == ["global_cmvn", "specaugment"]
    assert cfg.get_feature_transforms("dev-clean", False)["feature_transforms"] == ["global_cmvn"]
    words = (data / cfg.vocab_filename).read_text().split()[::2]
    assert not {"<s>", "</s>", "<pad>", "<unk>"} & set(words)
    bpe = build_bpe(type("A", (), {"bpe": "sentencepiece", "sentencepiece_model": cfg.bpe_tokenizer["sentencepiece_model"]})())
    assert all(bpe.decode(bpe.encode(r["tgt_text"])) == r["tgt_text"] for r in rows)


@needs_espeak
def test_prepare_continues_after_an_interruption_and_refuses_other_settings(corpus, prepared, capsys):
    out, _ = prepared
    data, features = out / "data", out / "fbank80"
    manifest = (data / "test-other.tsv").read_text()
    # interrupted inside test-other: its manifest and zip not written yet, two of its features already were
    (data / "test-other.tsv").unlink()
    os.replace(features / "test-other.zip", out / "old.zip")
    loose = features / "test-other"
    loose.mkdir()
    first = sorted(u for u, _ in corpus[1]["test-other"])[:2]
    for utt in first:
        speaker, chapter, _ = utt.split("-")
        np.save(loose / f"{utt}.npy", recipe.fbank(corpus[0] / "test-other" / speaker / chapter / f"{utt}.flac", 80))
    capsys.readouterr()
    recipe.prepare(corpus[0], out, scale="smoke", workers=2)  # the rest in two processes: the same bytes
    printed = capsys.readouterr().out
    assert "test-other: filterbanks of 18 of 20 utterances" in printed and "dev-clean: done" in printed
    assert (data / "test-other.tsv").read_text() == manifest and not loose.exists()
    assert (features / "test-other.zip").read_bytes() == (out / "old.zip").read_bytes()
    with pytest.raises(SystemExit):  # full-scale settings over a smoke preparation: another run
        main(["prepare", "--data", str(corpus[0]), "--out", str(out)])
    err = capsys.readouterr().err
    assert "was prepared with other" in err and "use another --out" in err and err.count("\n") == 1


def test_bad_input_is_one_line(tmp_path, capsys):
    cases = [
        (["train", "--method", "b2t", "--depth", "12", "--gpus", "8", "--data-bin", "d", "--save-dir",
          str(tmp_path / "ck"), "--hydra-config", str(tmp_path / "row.yaml")], "has no fairseq-hydra-train config"),
        (["prepare", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")], "does not exist (--data must hold"),
        (["train", "--method", "b2t", "--depth", "12", "--scale", "smoke", "--data-bin", str(tmp_path),
          "--save-dir", str(tmp_path / "ck")], "has no config.yaml"),
        (["evaluate", "--save-dir", str(tmp_path / "none"), "--data-bin", str(tmp_path), "--out", "o.json"],
         "save dir"),
    ]  # fmt: skip
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 1 and message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------ prepare: a source that is not whole
def test_prepare_refuses_audio_without_a_transcript(noise, tmp_path, capsys):
    root, _ = noise
    chapter = root / "train-clean-100" / "12" / "100"
    trans = chapter / "12-100.trans.txt"
    lines = trans.read_text().splitlines(keepends=True)
    trans.unlink()
    err = refused(capsys, root, tmp_path / "out", chapter, "12-100.trans.txt", "restore the transcript")
    assert "12 untranscribed .flac files in train-clean-100" in err
    trans.write_text("")
    refused(capsys, root, tmp_path / "out", f"{trans} is empty", "restore it")
    trans.write_text("".join(lines[:-1]))  # the chapter's last utterance lost its line
    refused(capsys, root, tmp_path / "out", chapter / "12-100-0011.flac", f"has no line in {trans}")


def test_prepare_refuses_a_repeated_utterance(noise, tmp_path, capsys):
    root, _ = noise
    trans = root / "dev-clean" / "21" / "101" / "21-101.trans.txt"
    original = trans.read_text()
    trans.write_text(original + "21-101-0000 ONE TWO\n")  # the same id again, as line 4 of the same file
    refused(capsys, root, tmp_path / "out", f"{trans}:4: utterance 21-101-0000 again (first at {trans}:1)")
    trans.write_text(original)
    for copy in (root / "dev-clean" / "29" / "101", root / "test-other" / "59" / "101"):  # one split, two splits
        shutil.copytree(trans.parent, copy)
        again = f"{copy / trans.name}:1: utterance 21-101-0000 again (first at {trans}:1)"
        refused(capsys, root, tmp_path / "out", again)
        shutil.rmtree(copy)


def test_prepare_refuses_unreadable_input_in_one_line(noise, tmp_path, capsys):
    import soundfile as sf

    root, _ = noise
    trans = root / "dev-other" / "32" / "102" / "32-102.trans.txt"
    original = trans.read_bytes()
    lines = original.split(b"\n")
    for bad, names in (
        (b"\xe9", [f"{trans}:2: not UTF-8 (byte 0xe9)", "re-encode it as UTF-8"]),  # Latin-1 text
        (b"\t", [f"{trans}:2: a tab in the transcript", "replace it with a space"]),
        (b"\r", [f"{trans}:2: a carriage return"]),
    ):
        trans.write_bytes(b"\n".join([lines[0], lines[1] + bad + b"NINE", *lines[2:]]))
        refused(capsys, root, tmp_path / "out", *names)
    trans.write_bytes(original)

    flac = root / "test-clean" / "41" / "103" / "41-103-0002.flac"
    samples = np.zeros(8000, dtype=np.float32)
    samples[3200] = np.nan  # a float WAV under the .flac name, as a broken conversion leaves it
    sf.write(flac, samples, 16000, format="WAV", subtype="FLOAT")
    code, _, err = run_prepare(capsys, root, tmp_path / "out")
    assert code == 1 and err.count("\n") == 1, err
    assert f"{flac}: 1 NaN or infinite sample(s), the first at 0.200 s; restore it" in err
    flac.write_bytes(b"fLaC" + bytes(range(256)) * 4)  # not audio at all
    code, _, err = run_prepare(capsys, root, tmp_path / "out")
    assert code == 1 and err.count("\n") == 1 and f"{flac}: cannot read audio" in err, err


def test_manifest_text_is_the_transcript_as_fairseq_reads_it(noise_prepared):
    from fairseq.data.audio.speech_to_text_dataset import SpeechToTextDatasetCreator
    from fairseq.data.encoders import build_bpe

    data = noise_prepared / "data"
    expected = 'said "nine" back\\slash'  # the transcript lower-cased, nothing escaped
    rows = SpeechToTextDatasetCreator._load_samples_from_tsv(str(data), "dev-clean")  # what fairseq-train reads
    trained = {r["id"]: r["tgt_text"] for r in rows}
    scored = {r["id"]: r["tgt_text"] for r in recipe.read_manifest(data / "dev-clean.tsv")}
    assert trained[QUOTED[0]] == scored[QUOTED[0]] == expected
    model = str(data / "spm_unigram40.model")
    bpe = build_bpe(type("A", (), {"bpe": "sentencepiece", "sentencepiece_model": model})())
    assert bpe.decode(bpe.encode(expected)) == expected


def test_rerun_redoes_exactly_what_a_changed_source_feeds(noise, tmp_path, capsys):
    """A chapter added (e.g. its transcript restored), a transcript line corrected and an audio file replaced: the
    rerun redoes the features, manifests, CMVN and vocabulary made from them, reuses the rest, and a rerun after it
    changes no byte."""
    import soundfile as sf
    from fairseq.data.audio.audio_utils import get_features_or_waveform

    root, texts = noise
    out, data = tmp_path / "out", tmp_path / "out" / "data"
    chapter = root / "train-clean-100" / "12" / "100"
    shutil.move(chapter, tmp_path / "away")
    code, printed, _ = run_prepare(capsys, root, out)
    assert code == 0 and "dev-clean: ignored 1 files" in printed and "dev-clean/README" in printed
    assert json.loads((data / "prepared.json").read_text())["ignored"] == {"dev-clean": ["dev-clean/README"]}
    assert len(recipe.read_manifest(data / "train-clean-100.tsv")) == 12
    before = {p.name: p.read_bytes() for p in data.iterdir()}

    shutil.move(tmp_path / "away", chapter)
    trans = chapter / "12-100.trans.txt"  # the restored chapter brings the first words with a "q" and a "z"
    restored = {utt: f"{text} QUIZ" for utt, text in texts["train-clean-100"].items() if utt.startswith("12-")}
    trans.write_text("".join(f"{utt} {text}\n" for utt, text in restored.items()))
    dev = root / "dev-clean" / "22" / "101" / "22-101.trans.txt"
    dev.write_text(dev.read_text().replace("22-101-0002 ", "22-101-0002 EIGHT EIGHT "))
    replaced = root / "dev-other" / "31" / "102" / "31-102-0000.flac"
    sf.write(replaced, np.full(5600, 0.01, dtype=np.float32), 16000, format="FLAC")
    code, printed, _ = run_prepare(capsys, root, out)
    assert code == 0
    assert "train-clean-100: filterbanks of 12 of 24 utterances" in printed  # the 12 unchanged ones reused
    assert "dev-other: filterbanks of 1 of 6 utterances" in printed and "dev-clean: filterbanks" not in printed
    assert "test-clean: done" in printed

    train = recipe.read_manifest(data / "train-clean-100.tsv")
    assert sorted(r["id"] for r in train) == sorted(texts["train-clean-100"])
    assert {r["id"]: r["tgt_text"] for r in train}["12-100-0003"] == restored["12-100-0003"].lower()
    dev_rows = {r["id"]: r for r in recipe.read_manifest(data / "dev-clean.tsv")}
    assert dev_rows["22-101-0002"]["tgt_text"] == "eight eight " + texts["dev-clean"]["22-101-0002"].lower()
    other = {r["id"]: r for r in recipe.read_manifest(data / "dev-other.tsv")}
    assert int(other["31-102-0000"]["n_frames"]) == 1 + (5600 - 400) // 160
    assert np.allclose(get_features_or_waveform(other["31-102-0000"]["audio"]), recipe.fbank(replaced, 80))
    frames = np.concatenate([get_features_or_waveform(r["audio"]) for r in train]).astype(np.float64)
    stats = np.load(data / "gcmvn.npz")
    assert np.allclose(stats["mean"], frames.mean(0), atol=1e-4) and np.allclose(stats["std"], frames.std(0), atol=1e-3)
    assert (data / "gcmvn.npz").read_bytes() != before["gcmvn.npz"]
    pieces = (data / "spm_unigram40.txt").read_text()
    assert "z" not in before["spm_unigram40.txt"].decode() and "z" in pieces and "q" in pieces
    assert (data / "test-clean.tsv").read_bytes() == before["test-clean.tsv"]

    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, printed, _ = run_prepare(capsys, root, out)
    assert code == 0 and "redoing" not in printed and "filterbanks" not in printed
    assert all(f"{split}: done" in printed for split in toy_speech.SPLITS)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


# ------------------------------------------------------------------ train: validation sees every utterance
def test_validation_batches_hold_every_utterance(noise_prepared, tmp_path, capsys):
    """fairseq's own validation iterator, built from the recipe's train command, yields each dev utterance once.
    The dev sets hold 6 utterances: fairseq's default --required-batch-size-multiple 8 gives none."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    data = noise_prepared / "data"
    cmd, _ = build_train_command("b2t", 12, None, data, tmp_path / "ckpt", scale="smoke")
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), cmd[1:]))
    task = tasks.setup_task(cfg.task)
    trainer = Trainer(cfg, task, task.build_model(cfg.model), task.build_criterion(cfg.criterion))
    subsets = cfg.dataset.valid_subset.split(",")
    assert subsets == ["dev-clean", "dev-other"]
    for subset in subsets:
        task.load_dataset(subset, combine=False, epoch=1)
        batches = trainer.get_valid_iterator(subset).next_epoch_itr(shuffle=False)
        assert sorted(i for batch in batches for i in batch["id"].tolist()) == list(range(6)), subset

    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "b2t", "--depth", "12", "--scale", "smoke", "--data-bin", str(data), "--save-dir",
              str(tmp_path / "ckpt"), "--dry-run", "--", "--required-batch-size-multiple", "8"])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "--required-batch-size-multiple cannot be passed" in err


def test_a_config_asking_for_batch_multiples_is_refused(tmp_path):
    for name in ("base", "12l", "36l", "smoke"):
        shutil.copy(REPO / "configs" / "librispeech" / f"{name}.yaml", tmp_path)
    with open(tmp_path / "smoke.yaml", "a") as f:
        f.write("evaluate: {generate: {required-batch-size-multiple: 8}}\n")
    with pytest.raises(RecipeError, match="evaluate.generate sets required-batch-size-multiple: 8; fairseq would leave out"):
        recipe.load_config(tmp_path, scale="smoke")


# ------------------------------------------------------------------ scoring and table
def test_word_error_rate_against_a_written_out_edit_distance():
    rng = np.random.default_rng(0)
    vocab = "a b c d e f".split()
    refs = [" ".join(rng.choice(vocab, rng.integers(1, 8))) for _ in range(50)]
    hyps = [" ".join(rng.choice(vocab, rng.integers(0, 9))) for _ in range(50)]
    wer, edits, words = recipe.word_error_rate(hyps, refs)
    expected = sum(levenshtein(h.split(), r.split()) for h, r in zip(hyps, refs))
    assert (edits, words) == (expected, sum(len(r.split()) for r in refs))
    assert wer == pytest.approx(100 * expected / words)
    # the normalisation: case and punctuation do not count
    assert recipe.word_error_rate(["Hello, world!"], ["hello world"])[0] == 0.0
    with pytest.raises(RecipeError, match="2 hypotheses but 1 references"):
        recipe.word_error_rate(["a", "b"], ["a"])


def test_table_beside_the_published_row(tmp_path):
    def result(method, depth, wers, **extra):
        return {"recipe": "librispeech", "method": method, "depth": depth, "scale": None, "variant": "",
                "wer": dict(zip(("dev-clean", "dev-other", "test-clean", "test-other"), wers)),
                "wer_settings": "W", **extra}  # fmt: skip

    for name, r in {"a": result("b2t", 36, (3.1, 8.0, 3.3, 8.1)), "b": result("pre-ln", 12, (3.9, 9.0, 4.5, 9.25))}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    table = recipe.render_table(recipe.load_results([tmp_path]), recipe.load_config())
    lines = table.splitlines()
    assert lines[0] == "| Method | Layers | Source | dev-clean | dev-other | test-clean | test-other |"
    assert lines[2:5] == [
        "| Pre-LN | 12L-6L | published: fairseq S2T s2t_transformer_s | 3.80 | 8.90 | 4.40 | 9.00 |",
        "| Pre-LN | 12L-6L | ours | 3.90 | 9.00 | 4.50 | 9.25 |",
        "| B2T | 36L-6L | ours | 3.10 | 8.00 | 3.30 | 8.10 |",
    ]
    assert "WER (ours): W." in table and "Published numbers: fairseq's examples/speech_to_text" in table


@pytest.mark.parametrize("name", ["prepare", "train", "evaluate", "table"])
def test_scripts_are_thin_wrappers(name):
    path = SCRIPTS / f"{name}.sh"
    assert os.access(path, os.X_OK)
    last = path.read_text().rstrip().splitlines()[-1]
    assert last == f'exec "${{PYTHON:-python}}" -m b2t_fairseq.recipes.librispeech --config-dir "$repo/configs/librispeech" {name} "$@"'


# ------------------------------------------------------------------ smoke: the four scripts on synthetic speech
@needs_espeak
@pytest.mark.slow
def test_smoke_scripts_on_synthetic_speech(corpus, tmp_path):
    root, texts = corpus
    env = {**cli_env(PYTHON=sys.executable), "OMP_NUM_THREADS": "2"}  # the one process running: both cores

    def script(name, *args):
        proc = subprocess.run([str(SCRIPTS / f"{name}.sh"), *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400, check=False)  # fmt: skip
        assert proc.returncode == 0, f"{name}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    script("prepare", "--scale", "smoke", "--data", root, "--out", tmp_path / "prep")
    data = tmp_path / "prep" / "data"
    rows = {"trained": [], "untrained": ["--average-last", "1"]}
    for row, eval_flags in rows.items():
        extra = [] if row == "trained" else ["--", "--max-epoch", "1"]  # one epoch of warmup: next to untrained
        train = script("train", "--method", "b2t", "--depth", "12", "--scale", "smoke", "--data-bin", data,
                       "--save-dir", tmp_path / row, *extra)  # fmt: skip
        assert "--task speech_to_text" in train and "--connection b2t" in train
        script("evaluate", "--scale", "smoke", "--save-dir", tmp_path / row, "--data-bin", data,
               "--out", tmp_path / "results" / f"{row}.json", *eval_flags)  # fmt: skip
    results = {row: json.loads((tmp_path / "results" / f"{row}.json").read_text()) for row in rows}
    trained = results["trained"]
    assert (trained["method"], trained["depth"], trained["scale"]) == ("b2t", 12, "smoke")
    assert len(trained["averaged"]) == 2 and results["untrained"]["variant"] == "--max-epoch 1"

    # rescore what the decoder printed, independently of the recipe: D- lines by id against the raw transcripts
    for subset, scored in trained["subsets"].items():
        gen = (tmp_path / "results" / "trained.work" / f"generate-{subset}.txt").read_text(encoding="utf-8")
        hyps = dict(re.findall(r"^D-(\d+)\t\S+\t(.*)$", gen, flags=re.M))
        refs = [text for _, text in sorted(texts[subset])]
        assert sorted(map(int, hyps)) == list(range(len(refs)))
        edits = sum(levenshtein(hyps[str(i)].split(), ref.split()) for i, ref in enumerate(refs))
        words = sum(len(ref.split()) for ref in refs)
        assert scored["wer"] == pytest.approx(100 * edits / words) == pytest.approx(scored["fairseq_wer"], abs=0.01)
    # a minute of training on the spoken digits beats the model after one epoch on the voices it was trained on
    for subset in ("dev-clean", "test-clean"):
        assert trained["wer"][subset] < results["untrained"]["wer"][subset], (subset, results)

    printed = script("table", "--results", tmp_path / "results", "--out", tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    assert printed.endswith(table)
    ours = [line for line in table.splitlines() if "| ours" in line]
    assert ours == [
        f"| B2T | 12L-6L | ours, scale smoke | " + " | ".join(f"{trained['wer'][s]:.2f}" for s in trained["wer"]) + " |",
        "| B2T | 12L-6L | ours (--max-epoch 1), scale smoke | "
        + " | ".join(f"{results['untrained']['wer'][s]:.2f}" for s in trained["wer"]) + " |",
    ]
    print("smoke WER trained / after one epoch:", trained["wer"], results["untrained"]["wer"])  # with -s
