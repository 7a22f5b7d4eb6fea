"""Score fairseq-generate output with SacreBLEU against raw references, as papers report BLEU.

    fairseq-generate data-bin --path avg.pt --gen-subset test ... > gen.out
    b2t-score --generate-output gen.out --ref raw/test.de --remove-bpe sentencepiece
    b2t-score --generate-output gen.out --ref raw/test.de --remove-bpe subword_nmt --detok-lang de --json bleu.json

The hypotheses are taken from the H- lines (the model's own tokens), undone from BPE and detokenized here, so
the references stay untouched raw text and SacreBLEU's own tokenizer decides the n-grams.
"""
import argparse
import io
import json
import sys
from functools import lru_cache

from sacrebleu.metrics import BLEU

from b2t_fairseq.safety import atomic
from b2t_fairseq.safety.errors import B2TConfigError

REMOVE_BPE = ("none", "subword_nmt", "sentencepiece")


def read_hypotheses(lines):
    """Texts of the ``H-<id>\\t<score>\\t<text>`` lines, in id order (generate prints them in length order)."""
    best = {}
    for line in lines:
        if not line.startswith("H-"):
            continue
        fields = line.rstrip("\r\n").split("\t", 2)
        try:
            sample_id = int(fields[0][2:])
        except ValueError:
            raise B2TConfigError(f"malformed hypothesis line: {line.strip()[:80]!r}") from None
        best.setdefault(sample_id, fields[2] if len(fields) == 3 else "")  # with --nbest the best comes first
    return [best[i] for i in sorted(best)]


@lru_cache(maxsize=None)
def _detokenizer(lang):
    from sacremoses import MosesDetokenizer

    return MosesDetokenizer(lang=lang)


def postprocess(text, remove_bpe="none", detok_lang=None):
    if remove_bpe == "subword_nmt":
        text = (text + " ").replace("@@ ", "").rstrip()
    elif remove_bpe == "sentencepiece":
        text = text.replace(" ", "").replace("\u2581", " ").strip()
    elif remove_bpe != "none":
        raise B2TConfigError(f"unknown remove_bpe {remove_bpe!r}; choose from {', '.join(REMOVE_BPE)}")
    if detok_lang not in (None, "none"):
        text = _detokenizer(detok_lang).detokenize(text.split())
    return text


def score(hyps, refs, tokenize="13a", lowercase=False):
    if len(hyps) != len(refs):
        raise B2TConfigError(
            f"{len(hyps)} hypotheses but {len(refs)} references; the generate output may be incomplete (interrupted "
            "run, another --gen-subset, or fairseq-generate dropping a last batch that is not a multiple of "
            "--required-batch-size-multiple: pass --required-batch-size-multiple 1)"
        )
    if not hyps:
        raise B2TConfigError("nothing to score: no hypotheses and no references")
    bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
    result = bleu.corpus_score(hyps, [refs])
    return {
        "bleu": result.score,
        "signature": str(bleu.get_signature()),
        "n": len(hyps),
        "score_string": str(result),
        "precisions": result.precisions,
        "bp": result.bp,
        "sys_len": result.sys_len,
        "ref_len": result.ref_len,
    }


def read_lines(path):
    # newline="\n": only \n ends a line, so a stray \r inside a sentence cannot shift the alignment.
    if path == "-":
        f = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="\n")
    else:
        f = open(path, encoding="utf-8", newline="\n")
    with f:
        return [line.rstrip("\r\n") for line in f]


def cli_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="b2t-score",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--generate-output", default="-", metavar="FILE", help="generate's stdout (default: stdin)")
    parser.add_argument("--ref", required=True, metavar="FILE", help="raw references, one per line")
    parser.add_argument("--remove-bpe", choices=REMOVE_BPE, default="none")
    parser.add_argument("--detok-lang", metavar="LANG", help="Moses-detokenize the hypotheses (default: don't)")
    parser.add_argument("--tokenize", choices=list(BLEU.TOKENIZERS), default="13a", help="SacreBLEU tokenizer")
    parser.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU")
    parser.add_argument("--output-hyp", metavar="FILE", help="write the post-processed hypotheses here")
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.generate_output == "-" and sys.stdin.isatty():
        parser.error("pipe fairseq-generate output into stdin or pass --generate-output FILE")
    try:
        raw_hyps = read_hypotheses(read_lines(args.generate_output))
        if not raw_hyps:
            raise B2TConfigError(f"no H-<id> lines in {args.generate_output}; is it fairseq-generate output?")
        hyps = [postprocess(h, args.remove_bpe, args.detok_lang) for h in raw_hyps]
        result = score(hyps, read_lines(args.ref), args.tokenize, args.lowercase)
        if args.output_hyp:
            atomic.write_text(args.output_hyp, "".join(h + "\n" for h in hyps))
        if args.json:
            atomic.write_text(args.json, json.dumps(result, indent=2) + "\n")
    except (B2TConfigError, OSError, UnicodeDecodeError) as e:
        parser.exit(1, f"b2t-score: error: {e}\n")
    print(f"{result['score_string']} | {result['signature']}")


if __name__ == "__main__":
    cli_main()
