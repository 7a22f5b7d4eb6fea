import re

import pytest

from b2t_fairseq.toy import translation as td

SRC_PLURAL_NOUNS = {n[1] for n in td.NOUNS}
SRC_NOUNS = {n[0] for n in td.NOUNS} | SRC_PLURAL_NOUNS
# target noun surface form -> (gender, number), built straight from the tables
TGT_NOUN_AGR = {}
for _sg, _pl, _stem, _gender in td.NOUNS:
    TGT_NOUN_AGR[_stem] = (_gender, "sg")
    TGT_NOUN_AGR[_stem + td.NOUN_PLURAL] = (_gender, "pl")
TGT_VERBS = {num: {v[2] + suf for v in td.VERBS} for num, suf in td.VERB_SUFFIX.items()}
TGT_CONJ = set(td.CONJUNCTIONS.values())


@pytest.fixture(scope="module")
def pairs():
    return td.generate_pairs(3000, seed=7)


def _clauses(tokens, conjunctions):
    clauses, cur = [], []
    for tok in tokens:
        if tok in conjunctions:
            clauses.append(cur)
            cur = []
        else:
            cur.append(tok)
    return clauses + [cur]


def _adj_suffix(token):
    """Return the agreement suffix if token is an inflected target adjective."""
    for stem in td.ADJECTIVES.values():
        m = re.fullmatch(re.escape(stem) + r"(o|a|oi|ai)", token)
        if m:
            return m.group(1)
    return None


def test_deterministic_per_seed():
    assert td.generate_pairs(200, seed=3) == td.generate_pairs(200, seed=3)
    assert td.generate_pairs(200, seed=3) != td.generate_pairs(200, seed=4)


def test_pinned_examples_reorder_and_inflect():
    # SVO -> SOV, adjective after noun, article/adjective agree with noun gender,
    # "two" is invariant, the verb is last and singular.
    assert td.translate("the big dog sees two small cats") == "ne varu gormo pim mesin pitsai mirek"
    # PP moves before the object, preposition becomes a postposition, "a" is dropped.
    assert td.translate("the dog sees a cat near the river") == "ne varu na duna vani mesi mirek"
    # multiple adjectives are mirrored; plural subject -> plural verb
    assert td.translate("these old red wolves chase the queen") == "tei vondan kraloi veskoi na nira gonumi"


def test_translate_rejects_ungrammatical():
    for bad in ["dog the sees a cat", "the dogs sees a cat", "a dogs see a cat",
                "the dog sees", "the dog sees a cat and"]:
        with pytest.raises(ValueError):
            td.translate(bad)


def test_generated_target_matches_parser_and_is_not_monotone(pairs):
    for src, tgt in pairs:
        assert td.translate(src) == tgt
    # the verb sits in second NP position in the source but ends every target clause
    for src, tgt in pairs:
        for clause in _clauses(tgt.split(), TGT_CONJ):
            assert clause[-1] in TGT_VERBS["sg"] | TGT_VERBS["pl"]
        assert src.split()[-1] not in {w for v in td.VERBS for w in v[:2]}
    assert sum(s.split() != t.split() for s, t in pairs) == len(pairs)


def test_subject_verb_agreement(pairs):
    n_plural = 0
    for src, tgt in pairs:
        src_clauses = _clauses(src.split(), set(td.CONJUNCTIONS))
        tgt_clauses = _clauses(tgt.split(), TGT_CONJ)
        assert len(src_clauses) == len(tgt_clauses)
        for sc, tc in zip(src_clauses, tgt_clauses):
            subject = next(w for w in sc if w in SRC_NOUNS)
            number = "pl" if subject in SRC_PLURAL_NOUNS else "sg"
            n_plural += number == "pl"
            assert tc[-1] in TGT_VERBS[number], (src, tgt)
    assert n_plural > 100  # both numbers are actually exercised


def test_noun_phrase_agreement(pairs):
    four_form = {d: forms.split() for d, (_, forms) in td.DETERMINERS.items()
                 if len(forms.split()) == 4}
    det_agr = {}
    for forms in four_form.values():
        for form, agr in zip(forms, [("m", "sg"), ("f", "sg"), ("m", "pl"), ("f", "pl")]):
            det_agr[form] = agr
    expected_suffix = {("m", "sg"): "o", ("f", "sg"): "a", ("m", "pl"): "oi", ("f", "pl"): "ai"}
    checked_adj = checked_det = 0
    for _, tgt in pairs:
        toks = tgt.split()
        for i, tok in enumerate(toks):
            if tok not in TGT_NOUN_AGR:
                continue
            agr = TGT_NOUN_AGR[tok]
            if i > 0 and toks[i - 1] in det_agr:
                assert det_agr[toks[i - 1]] == agr, tgt
                checked_det += 1
            j = i + 1
            while j < len(toks) and _adj_suffix(toks[j]):
                assert _adj_suffix(toks[j]) == expected_suffix[agr], tgt
                checked_adj += 1
                j += 1
    assert checked_adj > 500 and checked_det > 500


