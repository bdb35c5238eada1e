"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (and SPICE when it can run), the COCO way.

This is a thin layer over pycocoevalcap: its PTB tokenizer and its scorers, called one by one. We do not
call COCOEvalCap.evaluate, because it builds SPICE first and SPICE downloads Stanford CoreNLP (offline it
fails). What this module adds:

- SPICE runs only when its CoreNLP jars are present; otherwise the report says "SPICE skipped: <reason>"
  and carries no SPICE number at all (never a 0 passed off as a score).
- Without Java, METEOR is skipped with the reason and tokenisation falls back to the pure-Python PTB
  mimic in vgpt_cli/evaluate/tokenize.py, with a warning (scores then differ slightly from the official
  ones on unusual punctuation).
- Several prediction sets against the same references share one Java tokenizer call and one METEOR
  process (each costs a JVM start).
- `CiderD`: document frequencies computed once from a reference corpus (the training captions), then fast
  repeated scoring (SCST rewards, validation).

Metric keys are pycocoevalcap's: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocoevalcap.cider.cider_scorer import cook_refs, cook_test

from vgpt_cli.errors import DataError
from vgpt_cli.evaluate.tokenize import tokenize_caption, tokenize_captions

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@contextlib.contextmanager
def _quiet_stdout():
    """pycocotools and BleuScorer chat on stdout, which carries only results here: silence them."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


# --- what can run ----------------------------------------------------------------------------------
def java_missing_reason(java: str = "java") -> str | None:
    """None when `java` runs; otherwise why not, in a few words."""
    exe = shutil.which(java)
    if exe is None:
        return f"no `{java}` on PATH (install a Java runtime, e.g. `apt-get install default-jre-headless`)"
    try:
        subprocess.run([exe, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`{exe} -version` failed ({e})"
    return None


def spice_missing_reason(java_reason: str | None, spice_dir: Path | None = None) -> str | None:
    """None when SPICE can run offline; otherwise why not."""
    if java_reason:
        return f"needs Java: {java_reason}"
    if spice_dir is None:
        import pycocoevalcap.spice as spice_pkg

        spice_dir = Path(spice_pkg.__file__).parent
    lib = Path(spice_dir) / "lib"
    missing = [j for j in SPICE_CORENLP_JARS if not (lib / j).is_file()]
    if missing:
        return (f"Stanford CoreNLP 3.6.0 jars not in {lib} ({', '.join(missing)}); SPICE would download them "
                "(python -m pycocoevalcap.spice.get_stanford_models, needs internet)")
    return None


# --- tokenisation ----------------------------------------------------------------------------------
def ptb_tokenize(captions: Mapping[str, Sequence[str]], use_java: bool) -> dict[str, list[str]]:
    """{id: [caption, ...]} -> {id: [tokenised caption, ...]}, with pycocoevalcap's PTBTokenizer when
    `use_java`, else the pure-Python mimic."""
    if not use_java:
        return tokenize_captions({k: list(v) for k, v in captions.items()})
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {k: [{"caption": c} for c in v] for k, v in captions.items()}
    return PTBTokenizer().tokenize(data)


# --- the report ------------------------------------------------------------------------------------
@dataclass
class MetricReport:
    """Corpus scores, per-item scores, and what was skipped and why."""

    scores: dict[str, float]
    per_item: dict[str, dict[str, float]]
    skipped: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb-java"
    warnings: list[str] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return len(self.per_item)

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "skipped": self.skipped, "tokenizer": self.tokenizer,
                "warnings": self.warnings, "n_items": self.n_items}


# Captions are cut to this many words for scoring: METEOR's alignment grows much faster than linearly
# with length (one 100,000-word caption kept it busy for more than 400 s); no real caption comes near.
MAX_SCORED_WORDS = 1000


def _cap_words(text: str) -> tuple[str, bool]:
    if len(text) <= MAX_SCORED_WORDS:  # fewer characters than the cap: fewer words too
        return text, False
    words = text.split()
    if len(words) <= MAX_SCORED_WORDS:
        return text, False
    return " ".join(words[:MAX_SCORED_WORDS]), True


def _check_text(path: Path | str, key: str, text: Any, what: str) -> str:
    """A caption read from a file: a string that is valid Unicode (no lone surrogates such as
    "\\ud800", which JSON allows and no tokenizer can write out)."""
    if not isinstance(text, str):
        raise DataError(f"{path}: item {key!r}: {what} {text!r} is not a string; fix the file")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path}: item {key!r}: {what} holds an invalid character ({e.reason}, a lone "
                        f"surrogate {text[e.start]!a}); fix the file") from None
    return text


def _check_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], name: str) -> None:
    if not predictions:
        raise DataError(f"{name}: no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise DataError(f"{name}: {len(missing)} prediction id(s) have no references, e.g. {missing[0]!r}; "
                        "pass the matching --references file or split")
    empty = [k for k in predictions if not references[k]]
    if empty:
        raise DataError(f"{name}: item {empty[0]!r} has no reference captions; remove it or add references")


def compute_metrics_many(
    prediction_sets: Mapping[str, Mapping[str, str]],
    references: Mapping[str, Sequence[str]],
    *,
    use_java: bool | None = None,
    spice: bool = True,
    spice_dir: Path | None = None,
    skip: Collection[str] = (),
    log: Log = _stderr,
) -> dict[str, MetricReport]:
    """Score several prediction sets ({name: {id: caption}}) against one set of references
    ({id: [caption, ...]}). Each set is scored over its own ids. One tokenizer call and one METEOR
    process serve all sets. `use_java=None` detects Java; False forces the pure-Python path.
    `skip`: metric names not to compute ("METEOR", "SPICE"), reported as skipped."""
    for name, preds in prediction_sets.items():
        _check_inputs(preds, references, name)
    java_reason = java_missing_reason() if use_java in (None, True) else "Java turned off by the caller"
    if use_java and java_reason:
        raise DataError(f"Java was required but cannot run: {java_reason}")
    java_ok = java_reason is None
    warnings: list[str] = []
    skipped: dict[str, str] = {}

    # One tokenizer call for references and every prediction set (keys tagged so they cannot collide).
    needed = dict.fromkeys(k for preds in prediction_sets.values() for k in preds)
    batch: dict[str, list[str]] = {f"r\0{k}": list(references[k]) for k in needed}
    for i, preds in enumerate(prediction_sets.values()):
        batch.update({f"p{i}\0{k}": [v] for k, v in preds.items()})
    cut = 0
    for texts in batch.values():
        for j, text in enumerate(texts):
            texts[j], was_cut = _cap_words(text)
            cut += was_cut
    if cut:
        warnings.append(f"{cut} caption(s) longer than {MAX_SCORED_WORDS:,} words were cut to their first "
                        f"{MAX_SCORED_WORDS:,} words for scoring")
    tokenizer = "ptb-java"
    if java_ok:
        try:
            tok = ptb_tokenize(batch, use_java=True)
            if tok.keys() != batch.keys() or any(len(tok[k]) != len(v) for k, v in batch.items()):
                raise OSError("its output lines do not match the input captions")
        except (OSError, subprocess.SubprocessError) as e:  # e.g. a read-only site-packages
            java_ok, java_reason = False, f"the Java PTB tokenizer failed ({e})"
    if not java_ok:
        tokenizer = "python"
        tok = ptb_tokenize(batch, use_java=False)
        warnings.append(f"Java PTB tokenizer unavailable ({java_reason}); used the pure-Python PTB mimic: "
                        "scores may differ slightly from the official coco-caption ones")
        skipped["METEOR"] = f"needs Java: {java_reason}"
    spice_reason = spice_missing_reason(None if java_ok else java_reason, spice_dir) if spice else "not requested"
    if spice_reason:
        skipped["SPICE"] = spice_reason
    for metric in skip:
        if metric not in ("METEOR", "SPICE"):
            raise ValueError(f"skip={metric!r}: only METEOR and SPICE can be skipped")
        skipped.setdefault(metric, "not requested")
    for w in warnings:
        log(f"warning: {w}")
    for metric, why in skipped.items():
        log(f"{metric} skipped: {why}")

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    meteor = None
    if "METEOR" not in skipped:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
    reports: dict[str, MetricReport] = {}
    try:
        for i, (name, preds) in enumerate(prediction_sets.items()):
            ids = list(preds)
            gts = {k: tok[f"r\0{k}"] for k in ids}
            res = {k: tok[f"p{i}\0{k}"] for k in ids}
            scores: dict[str, float] = {}
            per_item: dict[str, dict[str, float]] = {k: {} for k in ids}
            set_skipped = dict(skipped)

            def put(metric: str, score: float, item_scores: Iterable[float],
                    scores=scores, per_item=per_item, ids=ids) -> None:
                scores[metric] = float(score)
                for k, s in zip(ids, item_scores):
                    per_item[k][metric] = float(s)

            with _quiet_stdout():
                bleu, bleus = Bleu(4).compute_score(gts, res, verbose=0)
            for n in range(4):
                put(f"Bleu_{n + 1}", bleu[n], bleus[n])
            if meteor is not None:
                put("METEOR", *meteor.compute_score(gts, res))
            put("ROUGE_L", *Rouge().compute_score(gts, res))
            put("CIDEr", *Cider().compute_score(gts, res))
            if "SPICE" not in set_skipped:
                try:
                    from pycocoevalcap.spice.spice import Spice

                    with _quiet_stdout():
                        s, item = Spice().compute_score(gts, res)
                    put("SPICE", s, [d["All"]["f"] for d in item])
                except Exception as e:  # SPICE is optional: a failure is reported, never fatal
                    set_skipped["SPICE"] = f"SPICE failed ({type(e).__name__}: {e})"
                    log(f"SPICE skipped: {set_skipped['SPICE']}")
            reports[name] = MetricReport(scores=scores, per_item=per_item, skipped=set_skipped,
                                         tokenizer=tokenizer, warnings=list(warnings))
    finally:
        if meteor is not None:
            meteor.__del__()  # stops the Java process now, not whenever the object is collected
    return reports


def compute_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    use_java: bool | None = None,
    spice: bool = True,
    spice_dir: Path | None = None,
    skip: Collection[str] = (),
    log: Log = _stderr,
) -> MetricReport:
    """Score {id: caption} against {id: [reference, ...]} over the predicted ids."""
    return compute_metrics_many({"predictions": predictions}, references, use_java=use_java, spice=spice,
                                spice_dir=spice_dir, skip=skip, log=log)["predictions"]


# --- files -----------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); fix or regenerate the file") from e


def _coco_from_references(references: Mapping[str, Sequence[str]]):
    """An in-memory pycocotools COCO object with string image ids, for loadRes validation."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": k} for k in references],
        "annotations": [{"image_id": k, "caption": c, "id": i}
                        for i, (k, c) in enumerate(((k, c) for k, v in references.items() for c in v), 1)],
    }
    with _quiet_stdout():
        coco.createIndex()
    return coco


