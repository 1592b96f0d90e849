"""03_pretrain.py's data chapter: each curation step on hand-made documents, synthetic math,
and the curated pipeline end to end."""
import importlib
import inspect
import json
import re

import numpy as np
import pytest

pre = importlib.import_module("03_pretrain")
tok = importlib.import_module("01_tokenizer")
Doc = tok.Document

PROSE = ("The river ran quietly past the old mill, and the miller's daughter watched the light "
         "change on the water while the village slept and the bells of the church kept the hours. ") * 3


@pytest.fixture(scope="module")
def tokenizer(corpus):
    train_docs, _ = corpus
    return tok.Tokenizer.train(tok.sample_text(train_docs, 300_000), vocab_size=1024)


def test_heuristic_filters_keep_prose_and_drop_junk():
    assert pre.heuristic_reject(Doc("web", "a", PROSE)) is None
    assert pre.heuristic_reject(Doc("web", "b", "too short to be a document")) == "short"
    assert pre.heuristic_reject(Doc("web", "c", " ".join(str(i * 7919) for i in range(200)))) == "digits"
    assert pre.heuristic_reject(Doc("web", "d", "word !!! ### $$$ %%% " * 40)) == "symbols"
    spam = "\n".join(["Click here to subscribe to our newsletter today"] * 30 + [PROSE])
    assert pre.heuristic_reject(Doc("web", "e", spam)) == "repeated lines"
    assert pre.heuristic_reject(Doc("python_code", "f", inspect.getsource(tok.sample_text))) is None  # real code
    dense = "".join(f"result[key_{i}] = (alpha[idx] + beta[idx]) * gamma(idx);\n" for i in range(30))  # 31% symbols
    assert pre.heuristic_reject(Doc("python_code", "g", dense)) is None  # code may be symbol-dense
    assert pre.heuristic_reject(Doc("web", "g", dense)) == "symbols"  # prose may not


def test_line_dedup_drops_boilerplate_seen_too_often():
    footer = "Copyright 2024 Example Corp. All rights reserved. Terms of use apply."
    docs = [Doc("web", f"w{i}", f"Article {i} says something different about topic {i}.\n{footer}\n") for i in range(10)]
    docs.append(Doc("web", "rare", "A line that appears only twice in the corpus, long enough.\n" * 2))
    docs.append(Doc("python_code", "c", f"# {footer}\nx = 1\n" * 10))
    out, removed = pre.dedup_lines(docs)
    assert removed == 10 and all(footer not in d.text for d in out if d.source == "web")
    assert all(f"Article {i} says" in out[i].text for i in range(10))
    assert out[10].text == docs[10].text  # twice is not "too often"
    assert out[11].text == docs[11].text  # code is never cut line by line
    assert pre.dedup_lines(docs, max_repeats=10)[1] == 0  # exactly 10 copies: allowed at 10


def shingles(ids, n=5):
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


def test_minhash_finds_a_near_duplicate_and_not_an_unrelated_text(tokenizer, corpus):
    _, val_docs = corpus
    base = next(d.text for d in val_docs if d.source == "bible")[:6000]
    pieces = re.split(r"(\s+)", base)  # words and the whitespace between them
    for i in range(0, len(pieces), 2 * 97):  # change about 1% of the words, keep the layout
        pieces[i] = "CHANGED"
    other = next(d.text for d in val_docs if d.source == "shakespeare")[:6000]
    ids = [tokenizer.encode(t) for t in (base, "".join(pieces), other, "too short")]
    signatures = pre.minhash_signatures(ids, n_perm=128)
    exact = len(shingles(ids[0]) & shingles(ids[1])) / len(shingles(ids[0]) | shingles(ids[1]))
    estimate = np.mean(signatures[0] == signatures[1])
    assert abs(estimate - exact) < 0.12  # 128 slots: standard error ~0.04
    assert np.mean(signatures[0] == signatures[2]) < 0.1
    assert pre.near_duplicates(signatures) == {1}  # the edited copy goes, the original and the rest stay


def test_near_duplicates_at_exactly_the_threshold_are_duplicates():
    """The threshold is inclusive (Jaccard >= threshold). At the default 0.8 no estimate from 64 slots
    can equal it (0.8 x 64 = 51.2), so this checks 0.75: two signatures agreeing in exactly 48 of 64
    slots (the first 12 bands, so they are candidates) are duplicates at 0.75, not at 0.76."""
    signatures = np.arange(128, dtype=np.uint64).reshape(2, 64)
    signatures[1, :48] = signatures[0, :48]
    assert pre.near_duplicates(signatures, threshold=0.75) == {1}
    assert pre.near_duplicates(signatures, threshold=0.76) == set()


