"""WikiText-103 recipe: token budget, identical settings across methods, the commands fairseq's parsers accept,
reading fairseq-eval-lm's output, the table, bad input, and one smoke run of the scripts prepare -> train ->
evaluate -> table through fairseq's real preprocess/train/eval-lm."""
import json
import math
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, SHARED_DATA, cli_env, parse_args, train_flags
from b2t_fairseq.recipes import wikitext103 as recipe
from b2t_fairseq.recipes.wikitext103 import RecipeError, build_train_command, main, parse_eval_lm_output, render_table

CONFIGS = REPO / "configs" / "wikitext103"
SCRIPTS = REPO / "scripts" / "wikitext103"
BASE = yaml.safe_load((CONFIGS / "base.yaml").read_text())
# What fairseq-eval-lm (fairseq 0.12) printed at the end of a real run of this recipe's smoke model.
EVAL_LM_TAIL = """\
2026-11-27 21:51:37 | INFO | fairseq_cli.eval_lm | Evaluated 594 tokens in 0.8s (779.66 tokens/s)
2026-11-27 21:51:37 | INFO | fairseq_cli.eval_lm | Loss (base 2): 7.5597, Perplexity: 188.67
"""
# Independent of the recipe's parser: the two lines as fairseq_cli/eval_lm.py formats them.
EVAL_LINE = re.compile(r"Evaluated ([\d,]+) tokens in .*\n.*Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)")


# ------------------------------------------------------------------ token budget and identical settings
@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 6, 8])
def test_every_gpu_count_sees_the_same_tokens_per_update(gpus):
    flags = train_flags(build_train_command("b2t", 16, gpus, "data", "ckpt")[0])
    assert gpus * int(flags["--max-tokens"]) * int(flags["--update-freq"]) == BASE["tokens_per_update"]
    assert ("--distributed-world-size" in flags) == (gpus > 1)


def test_the_budget_is_fairseqs_8_gpu_command():
    # README.adaptive_inputs.md: --max-tokens 3072 --update-freq 3, on the 8 GPUs of Baevski & Auli
    assert BASE["tokens_per_update"] == 3072 * 3 * 8 and BASE["train"]["max-tokens"] == 3072
    flags = train_flags(build_train_command("b2t", 16, 8, "data", "ckpt")[0])
    assert flags["--update-freq"] == "3"


def test_a_gpu_count_that_does_not_divide_the_budget_is_refused():
    with pytest.raises(RecipeError, match="not a multiple of 5 worker"):
        build_train_command("b2t", 16, 5, "data", "ckpt")
    # a smaller per-GPU batch keeps the budget and raises update-freq instead
    flags = train_flags(build_train_command("b2t", 16, 8, "data", "ckpt", max_tokens=1536)[0])
    assert (flags["--max-tokens"], flags["--update-freq"]) == ("1536", "6")


@pytest.mark.parametrize("depth, gpus, scale", [(16, 8, None), (32, 8, None), (32, 0, None), (16, 0, "smoke")])
def test_methods_differ_only_in_connection(depth, gpus, scale):
    methods = [m for m in recipe.METHODS if m != "tfixup"]  # no decoder-only form (refused below)
    flags = {m: train_flags(build_train_command(m, depth, gpus, "data", "ckpt", scale)[0]) for m in methods}
    for method, f in flags.items():
        assert f.pop("--connection") == method
        assert f == flags["post-ln"], method


def test_tfixup_is_refused_with_the_reason():
    with pytest.raises(RecipeError, match="encoder-decoder models only"):
        build_train_command("tfixup", 16, 8, "data", "ckpt")


def test_depth_gpu_and_smoke_settings():
    for depth in recipe.DEPTHS:
        f = train_flags(build_train_command("pre-ln", depth, 8, "data", "ckpt")[0])
        assert f["--decoder-layers"] == str(depth) and f["--arch"] == "transformer_lm_b2t_wiki103"
        assert f["--fp16"] is True and "--cpu" not in f
    f = train_flags(build_train_command("b2t", 32, 0, "data", "ckpt")[0])
    assert f["--cpu"] is True and "--fp16" not in f
    f = train_flags(build_train_command("b2t", 32, 0, "data", "ckpt", scale="smoke")[0])
    assert f["--decoder-layers"] == "2" and f["--cpu"] is True
    with pytest.raises(RecipeError, match="runs on the CPU"):
        build_train_command("b2t", 16, 1, "data", "ckpt", scale="smoke")


def test_a_depth_file_that_disagrees_with_its_name_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text((CONFIGS / "base.yaml").read_text())
    (tmp_path / "16l.yaml").write_text("train: {decoder-layers: 12}\n")
    with pytest.raises(RecipeError, match="16l.yaml must set decoder-layers: 16, not 12"):
        build_train_command("b2t", 16, 8, "data", "ckpt", config_dir=tmp_path)


