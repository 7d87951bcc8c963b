"""The bundled demo task and its scorer (pure Python, no torch).

`demo:support` teaches a fixed answer format:

    Category: <account|billing|shipping|technical>
    Answer: <text>

``score`` grades answers to the held-out prompts of `demo:support-eval`: the share that follow the
format, and the share that also name the right category.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

CATEGORIES = ("account", "billing", "shipping", "technical")
_FORMAT = re.compile(r"^\s*Category:\s*(account|billing|shipping|technical)\s*\n\s*Answer:\s*\S", re.IGNORECASE)
DATA = Path(__file__).resolve().parent / "data"


def held_out(n: int | None = None) -> list[tuple[str, str]]:
    """(prompt, expected category) pairs from the held-out split."""
    rows = [json.loads(l) for l in (DATA / "support-eval.jsonl").read_text().splitlines() if l.strip()]
    pairs = []
    for r in rows:
        user = next(m["content"] for m in r["messages"] if m["role"] == "user")
        answer = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        pairs.append((user, answer.split("\n", 1)[0].split(":", 1)[1].strip()))
    return pairs[:n] if n else pairs


def grade(answer: str, expected: str) -> tuple[bool, bool]:
    """(follows the format, names the expected category)."""
    m = _FORMAT.match(answer or "")
    return bool(m), bool(m and m.group(1).lower() == expected)


def score(answers: list[str], expected: list[str]) -> dict:
    graded = [grade(a, e) for a, e in zip(answers, expected)]
    n = len(graded)
    fmt = sum(g[0] for g in graded)
    cat = sum(g[1] for g in graded)
    return {"n": n, "format": fmt, "category": cat,
            "format_rate": fmt / n if n else 0.0, "category_rate": cat / n if n else 0.0}


def evaluate(session, adapter: str, n: int = 24, max_new_tokens: int = 48) -> dict:
    """Answer ``n`` held-out prompts with ``adapter`` (or 'base') greedily and score them."""
    pairs = held_out(n)
    answers = [session.generate(p, adapter=adapter, max_new_tokens=max_new_tokens).text for p, _ in pairs]
    result = score(answers, [c for _, c in pairs])
    result["examples"] = [{"prompt": p, "answer": a} for (p, _), a in zip(pairs[:3], answers[:3])]
    return result