def load_references(path: Path) -> dict[str, list[str]]:
    """Ground-truth captions from a COCO-format annotation file ({"images", "annotations": [{"image_id",
    "caption"}]}, read with pycocotools) or a JSON mapping {"image id": ["ref", ...]} (or one string).
    Ids become strings."""
    path = Path(path)
    raw = _read_json(path)
    if isinstance(raw, dict) and "annotations" in raw:
        from pycocotools.coco import COCO

        try:
            with _quiet_stdout():
                coco = COCO(str(path))
            refs: dict[str, list[str]] = {}
            for img_id in coco.getImgIds() or list(coco.imgToAnns):
                caps = [_check_text(path, str(img_id), a["caption"], "reference caption")
                        for a in coco.imgToAnns.get(img_id, [])]
                if caps:
                    refs[str(img_id)] = caps
            for img_id, anns in coco.imgToAnns.items():  # annotation files without an "images" list
                refs.setdefault(str(img_id), [_check_text(path, str(img_id), a["caption"], "reference caption")
                                              for a in anns])
        except (KeyError, TypeError, AssertionError) as e:
            raise DataError(f"{path}: not a COCO caption annotation file (missing {e}); each annotation needs "
                            "'image_id' and 'caption'") from e
        if not refs:
            raise DataError(f"{path}: no caption annotations found")
        return refs
    if isinstance(raw, dict) and raw:
        refs = {}
        for k, v in raw.items():
            caps = [v] if isinstance(v, str) else v
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
                raise DataError(f"{path}: item {k!r} must map to a caption or a non-empty list of captions")
            refs[str(k)] = [_check_text(path, str(k), c, "reference caption") for c in caps]
        return refs
    raise DataError(f"{path}: expected a COCO annotation file or a JSON object {{\"image id\": [\"ref\", ...]}}")