def test_fairseqs_parsers_accept_the_commands(data_dir):
    """fairseq-train's parser (architecture included) and fairseq-eval-lm's accept every flag the recipe builds."""
    from fairseq import options

    cmd, _ = build_train_command("b2t", 32, 8, data_dir, "ckpt")
    argv = [a for a in cmd[2:] if a != "--fp16"] + ["--cpu"]  # no GPU here
    args = parse_args(data_dir, argv, task="language_modeling")
    assert (args.arch, args.connection, args.decoder_layers, args.update_freq) == ("transformer_lm_b2t_wiki103",
                                                                                  "b2t", 32, [3])
    assert args.adaptive_input and args.tie_adaptive_weights and args.criterion == "adaptive_loss"
    assert (args.decoder_embed_dim, args.decoder_ffn_embed_dim, args.dropout) == (1024, 4096, 0.3)
    assert (args.lr, args.lr_scheduler, args.lr_period_updates, args.min_lr) == ([1.0], "cosine", 270000, 0.0001)
    assert args.tokens_per_sample == 3072 and args.max_update == 286000

    ev = BASE["evaluate"]["eval_lm"]
    argv = recipe.eval_lm_argv(data_dir, "avg.pt", "test", ev, cpu=True)
    args = options.parse_args_and_arch(options.get_eval_lm_parser(), argv)
    assert (args.tokens_per_sample, args.context_window, args.gen_subset) == (3072, 2560, "test")
    assert args.cpu and args.path == "avg.pt"


def test_dry_run_prints_one_line_with_extra_flags_last(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are resolved here, so another node's cwd cannot matter
    assert main(["train", "--method", "post-ln", "--depth", "16", "--gpus", "4", "--data-bin", "bin", "--save-dir",
                 "ckpt", "--dry-run", "--", "--log-interval", "50"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    cmd = line.split()
    assert cmd[:2] == ["fairseq-train", str(tmp_path / "bin")]
    f = train_flags(cmd)
    assert (f["--connection"], f["--update-freq"], f["--task"]) == ("post-ln", "6", "language_modeling")
    assert cmd[-2:] == ["--log-interval", "50"]


# ------------------------------------------------------------------ fairseq-eval-lm output
def test_eval_lm_output_is_read_from_fairseqs_lines():
    tokens, loss, ppl = parse_eval_lm_output("... other log lines ...\n" + EVAL_LM_TAIL)
    assert (tokens, loss, ppl) == (594, 7.5597, 188.67)
    assert 2**loss == pytest.approx(ppl, abs=0.005 + ppl * math.log(2) * 5e-5)  # the right fields, to rounding
    assert parse_eval_lm_output(EVAL_LM_TAIL.replace("594", "245,569"))[0] == 245569  # fairseq prints {:,}


@pytest.mark.parametrize("text", [
    "",  # the run died before scoring
    EVAL_LM_TAIL.splitlines()[0],
    # older fairseq printed the natural-log loss as "Loss:"; it must not be read as bits
    "| Evaluated 245569 tokens in 56.1s (4379.02 tokens/s)\n| Loss: 3.4164, Perplexity: 30.46\n",
    EVAL_LM_TAIL + EVAL_LM_TAIL,
])
def test_eval_lm_output_without_exactly_one_result_is_an_error(text):
    with pytest.raises(RecipeError, match="expected one each"):
        parse_eval_lm_output(text, "eval.log")


# ------------------------------------------------------------------ prepare
def _write_raw(directory, lines):
    directory.mkdir(parents=True, exist_ok=True)
    for split in recipe.SPLITS:
        (directory / f"wiki.{split}.tokens").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_prepare_binarizes_once_and_counts_every_token(tmp_path, capsys):
    raw, data_bin = tmp_path / "raw", tmp_path / "bin"
    lines = [" = Title = ", "the cat sat on the mat .", "a <unk> of 3 @,@ 000 words"]
    _write_raw(raw, lines)
    assert main(["prepare", "--raw-dir", str(raw), "--data-bin", str(data_bin)]) == 0
    assert not (tmp_path / "bin.partial").exists()
    # every word plus one end-of-line symbol per line is binarized; WikiText's own <unk> stays one token
    assert recipe.subset_tokens(data_bin, "test") == sum(len(line.split()) + 1 for line in lines)
    stamp = {p.name: p.stat().st_mtime_ns for p in data_bin.iterdir()}
    capsys.readouterr()
    assert main(["prepare", "--raw-dir", str(tmp_path / "gone"), "--data-bin", str(data_bin)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert stamp == {p.name: p.stat().st_mtime_ns for p in data_bin.iterdir()}


# ------------------------------------------------------------------ bad input
@pytest.fixture
def bad_dirs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "wiki.train.tokens").write_text("a b\n")
    _write_raw(tmp_path / "full", ["a b"])
    half = tmp_path / "half"  # an LM data-bin without its test subset
    half.mkdir()
    for name in ("dict.txt", "valid.idx", "valid.bin"):
        (half / name).write_text("")
    (tmp_path / "ckpt").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "--raw-dir", "{d}/nope", "--data-bin", "{d}/bin"], "raw directory {d}/nope does not exist"),
        (["prepare", "--raw-dir", "{d}/raw", "--data-bin", "{d}/bin"],
         "{d}/raw lacks wiki.valid.tokens, wiki.test.tokens"),
        (["prepare", "--raw-dir", "{d}/full", "--data-bin", "{d}/half"], "{d}/half exists and is not a complete"),
        (["train", "--method", "b2t", "--depth", "16", "--gpus", "5", "--data-bin", "d", "--save-dir", "s"],
         "not a multiple of 5 worker(s)"),
        (["train", "--method", "b2t", "--depth", "16", "--gpus", "8", "--data-bin", "{d}/nope", "--save-dir", "s"],
         "data-bin {d}/nope does not exist"),
        (["train", "--method", "b2t", "--depth", "16", "--gpus", "8", "--data-bin", "d", "--save-dir", "s", "--dry-run", "--",
          "--decoder-layers", "8"], "--decoder-layers cannot be passed to fairseq-train here; use --depth"),
        (["evaluate", "--save-dir", "{d}/nope", "--data-bin", "{d}/half", "--out", "o.json"],
         "save dir {d}/nope does not exist"),
        (["evaluate", "--save-dir", "{d}/ckpt", "--data-bin", "{d}/half", "--out", "o.json"],
         "{d}/half lacks test.idx, test.bin"),
        (["evaluate", "--save-dir", "{d}/ckpt", "--data-bin", "{d}/raw", "--out", "o.json"], "lacks dict.txt"),
        (["table", "--results", "{d}/ckpt"], "no wikitext103 evaluate results"),
        (["--config-dir", "{d}/nope", "table", "--results", "{d}"], "config {d}/nope/base.yaml does not exist"),
    ],
)
def test_bad_input_is_one_line(argv, message, bad_dirs, capsys):
    with pytest.raises(SystemExit) as e:
        main([a.format(d=bad_dirs) for a in argv])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("wikitext103: error: ") and message.format(d=bad_dirs) in err, err


