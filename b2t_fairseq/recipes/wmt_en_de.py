"""WMT En-De recipe of the B2T paper: prepare data, train a (method, depth) row, evaluate on newstest2010-2016, table.

    python -m b2t_fairseq.recipes.wmt_en_de prepare --out wmt16 (--download | --archive wmt16_en_de.tar.gz | \\
        --release DIR) (--fetch-refs | --refs DIR)
    python -m b2t_fairseq.recipes.wmt_en_de train --method b2t --depth 18 --gpus 8 \\
        --data-bin data-bin/wmt16_en_de_bpe32k --save-dir ckpt/b2t-18l [--dry-run] [-- extra fairseq-train flags]
    python -m b2t_fairseq.recipes.wmt_en_de evaluate --save-dir ckpt/b2t-18l --data-bin data-bin/wmt16_en_de_bpe32k \\
        --refs raw-refs/ --out results/b2t-18l.json [--subset 2014=test --subset 2015=test1 ...]
    python -m b2t_fairseq.recipes.wmt_en_de table --results results/ --out table.md

Hyperparameters live in configs/wmt_en_de/*.yaml (base + 6l/18l/100l, + smoke for --scale smoke); this file
only combines them. Every method gets the same flags; --method only sets --connection.
"""
import json
import shlex
import subprocess
import sys
from pathlib import Path

from b2t_fairseq.safety import atomic
from b2t_fairseq.recipes.common import (
    METHODS, PLUGIN_DIR, Recipe, RecipeError, check_data_bin, fmt, subset_pairs,
)  # fmt: skip
from b2t_fairseq.tools.pipeline import as_flags

PROG = "wmt_en_de"


# ------------------------------------------------------------------ prepare
PREPARE_FILE = "prepare.json"


def fetch(url, dest):
    """Download ``url`` to ``dest`` (via a .part file, so an interrupted download is never taken as complete)."""
    import shutil
    import urllib.request

    dest = Path(dest)
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url) as response, open(part, "wb") as out:
            kind = response.headers.get("Content-Type", "")
            if kind.startswith("text/html"):  # Google Drive answers a consent page instead of the file
                raise RecipeError(f"{url} returned a web page, not the archive; download it by hand and pass --archive")
            shutil.copyfileobj(response, out)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise RecipeError(f"could not download {url}: {e}; download it by hand and pass --archive FILE") from None
    part.rename(dest)
    return dest


def _find_release(root, prep, years):
    """The directory inside ``root`` that holds the release's train and newstest files (the tarball nests them)."""
    marker = f"{prep['train_prefix']}.{prep['src']}"
    hits = [root] if (root / marker).is_file() else sorted(p.parent for p in root.rglob(marker))
    if not hits:
        raise RecipeError(f"{root} holds no {marker}: is it the extracted WMT'16 release (wmt16_en_de.tar.gz)?")
    release = hits[0]
    names = [f"{prep['train_prefix']}.{lang}" for lang in (prep["src"], prep["tgt"])]
    for year in sorted(set(years) | {int(prep["valid_year"])}):
        names += [f"{prep['test_pattern'].format(year=year)}.{lang}" for lang in (prep["src"], prep["tgt"])]
    missing = [n for n in names if not (release / n).is_file()]
    if missing:
        raise RecipeError(
            f"{release} lacks {', '.join(missing)} (tokenize and apply the release's bpe.32000 codes to the missing "
            "newstest years, or leave them out with --years)"
        )
    return release