def test_semantic_dedup_drops_a_reordered_copy(tokenizer, corpus):
    _, val_docs = corpus
    texts = [d.text[:4000] for d in val_docs[:12]]
    paragraphs = texts[0].split("\n")
    reordered = "\n".join(paragraphs[::-1])  # same content, different order: MinHash misses much of it
    ids = [tokenizer.encode(t) for t in texts + [reordered]]
    assert pre.semantic_duplicates(ids, tokenizer.n_words) == {len(texts)}


def test_unsafe_filter():
    assert pre.unsafe_reason(Doc("web", "a", PROSE)) is None
    adult = PROSE + " free porn videos, hentai and camgirls: nsfw porn " * 3
    assert pre.unsafe_reason(Doc("web", "b", adult)) == "adult content"
    contacts = PROSE + " ".join(f"write to user{i}@example.com or call 555-123-{1000 + i}" for i in range(20))
    assert pre.unsafe_reason(Doc("web", "c", contacts)) == "personal data"
    kjv = "And the woman was arrayed in purple and scarlet colour, the mother of harlots. " * 5
    assert pre.unsafe_reason(Doc("bible", "d", kjv)) is None  # old words are not web porn
    assert pre.unsafe_reason(Doc("python_code", "e", "# XXX: fix this later\n" * 20 + PROSE)) is None


def test_quality_classifier_separates_good_from_bad_on_held_out_text(tokenizer, corpus):
    train_docs, val_docs = corpus
    prose = [d for d in train_docs if d.source in ("shakespeare", "bible", "python_docs")]
    classifier = pre.train_quality_classifier([tokenizer.encode(d.text[:20_000]) for d in prose[:60]], tokenizer.n_words)
    rng = np.random.default_rng(123)
    good = [tokenizer.encode(d.text[i:i + 600]) for d in val_docs if d.source in ("shakespeare", "bible")
            for i in range(0, 6000, 600)]
    bad = [pre.degrade(g, rng) for g in good]
    bad += [tokenizer.encode(" ".join(["buy cheap pills online click here best price"] * 12))]
    bad += [tokenizer.encode("".join(rng.choice(list("qwxzjkvbp "), size=600)))]
    p_good, p_bad = classifier.predict_proba(good), classifier.predict_proba(bad)
    accuracy = (np.sum(p_good >= 0.5) + np.sum(p_bad < 0.5)) / (len(good) + len(bad))
    assert accuracy >= 0.9, (p_good.mean(), p_bad.mean())


def test_synthetic_math_is_deterministic_and_correct():
    problems = tok.math_problems(300, seed=7)
    assert problems == tok.math_problems(300, seed=7) and problems != tok.math_problems(300, seed=8)
    for question, working, answer in problems:
        steps = re.findall(r"(\d+) ([+\-x/]) (\d+) = (\d+)", working)
        assert steps, working
        for a, op, b, c in steps:  # every step of the worked answer is true arithmetic
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "x": a * b, "/": a / b}[op] == c
        assert int(steps[-1][3]) == answer >= 0
    text = tok.format_problem(*problems[0])
    assert text.startswith("Question: ") and text.rstrip().endswith(f"The answer is {problems[0][2]}.")
    docs = tok.math_documents(60, seed=1, per_document=25)
    assert [d.text.count("Question:") for d in docs] == [25, 25, 10] and docs[0].source == "synthetic_math"


def test_curate_reports_each_step_and_removes_what_it_should(tokenizer, corpus):
    train_docs, _ = corpus
    real = [d for d in train_docs if d.source in ("shakespeare", "bible")][:30]
    junk = [Doc("bible", "junk/digits", " ".join(str(i * 7919) for i in range(300))),
            Doc("bible", "junk/copy", real[0].text.replace("the", "thee", 3)),
            Doc("bible", "junk/adult", PROSE + " porn nsfw hentai porn " * 20)]
    kept, report, _ = pre.curate(real + junk, tokenizer, log=lambda *a: None)
    names = {d.name for d in kept}
    assert not names & {"junk/digits", "junk/copy", "junk/adult"}
    assert [r["step"] for r in report] == ["heuristic filters", "line de-duplication", "MinHash near-duplicates",
                                           "semantic de-duplication", "unsafe content", "quality classifier"]
    for a, b in zip(report, report[1:]):
        assert a["docs_out"] == b["docs_in"] and a["tokens_out"] == b["tokens_in"]
    assert report[0]["docs_in"] == 33 and report[-1]["docs_out"] == len(kept)
    assert sum(r["per_source"]["bible"]["docs_in"] - r["per_source"]["bible"]["docs_out"] for r in report) >= 3
    with pytest.raises(tok.UserError, match="removed every document"):
        pre.curate([Doc("web", "x", "tiny")], tokenizer, log=lambda *a: None)


