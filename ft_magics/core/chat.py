"""A multi-turn conversation with the model: the messages so far, which adapter gave each answer, and
the part of the history that still fits the model's context."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .events import counted
from .inference import adds_special_tokens, build_prompt, context_limit


def left_out_notes(left_out: int) -> list:
    """The note a view shows when older exchanges did not fit the model's context (none when all did)."""
    return [f"{counted(left_out, 'oldest exchange')} left out to fit the context"] if left_out else []


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    content: str
    adapter: str = ""  # for an answer: the adapter that gave it ("base" for none)
    stopped: bool = False  # an answer cut short by an interrupt


@dataclass
class Conversation:
    system: Optional[str] = None
    turns: list = field(default_factory=list)

    @property
    def exchanges(self) -> int:
        return sum(1 for t in self.turns if t.role == "assistant")

    def messages(self) -> list:
        return [{"role": t.role, "content": t.content} for t in self.turns]

    def add(self, question: str, answer: str, adapter: str, stopped: bool = False) -> None:
        self.turns += [Turn("user", question), Turn("assistant", answer, adapter, stopped)]

    def fitting_history(self, model, tokenizer, question: str, answer_tokens: int) -> tuple[list, int]:
        """``(messages, left_out)``: the most recent whole exchanges that leave ``answer_tokens`` of the
        model's context for the answer to ``question``; ``left_out`` counts the older exchanges dropped."""
        history = self.messages()
        limit = context_limit(model)
        if limit is None:
            return history, 0
        dropped = 0
        while history:
            text = build_prompt(tokenizer, question, self.system, history)
            n = len(tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer))["input_ids"])
            if n + answer_tokens <= limit:
                break
            history = history[2:]  # the oldest question and its answer
            dropped += 1
        return history, dropped

    def transcript(self) -> str:
        if not self.turns:
            return ""
        lines = [f"system: {self.system}"] if self.system else []
        for t in self.turns:
            if t.role == "user":
                lines.append(f"you: {t.content}")
            else:
                lines.append(f"{t.adapter or 'model'}: {t.content}{' [stopped]' if t.stopped else ''}")
        return "\n".join(lines)
