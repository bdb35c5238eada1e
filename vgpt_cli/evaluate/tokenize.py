"""A pure-Python stand-in for the coco-caption PTB tokenizer, used only when Java is absent.

pycocoevalcap tokenises with Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`) and then
drops the tokens in its PUNCTUATIONS list. This module mimics both steps:

- contractions are split the PTB way ("can't" -> "ca n't", "man's" -> "man 's", "cannot" -> "can not");
- punctuation is split off words, but numbers ("3.5", "1,000", "5:30", "3/4/2010"), hyphenated and
  slashed words ("black-and-white", "co/op") and letter-dot abbreviations ("u.s.", "p.m.") stay whole;
- brackets become -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- (lower-cased, as the Java tool writes them; the
  punctuation filter lists only the upper-case forms, so like pycocoevalcap we keep the lower-case ones);
- quotes become `` '' ` ', unicode dashes "--", the ellipsis "...", pound "#" and euro "$" (CoreNLP's
  currency normalisation);
- then everything is lower-cased and the PUNCTUATIONS tokens are removed.

On 42,000 real captions (Flickr8k and CC3M validation) it agrees with the Java tokenizer on 99.9%
of the lines (tests/test_metrics.py checks this when Java is there); scores computed with it are close to,
but not guaranteed identical to, the official ones, which is why the evaluation warns when it is used.
"""

from __future__ import annotations

import re

from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

_PUNCT = frozenset(PUNCTUATIONS)

# Characters CoreNLP rewrites before tokenising.
_CHAR_MAP = str.maketrans({
    "\u201c": ' " ', "\u201d": ' " ', "\u201e": ' " ', "\u00ab": ' " ', "\u00bb": ' " ',
    "\u2018": "'", "\u2019": "'", "\u201a": "'",
    "\u2013": " -- ", "\u2014": " -- ", "\u2015": " -- ",
    "\u2026": " ... ",
    "\u00a3": " # ", "\u20ac": " $ ",
    "\u00a0": " ",
})

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# Known abbreviations that keep their period (a subset of CoreNLP's list that shows up in captions).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof mt ft vs etc inc ltd co corp gen gov sen rep rev sgt capt col lt "
    "jan feb mar apr aug sep sept oct nov dec".split()
)

_W = r"[^\W_]"  # a letter or digit, any script
_TOKEN = re.compile(
    r"""
    (?P<emoticon>[:;=]'?[()](?!\w))                  # :)  ;)  :'(  -> one token, like CoreNLP
  | (?P<url>https?://\S+|www\.\S+)
  | (?P<num>\d+(?:[.,:/]\d+)+(?!\w))                   # 3.5  1,000  5:30  3/4/2010
  | (?P<abbr>(?:[^\W\d_]\.){2,})                       # u.s.  p.m.
  | (?P<word>""" + _W + r"""+(?:(?:[-'&/@.]|\.(?=""" + _W + r"""))""" + _W + r"""+)*(?:\.(?!\.))?)
  | (?P<ellipsis>\.{2,})
  | (?P<dashes>-{2,})
  | (?P<quotes>``|'')
  | (?P<other>\S)
    """,
    re.VERBOSE,
)

_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$")
_CONTRACTION_CHUNK = re.compile(r"(?i)^(n't|'s|'m|'d|'re|'ve|'ll)$")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}


def _word_tokens(word: str) -> list[str]:
    trailing: list[str] = []
    if word.endswith("."):
        stem = word[:-1]
        if stem.lower() in _ABBREVIATIONS:
            return [word]
        word, trailing = stem, ["."]
    low = word.lower()
    if low in _SPLIT_WORDS:
        a, b = _SPLIT_WORDS[low]
        return [word[: len(a)], word[len(a):], *trailing]
    m = _CONTRACTION.match(word)
    if m and m.group(1)[-1:].isalnum():
        return [m.group(1), m.group(2), *trailing]
    return [word, *trailing]


def ptb_tokens(text: str) -> list[str]:
    """The PTB tokens of one caption, lower-cased, before punctuation removal."""
    text = text.translate(_CHAR_MAP)
    out: list[str] = []
    for chunk in text.split():
        if _CONTRACTION_CHUNK.match(chunk):  # already split: "man 's", "do n't"
            out.append(chunk)
            continue
        at_start = True
        for m in _TOKEN.finditer(chunk):
            kind, tok = m.lastgroup, m.group()
            if kind == "word":
                out.extend(_word_tokens(tok))
            elif kind == "ellipsis":
                out.append("...")
            elif kind == "other":
                if tok in "\"'":
                    # CoreNLP: a quote that opens a word is an opening quote, otherwise a closing one
                    opening = m.end() < len(chunk) and (at_start or tok == '"')
                    out.append(("``" if tok == '"' else "`") if opening else ("''" if tok == '"' else "'"))
                elif tok in _BRACKETS:
                    out.append(_BRACKETS[tok])
                else:
                    out.append(tok)
            elif kind == "emoticon":
                out.append(tok[:-1] + _BRACKETS[tok[-1]])
            else:
                out.append(tok)
            at_start = tok in _BRACKETS or tok == '"'
    return [t.lower() for t in out]


def tokenize_caption(text: str) -> str:
    """One caption as pycocoevalcap's PTBTokenizer.tokenize returns it: tokens joined by spaces,
    punctuation removed."""
    return " ".join(t for t in ptb_tokens(text.replace("\n", " ")) if t not in _PUNCT)


def tokenize_captions(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """The pure-Python counterpart of PTBTokenizer().tokenize over {id: [caption, ...]}."""
    return {k: [tokenize_caption(c) for c in v] for k, v in captions.items()}