def test_main_curates_mixes_and_writes_the_report(tmp_path, corpus):
    train_docs, val_docs = corpus
    data = tmp_path / "data"
    for d in [d for d in train_docs + val_docs if d.source in ("shakespeare", "python_docs")][:50]:
        path = data / d.source / (d.name.split("/")[-1] + ".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(d.text)
    (data / "shakespeare" / "spam.txt").write_text("\n".join(["Subscribe now for exclusive deals and offers"] * 80))
    tokenizer = tok.Tokenizer.train([p.read_text() for p in data.rglob("*.txt")], vocab_size=700)
    tokenizer.save(tmp_path / "tokenizer.model")
    out = tmp_path / "run"
    pre.main(["--data", str(data), "--tokenizer", str(tmp_path / "tokenizer.model"), "--out", str(out),
              "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "1", "--multiple-of", "16",
              "--seq-len", "32", "--batch-tokens", "128", "--micro-batch", "4", "--steps", "2", "--eval-rows", "2",
              "--device", "cpu", "--math-problems", "200", "--mix", "paper"])
    report = json.loads((out / "curation.json").read_text())
    assert report["steps"][0]["per_source"]["shakespeare"]["docs_in"] > report["steps"][0]["per_source"]["shakespeare"]["docs_out"]
    assert set(report["mix"]) == {"shakespeare", "python_docs", "synthetic_math"}
    assert list(report["languages"]["documents"]) == ["all"]  # no parallel Bibles to learn languages from: one pipeline
    assert report["mix"]["synthetic_math"] == pytest.approx(25 / 75)  # math 25 of (general 50 + math 25)
    with pytest.raises(tok.UserError, match="expected paper, natural"):
        pre.main(["--data", str(data), "--tokenizer", str(tmp_path / "tokenizer.model"), "--out", str(tmp_path / "r2"),
                  "--mix", "shakespeare:2"])


# --- language identification (§3.1.1) --------------------------------------------------------------

def test_language_id_is_naive_bayes_over_character_ngrams_worked_by_hand():
    lid = pre.LanguageID(orders=(1,)).fit(["aab", "bbc"], ["X", "Y"])
    # unigrams of " aab " are {" ": 2, "a": 2, "b": 1}, of " bbc " {" ": 2, "b": 2, "c": 1}; vocabulary {" ", a, b, c}
    assert lid.log_prob["X"]["a"] == pytest.approx(np.log((2 + 1) / (5 + 4)))
    assert lid.unseen["X"] == pytest.approx(np.log(1 / 9))  # never seen in X: add-one smoothing
    # " a ": {" ": 2, "a": 1}; X scores 2·log(3/9) + log(3/9), Y 2·log(3/9) + log(1/9): X
    assert lid.predict(["a", "c", "zzz a"]) == ["X", "Y", "X"]  # an n-gram no language has ("z") is ignored


def test_language_id_tells_the_three_languages_apart_on_single_held_out_verses(corpus):
    train_docs, val_docs = corpus
    lid = pre.train_language_id(train_docs)
    assert lid.languages == ["Chichewa", "English", "Ukrainian"]
    accuracy = pre.language_id_accuracy(lid, val_docs)
    assert set(accuracy) == {"English", "Ukrainian", "Chichewa"} and min(accuracy.values()) > 0.97, accuracy
    assert lid.predict(["def main():\n    return 0", "Ndipo Mulungu anati", "І сказав Бог"]) == ["English", "Chichewa", "Ukrainian"]
    assert pre.train_language_id([d for d in train_docs if d.source != "ukrainian" and d.source != "chichewa"]) is None


def test_each_language_gets_its_own_line_deduplication(tokenizer, corpus):
    """A boilerplate line 4 times in English and 4 times in Ukrainian documents: 8 copies in one
    pipeline (more than 6: removed), 4 in each language's own (kept)."""
    train_docs, _ = corpus
    boiler = "This line is repeated boilerplate of a website footer"
    english = [Doc("bible", f"en/{i}", d.text[:3000] + "\n" + boiler) for i, d in
               enumerate([d for d in train_docs if d.source == "bible"][:4])]
    ukrainian = [Doc("ukrainian", f"uk/{i}", d.text[:3000] + "\n" + boiler) for i, d in
                 enumerate([d for d in train_docs if d.source == "ukrainian"][:4])]
    lid = pre.train_language_id(train_docs)
    quiet = dict(log=lambda *a: None, quality_threshold=0.0)
    _, one, _ = pre.curate(english + ukrainian, tokenizer, **quiet)
    kept, per_language, language = pre.curate(english + ukrainian, tokenizer, language_id=lid, **quiet)
    assert one[1]["lines_removed"] == 8 and per_language[1]["lines_removed"] == 0
    assert all(boiler in d.text for d in kept)
    assert {language[d.name] for d in english} == {"English"} and {language[d.name] for d in ukrainian} == {"Ukrainian"}