def _extract(archive, into):
    import tarfile

    if not Path(archive).is_file():
        raise RecipeError(f"archive {archive} does not exist")
    done = Path(into) / ".extracted"
    if not done.is_file():
        print(f"extracting {archive} -> {into}", flush=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(into, filter="data")
        except (tarfile.TarError, EOFError) as e:
            raise RecipeError(f"{archive} is not a readable tar archive ({e}); download it again") from None
        done.touch()
    return Path(into)


def _count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _sacrebleu_refs(test_set, langpair):
    proc = subprocess.run([sys.executable, "-m", "sacrebleu", "-t", test_set, "-l", langpair, "--echo", "ref"],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RecipeError(f"sacrebleu could not echo the {test_set} references ({last}); pass --refs DIR instead")
    return proc.stdout


def prepare(out, release=None, archive=None, download=False, refs=None, fetch_refs=False, years=None, workers=1,
            config_dir=None):  # fmt: skip
    """Binarize the release into ``out``/data-bin (subsets test{year}) and put raw references in ``out``/refs.

    Every input is checked before anything is written, and each stage is skipped when its output exists, so a
    rerun after an interruption or a missing file continues instead of starting over."""
    config = load_config(config_dir)
    prep, ev = config["prepare"], config["evaluate"]
    years = [int(y) for y in (years or ev["years"])]
    src, tgt = prep["src"], prep["tgt"]
    out = Path(out)
    if sum(x is not None and x is not False for x in (release, archive, download or None)) != 1:
        raise RecipeError("say where the WMT'16 release is: exactly one of --release DIR, --archive FILE, --download")
    if (refs is None) == (not fetch_refs):
        raise RecipeError("say where the raw references are: exactly one of --refs DIR or --fetch-refs (sacrebleu)")
    if refs is not None:  # check the references before the (long) extraction and binarization
        missing = [str(Path(refs) / ev["ref_pattern"].format(year=y)) for y in years
                   if not (Path(refs) / ev["ref_pattern"].format(year=y)).is_file()]  # fmt: skip
        if missing:
            raise RecipeError(f"missing raw references: {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    if download:
        archive = fetch(prep["download_url"], out / "wmt16_en_de.tar.gz")
    if archive is not None:
        release = _extract(archive, out / "release")
    if not Path(release).is_dir():
        raise RecipeError(f"release directory {release} does not exist")
    release = _find_release(Path(release), prep, years)

    # raw references: copied (or echoed by sacrebleu), each checked against its source's line count
    ref_dir = out / "refs"
    ref_dir.mkdir(exist_ok=True)
    for year in years:
        name = ev["ref_pattern"].format(year=year)
        target = ref_dir / name
        if not target.is_file():
            if refs is not None:
                text = (Path(refs) / name).read_text(encoding="utf-8")
            else:
                text = _sacrebleu_refs(prep["sacrebleu_sets"][year], f"{src}-{tgt}")
            tmp = target.with_name(name + ".part")
            tmp.write_text(text, encoding="utf-8")
            tmp.rename(target)
        source = release / f"{prep['test_pattern'].format(year=year)}.{src}"
        n_ref, n_src = _count_lines(target), _count_lines(source)
        if n_ref != n_src:
            target.unlink()
            raise RecipeError(
                f"{year}: {n_ref} reference lines but {n_src} source lines in {source.name} (for 2014 use the full "
                "3003-line newstest2014, sacrebleu's wmt14/full)"
            )

    data_bin = out / "data-bin"
    test_subsets = [f"test{year}" for year in years]
    if all(subset_pairs(data_bin, s) for s in ["train", "valid", *test_subsets]):
        print(f"{data_bin} is complete; skipping fairseq-preprocess", flush=True)
    else:
        tmp_bin = out / "data-bin.part"  # binarized aside, so a crash never leaves a data-bin that looks complete
        if tmp_bin.exists():
            import shutil

            shutil.rmtree(tmp_bin)
        pattern = str(release / prep["test_pattern"])
        cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", src, "--target-lang", tgt,
               "--trainpref", str(release / prep["train_prefix"]),
               "--validpref", pattern.format(year=prep["valid_year"]),
               "--testpref", ",".join(pattern.format(year=y) for y in years),
               "--destdir", str(tmp_bin), "--workers", str(workers), *as_flags(prep.get("preprocess", {}))]  # fmt: skip
        print("+", shlex.join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise RecipeError("fairseq-preprocess failed (see its output above)")
        # fairseq-preprocess names the test sets test, test1, test2, ...; evaluate expects test{year}
        for i, year in enumerate(years):
            old = "test" if i == 0 else f"test{i}"
            for path in tmp_bin.glob(f"{old}.{src}-{tgt}.*"):
                path.rename(tmp_bin / path.name.replace(f"{old}.", f"test{year}.", 1))
        if data_bin.exists():
            import shutil

            shutil.rmtree(data_bin)
        tmp_bin.rename(data_bin)
    manifest = {"recipe": PROG, "release": str(release), "years": years, "valid": f"newstest{prep['valid_year']}",
                "data_bin": str(data_bin), "refs": str(ref_dir),
                "refs_from": str(refs) if refs is not None else "sacrebleu"}  # fmt: skip
    atomic.write_text(out / PREPARE_FILE, json.dumps(manifest, indent=2) + "\n")
    print(f"prepared {data_bin} (train, valid = newstest{prep['valid_year']}, "
          f"{', '.join(test_subsets)}) and raw references in {ref_dir}")  # fmt: skip
    return manifest


def cmd_prepare(args, extra):
    prepare(args.out, args.release, args.archive, args.download, args.refs, args.fetch_refs, args.years,
            args.workers, args.config_dir)  # fmt: skip
    return 0


# ------------------------------------------------------------------ evaluate
def _parse_mapping(items, what):
    mapping = {}
    for item in items or ():
        year, sep, value = item.partition("=")
        if not sep or not year.strip().isdigit() or not value:
            raise RecipeError(f"{what} {item!r} must look like YEAR={'SUBSET' if what == '--subset' else 'FILE'}")
        mapping[int(year)] = value
    return mapping


def lenpen_for(config, year):
    table = config["evaluate"]["lenpen"]
    return float(table.get(year, table.get(str(year), table["default"])))


def generate(data_bin, checkpoint, subset, src, tgt, lenpen, flags, cpu, output):
    cmd = [sys.executable, "-m", "fairseq_cli.generate", str(data_bin), "--user-dir", str(PLUGIN_DIR),
           "--path", str(checkpoint), "--gen-subset", subset, "--source-lang", src, "--target-lang", tgt,
           "--lenpen", str(lenpen), *as_flags(flags)]  # fmt: skip
    if cpu:
        cmd.append("--cpu")
    print("+", shlex.join(cmd), flush=True)
    with atomic.atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        result = subprocess.run(cmd, stdout=out)
    if result.returncode != 0:
        raise RecipeError(f"fairseq-generate failed on subset {subset} with exit code {result.returncode}")


def score_file(generate_output, reference, ev, hyp_output):
    from b2t_fairseq.tools import score as scorer

    lines = Path(generate_output).read_text(encoding="utf-8").splitlines()
    raw = scorer.read_hypotheses(lines)
    if not raw:
        raise RecipeError(f"no H-<id> lines in {generate_output}")
    hyps = [scorer.postprocess(h, ev["remove_bpe"], ev.get("detok_lang")) for h in raw]
    atomic.write_text(hyp_output, "".join(h + "\n" for h in hyps))
    refs = scorer.read_lines(str(reference))
    return scorer.score(hyps, refs, ev.get("tokenize", "13a"))


class WmtEnDe(Recipe):
    name, doc, depths = PROG, __doc__, (6, 18, 100)
    result_keys = ("method", "depth", "bleu", "avg", "signature")
    eval_smoke_help = "smoke: no BPE removal or detokenization, short decoding"
    evaluate_help = "average, decode newstest20xx, score with SacreBLEU, write one JSON"
    default_max_tokens = 3584

    def evaluate_inputs(self):
        return {
            "--refs": {"type": Path, "help": "directory of raw references named as the config's ref_pattern"},
            "--ref": {"action": "append", "metavar": "YEAR=FILE", "help": "reference file for one year (repeatable)"},
            "--subset": {"action": "append", "metavar": "YEAR=SUBSET",
                         "help": "binarized subset holding a year (default: test{YEAR}); fairseq-preprocess --testpref "
                                 "a,b,c names them test, test1, test2, ..."},
            "--years": {"nargs": "+", "type": int, "help": "default: the config's (2010 ... 2016)"},
        }  # fmt: skip

    def plan_evaluation(self, config, data_bin, refs=None, ref=None, subset=None, years=None):
        """(year, subset, src, tgt, reference) of every year, each checked before the (long) decoding, so a typo
        fails in a second, not after six years of output."""
        ev = config["evaluate"]
        years = [int(y) for y in (years or ev["years"])]
        subset_map, ref_map = _parse_mapping(subset, "--subset"), _parse_mapping(ref, "--ref")
        check_data_bin(data_bin, subsets=())
        stray = sorted((set(subset_map) | set(ref_map)) - set(years))
        if stray:
            raise RecipeError(f"--subset/--ref given for {stray}, which are not among the years {years}")
        plan = []
        for year in years:
            name = subset_map.get(year, f"test{year}")
            pairs = subset_pairs(data_bin, name)
            if not pairs:
                hint = "" if year in subset_map else f" (map it with --subset {year}=SUBSET, e.g. test, test1, ...)"
                raise RecipeError(f"{data_bin} has no subset '{name}' for {year}{hint}")
            if len(pairs) > 1:
                raise RecipeError(f"subset '{name}' exists for several language pairs in {data_bin}: {sorted(pairs)}")
            src, tgt = next(iter(pairs))
            if year in ref_map:
                reference = Path(ref_map[year])
            elif refs is not None:
                reference = Path(refs) / ev["ref_pattern"].format(year=year)
            else:
                raise RecipeError(f"no reference for {year}: pass --refs DIR or --ref {year}=FILE")
            if not reference.is_file():
                raise RecipeError(f"reference {reference} for {year} does not exist")
            plan.append((year, name, src, tgt, reference))
        return plan

    def decode_and_score(self, plan, config, data_bin, checkpoint, cpu, work):
        ev = config["evaluate"]
        per_year = {}
        for year, subset, src, tgt, reference in plan:
            lenpen = lenpen_for(config, year)
            gen_out = work / f"generate-{year}.txt"
            generate(data_bin, checkpoint, subset, src, tgt, lenpen, ev.get("generate", {}), cpu, gen_out)
            result = score_file(gen_out, reference, ev, work / f"hyp-{year}.detok.txt")
            per_year[str(year)] = {
                "bleu": result["bleu"], "subset": subset, "reference": str(reference), "lenpen": lenpen,
                "n": result["n"], "score_string": result["score_string"],
            }  # fmt: skip
            print(f"{year}: {result['score_string']}", flush=True)
        bleus = [v["bleu"] for v in per_year.values()]
        return {
            "bleu": {y: v["bleu"] for y, v in per_year.items()},
            "avg": sum(bleus) / len(bleus),
            "years": per_year,
            "signature": result["signature"],
            "postprocess": {"remove_bpe": ev["remove_bpe"], "detok_lang": ev.get("detok_lang")},
        }

    def headline(self, summary):
        return f"avg BLEU {summary['avg']:.2f} over {len(summary['bleu'])} year(s)"

    def columns(self, config):
        return [*map(str, config["evaluate"]["years"]), "Avg"]

    def result_cells(self, result, config):
        years = [str(y) for y in config["evaluate"]["years"]]
        partial = "†" if any(y not in result["bleu"] for y in years) else ""
        return [fmt(result["bleu"].get(y)) for y in years] + [fmt(result["avg"]) + partial]

    def published_cells(self, row, config):
        bleu = row.get("bleu") or {}
        return [fmt(bleu.get(y, bleu.get(str(y)))) for y in config["evaluate"]["years"]] + [fmt(row.get("avg"))]

    def table_notes(self, results, config):
        notes = [f"SacreBLEU signature (ours): {'; '.join(sorted({r['signature'] for r in results}))}"]
        years = [str(y) for y in config["evaluate"]["years"]]
        if any(y not in r["bleu"] for r in results for y in years):
            notes.append("† average over the evaluated years only; the published Avg is over all seven.")
        return notes

    def add_prepare_parser(self, sub):
        p = sub.add_parser("prepare", help="WMT'16 release -> data-bin (test2010 ... test2016) + raw references")
        p.add_argument("--out", required=True, type=Path, help="writes OUT/data-bin, OUT/refs, OUT/prepare.json")
        p.add_argument("--release", type=Path, help="extracted wmt16_en_de.tar.gz (train.tok.clean.bpe.32000.*, ...)")
        p.add_argument("--archive", type=Path, help="wmt16_en_de.tar.gz, downloaded by hand")
        p.add_argument("--download", action="store_true", help="fetch the archive from the config's download_url")
        p.add_argument("--refs", type=Path, help="directory of raw references newstest{YEAR}.de (offline)")
        p.add_argument("--fetch-refs", action="store_true", help="let sacrebleu download the raw references")
        p.add_argument("--years", nargs="+", type=int, help="default: the config's (2010 ... 2016)")
        p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers")
        p.set_defaults(func=cmd_prepare)


RECIPE = WmtEnDe()
DEFAULT_CONFIG_DIR, DEPTHS = RECIPE.config_dir, RECIPE.depths
load_config, build_train_command, evaluate = RECIPE.load_config, RECIPE.build_train_command, RECIPE.evaluate
load_results, render_table, build_parser, main = RECIPE.load_results, RECIPE.render_table, RECIPE.build_parser, RECIPE.main


if __name__ == "__main__":
    sys.exit(main())
