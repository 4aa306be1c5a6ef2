"""Metrics of an open-ended answer against a reference text: ROUGE-L (Google's `rouge-score`), token F1 and exact match
(SQuAD's definitions). Each returns a float in [0, 1] for one (prediction, reference) pair."""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(ARTICLES.sub(" ", text.lower().translate(PUNCTUATION)).split())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the normalised tokens (multiset overlap), as in SQuAD; 1.0 when both
    are empty."""
    predicted, gold = normalize_text(prediction).split(), normalize_text(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised texts are equal, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of tokens, Porter-stemmed), by `rouge-score`."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


REFERENCE_METRICS = {"rouge_l": rouge_l, "token_f1": token_f1, "exact_match": exact_match}
