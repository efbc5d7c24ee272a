"""What kind of task a prompt is (code, math, prose, chat), told before prefill.

A multinomial naive Bayes over words, symbols and word pairs: trained in milliseconds on
the calibration prompts (assets/prompts/calibration.jsonl), so nothing ships but the
prompts, and accurate enough (tests/test_tasks.py reports held-out accuracy) because the
tasks differ in vocabulary and punctuation far more than in topic.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..assets import asset_path

CALIBRATION = asset_path("prompts", "calibration.jsonl")
TASKS = ("code", "math", "prose", "chat")

_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


def features(text: str) -> list[str]:
    """Lower-cased words, numbers and single symbols, plus adjacent pairs."""
    tokens = _TOKEN.findall(text.lower())
    tokens = ["<num>" if t.isdigit() else t for t in tokens]
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]


def load_calibration(file: Path = CALIBRATION) -> list[tuple[str, str]]:
    """(task, text) pairs from a JSONL file: one {"task", "text"} per line."""
    if not Path(file).exists():
        raise FileNotFoundError(f"No calibration prompts at {file}.")
    pairs = []
    for n, line in enumerate(Path(file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pairs.append((str(record["task"]), str(record["text"])))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{file}:{n}: expected a {{'task', 'text'}} object") from e
    return pairs


def split_held_out(pairs: list[tuple[str, str]], every: int = 5):
    """Every ``every``-th prompt of each task is held out: deterministic, per task."""
    seen: Counter[str] = Counter()
    train, held = [], []
    for task, text in pairs:
        seen[task] += 1
        (held if seen[task] % every == 0 else train).append((task, text))
    return train, held


@dataclass
class TaskClassifier:
    tasks: list[str]
    log_prior: np.ndarray  # [tasks]
    log_likelihood: dict[str, np.ndarray]  # feature -> [tasks]

    @classmethod
    def fit(cls, pairs: list[tuple[str, str]], alpha: float = 0.5) -> TaskClassifier:
        tasks = sorted({task for task, _ in pairs})
        index = {t: i for i, t in enumerate(tasks)}
        counts: dict[str, np.ndarray] = {}
        docs = np.zeros(len(tasks))
        for task, text in pairs:
            docs[index[task]] += 1
            for f in features(text):
                counts.setdefault(f, np.zeros(len(tasks)))[index[task]] += 1
        totals = sum(counts.values()) + alpha * len(counts)
        log_totals = np.log(totals)
        likelihood = {f: np.log(c + alpha) - log_totals for f, c in counts.items()}
        return cls(tasks, np.log(docs / docs.sum()), likelihood)

    @classmethod
    def default(cls) -> TaskClassifier:
        """Trained on the shipped calibration prompts (held-out ones included)."""
        return cls.fit(load_calibration())

    def scores(self, text: str) -> np.ndarray:
        """Features never seen in training are skipped: scoring them would favour the
        task with the fewest training tokens (chat) for any long, unusual prompt."""
        score = self.log_prior.copy()
        for f in features(text):
            if f in self.log_likelihood:
                score += self.log_likelihood[f]
        return score

    def predict(self, text: str) -> str:
        return self.tasks[int(np.argmax(self.scores(text)))]

    def accuracy(self, pairs: list[tuple[str, str]]) -> float:
        return float(np.mean([self.predict(text) == task for task, text in pairs]))
