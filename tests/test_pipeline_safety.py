"""b2t-pipeline after interruptions and with bad input (issue 9): every stage's output is whole or absent, a rerun
redoes what was cut short, a non-UTF-8 byte is named by file and line, and a work dir is never reused for
other inputs."""
import os
import signal
import subprocess
import sys
import time

import pytest

from b2t_fairseq.toy import translation as toy_translation
from b2t_fairseq.tools import pipeline
from conftest import REPO, cli_env, run

SPM = {"vocab_size": 200, "model_type": "unigram", "character_coverage": 1.0}


@pytest.fixture
def corpus(tmp_path):
    raw = tmp_path / "raw"
    toy_translation.write_corpus(raw, n_train=300, n_valid=20, n_test=20, seed=3)
    return raw


def _lines(path):
    return path.read_text(encoding="utf-8").count("\n")


def test_non_utf8_byte_names_file_and_line_and_leaves_nothing_behind(corpus, tmp_path):
    train = corpus / "train.tgt"
    lines = train.read_bytes().split(b"\n")
    lines[2] = lines[2][:3] + b"\xff" + lines[2][3:]
    train.write_bytes(b"\n".join(lines))
    work = tmp_path / "work"
    with pytest.raises(pipeline.PipelineError, match=r"train\.tgt, line 3, column 4: byte 0xff is not UTF-8"):
        pipeline.prepare_sentencepiece(work, f"{corpus}/", "src", "tgt", SPM)
    assert not list((work / "spm").glob("*")), "a failed stage must leave no file a rerun could take as done"
    lines[2] = lines[2].replace(b"\xff", b"")
    train.write_bytes(b"\n".join(lines))
    prefix, _, _ = pipeline.prepare_sentencepiece(work, f"{corpus}/", "src", "tgt", SPM)
    assert _lines(work / "spm" / "train.tgt") == _lines(corpus / "train.tgt")


def test_half_encoded_split_is_encoded_again(corpus, tmp_path):
    work = tmp_path / "work"
    pipeline.prepare_sentencepiece(work, f"{corpus}/", "src", "tgt", SPM)
    encoded = work / "spm" / "train.src"
    whole = encoded.read_text(encoding="utf-8")
    # what a run killed while encoding left behind before outputs were written atomically
    encoded.write_text(whole[: len(whole) // 3], encoding="utf-8")
    pipeline.prepare_sentencepiece(work, f"{corpus}/", "src", "tgt", SPM)
    assert encoded.read_text(encoding="utf-8") == whole


def test_preprocess_killed_half_way_is_redone(corpus, tmp_path):
    """A real fairseq-preprocess killed while it writes, then the stage rerun: a complete data-bin."""
    work = tmp_path / "work"
    prefix, src, tgt = pipeline.prepare_sentencepiece(work, f"{corpus}/", "src", "tgt", SPM)
    code = f"from b2t_fairseq.tools import pipeline; from pathlib import Path; pipeline.preprocess(Path({str(work)!r}), {prefix!r}, 'src', 'tgt')"
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    partial = work / ".data-bin.partial"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(partial.glob("*.bin")):
        time.sleep(0.005)
    assert proc.poll() is None, "preprocess finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "data-bin").exists(), "an interrupted stage must not leave its output in place"
    data_bin = pipeline.preprocess(work, prefix, src, tgt)
    assert (data_bin / pipeline.COMPLETE).is_file() and not partial.exists()
    assert (data_bin / "test.src-tgt.tgt.bin").stat().st_size > 0


def test_data_bin_of_an_older_killed_run_is_rebuilt_and_a_changed_one_refused(corpus, tmp_path):
    work = tmp_path / "work"
    prefix, src, tgt = pipeline.prepare_sentencepiece(work, f"{corpus}/", "src", "tgt", SPM)
    data_bin = work / "data-bin"
    data_bin.mkdir()
    (data_bin / "preprocess.log").write_text("")
    (data_bin / "test.src-tgt.tgt.bin").write_bytes(b"")  # the 0-byte target an old stage check accepted
    pipeline.preprocess(work, prefix, src, tgt)
    assert (data_bin / "test.src-tgt.tgt.bin").stat().st_size > 0
    with open(data_bin / "train.src-tgt.src.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(pipeline.PipelineError, match="train.src-tgt.src.bin.*delete it to rebuild"):
        pipeline.preprocess(work, prefix, src, tgt)


def test_work_dir_of_other_inputs_is_refused(corpus, tmp_path):
    work = tmp_path / "work"
    (work).mkdir()
    pipeline.record_work(work, {"config": {"a": 1}, "data": str(corpus), "src": "src", "tgt": "tgt", "extra": []})
    pipeline.record_work(work, {"config": {"a": 1}, "data": str(corpus), "src": "src", "tgt": "tgt", "extra": []})
    proc = run("b2t-pipeline", "--config", REPO / "configs" / "demo" / "real.yaml", "--work-dir", work,
               "--data", corpus, "--src", "src", "--tgt", "tgt", check=False)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "holds a run made with another config" in proc.stderr and "use another --work-dir" in proc.stderr


def test_test_line_longer_than_the_positions_is_named_before_training(corpus, tmp_path):
    lines = (corpus / "test.src").read_text(encoding="utf-8").splitlines()
    lines[4] = " ".join(["word"] * 40)
    (corpus / "test.src").write_text("\n".join(lines) + "\n", encoding="utf-8")
    pipeline.check_test_lengths(f"{corpus}/", "src", "tgt", {"max-source-positions": 64})
    with pytest.raises(pipeline.PipelineError, match=r"test\.src, line 5: 41 tokens .* max-source-positions 32"):
        pipeline.check_test_lengths(f"{corpus}/", "src", "tgt", {"max-source-positions": 32})
    with pytest.raises(pipeline.PipelineError, match="max-source-positions 16"):  # `-- flags` win over the config
        pipeline.check_test_lengths(f"{corpus}/", "src", "tgt", {}, ["--max-source-positions", "16"])
