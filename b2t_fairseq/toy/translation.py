"""Deterministic synthetic parallel corpus for the translation demo.

Source ("src") is English-like SVO:  S V O [prep NP] [("and"|"but") clause]
with NP = det adj{0,2} noun, e.g. "the big dog sees two small cats".

Target ("tgt") is an invented SOV language:
  * clause order is  S [NP postposition] O V  (the PP moves before the object);
  * NP order is  det noun adj*  with adjectives after the noun, mirrored;
  * every target noun has a fixed gender (m/f); determiners and adjectives
    agree with the noun in gender and number (suffixes joined to the stem);
  * the verb agrees with the subject in number; the indefinite "a" is dropped.
Inflection is fused into whitespace-separated words, so src and tgt lengths
differ and the model has to learn reordering, agreement and noun genders.
Source vocabulary: 102 words; target: 144 words.  Sentences: 5-20 tokens.
"""
import argparse
import random
from pathlib import Path

from b2t_fairseq.safety import atomic

SG, PL = "sg", "pl"
MAX_LEN = 20

# (source singular, source plural, target stem, gender).  Stems all end in a
# vowel so that the plural "-n" never produces a word of another class.
NOUNS = [tuple(entry.split()) for entry in """
    dog dogs varu m, cat cats mesi f, man men tomaro m, woman women lusa f,
    child children pelo m, bird birds kiwe f, horse horses dalimu m, farmer farmers grono m,
    teacher teachers solvi f, king kings bareko m, queen queens nira f, girl girls fenu f,
    boy boys hato m, fox foxes rulka f, wolf wolves vonda m, mouse mice tipi f,
    friend friends amaro m, doctor doctors medi f, sailor sailors nauto m, baker bakers pasku f,
    river rivers duna f, house houses kasto m, tree trees bolu m, garden gardens ortena f,
    bridge bridges ponti m
""".split(",")]
ADJECTIVES = {
    "big": "gorm", "small": "pits", "red": "kral", "old": "vesk",
    "young": "jul", "happy": "fend", "angry": "ziv", "green": "telv",
    "tall": "hosk", "quiet": "murn", "brave": "dask", "lazy": "bolv",
}
# (3rd person singular, plural, target stem)
VERBS = [
    ("sees", "see", "mir"), ("likes", "like", "lub"), ("follows", "follow", "trek"),
    ("helps", "help", "pom"), ("finds", "find", "nakh"), ("chases", "chase", "gon"),
    ("watches", "watch", "vid"), ("knows", "know", "zen"), ("calls", "call", "zov"),
    ("feeds", "feed", "hran"), ("meets", "meet", "sust"), ("visits", "visit", "pohod"),
]
PREPOSITIONS = {"near": "vani", "with": "kol", "behind": "tesu", "under": "bano", "beside": "rima"}
CONJUNCTIONS = {"and": "su", "but": "pek"}
# source determiner -> (number it forces, or None; target forms).  Four target
# forms are indexed by AGR_ORDER, one is invariant, none means "dropped".
DETERMINERS = {
    "the": (None, "ne na nei nai"), "a": (SG, ""),
    "this": (SG, "te ta tei tai"), "these": (PL, "te ta tei tai"),
    "that": (SG, "se sa sei sai"), "those": (PL, "se sa sei sai"),
    "two": (PL, "pim"), "three": (PL, "sol"), "some": (PL, "ruk"),
}
AGR_ORDER = [("m", SG), ("f", SG), ("m", PL), ("f", PL)]
ADJ_SUFFIX = dict(zip(AGR_ORDER, ["o", "a", "oi", "ai"]))
NOUN_PLURAL = "n"
VERB_SUFFIX = {SG: "ek", PL: "umi"}

_NOUN_FORMS = {f: (i, num) for i, n in enumerate(NOUNS) for f, num in ((n[0], SG), (n[1], PL))}
_VERB_FORMS = {f: (i, num) for i, v in enumerate(VERBS) for f, num in ((v[0], SG), (v[1], PL))}


def source_vocab():
    return set(DETERMINERS) | set(_NOUN_FORMS) | set(ADJECTIVES) | set(_VERB_FORMS) \
        | set(PREPOSITIONS) | set(CONJUNCTIONS)


def target_vocab():
    words = {f for _, forms in DETERMINERS.values() for f in forms.split()}
    words |= {n[2] for n in NOUNS} | {n[2] + NOUN_PLURAL for n in NOUNS}
    words |= {a + s for a in ADJECTIVES.values() for s in ADJ_SUFFIX.values()}
    words |= {v[2] + s for v in VERBS for s in VERB_SUFFIX.values()}
    return words | set(PREPOSITIONS.values()) | set(CONJUNCTIONS.values())


# A sentence is a list of clauses joined by conjunctions:
#   sentence = [clause, (conj, clause)*];  clause = (subj, verb, obj, pp|None)
#   np = (det, adjectives, noun index, number);  pp = (prep, np)
def _sample_np(rng, noun):
    number = PL if rng.random() < 0.4 else SG
    dets = [d for d, (num, _) in DETERMINERS.items() if num in (None, number)]
    det = "the" if rng.random() < 0.4 else rng.choice(dets)
    n_adj = rng.choices([0, 1, 2], weights=[5, 3, 1])[0]
    return det, tuple(rng.sample(sorted(ADJECTIVES), n_adj)), noun, number


def _sample_clause(rng):
    # distinct nouns avoid degenerate "the dog sees the dog" clauses
    subj, obj, loc = rng.sample(range(len(NOUNS)), 3)
    pp = (rng.choice(sorted(PREPOSITIONS)), _sample_np(rng, loc)) if rng.random() < 0.3 else None
    return _sample_np(rng, subj), rng.randrange(len(VERBS)), _sample_np(rng, obj), pp


