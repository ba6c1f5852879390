"""Task metrics over predictions and references: pure functions, no model.

    normalize_answer("The Cat, sat!")      # 'cat sat'  (SQuAD's normaliser)
    exact_match("the cat", ["Cat"])        # 1.0
    token_f1("cat sat", ["the cat"])       # 0.667
    final_answer("... so 4 + 81\\n#### 85") # '85'
    pass_at_k(n=5, c=2, k=1)               # 0.4   (Chen et al. 2021, unbiased)
    majority_vote(["85", "84", " 85"])     # '85'
    check_working("47 + 38 = 85\\n#### 85") # True   (the calculator: every "x op y = z" recomputed)

Each per-row metric takes one prediction and a list of references and keeps the best reference (as
SQuAD does with several gold answers). The normaliser is SQuAD v1.1's evaluation script's: lowercase,
drop ASCII punctuation (string.punctuation), drop the articles a/an/the as whole words, collapse
whitespace. Corpus metrics (BLEU, chrF) are sacrebleu's corpus scores on 0-100, ROUGE-L is
rouge-score's F-measure (its own tokenizer: lowercase, non-alphanumeric characters are separators,
no stemming) averaged over rows.
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np

ANSWER_MARK = "####"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# "x op y = z" with integers, op one of + - * x ×
EQUATION = re.compile(r"(?<![\d.])(-?\d+)\s*([-+*x×])\s*(-?\d+)\s*=\s*(-?\d+)(?![\d.])")
_CALC = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def normalize_answer(text: str) -> str:
    """SQuAD's normaliser: lowercase, strip punctuation, then articles, then collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def final_answer(text: str, mark: str = ANSWER_MARK) -> str:
    """The structured answer: the text after the last `mark` (GSM8K's '#### 85'), to the end of that
    line, stripped; a text without the mark is its own answer, stripped."""
    if mark in text:
        text = text.rsplit(mark, 1)[1]
        text = text.strip().split("\n", 1)[0]
    return text.strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised reference, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD's token F1 over normalised whitespace tokens (multiset overlap), best reference; an empty
    side scores 1.0 only when both are empty (SQuAD v2's rule)."""
    best = 0.0
    p = normalize_answer(prediction).split()
    for ref in references:
        r = normalize_answer(ref).split()
        if not p or not r:
            best = max(best, float(p == r))
            continue
        same = sum((collections.Counter(p) & collections.Counter(r)).values())
        if same:
            precision, recall = same / len(p), same / len(r)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (longest common subsequence, rouge-score), best reference."""
    return _rouge().score_multi(list(references), prediction)["rougeL"].fmeasure


def _rouge():
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _ROUGE


_ROUGE = None


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Rows of references -> sacrebleu's streams (stream j holds every row's j-th reference; None
    where a row has fewer)."""
    width = max(len(r) for r in references)
    return [[r[j] if j < len(r) else None for r in references] for j in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100: 4-gram, brevity penalty, its 13a tokenizer, no smoothing beyond
    its default 'exp')."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score)


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus chrF (0-100: character 6-grams, beta 2)."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. 2021: 1 - C(n-c, k) / C(n, k), the chance that k of the n
    samples drawn without replacement hold at least one of the c correct ones (as their numpy form)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(answers: Sequence[str]) -> str:
    """Self-consistency's vote: the most frequent normalised answer (a tie goes to the one seen
    first); returns that answer as the first sample holding it wrote it."""
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    keys = [normalize_answer(a) for a in answers]
    counts = collections.Counter(keys)
    top = max(counts.values())
    winner = next(k for k in keys if counts[k] == top)
    return answers[keys.index(winner)]


def check_working(text: str) -> bool | None:
    """The calculator: True when every integer equation "x op y = z" (op + - * x ×) in the text holds,
    False when one does not, None when the text holds none to check."""
    found = EQUATION.findall(text)
    if not found:
        return None
    return all(_CALC[{"x": "*", "×": "*"}.get(op, op)](int(x), int(y)) == int(z) for x, op, y, z in found)


# metric name -> what it is, for --help and the error that lists them
METRICS = {
    "exact_match": "greedy answer == a reference after normalize_answer (mean over rows, 0-1)",
    "f1": "token F1 of the greedy answer, best reference (mean, 0-1)",
    "rouge_l": "ROUGE-L F-measure of the greedy completion, best reference (mean, 0-1)",
    "bleu": "corpus BLEU of the greedy completions (sacrebleu, 0-100)",
    "chrf": "corpus chrF of the greedy completions (sacrebleu, 0-100)",
    "pass_at_k": "unbiased pass@k from --n samples, correct = exact match (mean, 0-1)",
    "self_consistency": "majority vote over --n samples' answers, exact match (mean, 0-1)",
    "calculator": "greedy completions whose working holds: every 'x op y = z' recomputed, none = 0 (mean, 0-1)",
}
SAMPLED = ("pass_at_k", "self_consistency")  # the metrics that need --n samples per prompt
