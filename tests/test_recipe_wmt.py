"""WMT En-De recipe: token-budget arithmetic, identical settings across methods, the printed fairseq-train
command, the results table, bad input, and one smoke run through fairseq's real train/generate."""
import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, cli_env, train_flags
from b2t_fairseq.recipes import wmt_en_de as recipe
from b2t_fairseq.recipes.common import recipe_facts, update_freq
from b2t_fairseq.modules import CONNECTIONS
from b2t_fairseq.recipes.wmt_en_de import RecipeError, build_train_command, main, render_table

CONFIGS = REPO / "configs" / "wmt_en_de"
SCRIPTS = REPO / "scripts" / "wmt_en_de"


# ------------------------------------------------------------------ update-freq
@pytest.mark.parametrize("gpus, freq", [(1, 128), (4, 32), (8, 16)])
def test_update_freq_keeps_the_papers_token_budget(gpus, freq):
    assert update_freq(458752, 3584, gpus) == freq
    cmd, info = build_train_command("b2t", 18, gpus, "data", "ckpt")
    flags = train_flags(cmd)
    assert flags["--update-freq"] == str(freq)
    assert gpus * int(flags["--max-tokens"]) * int(flags["--update-freq"]) == 458752 == info["tokens_per_update"]
    assert ("--distributed-world-size" in flags) == (gpus > 1)
    if gpus > 1:
        assert flags["--distributed-world-size"] == str(gpus)


def test_update_freq_error_names_the_budget_it_would_get():
    with pytest.raises(RecipeError) as e:
        update_freq(458752, 3584, 3)
    message = str(e.value)
    assert "3 worker(s) x 3584 max-tokens = 10,752" in message
    assert "update-freq 42 would give 451,584" in message and "update-freq 43 would give 462,336" in message
    # another --max-tokens changes the arithmetic, not the budget
    assert update_freq(458752, 2048, 4) == 56


def test_tokens_per_update_comes_from_the_config():
    assert yaml.safe_load((CONFIGS / "base.yaml").read_text())["tokens_per_update"] == 458752


# ------------------------------------------------------------------ identical settings
@pytest.mark.parametrize("depth", [6, 18, 100])
def test_methods_differ_only_in_connection(depth):
    """Every method of the plugin, identical flags; T-Fixup's one exception (no warmup) is the config's."""
    assert set(recipe.METHODS) == set(CONNECTIONS)
    flags = {m: train_flags(build_train_command(m, depth, 8, "data", "ckpt")[0]) for m in recipe.METHODS}
    for method, f in flags.items():
        assert f.pop("--connection") == method
    assert flags["tfixup"].pop("--warmup-init-lr") == flags["tfixup"]["--lr"] == "0.001"
    assert flags["post-ln"].pop("--warmup-init-lr") == "1e-07"
    for method, f in flags.items():
        f.pop("--warmup-init-lr", None)
        assert f == flags["post-ln"], method


def test_depth_configs_set_arch_dropout_worddrop_and_updates():
    expect = {
        6: ("transformer_b2t_wmt_en_de", "0.3", "none", "50000"),
        18: ("transformer_b2t_wmt_en_de_18l", "0.5", "worddrop", "50000"),
        100: ("transformer_b2t_wmt_en_de_100l", "0.5", "worddrop", "25000"),
    }
    for depth, (arch, dropout, sampling, updates) in expect.items():
        f = train_flags(build_train_command("b2t", depth, 8, "data", "ckpt")[0])
        assert (f["--arch"], f["--dropout"], f["--sampling-method"], f["--max-update"]) == expect[depth]
        assert ("--enc-replace-rate" in f) == (depth > 6)


