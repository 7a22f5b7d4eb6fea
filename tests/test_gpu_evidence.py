"""The GPU evidence of issue 23, checked where a CPU can check it: its last stage (the stability study's base18
stage: 18L-18L at base width, Post-LN / Pre-LN / B2T side by side) run with --smoke on the toy corpus through real
fairseq-train processes, its flags, its records and report, its refusals; and benchmarks/gpu/run.sh's bad input.
The whole run.sh is checked with `bash benchmarks/gpu/run.sh smoke` (minutes: not in the suite)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import stability_study as study  # noqa: E402

METHODS = ("post-ln", "pre-ln", "b2t")


def test_base18_trains_the_papers_18l_model_with_the_wmt_recipes_optimiser():
    config = study.base18_config()
    runner = study.Runner(gpu=True, jobs=3)
    options = study.base18_options(config, "b2t", runner, minutes=4.5, smoke=False)
    # the paper's values (docs/PAPER.md), read from configs/wmt_en_de/base.yaml, not written a second time
    assert (options["lr"], options["warmup-updates"], options["warmup-init-lr"]) == (0.001, 4000, 1e-7)
    assert (options["clip-norm"], options["label-smoothing"], options["adam-betas"]) == (0.1, 0.1, "(0.9,0.98)")
    assert options["arch"] == "transformer_b2t_wmt_en_de_18l" and options["fp16"] is True and "cpu" not in options
    assert options["stop-time-hours"] == 0.075 and options["no-save"] is True
    assert config["methods"] == list(METHODS)
    wmt = yaml.safe_load((REPO / "configs" / "wmt_en_de" / "base.yaml").read_text())["train"]
    assert all(options[k] == wmt[k] for k in config["from_wmt_recipe"])
    smoke = study.base18_options(config, "b2t", study.Runner(), minutes=1, smoke=True)
    assert smoke["cpu"] is True and "fp16" not in smoke and smoke["encoder-layers"] == 2


def test_base18_needs_a_gpu_or_smoke(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        study.main(["--work", str(tmp_path), "--stages", "base18"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1
    assert "pass --gpu on a GPU machine, or --smoke" in err[0]


def test_base18_smoke_trains_each_method_side_by_side_and_reports(toy_corpus, tmp_path, capsys):
    work, docs = tmp_path / "study", tmp_path / "docs"
    argv = ["--work", str(work), "--stages", "base18", "report", "--smoke", "--minutes", "1",
            "--data-bin", str(toy_corpus["data_bin"]), "--docs", str(docs)]  # fmt: skip
    study.main(argv)
    logs = {}
    for method in METHODS:
        run = work / f"18lsmoke-{method}"
        record = json.loads((run / "study.json").read_text())
        assert record["method"] == method and record["failed"] is None and record["device"] == "cpu"
        assert record["updates"] == 6 and record["all_finite"] and record["valid"]  # smoke: 6 updates, valid at 3, 6
        assert record["options"]["stop-time-hours"] == round(1 / 60, 6)
        log = (run / "train.log").read_text()
        assert f"'connection': '{method}'" in log or f"connection='{method}'" in log or f'"connection": "{method}"' in log
        logs[method] = (run / "train.log").stat().st_mtime_ns
    assert not list(work.glob("18lbase-*")), "a smoke check must never be named as a result"
    tables = (docs / "tables.md").read_text()
    section = tables.split("### 18L-18L at transformer_wmt_en_de width", 1)[1].split("\n\n", 2)[1]
    assert [row.split(" | ")[0] for row in section.splitlines()[2:]] == [f"| {m}" for m in METHODS]
    assert (docs / "loss_curves_18l_base.png").stat().st_size > 1000
    csv_methods = {line.split(",")[0] for line in (docs / "loss_curves_18l_base.csv").read_text().splitlines()[1:]}
    assert csv_methods == set(METHODS)

    # a rerun reuses the finished runs, also for another length (--minutes); a run recorded with other flags (a
    # config changed since) is refused in one line that names the run to delete
    study.main([*argv[:7], "2", *argv[8:]])
    assert {m: (work / f"18lsmoke-{m}" / "train.log").stat().st_mtime_ns for m in METHODS} == logs
    done = work / "18lsmoke-post-ln" / "study.json"
    record = json.loads(done.read_text())
    record["options"]["lr"] = 0.0005
    done.write_text(json.dumps(record))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        study.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"delete {work / '18lsmoke-post-ln'}" in err[0]

    # a run the device's time stopped (a log, no record) is reported from its log, marked as stopped early
    (work / "18lsmoke-b2t" / "study.json").unlink()
    study.main(["--work", str(work), "--stages", "report", "--smoke", "--docs", str(docs)])
    b2t_row = [r for r in (docs / "tables.md").read_text().splitlines() if r.startswith("| b2t | 6 |")]
    assert len(b2t_row) == 1 and "stopped early" in b2t_row[0]


def test_base18_data_bin_without_a_dictionary_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--work", str(tmp_path), "--stages", "base18", "--smoke", "--data-bin", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--data-bin {tmp_path}: no fairseq dictionary" in err[0]


def test_run_sh_names_its_modes_on_a_bad_one():
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "gpus"], capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "run.sh: unknown mode 'gpus'; use gpu (the default), smoke or prepare"
