"""Metrics: our wrapper against pycocoevalcap run directly, the published clipscore numbers, the
Java-absent and SPICE-absent paths, the pure-Python tokenizer against the Java one, CIDEr-D."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vgpt_cli.cli import app
from vgpt_cli.errors import DataError
from vgpt_cli.evaluate.metrics import (
    CiderD,
    compute_metrics,
    java_missing_reason,
    load_predictions,
    load_references,
)
from vgpt_cli.evaluate.tokenize import ptb_tokens, tokenize_caption

HAVE_JAVA = java_missing_reason() is None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="no Java runtime: the official PTB tokenizer and METEOR need one")

# The clipscore repository's README (reproduced by pycocoevalcap 1.2); see tests/assets/realdata/README.md.
PUBLISHED = {
    "good_captions.json": {"Bleu_1": 0.6667, "Bleu_2": 0.4899, "Bleu_3": 0.3469, "Bleu_4": 0.0,
                           "METEOR": 0.3444, "ROUGE_L": 0.4280, "CIDEr": 0.5637},
    "bad_captions.json": {"Bleu_1": 0.4815, "Bleu_2": 0.2404, "Bleu_3": 0.1359, "Bleu_4": 0.0,
                          "METEOR": 0.1861, "ROUGE_L": 0.3121, "CIDEr": 0.2790},
}
FILES = list(PUBLISHED)


@pytest.fixture(scope="module")
def clip(realdata: Path) -> Path:
    return realdata / "clipscore_example"


@pytest.fixture(scope="module")
def direct_scores(clip: Path) -> dict[str, dict[str, float]]:
    """pycocoevalcap's own tokenizer and scorers, run the way COCOEvalCap.evaluate runs them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = json.loads((clip / "refs.json").read_text())
    meteor = Meteor()
    out = {}
    for name in FILES:
        cands = json.loads((clip / name).read_text())
        gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in refs[k]] for k in cands})
        res = PTBTokenizer().tokenize({k: [{"caption": c}] for k, c in cands.items()})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out[name] = {**{f"Bleu_{i + 1}": bleu[i] for i in range(4)},
                     "METEOR": meteor.compute_score(gts, res)[0], "ROUGE_L": Rouge().compute_score(gts, res)[0],
                     "CIDEr": Cider().compute_score(gts, res)[0]}
    meteor.__del__()
    return out


@pytest.mark.slow
@needs_java
def test_cli_scores_equal_pycocoevalcap_and_published(clip: Path, direct_scores, tmp_path: Path) -> None:
    metrics_file = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["evaluate", "-p", str(clip / FILES[0]), "-p", str(clip / FILES[1]),
                                 "-r", str(clip / "refs.json"), "-o", str(metrics_file)], terminal_width=200)
    assert r.exit_code == 0, r.output
    got = json.loads(metrics_file.read_text())
    lines = {n: next(line for line in r.stdout.splitlines() if n in line) for n in FILES}
    for name in FILES:
        assert got[name]["scores"] == direct_scores[name]  # exactly: same tokenizer, same scorers
        assert got[name]["tokenizer"] == "ptb-java"
        for metric, value in PUBLISHED[name].items():
            assert round(got[name]["scores"][metric], 4) == value, (name, metric)
            assert f"{value:.4f}" in lines[name]  # the printed table row
        assert "SPICE" not in got[name]["scores"] or got[name]["scores"]["SPICE"] > 0