def test_evaluate_without_enough_checkpoints_says_how_to_change_it(bad_dirs, capsys):
    bin_dir = bad_dirs / "bin"
    bin_dir.mkdir()
    for name in ("dict.txt", "valid.idx", "valid.bin", "test.idx", "test.bin"):
        (bin_dir / name).write_text("")
    with pytest.raises(SystemExit):
        main(["evaluate", "--save-dir", str(bad_dirs / "ckpt"), "--data-bin", str(bin_dir), "--out", "o.json"])
    err = capsys.readouterr().err
    assert "found only 0 checkpoint{epoch}.pt" in err and "--average-last N" in err and err.count("\n") == 1


# ------------------------------------------------------------------ table
def _result(method, depth, valid, test, **extra):
    return {"recipe": "wikitext103", "method": method, "depth": depth, "scale": None, "variant": "",
            "valid_ppl": valid, "test_ppl": test,
            "eval_settings": {"tool": "fairseq-eval-lm", "tokens-per-sample": 3072, "context-window": 2560}, **extra}


def _row(table, *starts):
    rows = [line for line in table.splitlines() if line.startswith("| " + " | ".join(starts) + " |")]
    assert len(rows) == 1, (starts, table)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_table_puts_ours_beside_the_published_row(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "b2t-32.json").write_text(json.dumps(_result("b2t", 32, 18.123, 19.006)))
    (results / "pre-16.json").write_text(json.dumps(_result("pre-ln", 16, 19.5, 20.25)))
    (results / "post-16.json").write_text(json.dumps(_result("post-ln", 16, 1234.5, 1300.0)))
    (results / "unrelated.json").write_text(json.dumps({"loss": 1}))  # e.g. a fairseq log: ignored
    out = tmp_path / "table.md"
    assert main(["table", "--results", str(results), "--out", str(out)]) == 0
    table = out.read_text()
    assert capsys.readouterr().out == table
    lines = table.splitlines()
    assert lines[0] == "| Method | Layers | Source | Valid PPL | Test PPL |"
    assert _row(table, "B2T", "32L", "ours")[3:] == ["18.12", "19.01"]
    published = BASE["published"]["rows"][0]
    assert _row(table, "B2T", "unknown", "published: paper")[3:] == [str(published["valid"]), str(published["test"])]
    # published first, then ours by depth, baselines before B2T within a depth
    order = [lines.index(next(x for x in lines if x.startswith(p))) for p in
             ("| B2T | unknown", "| Post-LN | 16L", "| Pre-LN | 16L", "| B2T | 32L")]
    assert order == sorted(order)
    assert "Perplexity (ours): fairseq-eval-lm --tokens-per-sample 3072 --context-window 2560" in table
    assert "Published numbers: Takase et al." in table


