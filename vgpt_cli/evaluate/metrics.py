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

Reading reference and prediction files is in caption_files.py, `CiderD` (fixed document frequencies, for
training) in cider_d.py; both stay importable from here.

Metric keys are pycocoevalcap's: Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr, SPICE.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgpt_cli.errors import DataError
from vgpt_cli.evaluate.caption_files import _quiet_stdout
from vgpt_cli.evaluate.caption_files import coco_results as coco_results
from vgpt_cli.evaluate.caption_files import load_predictions as load_predictions
from vgpt_cli.evaluate.caption_files import load_references as load_references
from vgpt_cli.evaluate.cider_d import CiderD as CiderD
from vgpt_cli.evaluate.tokenize import tokenize_captions

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


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


def compute_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                    **options: Any) -> MetricReport:
    """Score {id: caption} against {id: [reference, ...]} over the predicted ids; `options` are
    compute_metrics_many's (use_java, spice, spice_dir, skip, log)."""
    return compute_metrics_many({"predictions": predictions}, references, **options)["predictions"]
