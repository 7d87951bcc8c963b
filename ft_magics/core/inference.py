"""Generation: chat-templated prompts, streamed text, timing."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import FtUsageError


@dataclass
class Generation:
    text: str
    adapter: str  # adapter name or "base"
    new_tokens: int
    seconds: float  # the whole call: the prompt's forward, any one-time work in it, and the decoding
    stopped: bool = False  # ended early by an interrupt (the text so far is kept)
    note: str = ""  # what was adjusted to make the call fit (the answer's length cut to the model's context)
    decode_seconds: Optional[float] = None  # from the first new token to the last (None: fewer than two)

    @property
    def decodes(self) -> bool:
        """Whether the answer has a decoding time to measure (two new tokens or more)."""
        return self.new_tokens > 1 and bool(self.decode_seconds)

    @property
    def tokens_per_s(self) -> float:
        """The decoding speed: the tokens after the first / the time from the first to the last. What comes
        before the first token is left out: the prompt's forward, and with it the one-time work of the first
        generate after a load, an adapter switch or training (on the CPU bitsandbytes repacks 4-bit weights for
        its inference kernel in that forward; the first forward warms up), which made that answer read 0.7 tok/s
        instead of 20. ``seconds`` keeps the whole call. An answer of one token has no decoding: its rate is
        over the whole call."""
        if self.decodes:
            return (self.new_tokens - 1) / self.decode_seconds
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self, notes=()) -> str:
        """``adapter · N tokens · X decode tok/s · notes...``: what a view shows under the answer (the rate is
        :attr:`tokens_per_s`, decoding only; a one-token answer shows the whole call's time instead)."""
        from .events import counted

        speed = f"{self.tokens_per_s:.1f} decode tok/s" if self.decodes else f"{self.seconds:.1f} s"
        extra = list(notes) + ([self.note] if self.note else []) + (["stopped by interrupt"] if self.stopped else [])
        return " · ".join([self.adapter, counted(self.new_tokens, "token"), speed] + extra)


HOT_TEMPERATURE = 2.0  # above it sampling is close to uniform over the vocabulary: a note says so


_INT_SETTINGS = ("max_new_tokens", "top_k", "seed")
_OPTIONAL_SETTINGS = ("top_k", "seed")  # None: the model's own (top_k), unseeded (seed)


def as_number(name: str, value: Any, integer: bool, optional: bool):
    """A generation setting given through the Python API as a number: "0.7" and 20.0 read as 0.7 and 20; what
    is not a number (or, for a count, not a whole one) is refused by name, not by a TypeError deep in torch."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or value is None:
        raise FtUsageError(f"{name} must be a number (got {value!r}).")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FtUsageError(f"{name} must be a number (got {value!r}).") from None
    if not integer:
        return number
    if not number.is_integer():
        raise FtUsageError(f"{name} must be a whole number (got {value!r}).")
    return int(number)


@dataclass(frozen=True)
class Sampling:
    """How an answer is decoded, one object from the magics' flags down to ``model.generate``: greedy
    unless ``temperature`` > 0. ``top_k`` None keeps the model's generation config (transformers: 50), 0
    turns it off; ``repetition_penalty`` > 1 makes tokens already in the text less likely (greedy too: small
    models loop without it)."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @classmethod
    def of(cls, sampling: Optional["Sampling"] = None, **settings) -> "Sampling":
        """``sampling`` (default: the defaults) with ``settings`` replaced, checked. A setting that is not a
        field is a usage error naming the fields (the Python API's counterpart of an unknown flag)."""
        import dataclasses

        if isinstance(sampling, dict):  # the settings as a dict (the Python API's natural guess)
            settings, sampling = {**sampling, **settings}, None
        elif sampling is not None and not isinstance(sampling, cls):
            raise FtUsageError(f"sampling must be a core.inference.Sampling or a dict of its settings (got "
                               f"{type(sampling).__name__}).")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise FtUsageError(f"unknown generation setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                               f"the settings are {', '.join(names)}.")
        settings = {k: as_number(k, v, k in _INT_SETTINGS, k in _OPTIONAL_SETTINGS) for k, v in settings.items()}
        return dataclasses.replace(sampling or cls(), **settings).checked()

    def checked(self) -> "Sampling":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise FtUsageError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens}).")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise FtUsageError(f"--temperature must be >= 0 and finite (got {self.temperature}); 0 means greedy, "
                               "0.7 is usual.")
        if not 0 < self.top_p <= 1:
            raise FtUsageError(f"--top-p must be in (0, 1] (got {self.top_p}).")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise FtUsageError(f"--top-k must be a whole number >= 0 (got {self.top_k}); 0 turns it off.")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise FtUsageError(f"--repetition-penalty must be > 0 (got {self.repetition_penalty}); 1 is none, "
                               "1.1-1.3 curbs loops.")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise FtUsageError(f"--seed must be a whole number from 0 to 2**63 - 1 (got {self.seed}).")
        return self

    @property
    def unused(self) -> list:
        """The flags that do nothing in this decoding (sampling settings of a greedy answer)."""
        if not self.greedy:
            return []
        return [flag for flag, on in (("--top-p", self.top_p != 1.0), ("--top-k", self.top_k is not None),
                                      ("--seed", self.seed is not None)) if on]

    @property
    def notes(self) -> list:
        """What a user should know about these settings before reading the answer (printed by the magics)."""
        out = []
        if self.unused:  # e.g. --top-p 0.5 without --temperature: the answer is greedy, the flag does nothing
            verb = "applies" if len(self.unused) == 1 else "apply"
            out.append(f"{', '.join(self.unused)} {verb} when sampling; add --temperature 0.7 (greedy without it).")
        if self.temperature > HOT_TEMPERATURE:
            out.append(f"--temperature {self.temperature:g} makes every token almost as likely as the model's choice: "
                       "expect noise. 0.2-1.5 is the usual range.")
        if self.repetition_penalty < 1:  # transformers divides a seen token's score by it: below 1 it is favoured
            out.append(f"--repetition-penalty {self.repetition_penalty:g} is below 1, so tokens already in the text "
                       "become more likely: expect loops. 1 is none; 1.1-1.3 curbs repeats.")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def seed_generator(self) -> None:
        """Seed torch's generator before a sampled answer that has a ``seed``: the same seed, the same answer."""
        if not self.greedy and self.seed is not None:
            import torch

            torch.manual_seed(self.seed)

    def generate_kwargs(self, max_new_tokens: Optional[int] = None) -> dict:
        """``model.generate`` keywords; ``max_new_tokens`` where the context cut the answer shorter."""
        kw = dict(max_new_tokens=max_new_tokens or self.max_new_tokens)
        if self.greedy:  # None: the model's generation config may hold sampling values that would only warn
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
            if self.top_k is not None:
                kw["top_k"] = self.top_k
        if self.repetition_penalty != 1.0:
            kw["repetition_penalty"] = self.repetition_penalty
        return kw


