"""Gigaword recipe: config layering, identical settings across methods, the token budget, ROUGE against hand-computed
values, the test split (given or carved), bad input, prepare on a synthetic release, and one smoke run of the
scripts prepare -> train -> evaluate -> table on the real 10k sample."""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, cli_env, parse_args, shared_data, train_flags
from b2t_fairseq.recipes import gigaword as recipe
from b2t_fairseq.recipes.gigaword import RecipeError, build_train_command, main, rouge

CONFIGS = REPO / "configs" / "gigaword"
SCRIPTS = REPO / "scripts" / "gigaword"
BASE = yaml.safe_load((CONFIGS / "base.yaml").read_text())
RELEASE_FILES = ("train.article.txt", "train.title.txt", "valid.article.filter.txt", "valid.title.filter.txt")


def _release(root, pairs):
    """A directory in the release layout; ``pairs`` maps file stem (train, valid) to [(article, title), ...]."""
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    names = {"train": ("train.article.txt", "train.title.txt"), "valid": RELEASE_FILES[2:]}
    for split, items in pairs.items():
        for col, name in enumerate(names[split]):
            (root / name).write_text("".join(p[col] + "\n" for p in items), encoding="utf-8")
    return root


def _pairs(n, tag):
    return [(f"{tag} article number {i} .", f"{tag} title {i}") for i in range(n)]


# ------------------------------------------------------------------ configuration
def test_configs_layer_base_depth_and_smoke():
    six = recipe.load_config(CONFIGS, 6)["train"]
    assert (six["encoder-layers"], six["decoder-layers"], six["dropout"], six["sampling-method"]) == (6, 6, 0.3, "none")
    assert six["max-update"] == 50000 and six["arch"] == "transformer_b2t"
    smoke = recipe.load_config(CONFIGS, 18, "smoke")
    train = smoke["train"]
    assert (train["encoder-layers"], train["encoder-embed-dim"]) == (2, 32)  # the smoke model replaces the depth's
    assert (train["dropout"], train["enc-replace-rate"], train["dec-replace-rate"]) == (0.5, 0.1, 0.1)  # kept
    assert "max-update" not in train and train["max-epoch"] == 2  # `null` in smoke.yaml deletes the base key
    assert train["lr"] == BASE["train"]["lr"] and train["clip-norm"] == BASE["train"]["clip-norm"]
    # nested merge: the smoke vocabulary replaces the size only
    assert smoke["prepare"]["sentencepiece"] == {**BASE["prepare"]["sentencepiece"], "vocab_size": 400}
    assert smoke["evaluate"]["generate"]["beam"] == BASE["evaluate"]["generate"]["beam"] == 5


@pytest.mark.parametrize("depth", [6, 18])
@pytest.mark.parametrize("gpus", [0, 8])
def test_methods_differ_only_in_connection(depth, gpus):
    flags = {m: train_flags(build_train_command(m, depth, gpus, "data", "ckpt")[0]) for m in recipe.METHODS}
    for method, f in flags.items():
        assert f.pop("--connection") == method
    assert flags["tfixup"].pop("--warmup-init-lr") == flags["tfixup"]["--lr"]  # the one exception: no warmup
    for method, f in flags.items():
        f.pop("--warmup-init-lr", None)
        assert f == flags["post-ln"], method