def test_vocabulary_and_lengths(pairs):
    src_vocab = {w for s, _ in pairs for w in s.split()}
    tgt_vocab = {w for _, t in pairs for w in t.split()}
    assert 60 <= len(src_vocab) <= 120
    assert 60 <= len(tgt_vocab) <= 200
    assert src_vocab <= td.source_vocab() and tgt_vocab <= td.target_vocab()
    # every lexical entry yields a distinct surface word: no accidental homographs
    n_det = len({f for _, forms in td.DETERMINERS.values() for f in forms.split()})
    expected = (n_det + 2 * len(td.NOUNS) + 4 * len(td.ADJECTIVES) + 2 * len(td.VERBS)
                + len(td.PREPOSITIONS) + len(td.CONJUNCTIONS))
    assert len(td.target_vocab()) == expected
    for src, tgt in pairs:
        assert 5 <= len(src.split()) <= 20
        assert 3 <= len(tgt.split()) <= 20
    mean_src = sum(len(s.split()) for s, _ in pairs) / len(pairs)
    assert 7 <= mean_src <= 12


def _read_lines(path):
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text.splitlines()


def test_write_corpus_splits(tmp_path):
    out = tmp_path / "new" / "corpus"
    counts = td.write_corpus(out, n_train=500, n_valid=60, n_test=40, seed=5)
    assert counts == {"train": 500, "valid": 60, "test": 40}
    lines = {}
    for split, n in counts.items():
        src, tgt = _read_lines(out / f"{split}.src"), _read_lines(out / f"{split}.tgt")
        assert len(src) == len(tgt) == n
        assert len(set(src)) == n
        lines[split] = src
    assert not set(lines["train"]) & set(lines["valid"])
    assert not set(lines["train"]) & set(lines["test"])
    assert not set(lines["valid"]) & set(lines["test"])
    # rewriting with the same seed reproduces the files byte for byte
    again = tmp_path / "again"
    td.write_corpus(again, n_train=500, n_valid=60, n_test=40, seed=5)
    for split in counts:
        for side in ("src", "tgt"):
            assert (out / f"{split}.{side}").read_bytes() == (again / f"{split}.{side}").read_bytes()


def test_main_writes_files(tmp_path, capsys):
    out = tmp_path / "cli"
    td.main(["--out-dir", str(out), "--train", "80", "--valid", "10", "--test", "12", "--seed", "2"])
    for split, n in {"train": 80, "valid": 10, "test": 12}.items():
        assert len(_read_lines(out / f"{split}.src")) == n
        assert len(_read_lines(out / f"{split}.tgt")) == n
    printed = capsys.readouterr().out
    assert "train=80" in printed and str(out) in printed


def test_main_help_and_required_arg(capsys):
    with pytest.raises(SystemExit) as exc:
        td.main(["--help"])
    assert exc.value.code == 0
    assert "--out-dir" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        td.main([])
    assert exc.value.code != 0


def test_console_script_exit_status_and_bad_counts(tmp_path, capsys):
    """The README's own example exits 0 (main used to return its counts, which the console script's wrapper
    turned into exit status 1); a count below 1 is one line naming the flag."""
    from conftest import run

    ok = run("b2t-toy-data", "--out-dir", tmp_path / "raw", "--train", 30, "--valid", 5, "--test", 5, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == "" and "wrote train=30 valid=5 test=5" in ok.stdout
    assert len(_read_lines(tmp_path / "raw" / "train.src")) == 30
    bad = run("b2t-toy-data", "--out-dir", tmp_path / "bad", "--train", -3, check=False)
    assert (bad.returncode, bad.stderr) == (2, "b2t-toy-data: error: --train -3: give a number of pairs of at least 1\n")
    for flag, value in (("--valid", 0), ("--test", -1)):  # the same check, in this process
        with pytest.raises(SystemExit) as exc:
            td.main(["--out-dir", str(tmp_path / "bad"), flag, str(value)])
        assert exc.value.code == 2
        assert capsys.readouterr().err == f"b2t-toy-data: error: {flag} {value}: give a number of pairs of at least 1\n"
    assert not (tmp_path / "bad").exists()
