"""Alignment metrics of the visual logit lens, per layer, from each patch's nearest tokens.

Inputs, per image: the nearest token's text of every patch (row-major), optionally its top-5 texts,
and optionally a label per patch (``None``: unlabelled; a string or a list of strings: the words
that name the patch, e.g. ``["red", "circle"]``). A token's *word* is its text with surrounding
white space and the tokenizer's word-start markers (``Ġ`` byte-level BPE, ``▁`` SentencePiece,
``##`` WordPiece continuation) removed, lower-cased.

* ``meaningful`` -- share of all patches (all images) whose nearest token is a meaningful word:
  alphabetic (``str.isalpha``), at least 3 letters, not a stop word (:data:`STOP_WORDS`)
  (METHOD.md, "Analysis the paper shows").
* ``grounded`` -- share of the *labelled* patches whose nearest token names one of the patch's
  label words: equal to the word or to one of its synonyms (:data:`SYNONYMS`, e.g. gray / grey),
  or to their plural (+s / +es). ``None`` when no patch is labelled. ``grounded_top5``: the same
  with any of the 5 nearest tokens.
* ``distinct_per_image`` -- number of distinct nearest tokens in an image, averaged over the
  images (a model whose patches all map to one "hub" token scores 1). ``distinct_share``: the
  same divided by the image's patch count.
* ``top_token_share`` -- share of an image's patches taken by its most frequent nearest token,
  averaged over the images (1.0: one hub token everywhere).

Plain Python; no torch needed.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional, Sequence, Union

Label = Union[None, str, Sequence[str]]

WORD_START_MARKERS = ("\u0120", "\u2581", "##")  # Ġ, ▁, ##

# English function words (articles, pronouns, prepositions, conjunctions, auxiliaries, common adverbs);
# only words of >= 3 letters matter for the rule, the short ones are listed for completeness.
STOP_WORDS = frozenset("""
a about above after again against all almost also although always am among an and another any anyone
anything are around as at be because been before being below between both but by can cannot could
did do does doing done down during each either else enough even ever every few for from further
had has have having he her here hers herself him himself his how however i if in into is it its
itself just least less let like many may me might more most much must my myself neither never no nor
not now of off often on once one only onto or other others otherwise our ours ourselves out over own
per perhaps rather same shall she should since so some such than that the their theirs them
themselves then there these they this those though through thus to too toward towards under until
up upon us very via was we were what whatever when where whether which while who whom whose why will
with within without would yet you your yours yourself yourselves
""".split())

# Words that name the same colour or shape (each group: any member names every other).
SYNONYM_GROUPS = (
    ("gray", "grey"),
    ("purple", "violet"),
    ("circle", "circular", "round", "disc", "disk"),
    ("square", "squared"),
    ("triangle", "triangular"),
    ("white",), ("black",), ("red",), ("green",), ("blue",), ("yellow",), ("orange",),
)
SYNONYMS = {w: frozenset(g) for g in SYNONYM_GROUPS for w in g}


def word(token_text: str) -> str:
    """The token's word: white space and word-start markers stripped, lower-cased."""
    t = token_text.strip()
    for mark in WORD_START_MARKERS:
        if t.startswith(mark):
            t = t[len(mark):]
    return t.strip().lower()


def is_meaningful(token_text: str) -> bool:
    w = word(token_text)
    return len(w) >= 3 and w.isalpha() and w not in STOP_WORDS


def label_words(label: Label) -> Optional[frozenset]:
    """The set of words that name a patch with this label (synonyms and plurals included), or None."""
    if label is None:
        return None
    words = [label] if isinstance(label, str) else list(label)
    out = set()
    for w in words:
        w = word(str(w))
        if not w:
            continue
        for s in SYNONYMS.get(w, frozenset([w])):
            out.update((s, s + "s", s + "es"))
    return frozenset(out)


def names(token_text: str, label: Label) -> bool:
    words = label_words(label)
    return bool(words) and word(token_text) in words


def image_metrics(tokens: Sequence[str], labels: Optional[Sequence[Label]] = None,
                  top5: Optional[Sequence[Sequence[str]]] = None, ids: Optional[Sequence[int]] = None) -> dict:
    """Counts of one image at one layer (summed over images by :func:`combine`). ``ids``: the token
    ids, when given counted instead of the texts for ``distinct`` / ``top`` (two ids may decode alike)."""
    n = len(tokens)
    if ids is not None and len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} patches")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} patches")
    counts = Counter(tokens if ids is None else ids)
    out = {"patches": n, "meaningful": sum(is_meaningful(t) for t in tokens),
           "distinct": len(counts), "top": max(counts.values()) if counts else 0,
           "labelled": 0, "grounded": 0, "grounded_top5": 0}
    if labels is not None:
        for i, lab in enumerate(labels):
            words = label_words(lab)
            if words is None:
                continue
            out["labelled"] += 1
            out["grounded"] += word(tokens[i]) in words
            if top5 is not None:
                out["grounded_top5"] += any(word(t) in words for t in top5[i][:5])
    out["has_top5"] = top5 is not None
    return out


def combine(per_image: Iterable[dict]) -> dict:
    """The layer's metrics from the per-image counts (definitions in the module docstring)."""
    per_image = list(per_image)
    if not per_image:
        raise ValueError("no images")
    patches = sum(c["patches"] for c in per_image)
    labelled = sum(c["labelled"] for c in per_image)
    n = len(per_image)
    out = {
        "meaningful": sum(c["meaningful"] for c in per_image) / patches if patches else 0.0,
        "grounded": (sum(c["grounded"] for c in per_image) / labelled) if labelled else None,
        "distinct_per_image": sum(c["distinct"] for c in per_image) / n,
        "top_token_share": sum(c["top"] / c["patches"] for c in per_image if c["patches"]) / n,
        "distinct_share": sum(c["distinct"] / c["patches"] for c in per_image if c["patches"]) / n,
        "grounded_top5": None,
        "patches": patches,
        "labelled_patches": labelled,
    }
    if labelled and all(c["has_top5"] for c in per_image):
        out["grounded_top5"] = sum(c["grounded_top5"] for c in per_image) / labelled
    return out


def layer_metrics(tokens_per_image: Sequence[Sequence[str]], labels_per_image=None, top5_per_image=None) -> dict:
    """The metrics of one layer over several images (lists aligned with the images)."""
    labels_per_image = labels_per_image or [None] * len(tokens_per_image)
    top5_per_image = top5_per_image or [None] * len(tokens_per_image)
    return combine(image_metrics(t, l, k) for t, l, k in zip(tokens_per_image, labels_per_image, top5_per_image))


__all__ = ["STOP_WORDS", "SYNONYMS", "combine", "image_metrics", "is_meaningful", "label_words", "layer_metrics",
           "names", "word"]
