"""VQAv2 accuracy (the official metric, as in the VQA evaluation code that LAVIS ships in ``vqa_tools``).

Per question, with the human answers ``a_1 .. a_n`` (n = 10 in VQAv2)::

    acc = mean over i of min(1, #{j != i : a_j == prediction} / 3)

i.e. ``min(1, matches / 3)`` averaged over the n leave-one-annotator-out subsets. With ``m`` of 10
answers matching this is 0.3 (m = 1), 0.6 (m = 2), 0.9 (m = 3) and 1.0 (m >= 4).

Normalisation (:func:`normalize_vqa_answer`) follows the official evaluation, quirks included:

1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space or
   the answer contains a digit-comma-digit group anywhere, otherwise replaced by a space; a
   period not followed by a digit is deleted (``"3.5"`` keeps its point), at most 32 of them;
3. lower-case, number words ``none, zero .. ten`` become digits, articles ``a an the`` are dropped,
   and common apostrophe-less contractions are restored (``"dont"`` -> ``"don't"``).

Official gold-answer handling: only the punctuation step, and only when the answers are not all
identical. :func:`vqa_accuracy` does exactly this by default (the number to report: VQAv2 annotation
answers are not all fully normalised, e.g. some keep an article, so full gold normalisation would
score higher than the official code); ``official_gold_processing=False`` normalises gold answers
like the prediction, for raw answer lists (e.g. ``"Two"``).
"""
from __future__ import annotations

import re
from typing import Dict, Sequence

__all__ = ["normalize_vqa_answer", "vqa_accuracy", "vqa_punctuation", "vqa_digits_articles"]

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern "(?!<=\d)(\.)(?!\d)" meant a look-behind but is a look-ahead that never
# fires at a ".", so it removes every period not followed by a digit; this is the same pattern.
_PERIOD = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE (= 32) as the `count` argument of sub().
_PERIOD_MAX_REMOVALS = 32

# Apostrophe-less spellings -> canonical contraction, as in the official evaluation (including its
# oddities: capitalised keys never match after lower-casing, and "somebody'd" maps to "somebodyd").
_CONTRACTION_TABLE = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't
couldn'tve couldn't've | couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't
hadnt hadn't | hadnt've hadn't've | hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd
hed've he'd've | he'dve he'd've | hes he's | howd how'd | howll how'll | hows how's
Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd | itd've it'd've
it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't | mightnt've mightn't've
mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've | neednt needn't
notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's
shouldve should've | shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've
somebody'd somebodyd | somebodyd've somebody'd've | somebody'dve somebody'd've
somebodyll somebody'll | somebodys somebody's | someoned someone'd | someoned've someone'd've
someone'dve someone'd've | someonell someone'll | someones someone's | somethingd something'd
somethingd've something'd've | something'dve something'd've | somethingll something'll
thats that's | thered there'd | thered've there'd've | there'dve there'd've | therere there're
theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've
weve we've | werent weren't | whatll what'll | whatre what're | whats what's | whatve what've
whens when's | whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've
who'dve who'd've | wholl who'll | whos who's | whove who've | whyll why'll | whyre why're
whys why's | wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've
wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've
y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd | youd've you'd've | you'dve you'd've
youll you'll | youre you're | youve you've
"""


def _parse_contractions(table: str) -> Dict[str, str]:
    pairs = (item.split() for item in table.replace("\n", " | ").split("|") if item.strip())
    return {key: value for key, value in pairs}


_CONTRACTIONS = _parse_contractions(_CONTRACTION_TABLE)


def vqa_punctuation(text: str) -> str:
    """Step 2 of the normalisation (the official ``processPunctuation``)."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The test looks at the original text, not at the partly processed one (as officially).
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVALS)


def vqa_digits_articles(text: str) -> str:
    """Step 3 of the normalisation (the official ``processDigitArticle``)."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer string as the official VQA evaluation does for predictions.

    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], official_gold_processing: bool = True) -> float:
    """VQA accuracy of one prediction against the human answers, as a fraction in [0, 1].

    Args:
        prediction: the model's answer (normalised here).
        answers: the human answers (10 in VQAv2; any number >= 1 works, e.g. OK-VQA's 5x2).
        official_gold_processing: ``True`` (default) applies only the punctuation step to the
            answers, and only when they differ, as the official code does; ``False`` normalises
            the answers exactly like the prediction.

    Returns:
        ``mean_i min(1, #{j != i : answers[j] == prediction} / 3)``. With a single answer there is
        nothing left after leaving it out, so the official formula gives 0: use exact match for
        single-reference data.
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    if official_gold_processing:
        gold = [vqa_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    else:
        gold = [normalize_vqa_answer(a) for a in answers]
    matches = sum(g == pred for g in gold)
    # Leaving out a matching answer removes one match; leaving out any other removes none.
    total = 0.0
    for g in gold:
        others = matches - (g == pred)
        total += min(1.0, others / 3.0)
    return total / len(gold)
