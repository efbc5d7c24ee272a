"""What kind of task a prompt is (code, math, prose, chat), told before prefill.

A multinomial naive Bayes over words, symbols and word pairs: trained in milliseconds
on the calibration prompts in assets/prompts, so nothing needs shipping but the prompts,
and accurate enough (tests/test_tasks.py reports held-out accuracy) because the tasks
differ in vocabulary and punctuation far more than in topic.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"
TASKS = ("code", "math", "prose", "chat")

_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


def features(text: str) -> list[str]:
    """Lower-cased words, numbers and single symbols, plus adjacent pairs."""
    tokens = _TOKEN.findall(text.lower())
    tokens = ["<num>" if t.isdigit() else t for t in tokens]
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:], strict=False)]


def load_calibration(folder: Path = PROMPTS_DIR) -> list[tuple[str, str]]:
    """(task, text) pairs from every ``*.jsonl`` file: one {"task", "text"} per line."""
    pairs = []
    for file in sorted(Path(folder).glob("*.jsonl")):
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append((str(record["task"]), str(record["text"])))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f'{file}:{n}: expected {{"task": ..., "text": ...}}') from e
    if not pairs:
        raise FileNotFoundError(f"No calibration prompts (*.jsonl) in {folder}.")
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
    log_unseen: np.ndarray  # [tasks]: a feature never seen in training

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
        return cls(tasks, np.log(docs / docs.sum()), likelihood, math.log(alpha) - log_totals)

    @classmethod
    def default(cls) -> TaskClassifier:
        """Trained on the shipped calibration prompts (held-out ones included)."""
        return cls.fit(load_calibration())

    def scores(self, text: str) -> np.ndarray:
        score = self.log_prior.copy()
        for f in features(text):
            score += self.log_likelihood.get(f, self.log_unseen)
        return score

    def predict(self, text: str) -> str:
        return self.tasks[int(np.argmax(self.scores(text)))]

    def accuracy(self, pairs: list[tuple[str, str]]) -> float:
        return float(np.mean([self.predict(text) == task for task, text in pairs]))