def test_published_numbers_live_in_the_config_with_their_source():
    published = BASE["published"]
    assert "Takase" in published["source"] and "wizwand" in published["source"]
    assert [(r["method"], r["valid"], r["test"]) for r in published["rows"]] == [("b2t", 18.38, 19.2)]


def test_table_rejects_two_results_for_one_row(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_result("b2t", 16, 20.0, 21.0)))
    with pytest.raises(RecipeError, match="two results for b2t 16L"):
        render_table(recipe.load_results([tmp_path]), recipe.load_config())


# ------------------------------------------------------------------ smoke, through fairseq's real entry points
def _tiny_corpus(raw):
    """wiki.{train,valid,test}.tokens from real English (the WMT sample) when present, else toy sentences."""
    sample = SHARED_DATA / "wmt_ende_opennmt10k"
    if sample.is_dir():
        def lines(split, n):
            text = (sample / f"{split}.en").read_text(encoding="utf-8").splitlines()
            return [line for line in text if 0 < len(line.split()) <= 40][:n]
    else:
        from b2t_fairseq.toy import translation as toy_translation

        def lines(split, n):
            return [src for src, _ in toy_translation.generate_pairs(n, seed=recipe.SPLITS.index(split))]
    splits = {"train": lines("train", 240), "valid": lines("valid", 30), "test": lines("test", 30)}
    raw.mkdir()
    for split, text in splits.items():
        (raw / f"wiki.{split}.tokens").write_text("".join(line + "\n" for line in text), encoding="utf-8")
    return splits


@pytest.mark.slow
def test_smoke_prepare_train_evaluate_table(tmp_path):
    env = cli_env(PYTHON=sys.executable)

    def script(name, *args):
        proc = subprocess.run([str(SCRIPTS / f"{name}.sh"), *map(str, args)], check=False, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{name}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr
        return proc

    raw, data_bin, save_dir = tmp_path / "raw", tmp_path / "data-bin", tmp_path / "ckpt"
    splits = _tiny_corpus(raw)
    script("prepare", "--raw-dir", raw, "--data-bin", data_bin)

    train = script("train", "--method", "b2t", "--depth", "16", "--scale", "smoke", "--data-bin", data_bin,
                   "--save-dir", save_dir)
    assert "--connection b2t" in train.stdout and "--update-freq 2" in train.stdout
    assert len(list(save_dir.glob("checkpoint[0-9]*.pt"))) >= 2  # epoch checkpoints to average

    out = tmp_path / "results" / "b2t-16l.json"
    script("evaluate", "--scale", "smoke", "--save-dir", save_dir, "--data-bin", data_bin, "--out", out)
    result = json.loads(out.read_text())
    assert (result["recipe"], result["method"], result["depth"], result["scale"]) == ("wikitext103", "b2t", 16, "smoke")
    assert len(result["averaged"]) == 2 and result["checkpoint"].endswith("averaged_last2.pt")
    assert result["eval_settings"]["context-window"] == 48
    for subset in ("valid", "test"):
        # what fairseq-eval-lm printed, read here without the recipe's parser
        log = (out.parent / "b2t-16l.work" / f"eval-lm-{subset}.log").read_text(encoding="utf-8")
        (tokens, loss, ppl), = EVAL_LINE.findall(log)
        assert result[f"{subset}_ppl"] == float(ppl) == result["subsets"][subset]["ppl"]
        assert result[f"{subset}_ppl"] == pytest.approx(2 ** float(loss), abs=0.005 + float(ppl) * math.log(2) * 5e-5)
        # every token of the subset was scored: its words plus one end-of-line symbol per line
        expected = sum(len(line.split()) + 1 for line in splits[subset])
        assert int(tokens.replace(",", "")) == result["subsets"][subset]["tokens"] == expected
        assert result[f"{subset}_ppl"] < len((data_bin / "dict.txt").read_text().splitlines())  # beats uniform

    table_md = tmp_path / "table.md"
    script("table", "--results", out.parent, "--out", table_md)
    table = table_md.read_text()
    assert table.splitlines()[0] == "| Method | Layers | Source | Valid PPL | Test PPL |"
    ours = _row(table, "B2T", "16L", "ours, scale smoke")
    assert ours[3:] == [f"{result['valid_ppl']:.2f}", f"{result['test_ppl']:.2f}"]
    published = BASE["published"]["rows"][0]
    assert _row(table, "B2T", "unknown", "published: paper")[3:] == [str(published["valid"]), str(published["test"])]