def build_prompt(tokenizer, prompt: str, system: Optional[str] = None, history: Sequence[dict] = ()) -> str:
    """The text the model sees: the chat template where the tokenizer has one, else the plain prompt.
    ``history``: earlier messages of a conversation (``{"role": "user"|"assistant", "content": ...}``)."""
    messages = (([{"role": "system", "content": system}] if system else [])
                + [{"role": m["role"], "content": m["content"]} for m in history]
                + [{"role": "user", "content": prompt}])
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from .data import plain_turn  # the layout training used: the text before the answer, as it was trained

    return "".join(plain_turn(m) for m in messages)


def adds_special_tokens(tokenizer) -> bool:
    """Whether encoding a built prompt should add BOS/EOS: not where the chat template already wrote them."""
    return not getattr(tokenizer, "chat_template", None)


def context_limit(model) -> Optional[int]:
    """The most tokens (prompt + answer) the model reads: its config's max_position_embeddings, if any."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def fit_to_context(model, prompt_tokens: int, max_new_tokens: int) -> tuple[int, str]:
    """``(max_new_tokens, note)`` that fit the model's context after a prompt of ``prompt_tokens``; a prompt
    that leaves no room is a usage error (past the context a model's positions are garbage, and slow)."""
    limit = context_limit(model)
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return max_new_tokens, ""
    if prompt_tokens >= limit:
        raise FtUsageError(
            f"the prompt is {prompt_tokens:,} tokens (as the model reads it, its chat template or turn layout "
            f"included) and the model reads at most {limit:,} (max_position_embeddings): shorten it."
        )
    return limit - prompt_tokens, (f"answer limit lowered to {limit - prompt_tokens} tokens: the model's context is "
                                   f"{limit:,}")


def check_prompts_fit(model, tokenizer, prompts: Sequence[str], system: Optional[str] = None,
                      labels: Optional[Sequence[str]] = None) -> None:
    """Refuse, before any work, a prompt that leaves the model no room to answer (:func:`fit_to_context`),
    naming which one by ``labels`` (default: its number) with its own length, not a padded batch's."""
    if context_limit(model) is None:
        return
    for k, prompt in enumerate(prompts):
        text = build_prompt(tokenizer, prompt, system)
        n = len(tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer))["input_ids"])
        try:
            fit_to_context(model, n, 1)
        except FtUsageError as exc:
            raise FtUsageError(f"{labels[k] if labels else f'prompt {k + 1}'}: {exc} Nothing was run.") from None


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if stream_end and text.endswith("\ufffd"):  # an answer cut inside a character: as _decoded drops it
                text = text[:-1]
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def without_added_eos(tokenizer, enc: dict, texts: Sequence[str]) -> dict:
    """``enc`` without the end-of-sequence token a tokenizer's post-processor appends to every text (Llama-2's
    ``add_eos_token=True``, some Mistral configs): a prompt that ends in EOS asks the model to go on after the end,
    and it rambled. Kept where the text itself spells the token."""
    eos, spelled = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "eos_token", None)
    ids = enc["input_ids"]
    if eos is None or ids.shape[1] < 2 or not bool((ids[:, -1] == eos).all()):
        return enc
    if spelled and any(t.endswith(spelled) for t in texts):
        return enc
    return {k: v[:, :-1] for k, v in enc.items()}


