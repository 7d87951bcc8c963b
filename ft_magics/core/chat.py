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
    system: Optional[str] = None  # for a question: the system prompt it was asked under


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
        self.turns += [Turn("user", question, system=self.system), Turn("assistant", answer, adapter, stopped)]

    def entries(self) -> list:
        """What a view shows, in order: ``("system", text)`` where the system prompt in force changes (at the top,
        and where ``--system`` changed it between turns: each answer shows beside the prompt it was given under;
        ``text`` None once it was removed), ``("user", text)``, ``("answer", text, adapter, stopped)``, and the
        system prompt set for the next turn, where it differs from the last one's."""
        out, shown = [], None
        for t in self.turns:
            if t.role == "user":
                if t.system != shown and (t.system or out):
                    out.append(("system", t.system))
                shown = t.system
                out.append(("user", t.content))
            else:
                out.append(("answer", t.content, t.adapter or "model", t.stopped))
        if self.system != shown and (self.system or out):
            out.append(("system", self.system))
        return out

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
        lines = []
        for entry in self.entries():
            if entry[0] == "system":
                lines.append(f"system: {entry[1]}" if entry[1] is not None else "system: (none from here on)")
            elif entry[0] == "user":
                lines.append(f"you: {entry[1]}")
            else:
                lines.append(f"{entry[2]}: {entry[1]}{' [stopped]' if entry[3] else ''}")
        return "\n".join(lines)