def test_dry_run_prints_the_18l_command(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are resolved here, so another node's cwd cannot matter
    assert main(["train", "--method", "pre-ln", "--depth", "18", "--gpus", "8", "--data-bin", "data-bin/wmt16",
                 "--save-dir", "ckpt/pre-ln-18", "--dry-run", "--", "--log-interval", "50"]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    cmd = line.split()
    assert cmd[:2] == ["fairseq-train", str(tmp_path / "data-bin/wmt16")]
    f = train_flags(cmd)
    assert f["--arch"] == "transformer_b2t_wmt_en_de_18l"
    assert f["--connection"] == "pre-ln"
    assert f["--dropout"] == "0.5"
    assert (f["--sampling-method"], f["--enc-replace-rate"], f["--dec-replace-rate"]) == ("worddrop", "0.1", "0.1")
    assert f["--fp16"] is True and "--cpu" not in f
    assert f["--save-dir"] == str(tmp_path / "ckpt/pre-ln-18") and f["--user-dir"].endswith("b2t_fairseq")
    for flag, value in {"--lr": "0.001", "--lr-scheduler": "inverse_sqrt", "--warmup-updates": "4000",
                        "--warmup-init-lr": "1e-07", "--stop-min-lr": "1e-09", "--clip-norm": "0.1",
                        "--weight-decay": "0.0", "--criterion": "label_smoothed_cross_entropy",
                        "--label-smoothing": "0.1", "--max-tokens": "3584", "--keep-last-epochs": "10",
                        "--seed": "1", "--update-freq": "16", "--max-update": "50000"}.items():  # fmt: skip
        assert f[flag] == value, flag
    assert "'(0.9,0.98)'" in line and f["--share-all-embeddings"] is True
    assert cmd[-2:] == ["--log-interval", "50"]  # extra flags go last


def test_cpu_and_smoke_commands():
    f = train_flags(build_train_command("b2t", 18, 0, "data", "ckpt")[0])
    assert f["--cpu"] is True and "--fp16" not in f and f["--update-freq"] == "128"
    f = train_flags(build_train_command("b2t", 18, 0, "data", "ckpt", scale="smoke")[0])
    assert f["--cpu"] is True and "--fp16" not in f
    assert f["--arch"] == "transformer_b2t" and f["--encoder-layers"] == "2"
    assert f["--dropout"] == "0.5"  # the depth's regularisation survives the smoke override
    with pytest.raises(RecipeError, match="runs on the CPU"):
        build_train_command("b2t", 6, 1, "data", "ckpt", scale="smoke")


def test_the_parsed_command_is_valid_for_fairseq(data_dir):
    """fairseq's own parser accepts every flag of the 18L command, and the model gets the recipe's settings."""
    from conftest import parse_args

    cmd, _ = build_train_command("b2t", 18, 8, data_dir, "ckpt")
    argv = cmd[2:]
    argv = [a for a in argv if a not in ("--fp16",)] + ["--cpu"]  # no GPU here
    args = parse_args(data_dir, argv)
    assert args.encoder_layers == args.decoder_layers == 18
    assert (args.dropout, args.enc_replace_rate, args.dec_replace_rate) == (0.5, 0.1, 0.1)
    assert args.connection == "b2t" and args.update_freq == [16] and args.stop_min_lr == 1e-9


def test_a_norm_type_is_one_flag_after_the_row_and_its_own_row_in_the_table(data_dir, tmp_path, capsys):
    """`train ... -- --norm-type rmsnorm`: the same row's command with the norm type, which fairseq's parser hands
    the model, and a table row of its own beside the layer-norm one."""
    from conftest import parse_args

    cmd, info = build_train_command("b2t", 18, 8, data_dir, "ckpt", extra=["--norm-type", "rmsnorm"])
    plain, _ = build_train_command("b2t", 18, 8, data_dir, "ckpt")
    assert cmd == plain + ["--norm-type", "rmsnorm"] and info["extra"] == ["--norm-type", "rmsnorm"]
    args = parse_args(data_dir, [a for a in cmd[2:] if a != "--fp16"] + ["--cpu"])
    assert (args.norm_type, args.connection) == ("rmsnorm", "b2t")
    results = tmp_path / "results"
    results.mkdir()
    (results / "ln.json").write_text(json.dumps(_result("b2t", 18, {2014: 27.0})))
    (results / "rms.json").write_text(json.dumps(_result("b2t", 18, {2014: 26.0}, variant="--norm-type rmsnorm")))
    assert main(["table", "--results", str(results)]) == 0
    table = capsys.readouterr().out
    assert _row(table, "B2T", "18L-18L", "ours")[7] == "27.00"
    assert _row(table, "B2T", "18L-18L", "ours (--norm-type rmsnorm)")[7] == "26.00"


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--method", "b2t", "--depth", "18", "--gpus", "3", "--data-bin", "d", "--save-dir", "s",
          "--dry-run"], "not a multiple of 3 worker(s)"),  # fmt: skip
        (["train", "--method", "b2t", "--depth", "6", "--gpus", "8", "--data-bin", "/nonexistent", "--save-dir",
          "s"], "data-bin /nonexistent does not exist"),  # fmt: skip
        (["train", "--method", "b2t", "--depth", "6", "--gpus", "8", "--data-bin", "d", "--save-dir", "s",
          "--dry-run", "--", "--connection", "pre-ln"], "use --method"),  # fmt: skip
        (["train", "--method", "b2t", "--depth", "18", "--data-bin", "d", "--save-dir", "s", "--dry-run"],
         "say where to train: --gpus N"),  # fmt: skip
        (["--config-dir", "/nonexistent", "table", "--results", "."], "config /nonexistent/base.yaml does not exist"),
        (["table", "--results", "/nonexistent.json"], "no such results file"),
        (["evaluate", "--save-dir", "/nonexistent", "--data-bin", "d", "--refs", "r", "--out", "o.json"],
         "save dir /nonexistent does not exist"),  # fmt: skip
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wmt_en_de: error: ") and message in err