def markup_note(tokenizer, prompt: str, system: Optional[str] = None) -> str:
    """What an answer's footer says when the prompt (or system prompt) spells a special token of the tokenizer
    (``<|im_start|>system``, pasted or typed): it is read as that token, so the text can open a turn of its own
    (a system prompt injected into the conversation), as training's data report warns; else ''."""
    from .data import special_spellings

    text = prompt + (system or "")
    spelled = sorted(t for t in special_spellings(tokenizer) if t in text)
    if not spelled:
        return ""
    return (f"the prompt spells {', '.join(map(repr, spelled))}: read as the special "
            f"token{'s' if len(spelled) > 1 else ''} (chat markup: a turn's boundary), not as text")


def generate(model, tokenizer, prompt: str, *, system: Optional[str] = None, sampling: Optional[Sampling] = None,
             on_text: Optional[Callable[[str], None]] = None, adapter_label: str = "base",
             history: Sequence[dict] = (), raw: bool = False, **settings) -> Generation:
    """One answer to ``prompt``; ``sampling`` (a :class:`Sampling`) and/or its fields as keywords
    (``max_new_tokens=64, temperature=0.7, ...``) say how it is decoded. ``raw``: the text is continued as
    typed (no chat template, no turn layout: what a model trained on plain text does)."""
    import torch

    sampling = Sampling.of(sampling, **settings)
    if not prompt or not prompt.strip():
        raise FtUsageError("the prompt is empty: give the user message (in a magic, after the flags or in the cell "
                           "body).")
    if raw and (system or history):
        raise FtUsageError("--raw continues the text as typed, so it takes no system prompt and no earlier turns "
                           "(those are turns of a conversation): drop --system, or drop --raw.")
    text = prompt if raw else build_prompt(tokenizer, prompt, system, history)
    device = next(model.parameters()).device
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=raw or adds_special_tokens(tokenizer))
    enc = without_added_eos(tokenizer, enc, [text])
    try:
        max_new_tokens, note = fit_to_context(model, enc["input_ids"].shape[1], sampling.max_new_tokens)
    except FtUsageError as exc:  # "shorten it": where a long system prompt is the cause, say so (a chat keeps it)
        own = len(tokenizer(system, add_special_tokens=False)["input_ids"]) if system else 0
        if own * 2 < enc["input_ids"].shape[1]:
            raise
        raise FtUsageError(f"{exc} Of that, the system prompt is {own:,} tokens: give a shorter one (--system TEXT; "
                           "in a chat, %lora_chat --system TEXT, or --new to start again without it).") from None
    enc = {k: v.to(device) for k, v in enc.items()}
    kw = dict(sampling.generate_kwargs(max_new_tokens), pad_token_id=tokenizer.pad_token_id)
    sampling.seed_generator()
    if on_text is not None:
        kw["streamer"] = _streamer(tokenizer, on_text)
    was_training = model.training
    model.eval()
    from .fused_lora import fused_lora
    from .training import StopFlag, interrupt_stops

    flag = StopFlag()
    clock = _TokenClock()
    kw["stopping_criteria"] = _stop_when(flag, clock)
    t = time.perf_counter()
    # not inference_mode: bnb repacks weights in here, and they must stay trainable. An interrupt (the
    # kernel's stop button, Ctrl-C) ends the answer at the next token and keeps it, as it stops training.
    try:
        with torch.no_grad(), fused_lora(model), interrupt_stops(flag, []):
            out = model.generate(**enc, **kw)
    except RuntimeError as exc:
        if "probability tensor contains" not in str(exc):
            raise
        raise FtUsageError(f"{adapter_label}: the model's next-token probabilities are not finite numbers (NaN or "
                           "inf), so nothing can be sampled: the adapter's weights overflowed (a run that diverged). "
                           "Answer with the base (--adapter base), or train the adapter again with a lower "
                           "learning_rate.") from None
    finally:
        if was_training:
            model.train()
    seconds = time.perf_counter() - t
    new = out[0][enc["input_ids"].shape[1]:].tolist()
    if sampling.greedy and sampling.repetition_penalty == 1.0 and repeats_itself(new):
        note = "; ".join(n for n in (note, LOOP_NOTE) if n)
    note = "; ".join(n for n in (markup_note(tokenizer, prompt, system), note) if n)
    return Generation(
        text=_decoded(tokenizer, new), adapter=adapter_label,
        new_tokens=len(new), seconds=seconds, stopped=flag.is_set(), note=note, decode_seconds=clock.decode_seconds,
    )