@pytest.mark.parametrize("gpus, freq", [(0, 16), (1, 16), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_every_gpu_count_sees_the_same_tokens_per_update(gpus, freq):
    cmd, info = build_train_command("post-ln", 18, gpus, "data", "ckpt")
    f = train_flags(cmd)
    assert f["--update-freq"] == str(freq)
    assert max(gpus, 1) * int(f["--max-tokens"]) * freq == BASE["tokens_per_update"] == info["tokens_per_update"]
    assert ("--distributed-world-size" in f) == (gpus > 1)
    assert ("--fp16" in f, "--cpu" in f) == ((True, False) if gpus else (False, True))
    # another per-GPU batch changes the update-freq, not the budget
    f = train_flags(build_train_command("post-ln", 18, gpus, "data", "ckpt", max_tokens=2048)[0])
    assert max(gpus, 1) * 2048 * int(f["--update-freq"]) == BASE["tokens_per_update"]


def test_dry_run_prints_the_18l_command(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are resolved here, so another node's cwd cannot matter
    assert main(["train", "--method", "b2t", "--depth", "18", "--gpus", "8", "--data-bin", "bin", "--save-dir", "ck",
                 "--dry-run", "--", "--log-interval", "50"]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    cmd = line.split()
    assert cmd[:2] == ["fairseq-train", str(tmp_path / "bin")]
    f = train_flags(cmd)
    expect = {"--arch": "transformer_b2t", "--encoder-layers": "18", "--decoder-layers": "18", "--dropout": "0.5",
              "--sampling-method": "worddrop", "--enc-replace-rate": "0.1", "--dec-replace-rate": "0.1",
              "--lr": "0.001", "--lr-scheduler": "inverse_sqrt", "--warmup-updates": "4000",
              "--label-smoothing": "0.1", "--criterion": "label_smoothed_cross_entropy", "--max-tokens": "4096",
              "--update-freq": "2", "--distributed-world-size": "8", "--connection": "b2t", "--save-dir": str(tmp_path / "ck"),
              "--keep-last-epochs": "10", "--seed": "1"}  # fmt: skip
    assert {k: f.get(k) for k in expect} == expect
    assert f["--fp16"] is True and f["--share-all-embeddings"] is True and "--cpu" not in f
    assert cmd[-2:] == ["--log-interval", "50"]  # extra flags go last


def test_fairseq_accepts_the_command(data_dir):
    cmd, _ = build_train_command("pre-ln", 18, 0, data_dir, "ckpt")
    args = parse_args(data_dir, cmd[2:])
    assert args.encoder_layers == args.decoder_layers == 18 and args.encoder_embed_dim == 512
    assert (args.connection, args.dropout, args.enc_replace_rate, args.update_freq) == ("pre-ln", 0.5, 0.1, [16])
    assert args.share_all_embeddings and args.cpu


# ------------------------------------------------------------------ ROUGE, checked against values worked out by hand
# Porter stems (tokens of more than 3 characters): cats->cat, stocks->stock, closed/close->close, wins->win;
# the tokenizer keeps only [a-z0-9] runs, so '##' and '#.#' vanish and '<unk>'/'UNK' both become 'unk'.
# pair 1: 5 of 6 unigrams match both ways (the: 1 of 2), bigrams 3 of 5, LCS "the cat sat on mat" = 5
# pair 2: hyp stock close down percent / ref australian stock close down percent: P 4/4 R 4/5 -> F1 8/9;
#         bigrams 3 of 3 vs 3 of 4 -> F1 6/7; LCS 4 -> 8/9
HYPS = ["the cats sat on the mat", "stocks close down ## percent"]
REFS = ["the cat sat on a mat", "australian stocks closed down #.# percent"]
EXPECTED = {"rouge1": 100 * (5 / 6 + 8 / 9) / 2, "rouge2": 100 * (3 / 5 + 6 / 7) / 2,
            "rougeL": 100 * (5 / 6 + 8 / 9) / 2}  # fmt: skip


def test_rouge_against_hand_computed_values():
    assert rouge(HYPS, REFS) == pytest.approx(EXPECTED)
    assert rouge(["<unk> wins"], ["UNK wins"]) == pytest.approx(dict.fromkeys(recipe.ROUGE_TYPES, 100.0))
    assert rouge([""], ["a title"]) == dict.fromkeys(recipe.ROUGE_TYPES, 0.0)


def test_scores_come_from_the_h_lines_in_id_order(tmp_path):
    # fairseq-generate prints sentences in length order; pieces are sentencepiece's
    gen = tmp_path / "generate-test.txt"
    gen.write_text(
        "S-1\t▁ignored\nT-1\t▁ignored\nH-1\t-0.5\t▁stock s ▁close ▁down ▁## ▁percent\n"
        "D-1\t-0.5\t▁x\nP-1\t-0.1\nS-0\t▁ignored\nH-0\t-0.3\t▁the ▁cat s ▁sat ▁on ▁the ▁mat\n",
        encoding="utf-8",
    )
    ref = tmp_path / "ref.txt"
    ref.write_text("".join(r + "\n" for r in REFS), encoding="utf-8")
    hyp = tmp_path / "hyp.txt"
    assert recipe.score_generate_output(gen, ref, "sentencepiece", hyp) == pytest.approx(EXPECTED)
    assert hyp.read_text(encoding="utf-8").splitlines() == HYPS
    ref.write_text(REFS[0] + "\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="2 hypotheses but 1 references"):
        recipe.score_generate_output(gen, ref, "sentencepiece", hyp)


# ------------------------------------------------------------------ the test split
def test_without_a_test_pair_the_last_valid_pairs_are_carved_off(tmp_path):
    valid = _pairs(10, "v")
    data = _release(tmp_path / "rel", {"train": _pairs(5, "t"), "valid": valid})
    plan = recipe.plan_splits(data, 4)
    assert plan["test"]["kind"] == "carved"
    test = recipe.write_raw(plan, tmp_path / "raw")
    raw = tmp_path / "raw"
    assert (raw / "test.title").read_bytes() == "".join(t + "\n" for _, t in valid[6:]).encode()
    assert (raw / "test.article").read_bytes() == "".join(a + "\n" for a, _ in valid[6:]).encode()
    assert (raw / "valid.title").read_text().splitlines() == [t for _, t in valid[:6]]
    assert (raw / "train.article").resolve() == (data / "train.article.txt").resolve()  # linked, not copied
    assert (test["pairs"], test["valid_pairs"]) == (4, 6)
    text = recipe.describe_test(test)
    assert text.startswith("NOT the standard Gigaword test set: the last 4 pairs of valid.article.filter.txt")
    with pytest.raises(RecipeError, match="has 10 pairs, too few to carve 10 test pairs"):
        recipe.plan_splits(data, 10)


def test_a_test_pair_is_found_in_the_release_layout_or_given(tmp_path):
    data = _release(tmp_path / "sumdata" / "train", {"train": _pairs(5, "t"), "valid": _pairs(5, "v")})
    giga = tmp_path / "sumdata" / "Giga"
    giga.mkdir()
    (giga / "input.txt").write_text("a b .\nc d .\n")
    (giga / "task1_ref0.txt").write_text("a\nc\n")
    giga = giga.resolve()
    plan = recipe.plan_splits(data, 4)
    assert plan["test"] == {"kind": "given", "article": str(giga / "input.txt"), "title": str(giga / "task1_ref0.txt")}
    (data / "test.article.txt").write_text("x .\n")  # test.*.txt beside the release files comes first
    (data / "test.title.txt").write_text("x\n")
    assert recipe.plan_splits(data, 4)["test"]["title"] == str(data / "test.title.txt")
    plan = recipe.plan_splits(data, 4, giga / "input.txt", giga / "task1_ref0.txt")  # an explicit pair wins
    assert plan["test"]["article"] == str(giga / "input.txt")
    assert recipe.write_raw(plan, tmp_path / "raw")["pairs"] == 2


# ------------------------------------------------------------------ bad input
def _bad_release(tmp_path, case):
    data = _release(tmp_path / "rel", {"train": _pairs(5, "t"), "valid": _pairs(5, "v")})
    if case == "missing":
        (data / "valid.title.filter.txt").unlink()
    elif case == "misaligned":
        (data / "train.title.txt").write_text("only one title\n")
    elif case == "half test pair":
        (data / "test.article.txt").write_text("x .\n")
    return data


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing", [], "valid.title.filter.txt does not exist (--data must hold the Rush et al. 2015 release files"),
        ("misaligned", [], "train.article.txt has 5 lines but {data}/train.title.txt has 1"),
        ("half test pair", [], "{data}/test.title.txt does not exist but {data}/test.article.txt does"),
        ("ok", ["--test-article", "{data}/train.article.txt"], "pass --test-article and --test-title together"),
        ("ok", ["--test-article", "{data}/a", "--test-title", "{data}/b"], "test file {data}/a does not exist"),
        ("ok", [], "has 5 pairs, too few to carve 500 test pairs off it"),
    ],
)
def test_prepare_names_what_is_wrong_in_one_line(tmp_path, capsys, case, extra, message):
    data = _bad_release(tmp_path, case)
    argv = ["prepare", "--data", str(data), "--out", str(tmp_path / "out")] + [a.format(data=data) for a in extra]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("gigaword: error: ") and err.count("\n") == 1, err
    assert message.format(data=data) in err
    assert not (tmp_path / "out" / "data-bin").exists()  # nothing half-done


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--method", "b2t", "--depth", "6", "--gpus", "3", "--data-bin", "d", "--save-dir", "s", "--dry-run"],
         "65,536 tokens per update is not a multiple of 3 worker(s) x 4096 max-tokens"),
        (["train", "--method", "b2t", "--depth", "6", "--gpus", "8", "--data-bin", "d", "--save-dir", "s", "--dry-run", "--",
          "--connection", "pre-ln"], "--connection cannot be passed to fairseq-train here; use --method"),
        (["train", "--method", "b2t", "--depth", "6", "--gpus", "1", "--scale", "smoke", "--data-bin", "d",
          "--save-dir", "s"], "--scale smoke runs on the CPU; drop --gpus"),
        (["train", "--method", "b2t", "--depth", "6", "--gpus", "8", "--data-bin", "/nonexistent", "--save-dir", "s"],
         "data-bin /nonexistent does not exist"),
        (["evaluate", "--save-dir", "/nonexistent", "--data-bin", "d", "--out", "o.json"],
         "save dir /nonexistent does not exist"),
        (["table", "--results", "/nonexistent.json"], "no such results file or directory: /nonexistent.json"),
        (["--config-dir", "/nonexistent", "train", "--method", "b2t", "--depth", "6", "--gpus", "8", "--data-bin", "d",
          "--save-dir", "s", "--dry-run"], "config /nonexistent/base.yaml does not exist"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("gigaword: error: ") and err.count("\n") == 1, err
    assert message in err


def test_evaluate_checks_its_inputs_before_decoding(tmp_path, capsys):
    save_dir, data_bin = tmp_path / "ckpt", tmp_path / "bin"
    save_dir.mkdir()
    data_bin.mkdir()
    (data_bin / "dict.article.txt").write_text("a 1\n")
    base = ["evaluate", "--save-dir", str(save_dir), "--data-bin", str(data_bin), "--out", str(tmp_path / "o.json")]
    cases = [([], f"{data_bin} has no 'test' subset"), (["--ref", "/nonexistent"], "reference /nonexistent does not")]
    for extra, message in cases:
        if extra:
            for lang in ("article", "title"):
                (data_bin / f"test.article-title.{lang}.idx").write_bytes(b"")
        with pytest.raises(SystemExit):
            main(base + extra)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------ table
def _result(method, depth, r1, r2, rl, test=None, **extra):
    test = test or {"kind": "carved", "from": ["/d/valid.article.filter.txt", "/d/valid.title.filter.txt"],
                    "pairs": 500, "valid_pairs": 500}  # fmt: skip
    return {"recipe": "gigaword", "method": method, "depth": depth, "scale": None, "variant": "", "rouge1": r1,
            "rouge2": r2, "rougeL": rl, "n": 500, "test_split": test, "rouge_settings": "ROUGE settings S",
            **extra}  # fmt: skip


def test_table_has_one_row_per_method_and_depth(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    rows = {"b2t-18": _result("b2t", 18, 36.004, 17.5, 33.996), "post-6": _result("post-ln", 6, 35.1, 16.789, 32.0),
            "pre-18": _result("pre-ln", 18, 34.0, 16.0, 31.0),
            "pre-6": _result("pre-ln", 6, 34.5, 16.25, 31.5)}  # fmt: skip
    for name, r in rows.items():
        (results / f"{name}.json").write_text(json.dumps(r))
    (results / "fairseq-log.json").write_text(json.dumps({"loss": 1}))  # other JSON is skipped
    out = tmp_path / "table.md"
    assert main(["table", "--results", str(results), "--out", str(out)]) == 0
    table = out.read_text()
    assert capsys.readouterr().out == table
    lines = table.splitlines()
    assert lines[:2] == ["| Method | Layers | Source | R-1 | R-2 | R-L |", "|---|---|---|---|---|---|"]
    assert lines[2:6] == [  # 6L before 18L, baselines first
        "| Post-LN | 6L-6L | ours | 35.10 | 16.79 | 32.00 |",
        "| Pre-LN | 6L-6L | ours | 34.50 | 16.25 | 31.50 |",
        "| Pre-LN | 18L-18L | ours | 34.00 | 16.00 | 31.00 |",
        "| B2T | 18L-18L | ours | 36.00 | 17.50 | 34.00 |",
    ]
    assert "Test set (500 pairs): NOT the standard Gigaword test set: the last 500 pairs of" in table
    assert "Scores: ROUGE settings S." in table


def test_table_refuses_mixed_test_sets_and_duplicate_rows(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(_result("b2t", 6, 1, 1, 1)))
    (tmp_path / "b.json").write_text(json.dumps(_result("pre-ln", 6, 1, 1, 1, test={"kind": "given", "article": "x",
                                                                                    "title": "y"})))  # fmt: skip
    with pytest.raises(SystemExit):
        main(["table", "--results", str(tmp_path)])
    assert "scored on different test sets" in capsys.readouterr().err
    (tmp_path / "b.json").write_text(json.dumps(_result("b2t", 6, 2, 2, 2)))
    with pytest.raises(SystemExit):
        main(["table", "--results", str(tmp_path)])
    assert "two results for b2t 6L" in capsys.readouterr().err


# ------------------------------------------------------------------ prepare without the shared sample
def test_prepare_a_synthetic_release_and_rerun(tmp_path, capsys):
    """Any directory in the release layout works (here the toy corpus, with the test pair in ../Giga)."""
    from b2t_fairseq.toy import translation as toy_translation

    toy = tmp_path / "toy"
    toy_translation.write_corpus(toy, n_train=200, n_valid=20, n_test=15, seed=3)
    data = tmp_path / "sumdata" / "train"
    names = {"train": ("train.article.txt", "train.title.txt"), "valid": RELEASE_FILES[2:],
             "test": ("../Giga/input.txt", "../Giga/task1_ref0.txt")}  # fmt: skip
    for split, (article, title) in names.items():
        for side, name in (("src", article), ("tgt", title)):
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            (data / name).write_bytes((toy / f"{split}.{side}").read_bytes())
    out = tmp_path / "prep"
    assert main(["prepare", "--scale", "smoke", "--data", str(data), "--out", str(out)]) == 0
    data_bin = out / "data-bin"
    for split in ("train", "valid", "test"):
        for lang in ("article", "title"):
            assert (data_bin / f"{split}.article-title.{lang}.bin").is_file()
    assert (data_bin / "test.reference.txt").read_bytes() == (toy / "test.tgt").read_bytes()
    facts = json.loads((data_bin / "prepared.json").read_text())
    assert facts["pairs"] == {"train": 200, "valid": 20, "test": 15}
    assert facts["test"]["kind"] == "given" and facts["test"]["title"].endswith("sumdata/Giga/task1_ref0.txt")
    assert "NOT the standard" not in capsys.readouterr().out
    stamp = (data_bin / "test.article-title.title.idx").stat().st_mtime_ns
    assert main(["prepare", "--scale", "smoke", "--data", str(data), "--out", str(out)]) == 0
    rerun = capsys.readouterr().out
    assert "raw splits: done" in rerun and "data-bin: done" in rerun and "fairseq-preprocess" not in rerun
    assert (data_bin / "test.article-title.title.idx").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):  # another setting into the same directory would mix two preparations
        main(["prepare", "--data", str(data), "--out", str(out)])
    assert "was prepared from other files or settings" in capsys.readouterr().err


# ------------------------------------------------------------------ the scripts
@pytest.mark.parametrize("name", ["prepare", "train", "evaluate", "table"])
def test_scripts_are_thin_wrappers(name):
    path = SCRIPTS / f"{name}.sh"
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    last = path.read_text().rstrip().splitlines()[-1]
    module = "-m b2t_fairseq.recipes.gigaword"
    assert last == f'exec "${{PYTHON:-python}}" {module} --config-dir "$repo/configs/gigaword" {name} "$@"'


# ------------------------------------------------------------------ smoke, the scripts on the real sample
@pytest.mark.slow
def test_smoke_scripts_on_the_real_sample(tmp_path):
    sample = shared_data("gigaword_headline10k")
    # a few hundred pairs are enough for the plumbing; the sample has no test split, so it is carved off valid
    data = tmp_path / "rel"
    data.mkdir()
    for name, n in zip(RELEASE_FILES, (200, 200, 60, 60)):
        with open(sample / name, "rb") as f:
            (data / name).write_bytes(b"".join(f.readline() for _ in range(n)))
    carved = (data / "valid.title.filter.txt").read_text(encoding="utf-8").splitlines()[30:]
    env = cli_env(PYTHON=sys.executable)

    def script(name, *args):
        proc = subprocess.run([str(SCRIPTS / f"{name}.sh"), *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert proc.returncode == 0, f"{name}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    prepared = script("prepare", "--scale", "smoke", "--data", data, "--out", tmp_path / "prep")
    assert "*** gigaword: no test pair in" in prepared and "NOT the standard Gigaword test set" in prepared
    data_bin = tmp_path / "prep" / "data-bin"
    assert (data_bin / "test.reference.txt").read_text(encoding="utf-8").splitlines() == carved

    save_dir = tmp_path / "ckpt"
    train = script("train", "--method", "b2t", "--depth", "6", "--scale", "smoke", "--data-bin", data_bin,
                   "--save-dir", save_dir)  # fmt: skip
    assert "+ fairseq-train" in train and "--connection b2t" in train and "--update-freq 2" in train
    assert (save_dir / "checkpoint1.pt").is_file() and (save_dir / "checkpoint2.pt").is_file()
    assert json.loads((save_dir / "recipe.json").read_text())["test_split"]["kind"] == "carved"

    out = tmp_path / "results" / "b2t-6l.json"
    script("evaluate", "--scale", "smoke", "--save-dir", save_dir, "--data-bin", data_bin, "--out", out)
    result = json.loads(out.read_text())
    assert (result["method"], result["depth"], result["scale"], result["n"]) == ("b2t", 6, "smoke", 30)
    assert len(result["averaged"]) == 2 and result["checkpoint"].endswith("averaged_last2.pt")
    assert result["test_split"]["kind"] == "carved" and result["test_split"]["pairs"] == 30
    assert result["reference"] == str(data_bin / "test.reference.txt")

    # rescore what the decoder printed, independently of the recipe: H- lines by id, pieces joined, rouge_score
    from rouge_score import rouge_scorer

    gen = (out.parent / "b2t-6l.work" / "generate-test.txt").read_text(encoding="utf-8")
    hyps = dict(re.findall(r"^H-(\d+)\t\S+\t?(.*)$", gen, flags=re.MULTILINE))
    assert sorted(map(int, hyps)) == list(range(30))
    hyps = ["".join(hyps[str(i)].split()).replace("\u2581", " ").strip() for i in range(30)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hyps, carved)]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert result[key] == pytest.approx(100 * sum(s[key].fmeasure for s in scores) / 30), key

    # `table` reads only these JSON files, through its script like the other three stages
    printed = script("table", "--results", out.parent, "--out", tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    assert printed.endswith(table)
    lines = table.splitlines()
    assert lines[0] == "| Method | Layers | Source | R-1 | R-2 | R-L |"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["B2T", "6L-6L", "ours, scale smoke"] + [f"{result[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL")]
    assert "Test set (30 pairs): NOT the standard Gigaword test set" in table
    print("smoke ROUGE-1/2/L:", " / ".join(f"{result[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL")))  # with -s