def load_predictions(path: Path, references: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """Candidate captions from a COCO results file ([{"image_id", "caption"}]) or a JSON mapping
    {"image id": "caption"}. With `references`, the ids are validated with pycocotools' loadRes."""
    path = Path(path)
    raw = _read_json(path)
    if isinstance(raw, list):
        preds: dict[str, str] = {}
        for i, r in enumerate(raw):
            if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
                raise DataError(f"{path}: result #{i} is not {{\"image_id\": ..., \"caption\": \"...\"}}")
            k = str(r["image_id"])
            if k in preds:
                raise DataError(f"{path}: image_id {k!r} has more than one caption; keep one per image")
            preds[k] = _check_text(path, k, r["caption"], "caption")
    elif isinstance(raw, dict):
        preds = {}
        for k, v in raw.items():
            if isinstance(v, list) and len(v) == 1:
                v = v[0]
            if not isinstance(v, str):
                raise DataError(f"{path}: item {k!r} must map to one caption string")
            preds[str(k)] = _check_text(path, str(k), v, "caption")
    else:
        raise DataError(f"{path}: expected a COCO results list or a JSON object {{\"image id\": \"caption\"}}")
    if not preds:
        raise DataError(f"{path}: no predictions in the file")
    if references is not None:
        missing = [k for k in preds if k not in references]
        if missing:
            raise DataError(f"{path}: {len(missing)} image id(s) are not in the references, e.g. {missing[0]!r}; "
                            "check that predictions and references are for the same images")
        coco = _coco_from_references(references)
        try:
            with _quiet_stdout():
                coco.loadRes([{"image_id": k, "caption": v} for k, v in preds.items()])
        except (AssertionError, KeyError) as e:
            raise DataError(f"{path}: pycocotools rejected the results ({e})") from e
    return preds


def coco_results(predictions: Mapping[str, str]) -> list[dict[str, Any]]:
    """{id: caption} -> the COCO results format, with integer image ids where the id is a number."""
    return [{"image_id": int(k) if k.isdigit() else k, "caption": v} for k, v in predictions.items()]


# --- CIDEr-D with a fixed document-frequency corpus ------------------------------------------------
class CiderD:
    """CIDEr-D with document frequencies from a fixed reference corpus, for many fast scorings.

    Built once from the training captions (one list of references per image), it then scores candidate
    sets against their references: `CiderD(corpus).score(candidates, refs) -> (mean, per_item)`. The
    arithmetic is pycocoevalcap's CiderScorer (its n-gram cooking is reused, and the tf-idf vectors,
    clipping, gaussian length penalty with sigma 6, and the quirk of taking the bigram count as the length,
    are reproduced operation by operation), so with the corpus equal to the scored references it returns
    exactly what pycocoevalcap's Cider returns. Reference vectors are cached, as SCST scores the same
    images again and again.

    tokenize: run the pure-Python PTB tokenizer (lower-case, punctuation removed) over corpus, candidates
    and references first; pass False when the text is already tokenised.
    """

    def __init__(self, refs_corpus: Iterable[Sequence[str]], n: int = 4, sigma: float = 6.0,
                 tokenize: bool = True) -> None:
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        df: dict[tuple[str, ...], float] = {}
        n_docs = 0
        for refs in refs_corpus:
            n_docs += 1
            cooked = cook_refs([self._tok(r) for r in refs], n)
            for ngram in {g for ref in cooked for g in ref}:
                df[ngram] = df.get(ngram, 0.0) + 1
        if n_docs == 0:
            raise DataError("CIDEr-D needs a non-empty reference corpus (the training captions)")
        self.n_docs = n_docs
        self.ref_len = np.log(float(n_docs))
        self._weight = {g: self.ref_len - np.log(max(1.0, c)) for g, c in df.items()}
        self._ref_cache: dict[tuple[str, ...], list[tuple[list[dict], list[float], int]]] = {}

    def _tok(self, text: str) -> str:
        return tokenize_caption(text) if self.tokenize else text

    def _vec(self, counts: Mapping[tuple[str, ...], int]) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            v = float(tf) * self._weight.get(ngram, self.ref_len)
            vec[k][ngram] = v
            norm[k] += pow(v, 2)
            if k == 1:
                length += tf
        return vec, [np.sqrt(x) for x in norm], length

    def _sim(self, hyp, ref) -> np.ndarray:
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        delta = float(lh - lr)
        val = np.array([0.0] * self.n)
        for k in range(self.n):
            rk = vr[k]
            for ngram, v in vh[k].items():
                r = rk.get(ngram, 0.0)
                val[k] += min(v, r) * r
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= np.e ** (-(delta**2) / (2 * self.sigma**2))
        return val

    def _refs(self, refs: Sequence[str]):
        key = tuple(refs)
        got = self._ref_cache.get(key)
        if got is None:
            got = [self._vec(c) for c in cook_refs([self._tok(r) for r in refs], self.n)]
            self._ref_cache[key] = got
        return got

    def score_one(self, candidate: str, refs: Sequence[str]) -> float:
        hyp = self._vec(cook_test(self._tok(candidate), self.n))
        ref_vecs = self._refs(refs)
        if not ref_vecs:
            raise DataError("CIDEr-D: an item has no reference captions")
        score = np.array([0.0] * self.n)
        for rv in ref_vecs:
            score += self._sim(hyp, rv)
        return float(np.mean(score) / len(ref_vecs) * 10.0)

    def score(self, candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
        """Mean CIDEr-D and the per-candidate array; refs[i] are the references of candidates[i]."""
        if len(candidates) != len(refs):
            raise ValueError(f"{len(candidates)} candidates but {len(refs)} reference lists")
        per = np.array([self.score_one(c, r) for c, r in zip(candidates, refs)], dtype=np.float64)
        return (float(per.mean()) if len(per) else 0.0), per
