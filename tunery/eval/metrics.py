"""Task metrics on generated text: exact match and ROUGE-L F1 (rouge-score, which works offline)."""

from __future__ import annotations


def exact_match(prediction: str, reference: str) -> float:
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def score(predictions: list[str], references: list[str]) -> dict:
    n = max(len(references), 1)
    return {"exact_match": sum(map(exact_match, predictions, references)) / n,
            "rouge_l": sum(rouge_l(predictions, references)) / n}