def _sample_sentence(rng):
    while True:  # resample rather than truncate so every sentence stays grammatical
        sent = [_sample_clause(rng)]
        if rng.random() < 0.25:
            sent += [rng.choice(sorted(CONJUNCTIONS)), _sample_clause(rng)]
        if len(render_source(sent).split()) <= MAX_LEN:
            return sent


def _src_np(np):
    det, adjs, noun, number = np
    return [det, *adjs, NOUNS[noun][0 if number == SG else 1]]


def _tgt_np(np):
    det, adjs, noun, number = np
    _, _, stem, gender = NOUNS[noun]
    forms = DETERMINERS[det][1].split()
    out = [forms[AGR_ORDER.index((gender, number))]] if len(forms) == 4 else forms
    out.append(stem + (NOUN_PLURAL if number == PL else ""))
    return out + [ADJECTIVES[a] + ADJ_SUFFIX[gender, number] for a in reversed(adjs)]


def render_source(sent):
    words = []
    for part in sent:
        if isinstance(part, str):
            words.append(part)
            continue
        subj, verb, obj, pp = part
        words += _src_np(subj) + [VERBS[verb][0 if subj[3] == SG else 1]] + _src_np(obj)
        words += [pp[0]] + _src_np(pp[1]) if pp else []
    return " ".join(words)


def render_target(sent):
    words = []
    for part in sent:
        if isinstance(part, str):
            words.append(CONJUNCTIONS[part])
            continue
        subj, verb, obj, pp = part
        words += _tgt_np(subj)
        words += _tgt_np(pp[1]) + [PREPOSITIONS[pp[0]]] if pp else []
        words += _tgt_np(obj) + [VERBS[verb][2] + VERB_SUFFIX[subj[3]]]
    return " ".join(words)


def parse(src):
    """Parse a source sentence back into the structure; ValueError if ungrammatical."""
    toks, pos = src.split(), 0

    def take(table):
        nonlocal pos
        if pos >= len(toks) or toks[pos] not in table:
            raise ValueError(f"unexpected token at {pos} in {src!r}")
        pos += 1
        return toks[pos - 1]

    def np():
        nonlocal pos
        det, adjs = take(DETERMINERS), []
        while pos < len(toks) and toks[pos] in ADJECTIVES:
            adjs.append(take(ADJECTIVES))
        noun, number = _NOUN_FORMS[take(_NOUN_FORMS)]
        if DETERMINERS[det][0] not in (None, number):
            raise ValueError(f"determiner {det!r} does not agree in {src!r}")
        return det, tuple(adjs), noun, number

    def clause():
        subj = np()
        verb, number = _VERB_FORMS[take(_VERB_FORMS)]
        if number != subj[3]:
            raise ValueError(f"verb does not agree with subject in {src!r}")
        obj = np()
        pp = (take(PREPOSITIONS), np()) if pos < len(toks) and toks[pos] in PREPOSITIONS else None
        return subj, verb, obj, pp

    sent = [clause()]
    while pos < len(toks):
        sent += [take(CONJUNCTIONS), clause()]
    return sent


def translate(src):
    """Reference translation of any grammatical source sentence."""
    return render_target(parse(src))


def _sample_pair(rng):
    sent = _sample_sentence(rng)
    return render_source(sent), render_target(sent)


def generate_pairs(n, seed):
    """n (src, tgt) pairs drawn i.i.d. from the grammar; may contain duplicates."""
    rng = random.Random(seed)
    return [_sample_pair(rng) for _ in range(n)]


def write_corpus(out_dir, n_train=4000, n_valid=300, n_test=300, seed=1):
    """Write {train,valid,test}.{src,tgt}; sources are unique across all splits."""
    rng, total = random.Random(seed), n_train + n_valid + n_test
    seen, pairs = set(), []
    for _ in range(50 * total + 1000):
        if len(pairs) == total:
            break
        src, tgt = _sample_pair(rng)
        if src not in seen:
            seen.add(src)
            pairs.append((src, tgt))
    if len(pairs) < total:
        raise RuntimeError(f"could only draw {len(pairs)} unique sentences, wanted {total}")
    # held-out splits come first so their content does not depend on n_train
    splits = {"test": pairs[:n_test], "valid": pairs[n_test:n_test + n_valid],
              "train": pairs[n_test + n_valid:]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        for side, col in (("src", 0), ("tgt", 1)):
            text = "".join(p[col] + "\n" for p in items)
            atomic.write_text(out / f"{split}.{side}", text)  # train.tgt, written last, marks the whole corpus
    return {split: len(splits[split]) for split in ("train", "valid", "test")}


def main(argv=None):
    """``b2t-toy-data``. Returns None: the console script's wrapper exits with what main returns."""
    ap = argparse.ArgumentParser(prog="b2t-toy-data", description="Write the toy src->tgt parallel corpus.")
    ap.add_argument("--out-dir", required=True, help="directory for {train,valid,test}.{src,tgt}")
    ap.add_argument("--train", type=int, default=4000, help="training pairs (default 4000)")
    ap.add_argument("--valid", type=int, default=300, help="validation pairs (default 300)")
    ap.add_argument("--test", type=int, default=300, help="test pairs (default 300)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = ap.parse_args(argv)
    for split in ("train", "valid", "test"):
        if getattr(args, split) < 1:
            ap.exit(2, f"b2t-toy-data: error: --{split} {getattr(args, split)}: give a number of pairs of at least 1\n")
    counts = write_corpus(args.out_dir, args.train, args.valid, args.test, args.seed)
    print(f"wrote train={counts['train']} valid={counts['valid']} test={counts['test']} "
          f"pairs to {args.out_dir} (seed={args.seed})")


if __name__ == "__main__":
    main()
