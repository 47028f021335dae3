"""Caption metric: CIDEr (pycocoevalcap's ``Cider``, i.e. CIDEr-D) on captions tokenised in Python.

pycocoevalcap's usual pipeline first runs its ``PTBTokenizer``, a Java program (Stanford CoreNLP);
there is no Java here, so :func:`caption_tokens` is the one tokeniser every caption goes through
instead: lower-case, every ASCII punctuation character replaced by a space, split on whitespace.
It differs from PTB on contractions and possessives (PTB splits ``"man's"`` into ``man 's``, we
give ``man s``) and on non-ASCII punctuation; scores are therefore close to, not equal to, the
numbers of the official COCO evaluation.

CIDEr-D as pycocoevalcap computes it, for a candidate ``c`` of image ``i`` with references ``S_i``::

    g_k(s) = tf_k(s) * log(|I| / max(1, df_k))      tf-idf of each n-gram (n = 1..4); df over the images' references
    CIDEr_n = 10 / |S_i| * sum_j  exp(-(l(c) - l(s_j))^2 / (2 * 6^2)) * <min(g(c), g(s_j)), g(s_j)> / (|g(c)| |g(s_j)|)
    CIDEr   = mean over n = 1..4 of CIDEr_n;  the corpus score is the mean over images

The idf is computed on the references of the scored images themselves, so a corpus score depends on
which images are scored together (compare methods on the same queries).
"""
from __future__ import annotations

import string
from typing import Hashable, Mapping, Sequence

__all__ = ["caption_tokens", "cider"]

_PUNCTUATION = str.maketrans({character: " " for character in string.punctuation})


def caption_tokens(text: str) -> str:
    """``text`` lower-cased, ASCII punctuation replaced by spaces, words joined by single spaces."""
    return " ".join(str(text).lower().translate(_PUNCTUATION).split())


def cider(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> tuple[float, dict]:
    """Corpus CIDEr-D of one predicted caption per image against its reference captions.

    Args:
        predictions: image key -> the generated caption.
        references: image key -> its reference captions (at least one); the same keys as ``predictions``.

    Returns:
        ``(corpus score, {key: per-image score})``, on pycocoevalcap's scale (x 10 inside; a perfect
        caption of a large corpus scores well above 1; papers report it x 100).

    Raises:
        ValueError: the keys differ, or an image has no reference.
    """
    from pycocoevalcap.cider.cider import Cider

    keys = list(predictions)
    if set(keys) != set(references):
        missing, extra = sorted(map(str, set(keys) - set(references))), sorted(map(str, set(references) - set(keys)))
        raise ValueError(f"cider: predictions and references name different images (no references for {missing[:5]}, "
                         f"no prediction for {extra[:5]})")
    if not keys:
        raise ValueError("cider: no predictions")
    empty = [str(k) for k in keys if not references[k]]
    if empty:
        raise ValueError(f"cider: images without reference captions: {empty[:5]}")
    # pycocoevalcap indexes by key and iterates in the order of the reference dict: make both explicit.
    gts = {index: [caption_tokens(r) for r in references[key]] for index, key in enumerate(keys)}
    res = {index: [caption_tokens(predictions[key])] for index, key in enumerate(keys)}
    corpus, per_image = Cider().compute_score(gts, res)
    return float(corpus), {key: float(per_image[index]) for index, key in enumerate(keys)}