def test_unknown_method_from_the_shell_has_no_traceback():
    proc = subprocess.run(
        [str(SCRIPTS / "train.sh"), "--method", "fixup", "--depth", "6", "--gpus", "8", "--data-bin", "d",
         "--save-dir", "s"],
        env=cli_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "invalid choice: 'fixup'" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_checks_inputs_before_decoding(toy_dirs, capsys):
    data_bin, save_dir, raw = toy_dirs
    base = ["evaluate", "--save-dir", str(save_dir), "--data-bin", str(data_bin), "--out", "o.json"]
    cases = [
        (["--years", "2014", "--refs", str(raw)], "no subset 'test2014' for 2014 (map it with --subset 2014=SUBSET"),
        (["--years", "2014", "--subset", "2014=test"], "no reference for 2014"),
        (["--years", "2014", "--subset", "2014=test", "--refs", str(raw)], f"reference {raw}/newstest2014.de"),
        (["--years", "2014", "--subset", "2015=test"], "--subset/--ref given for [2015]"),
        (["--years", "2014", "--subset", "2014", "--refs", str(raw)], "must look like YEAR=SUBSET"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            main(base + extra)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.fixture
def toy_dirs(tmp_path):
    data_bin, save_dir, raw = tmp_path / "bin", tmp_path / "ckpt", tmp_path / "raw"
    for d in (data_bin, save_dir, raw):
        d.mkdir()
    (data_bin / "dict.src.txt").write_text("a 1\n")
    for lang in ("src", "tgt"):
        (data_bin / f"test.src-tgt.{lang}.idx").write_bytes(b"")
    return data_bin, save_dir, raw


# ------------------------------------------------------------------ table
def _result(method, depth, bleu, **extra):
    return {"recipe": "wmt_en_de", "method": method, "depth": depth, "scale": None, "variant": "",
            "bleu": {str(y): b for y, b in bleu.items()}, "avg": sum(bleu.values()) / len(bleu),
            "signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0", **extra}  # fmt: skip


def _row(table, *starts):
    rows = [line for line in table.splitlines() if line.startswith("| " + " | ".join(starts) + " |")]
    assert len(rows) == 1, (starts, table)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_table_puts_ours_beside_the_published_rows(tmp_path, capsys):
    years = range(2010, 2017)
    full = dict(zip(years, [25.0, 22.5, 23.125, 27.0, 28.0, 30.5, 35.0]))
    results = tmp_path / "results"
    results.mkdir()
    (results / "b2t-18.json").write_text(json.dumps(_result("b2t", 18, full)))
    (results / "pre-6.json").write_text(json.dumps(_result("pre-ln", 6, {2014: 26.4})))
    (results / "unrelated.json").write_text(json.dumps({"loss": 1}))  # e.g. a fairseq log: ignored
    out = tmp_path / "table.md"
    assert main(["table", "--results", str(results), "--out", str(out)]) == 0
    table = out.read_text()
    assert capsys.readouterr().out == table
    lines = table.splitlines()
    assert lines[0] == "| Method | Layers | Source | 2010 | 2011 | 2012 | 2013 | 2014 | 2015 | 2016 | Avg |"
    ours = _row(table, "B2T", "18L-18L", "ours")
    assert ours[3:] == ["25.00", "22.50", "23.12", "27.00", "28.00", "30.50", "35.00", f"{sum(full.values()) / 7:.2f}"]
    assert _row(table, "Pre-LN", "18L-18L", "published: paper")[3:] == \
        ["24.07", "21.98", "22.40", "26.28", "27.36", "29.74", "34.16", "26.57"]  # fmt: skip
    assert _row(table, "B2T", "18L-18L", "published: authors' README re-run (current code)")[-1] == "27.52"
    assert _row(table, "B2T", "18L-18L", "published: paper (init before the authors' change)")[-1] == "27.30"
    assert "fails to train" in _row(table, "Post-LN", "18L-18L", "published: paper — fails to train")[2]
    partial = _row(table, "Pre-LN", "6L-6L", "ours")
    assert partial[3:] == ["–", "–", "–", "–", "26.40", "–", "–", "26.40†"]
    # 6L rows before 18L ones; within a depth the published rows come first
    assert lines.index("| " + " | ".join(partial) + " |") < lines.index("| " + " | ".join(ours) + " |")
    assert "SacreBLEU signature (ours): nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0" in table
    assert "authors' README" in table and "† average over the evaluated years only" in table


def test_published_rows_live_in_the_config():
    published = yaml.safe_load((CONFIGS / "base.yaml").read_text())["published"]
    assert "Takase" in published["source"]
    avgs = sorted(r["avg"] for r in published["rows"] if "avg" in r)
    assert avgs == [26.57, 27.30, 27.52]
    for row in published["rows"]:
        if "bleu" in row:  # the published Avg is the mean of the seven years, to rounding
            assert sum(row["bleu"].values()) / 7 == pytest.approx(row["avg"], abs=0.01)


def test_table_rejects_two_results_for_one_row(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_result("b2t", 6, {2014: 1.0})))
    with pytest.raises(RecipeError, match="two results for b2t 6L"):
        render_table(recipe.load_results([tmp_path]), recipe.load_config())


def test_lenpen_per_year():
    config = recipe.load_config()
    assert [recipe.lenpen_for(config, y) for y in range(2010, 2017)] == [1.0, 1.0, 1.0, 1.0, 0.6, 1.0, 1.0]


# ------------------------------------------------------------------ smoke, through fairseq's real entry points
def _fake_release(root, n_train=600, n_test=100):
    """A directory in the layout of Google's WMT'16 release, holding the real WMT sample when it is present.

    The sample is Moses-tokenized without BPE, so these "bpe" files are word-level; the smoke scale removes no BPE
    and detokenizes nothing, and the references are the sample's tokenized newstest2014 lines."""
    from conftest import SHARED_DATA

    sample = SHARED_DATA / "wmt_ende_opennmt10k"
    release, refs = root / "release", root / "raw-refs"
    release.mkdir()
    refs.mkdir()
    if sample.is_dir():
        read = lambda split, lang: (sample / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()  # noqa: E731
        source = "real WMT sample"
    else:
        from b2t_fairseq.toy import translation as toy_translation

        toy_translation.write_corpus(root / "toy", n_train=n_train, n_valid=n_test, n_test=n_test, seed=1)
        lang_of = {"en": "src", "de": "tgt"}
        read = lambda split, lang: (root / "toy" / f"{split}.{lang_of[lang]}").read_text().splitlines()  # noqa: E731
        source = "generated toy corpus"
    for lang in ("en", "de"):
        for split, name, n in (("train", "train.tok.clean.bpe.32000", n_train), ("valid", "newstest2013.tok.bpe.32000",
                               n_test), ("test", "newstest2014.tok.bpe.32000", n_test)):  # fmt: skip
            (release / f"{name}.{lang}").write_text("\n".join(read(split, lang)[:n]) + "\n", encoding="utf-8")
    (refs / "newstest2014.de").write_text("\n".join(read("test", "de")[:n_test]) + "\n", encoding="utf-8")
    return release, refs, source


def _script(name, *args, cwd):
    proc = subprocess.run([str(SCRIPTS / f"{name}.sh"), *map(str, args)], cwd=cwd, env=cli_env(PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"{name}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_smoke_prepare_train_evaluate_table(tmp_path):
    """The four scripts end to end at smoke scale: release -> data-bin -> fairseq-train -> average -> generate ->
    SacreBLEU JSON -> table, on the real WMT sample when ../shared/data has it (else the generated corpus)."""
    release, raw_refs, source = _fake_release(tmp_path)
    prepared = tmp_path / "wmt16"
    prep = _script("prepare", "--out", prepared, "--release", release, "--refs", raw_refs, "--years", "2014",
                   cwd=tmp_path)  # fmt: skip
    data_bin = prepared / "data-bin"
    assert "--validpref" in prep.stdout and "newstest2013.tok.bpe.32000" in prep.stdout
    assert subsets_of(data_bin) == {"train", "valid", "test2014"}, source
    assert (prepared / "refs" / "newstest2014.de").read_text() == (raw_refs / "newstest2014.de").read_text()

    save_dir = tmp_path / "ckpt"
    train = _script("train", "--method", "b2t", "--depth", "6", "--scale", "smoke",
                    "--data-bin", data_bin, "--save-dir", save_dir, cwd=tmp_path)  # fmt: skip
    assert "--connection b2t" in train.stdout and "--update-freq 2" in train.stdout
    assert len(list(save_dir.glob("checkpoint[0-9]*.pt"))) >= 2  # epoch checkpoints to average

    out = tmp_path / "results" / "b2t-6l.json"
    _script("evaluate", "--scale", "smoke", "--save-dir", save_dir, "--data-bin", data_bin,
            "--refs", prepared / "refs", "--years", "2014", "--out", out, cwd=tmp_path)  # fmt: skip
    result = json.loads(out.read_text())
    assert (result["method"], result["depth"], result["scale"]) == ("b2t", 6, "smoke")
    assert result["years"]["2014"]["subset"] == "test2014"
    assert result["years"]["2014"]["lenpen"] == 0.6 and result["years"]["2014"]["n"] == 100
    assert len(result["averaged"]) == 2 and result["checkpoint"].endswith("averaged_last2.pt")
    assert "tok:13a" in result["signature"]

    # the JSON holds the score of what the decoder really produced: rescore its hypotheses independently
    from sacrebleu.metrics import BLEU

    hyps = (out.parent / "b2t-6l.work" / "hyp-2014.detok.txt").read_text(encoding="utf-8").splitlines()
    gen = (out.parent / "b2t-6l.work" / "generate-2014.txt").read_text(encoding="utf-8")
    assert len(hyps) == 100 == len(re.findall(r"^H-\d+\t", gen, flags=re.M))
    refs = (raw_refs / "newstest2014.de").read_text(encoding="utf-8").splitlines()
    assert BLEU().corpus_score(hyps, [refs]).score == pytest.approx(result["bleu"]["2014"])

    table_md = tmp_path / "table.md"
    _script("table", "--results", out.parent, "--out", table_md, cwd=tmp_path)
    table = table_md.read_text()
    assert table.splitlines()[0] == "| Method | Layers | Source | 2010 | 2011 | 2012 | 2013 | 2014 | 2015 | 2016 | Avg |"
    row = _row(table, "B2T", "6L-6L", "ours, scale smoke")
    assert row[3:] == ["–"] * 4 + [f"{result['bleu']['2014']:.2f}"] + ["–"] * 2 + [f"{result['avg']:.2f}†"]
    assert f"SacreBLEU signature (ours): {result['signature']}" in table

    # a data-bin from another prepare, same vocabulary in another order: evaluate and a resumed train refuse it
    other = tmp_path / "reordered-data-bin"
    shutil.copytree(data_bin, other)
    for name in ("dict.en.txt", "dict.de.txt"):
        lines = (other / name).read_text(encoding="utf-8").splitlines(keepends=True)
        lines[0], lines[1] = lines[1], lines[0]
        (other / name).write_text("".join(lines), encoding="utf-8")
    for argv in (["evaluate", "--scale", "smoke", "--save-dir", save_dir, "--data-bin", other, "--refs",
                  prepared / "refs", "--years", "2014", "--out", tmp_path / "other.json"],
                 ["train", "--method", "b2t", "--depth", "6", "--scale", "smoke", "--data-bin", other, "--save-dir",
                  save_dir]):  # fmt: skip
        proc = subprocess.run([str(SCRIPTS / f"{argv[0]}.sh"), *map(str, argv[1:])], cwd=tmp_path,
                              env=cli_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "trained with other dictionaries than this data's" in proc.stderr, (argv[0], proc.stderr[-2000:])
    assert not (tmp_path / "other.json").exists()


def subsets_of(data_bin):
    return {p.name.split(".")[0] for p in data_bin.glob("*.en-de.en.idx")}


# ------------------------------------------------------------------ prepare: bad input and the download path
@pytest.fixture
def release_dirs(tmp_path):
    release, refs, _ = _fake_release(tmp_path, n_train=20, n_test=5)
    return release, refs


def test_prepare_checks_inputs_before_writing(release_dirs, tmp_path, capsys):
    release, refs = release_dirs
    out = tmp_path / "out"
    base = ["prepare", "--out", str(out), "--years", "2014"]
    cases = [
        (["--refs", str(refs)], "exactly one of --release DIR, --archive FILE, --download"),
        (["--release", str(release), "--archive", "a.tgz", "--refs", str(refs)], "exactly one of --release"),
        (["--release", str(release)], "exactly one of --refs DIR or --fetch-refs"),
        (["--release", str(release), "--refs", str(refs), "--years", "2015"],
         f"missing raw references: {refs}/newstest2015.de"),  # fmt: skip
        (["--release", str(tmp_path), "--refs", str(refs), "--years", "2016"], "missing raw references"),
        (["--archive", str(tmp_path / "none.tar.gz"), "--refs", str(refs)], "archive"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            main(base + extra)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (out / "data-bin").exists()


def test_prepare_names_missing_release_files_and_bad_references(release_dirs, tmp_path, capsys):
    release, refs = release_dirs
    (release / "newstest2013.tok.bpe.32000.de").unlink()  # the validation set
    with pytest.raises(SystemExit):
        main(["prepare", "--out", str(tmp_path / "o"), "--release", str(release), "--refs", str(refs),
              "--years", "2014"])  # fmt: skip
    assert "lacks newstest2013.tok.bpe.32000.de" in capsys.readouterr().err
    (release / "newstest2013.tok.bpe.32000.de").write_text("x\n" * 5)
    with open(refs / "newstest2014.de", "a") as f:  # 6 references for 5 sources: e.g. the filtered newstest2014
        f.write("one more\n")
    with pytest.raises(SystemExit):
        main(["prepare", "--out", str(tmp_path / "o"), "--release", str(release), "--refs", str(refs),
              "--years", "2014"])  # fmt: skip
    err = capsys.readouterr().err
    assert "2014: 6 reference lines but 5 source lines" in err and "wmt14/full" in err
    assert not (tmp_path / "o" / "refs" / "newstest2014.de").exists()  # not left behind as if it were good


def test_prepare_downloads_and_extracts_the_archive(release_dirs, tmp_path):
    """--download fetches the config's URL (a file:// URL here: no network in tests) and finds the nested release."""
    import tarfile

    release, refs = release_dirs
    archive = tmp_path / "wmt16_en_de.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(release, arcname="wmt16_en_de")  # the real tarball nests its files one level down too
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    config = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    config["prepare"]["download_url"] = archive.as_uri()
    (config_dir / "base.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    manifest = recipe.prepare(out, download=True, refs=refs, years=[2014], config_dir=config_dir)
    assert (out / "wmt16_en_de.tar.gz").read_bytes() == archive.read_bytes()
    assert manifest["release"] == str(out / "release" / "wmt16_en_de")
    assert subsets_of(out / "data-bin") == {"train", "valid", "test2014"}
    stamp = (out / "data-bin" / "dict.en.txt").stat().st_mtime_ns
    recipe.prepare(out, download=True, refs=refs, years=[2014], config_dir=config_dir)  # rerun: nothing redone
    assert (out / "data-bin" / "dict.en.txt").stat().st_mtime_ns == stamp

    config["prepare"]["download_url"] = (tmp_path / "gone.tar.gz").as_uri()
    (config_dir / "base.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RecipeError, match="could not download .*pass --archive"):
        recipe.prepare(tmp_path / "out2", download=True, refs=refs, years=[2014], config_dir=config_dir)
    assert not list((tmp_path / "out2").glob("*.part"))


def test_row_comes_from_the_checkpoint_without_recipe_json(tmp_path):
    """A save dir trained by hand (no recipe.json) is labelled from the model options fairseq stored."""
    import argparse

    state = {"cfg": {"model": argparse.Namespace(connection="pre-ln", encoder_layers=18)}}
    facts = recipe_facts(tmp_path, state)
    assert (facts["method"], facts["depth"]) == ("pre-ln", 18)
    (tmp_path / "recipe.json").write_text(json.dumps({"method": "b2t", "depth": 6, "scale": "smoke", "extra": []}))
    assert recipe_facts(tmp_path, state)["method"] == "b2t"


# ------------------------------------------------------------------ one run per save dir (issue 9)
def test_resuming_a_row_with_other_extra_flags_is_refused(tmp_path):
    from b2t_fairseq.recipes.common import write_recipe_facts

    _, info = build_train_command("b2t", 18, 8, "data", tmp_path, extra=["--dropout", "0.3"])
    write_recipe_facts(tmp_path, info)
    write_recipe_facts(tmp_path, info)  # resuming the same row is fine
    _, other = build_train_command("b2t", 18, 8, "data", tmp_path, extra=["--dropout", "0.1"])
    with pytest.raises(RecipeError, match=r"trained with `-- --dropout 0.3`, not `-- --dropout 0.1`"):
        write_recipe_facts(tmp_path, other)
    assert json.loads((tmp_path / "recipe.json").read_text())["extra"] == ["--dropout", "0.3"]  # not relabelled
    _, four_gpus = build_train_command("b2t", 18, 4, "data", tmp_path, extra=["--dropout", "0.3"])
    write_recipe_facts(tmp_path, four_gpus)  # another GPU count keeps the tokens per update: the same row


def test_evaluating_at_another_scale_is_refused(tmp_path):
    from b2t_fairseq.recipes.common import average_run, write_recipe_facts

    _, info = build_train_command("b2t", 18, 8, "data", tmp_path)
    write_recipe_facts(tmp_path, info)
    with pytest.raises(RecipeError, match=r"trained at full scale .*evaluate it with no --scale"):
        average_run(tmp_path, 2, scale="smoke")