def test_java_absent_subprocess(clip: Path, tmp_path: Path) -> None:
    """No java on PATH: METEOR skipped with the reason, the pure-Python tokenizer (with a warning),
    the other metrics still the published ones."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "java").exists()]
    env = {**os.environ, "PATH": os.pathsep.join(path)}
    r = subprocess.run([sys.executable, "-m", "vgpt_cli", "evaluate", "--json", "-p", str(clip / FILES[0]),
                        "-p", str(clip / FILES[1]), "-r", str(clip / "refs.json")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "METEOR skipped: needs Java: no `java` on PATH" in r.stderr
    assert "SPICE skipped: needs Java" in r.stderr
    assert "pure-Python PTB" in r.stderr
    got = json.loads(r.stdout)
    for name in FILES:
        assert "METEOR" not in got[name]["scores"] and "SPICE" not in got[name]["scores"]
        assert got[name]["tokenizer"] == "python"
        for metric, value in PUBLISHED[name].items():
            if metric != "METEOR":
                assert round(got[name]["scores"][metric], 4) == value, (name, metric)


def test_spice_absent_is_reported_not_scored(clip: Path, tmp_path: Path) -> None:
    refs = load_references(clip / "refs.json")
    preds = load_predictions(clip / FILES[0], refs)
    logged: list[str] = []
    rep = compute_metrics(preds, refs, use_java=False, spice_dir=tmp_path, log=logged.append)
    assert "SPICE" not in rep.scores and "SPICE" in rep.skipped
    assert any(line.startswith("SPICE skipped: ") for line in logged)
    if HAVE_JAVA:  # Java present, jars absent: the reason names the missing jars
        from vgpt_cli.evaluate.metrics import spice_missing_reason

        reason = spice_missing_reason(None, tmp_path)
        assert "stanford-corenlp-3.6.0.jar" in reason and str(tmp_path) in reason
    assert rep.per_item.keys() == preds.keys()
    assert all("CIDEr" in v for v in rep.per_item.values())


def test_coco_format_files_match_simple_mappings(clip: Path, tmp_path: Path) -> None:
    refs = json.loads((clip / "refs.json").read_text())
    cands = json.loads((clip / FILES[0]).read_text())
    ids = {k: i + 1 for i, k in enumerate(refs)}  # COCO uses integer image ids
    ann = {"images": [{"id": i} for i in ids.values()],
           "annotations": [{"image_id": ids[k], "caption": c, "id": n}
                           for n, (k, c) in enumerate(((k, c) for k, v in refs.items() for c in v))]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": ids[k], "caption": c} for k, c in cands.items()]))
    coco_refs = load_references(tmp_path / "ann.json")
    coco_preds = load_predictions(tmp_path / "res.json", coco_refs)
    assert coco_refs == {str(ids[k]): v for k, v in refs.items()}
    a = compute_metrics(coco_preds, coco_refs, use_java=False, log=lambda m: None)
    b = compute_metrics(load_predictions(clip / FILES[0]), load_references(clip / "refs.json"), use_java=False,
                        log=lambda m: None)
    assert a.scores == b.scores

    # results that do not match the annotation file are refused with the file named
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 99, "caption": "a cat"}]))
    with pytest.raises(DataError, match="bad.json.*not in the references"):
        load_predictions(tmp_path / "bad.json", coco_refs)
    (tmp_path / "dup.json").write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    with pytest.raises(DataError, match="more than one caption"):
        load_predictions(tmp_path / "dup.json", coco_refs)
    r = CliRunner().invoke(app, ["evaluate", "-p", str(tmp_path / "bad.json"), "-r", str(tmp_path / "ann.json")])
    assert r.exit_code == 2 and "bad.json" in r.output and "Traceback" not in r.output


# --- the pure-Python PTB tokenizer ------------------------------------------------------------------
def test_python_tokenizer_cases() -> None:
    # expected outputs are what CoreNLP 3.4.1's PTBTokenizer -preserveLines -lowerCase writes
    assert ptb_tokens("A man's dog can't run. \"Hello,\" she said (quietly) [yes] {no}.") == \
        ["a", "man", "'s", "dog", "ca", "n't", "run", ".", "``", "hello", ",", "''", "she", "said", "-lrb-",
         "quietly", "-rrb-", "-lsb-", "yes", "-rsb-", "-lcb-", "no", "-rcb-", "."]
    assert ptb_tokens("It's 3.5 miles -- or 50% of $5... U.S. Mr. Smith & co/op a-b black-and-white") == \
        ["it", "'s", "3.5", "miles", "--", "or", "50", "%", "of", "$", "5", "...", "u.s.", "mr.", "smith", "&",
         "co/op", "a-b", "black-and-white"]
    assert ptb_tokens("Don't won't cannot gonna I'm we're") == \
        ["do", "n't", "wo", "n't", "can", "not", "gon", "na", "i", "'m", "we", "'re"]
    assert tokenize_caption("A Dog, running... on the beach!") == "a dog running on the beach"


@needs_java
def test_python_tokenizer_agrees_with_java_on_real_captions(realdata: Path) -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    flickr = [line.split("\t", 1)[1].strip() for line in
              (realdata / "flickr8k" / "Flickr8k.token.excerpt.txt").read_text().splitlines()]
    cc = [line.split("\t", 1)[0].strip() for line in
          (realdata / "cc3m_validation" / "Validation_GCC-1.1.0-Validation.head2000.tsv").read_text().splitlines()]
    assert len(flickr) + len(cc) == 3005
    lines = flickr + cc
    java = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(lines)})
    agree = sum(java[str(i)][0] == tokenize_caption(c) for i, c in enumerate(lines))
    assert agree / len(lines) >= 0.998, agree


# --- CIDEr-D -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flickr_refs(realdata: Path) -> list[list[str]]:
    by_image: dict[str, list[str]] = {}
    for line in (realdata / "flickr8k" / "Flickr8k.token.excerpt.txt").read_text().splitlines():
        key, cap = line.split("\t", 1)
        by_image.setdefault(key.split("#")[0], []).append(tokenize_caption(cap))
    return [v for v in by_image.values() if len(v) == 5]


def test_cider_d_equals_pycocoevalcap_cider(flickr_refs) -> None:
    from pycocoevalcap.cider.cider import Cider

    data = flickr_refs[:300]
    cands, refs = [r[0] for r in data], [r[1:] for r in data]  # the held-out caption as the candidate
    want, want_items = Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)})
    got, got_items = CiderD(refs, tokenize=False).score(cands, refs)
    assert got == want and np.array_equal(got_items, want_items)
    # the cache does not change anything on a second pass
    assert CiderD(refs, tokenize=False).score(cands, refs)[0] == want


def test_cider_d_fixed_corpus_matches_pycocoevalcap_scorer(flickr_refs) -> None:
    """Document frequencies from a bigger corpus: pycocoevalcap's own CiderScorer.compute_cider, with its
    df and ref_len pinned to that corpus, is the reference."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    corpus = [r[1:] for r in flickr_refs]
    cands, refs = [r[0] for r in flickr_refs[:50]], corpus[:50]
    full = CiderScorer()
    for r in corpus:
        full += (None, r)
    full.compute_doc_freq()

    class Pinned(CiderScorer):
        ref_len = property(lambda self: np.log(float(len(corpus))), lambda self, v: None)

    ref = Pinned()
    ref.document_frequency = full.document_frequency
    for c, r in zip(cands, refs):
        ref += (c, r)
    want = np.array(ref.compute_cider())
    scorer = CiderD(corpus, tokenize=False)
    mean, per = scorer.score(cands, refs)
    assert np.array_equal(per, want) and mean == pytest.approx(want.mean(), abs=1e-12)
    assert scorer.score([refs[0][0]], [refs[0]])[0] > scorer.score(["a"], [refs[0]])[0]
    with pytest.raises(DataError):
        CiderD([])