def repeats_itself(ids: Sequence[int], min_repeats: int = 4, max_period: int = 128, min_span: int = 12,
                   short_period: int = 32) -> bool:
    """Whether the answer ends in one stretch of tokens said again and again, to its last token ("I'm a wizard.
    I'm a wizard. ..."): the loop a small model falls into when decoded greedily. A stretch of up to
    ``short_period`` tokens counts when said ``min_repeats`` times in a row over ``min_span`` tokens at least
    (the span keeps a run of dots or a table rule from counting). A longer one, a sentence or two of up to
    ``max_period`` tokens (a 40-token sentence looped through a 300-token answer and got no note), counts when
    said twice or more and the loop is as long as the longest short one (``min_repeats`` x ``short_period``
    tokens): text that quotes a line once more, or a list whose items start alike, is not repeated whole."""
    ids = list(ids)
    long_span = min_repeats * short_period
    for period in range(1, max_period + 1):
        if period <= short_period:
            span = period * max(min_repeats, -(-min_span // period))
        else:
            span = period * max(2, -(-long_span // period))
        if len(ids) < span:  # (the long spans do not grow with the period: 132 tokens at 33, 128 at 64)
            continue
        tail = ids[-span:]
        if all(tail[i] == tail[i % period] for i in range(span)):
            return True
    return False


LOOP_NOTE = "the answer repeats itself: --repetition-penalty 1.2 (or sampling, --temperature 0.7) curbs that"


def _decoded(tokenizer, ids: list) -> str:
    """The answer's text. An answer cut by max_new_tokens can end inside a character that spans several
    byte-level tokens (an emoji, CJK): that partial character decodes to one U+FFFD, which is dropped."""
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return text[:-1].rstrip() if text.endswith("\ufffd") else text


class _TokenClock:
    """When ``generate`` chose its first new token and its last: ``generate`` asks its stopping criteria once per
    new token, right after choosing it, so the first call comes after the prompt's forward (and whatever one-time
    work ran in it) and the calls after it time the decoding alone."""

    def __init__(self) -> None:
        self.first: Optional[float] = None
        self.last: Optional[float] = None

    def tick(self, input_ids) -> None:
        if input_ids.device.type != "cpu":  # the token is chosen when the device has made it, not when queued
            input_ids[0, -1].item()
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last

    @property
    def decode_seconds(self) -> Optional[float]:
        """From the first new token to the last; None before a second one."""
        return self.last - self.first if self.first is not None and self.last > self.first else None


def _stop_when(flag, clock: Optional[_TokenClock] = None):
    """A ``stopping_criteria`` for ``generate`` that ends every row once ``flag`` is set (and ticks ``clock``
    at each new token)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Flag(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if clock is not None:
                clock.tick(input_ids)
            return torch.full((input_ids.shape[0],), flag.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Flag()])


# --------------------------------------------------------------------------- batches (left padding)
def generate_batch(model, tokenizer, prompts: list, *, system: Optional[str] = None, max_new_tokens: int = 64,
                   adapter_names: Optional[list] = None, limits: Optional[list] = None,
                   contexts: Optional[list] = None, sampling: Optional[Sampling] = None) -> list:
    """Answers to several prompts in one ``generate`` call (greedy unless ``sampling`` says otherwise; its
    ``max_new_tokens`` gives way to the argument), left-padded so every row ends at the same position.
    ``adapter_names`` (one per row, ``"__base__"`` for none) lets PEFT run a different
    adapter on each row in the same forward pass; ``contexts`` (one ``(system, earlier turns)`` per row)
    replaces the one ``system``. Returns ``(text, new_tokens)`` per prompt."""
    import torch

    texts = [build_prompt(tokenizer, p, *(contexts[i] if contexts else (system, ()))) for i, p in enumerate(prompts)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True,
                        add_special_tokens=adds_special_tokens(tokenizer))
        enc = without_added_eos(tokenizer, enc, texts)
    finally:
        tokenizer.padding_side = side
    max_new_tokens, _ = fit_to_context(model, enc["input_ids"].shape[1], max_new_tokens)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    sampling = sampling or Sampling()
    kw = dict(sampling.generate_kwargs(max_new_tokens), pad_token_id=tokenizer.pad_token_id)
    sampling.seed_generator()
    if adapter_names is not None:
        kw["adapter_names"] = list(adapter_names)
    was_training = model.training
    model.eval()
    from .fused_lora import fused_lora

    # the fused forwards (DoRA with its norm kept); rows of several adapters run PEFT's mixed-batch forward
    with torch.no_grad(), fused_lora(model):
        out = model.generate(**enc, **kw)
    if was_training:
        model.train()
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    stops.discard(None)
    results = []
    start = enc["input_ids"].shape[1]
    for j, row in enumerate(out[:, start:].tolist()):
        if limits is not None:
            row = row[:limits[j]]
        n = len(row)
        for i, tok in enumerate(row):
            if tok in stops:
                n = i + 1
                break
        results.append((_decoded(tokenizer, row[:n]), n))
    return results


# --------------------------------------------------------------------------- side-by-side comparison
def split_prompts(body: str) -> list:
    """Prompts in a cell body, separated by lines holding only ``---``."""
    import re

    parts = [p.strip() for p in re.split(r"(?m)^\s*---+\s*$", body or "")]
    prompts = [p for p in parts if p]
    if not prompts:
        raise FtUsageError("no prompt to compare: write it after the flags (%lora_compare --adapters a,b How do I ...?), "
                           "or one or more prompts in the cell body of %%lora_compare, separated by lines of ---.")
    return prompts


EMPTY_ANSWER = "(empty answer)"  # a comparison's answer of no text (the model ended its turn at once)


@dataclass
class Comparison:
    prompts: list
    columns: list  # "base" and adapter names
    cells: dict  # (prompt index, column) -> Generation
    swap_ms: dict  # column -> swap time
    system: Optional[str] = None  # the system prompt every answer was given, shown above them

    def tokens_per_s(self, column: str) -> float:
        """The column's decoding speed over its answers, as each answer's footer measures it
        (:attr:`Generation.tokens_per_s`): the tokens after each first one / the time from first to last."""
        gens = [self.cells[(i, column)] for i in range(len(self.prompts))]
        decoded = [g for g in gens if g.decodes]
        if not decoded:  # one-token answers: over the whole calls
            secs = sum(g.seconds for g in gens)
            return sum(g.new_tokens for g in gens) / secs if secs > 0 else 0.0
        return sum(g.new_tokens - 1 for g in decoded) / sum(g.decode_seconds for g in decoded)

    def to_text(self, width: Optional[int] = None) -> str:
        """The comparison as text, the answers wrapped to ``width`` columns (None: the terminal's, at most 100;
        a fixed 100 broke up again in an 80-column terminal)."""
        import shutil
        import textwrap

        width = width or min(100, max(40, shutil.get_terminal_size((100, 24)).columns - 1))
        lines = [f"System prompt: {self.system}", ""] if self.system else []
        for i, p in enumerate(self.prompts):
            lines.append(f"Prompt {i + 1}: {p}")
            for c in self.columns:
                g = self.cells[(i, c)]
                shown = g.text if g.text.strip() else ("(blank: whitespace only)" if g.text else EMPTY_ANSWER)
                body = "\n".join(  # each line of the answer wrapped on its own: a list stays a list
                    textwrap.fill(line, width=width, initial_indent="    ", subsequent_indent="    ") if line.strip()
                    else "" for line in shown.splitlines() or [shown])
                lines.append(f"  [{c}] {g.new_tokens} tokens")
                lines.append(body)
            lines.append("")
        lines.append("decode tokens/s: " + "   ".join(f"{c} {self.tokens_per_s(c):.1f}" for c in self.columns))
        lines += [f"Note: {n}" for n in self.notes()]
        return "\n".join(lines)

    def notes(self) -> list:
        """What the answers' footers would say (a limit lowered to fit the context, a loop), once each, with the
        answers it is about where it is not all of them: the comparison shows no footers."""
        where: dict = {}
        for (i, c), g in self.cells.items():
            for n in filter(None, (g.note or "").split("; ")):
                where.setdefault(n, []).append(c + (f", prompt {i + 1}" if len(self.prompts) > 1 else ""))
        return [n if len(labels) == len(self.cells) else f"{n} ({'; '.join(labels)})" for n, labels in where.items()]

    def to_html(self) -> str:
        import html

        left = "style='text-align:left'"  # Jupyter right-aligns headers: they stood apart from their answers
        head = "".join(f"<th {left}>{html.escape(c)}<br><small>{self.tokens_per_s(c):.1f} decode tok/s</small></th>"
                       for c in self.columns)

        def cell(text: str) -> str:  # an empty answer read as a blank cell, as if it were missing
            if text.strip():
                return html.escape(text)
            return f"<i style='color:#888'>{'(blank: whitespace only)' if text else EMPTY_ANSWER}</i>"

        rows = []
        for i, p in enumerate(self.prompts):
            cells = "".join(
                f"<td style='vertical-align:top;white-space:pre-wrap;text-align:left'>"
                f"{cell(self.cells[(i, c)].text)}</td>" for c in self.columns)
            rows.append(f"<tr><td style='vertical-align:top;text-align:left'><b>{html.escape(p)}</b></td>{cells}</tr>")
        notes = "".join(f"<p>Note: {html.escape(n, quote=False)}</p>" for n in self.notes())
        system = f"<p><b>System prompt:</b> {html.escape(self.system, quote=False)}</p>" if self.system else ""
        return (f"{system}<table class='ft-compare'><thead><tr><th {left}>prompt</th>{head}</tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>{notes}")

    def _repr_html_(self) -> str:
        return self.to_html()

    def __str__(self) -> str:
        return self.to_text()


def compare(model, tokenizer, prompts: list, columns: list, switch: Callable[[str], float], *,
            max_new_tokens: int = 64, system: Optional[str] = None, repetition_penalty: float = 1.0) -> Comparison:
    """Greedy (reproducible) answers of every column to every prompt; ``switch(column)`` selects it.

    One token is generated first, untimed: the first generation after a load or a training run pays
    one-time costs (bitsandbytes repacks 4-bit weights for inference on the CPU, kernels warm up) that
    made the first column, the base, look up to 2x slower than the adapters after it."""
    cells, swaps = {}, {}
    greedy = Sampling.of(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    if columns and prompts:
        switch(columns[0])
        generate(model, tokenizer, prompts[0], system=system, sampling=greedy, max_new_tokens=1)
    for c in columns:
        swaps[c] = switch(c)
        for i, p in enumerate(prompts):
            cells[(i, c)] = generate(model, tokenizer, p, system=system, sampling=greedy, adapter_label=c)
            if cells[(i, c)].stopped:  # an interrupt ends the whole comparison, not one answer of it
                raise FtUsageError(f"comparison stopped by an interrupt after {len(cells)} of "
                                   f"{len(columns) * len(prompts)} answers.")
    return Comparison(prompts=list(prompts), columns=list(columns), cells=cells, swap_ms=swaps, system=system)
