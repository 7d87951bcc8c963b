"""Preference training: prompt / chosen / rejected pairs -> paired examples -> the DPO and ORPO losses.

A pair is two conversations that share a prompt and differ in the answer. Each side is rendered and
tokenised exactly as a supervised example (``core.data``), with the loss mask on the answer only; the
collator stacks the chosen rows over the rejected rows, so one forward pass scores both.

- DPO (Rafailov et al. 2023): ``-log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))``.
  The reference is the base model: the same model with the adapter switched off (PEFT's
  ``disable_adapter``), one extra no-grad forward per step and no second copy of the weights.
- ORPO (Hong et al. 2024): the chosen answers' cross-entropy plus ``beta`` times
  ``-log sigmoid(log odds(c) - log odds(r))`` on the mean token log-probabilities; no reference pass.

Sequence log-probabilities come from the decoder's hidden states through the chunked head
(``speed.chunked_token_logprobs``): no full-vocabulary logits for the batch, as in supervised runs.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import FtUsageError
from .events import counted
from .data import (PROMPT_NAMES, Record, TokenizedExample, _messages, _renamed, _string_field,
                   conversation_cell, parse_map)

PAIR_FORMAT = "preference pairs"
# column names other datasets give the two answers (StackExchange-paired: response_j / response_k)
CHOSEN_NAMES = ("chosen", "preferred", "accepted", "better", "chosen_response", "response_j", "winner", "good")
REJECTED_NAMES = ("rejected", "dispreferred", "worse", "rejected_response", "response_k", "loser", "bad")
TRANSCRIPT_TURN = ("\n\nHuman:", "\n\nAssistant:")  # Anthropic HH-RLHF's plain-text conversations


@dataclass
class Pair:
    """One preference pair: the prompt's messages and the two answers' messages (assistant turns)."""

    prompt: list
    chosen: list
    rejected: list
    where: str = ""

    text = None  # read as a record by core.data.quality_warnings: a conversation, its chosen side

    @property
    def messages(self) -> list:
        return self.prompt + self.chosen

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}

    def records(self) -> tuple:
        """The two sides as supervised records whose loss is on the answer's turns only."""
        return (Record(messages=self.prompt + self.chosen, where=self.where, answer_turns=_turns(self.chosen)),
                Record(messages=self.prompt + self.rejected, where=self.where, answer_turns=_turns(self.rejected)))


def _turns(answer: list) -> int:
    return sum(1 for m in answer if m["role"] == "assistant")


# ----------------------------------------------------------------------------- rows -> pairs
def pair_columns(keys) -> Optional[dict]:
    """``{column: field}`` renaming the data's columns to prompt / chosen / rejected when a chosen and a
    rejected column can be told (any letter case), else None."""
    by_lower = {str(k).lower(): str(k) for k in keys}
    chosen = next((by_lower[n] for n in CHOSEN_NAMES if n in by_lower), None)
    rejected = next((by_lower[n] for n in REJECTED_NAMES if n in by_lower), None)
    if chosen is None or rejected is None:
        return None
    out = {chosen: "chosen", rejected: "rejected"}
    # the prompt: a prompt-like column, or the conversation so far (LLaMA-Factory's ShareGPT pairs: conversations)
    prompt = next((by_lower[n] for n in PROMPT_NAMES + ("conversations", "messages")
                   if n in by_lower and by_lower[n] not in out), None)
    if prompt is not None:
        out[prompt] = "prompt"
    if "system" in by_lower:
        out[by_lower["system"]] = "system"
    return out


def normalise_pairs(rows: list, fmt: str = "auto", text_field: Optional[str] = None,
                    column_map: Optional[str] = None, where: str = "data") -> tuple:
    """Validate every row as a preference pair; ``(pairs, format description)``. Same signature as
    ``core.data.normalise`` so that ``split_records`` serves both."""
    if not rows:
        raise FtUsageError(f"{where} has no rows: it holds no examples.")
    if fmt not in ("auto", None):
        raise FtUsageError(f"format: {fmt} does not apply to preference pairs; drop the format setting (the pairs "
                           "are read from their prompt / chosen / rejected columns).")
    locate = rows.where if hasattr(rows, "where") else (lambda i, default: f"{default}, row {i + 1}")
    columns = list(dict.fromkeys(k for r in rows[:1000] if isinstance(r, dict) for k in r))
    mapping = parse_map(column_map)
    missing = [a for a in mapping if a not in columns]
    if missing:
        raise FtUsageError(f"{where}: --map names column(s) {', '.join(map(repr, missing))} that do not exist. "
                           f"Columns: {', '.join(sorted(map(str, columns)))}.")
    mapped = {c: mapping.get(c, c) for c in columns}
    found = pair_columns(mapped.values())
    if found is None:
        raise FtUsageError(
            f"{where}: preference training (objective: dpo / orpo / ipo / simpo) needs rows with a chosen and a rejected answer "
            f"(and their prompt); these rows have {', '.join(sorted(map(str, mapped.values()))) or 'no fields'}. "
            "Name the columns with --map, e.g. --map \"question=prompt,good=chosen,bad=rejected\", or train with "
            "objective: sft.")
    final = {c: found.get(m, m) for c, m in mapped.items()}
    shown = [f"{c} -> {f}" for c, f in final.items() if c != f and f in ("prompt", "chosen", "rejected")]
    rows2 = _renamed(rows, final)
    pairs = [_pair(r, locate(i, where)) for i, r in enumerate(rows2)]
    desc = PAIR_FORMAT + (f" (columns {', '.join(shown)})" if shown else "")
    return pairs, desc


def _side(value: Any, row: dict, key: str, where: str) -> list:
    if isinstance(value, str):  # (as read, or as _pair has cut it)
        return [{"role": "assistant", "content": value}]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return _messages(value, f"{where}, {key}")
    if isinstance(value, dict) and ("content" in value or "value" in value):  # one message (role/content, from/value)
        return _messages([value], f"{where}, {key}")
    return [{"role": "assistant", "content": _string_field(row, key, where)}]


def _prompt(row: dict, where: str) -> tuple:
    """``(the prompt's messages or None, whether it was a Human:/Assistant: transcript)``. A transcript prompt
    (Anthropic HH's layout in Dahoas/full-hh-rlhf and rm-static: the conversation so far, ending at the
    "Assistant:" marker the answers follow) becomes its turns, without that last, empty, marker."""
    if row.get("prompt") is None:
        return None, False
    p = conversation_cell(row["prompt"])
    if hasattr(p, "tolist") and not isinstance(p, (str, bytes)):
        p = p.tolist()
    if isinstance(p, list):
        return _messages(p, f"{where}, prompt"), False
    text = _string_field(row, "prompt", where)
    talk = _conversation_transcript(text)
    if talk is None:
        return [{"role": "user", "content": text}], False
    if talk[-1]["role"] == "assistant":
        if talk[-1]["content"]:
            raise FtUsageError(
                f"{where}: the prompt is a Human:/Assistant: transcript whose last Assistant: turn already holds text "
                f"({_short(talk[-1]['content'])!r}), so where the answers begin cannot be told. End each prompt at its "
                "final \"Assistant:\" marker (the chosen and rejected answers follow it), or give the prompt as a "
                "list of role/content messages and name the answer columns with --map \"...=chosen,...=rejected\".")
        talk = talk[:-1]
    return talk, True


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _conversation_transcript(text: str) -> Optional[list]:
    """A transcript that opens with the human's turn and holds an "Assistant:" marker: surely a conversation
    written out (not a text that merely begins with a word and a colon), else None."""
    talk = _transcript(text)
    if not talk or talk[0]["role"] != "user" or not any(m["role"] == "assistant" for m in talk):
        return None
    return talk


def _transcript(text: str) -> Optional[list]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages (None if the text is not such a transcript)."""
    import re

    parts = re.split(r"\n\n(Human|Assistant):", text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _pair(row: Any, where: str) -> Pair:
    if not isinstance(row, dict):
        raise FtUsageError(f"{where}: expected an object, got {type(row).__name__}.")
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise FtUsageError(f"{where}: field {key!r} is missing or null; every pair needs both answers.")
    prompt, transcript = _prompt(row, where)
    c_raw, r_raw = conversation_cell(row["chosen"]), conversation_cell(row["rejected"])
    if transcript and isinstance(c_raw, str) and isinstance(r_raw, str):
        # answers to an HH transcript prompt: " yes" after "Assistant:" is read as the transcript path reads
        # its turns (stripped); whole transcripts on both sides are read as whole conversations
        talks = _conversation_transcript(c_raw), _conversation_transcript(r_raw)
        c_raw, r_raw = talks if None not in talks else (c_raw.strip(), r_raw.strip())
    if prompt is None and isinstance(c_raw, str) and isinstance(r_raw, str):
        c_raw, r_raw = _transcript(c_raw), _transcript(r_raw)
        if c_raw is None or r_raw is None:
            raise FtUsageError(
                f"{where}: chosen and rejected are plain text and there is no prompt column, so the prompt they answer "
                "cannot be told. Give a prompt column (--map \"question=prompt\"), or write each side as a "
                "conversation (a list of role/content messages ending in the answer).")
    chosen, rejected = _side(c_raw, row, "chosen", where), _side(r_raw, row, "rejected", where)
    if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        # whole conversations (implicit prompt; UltraFeedback's beside a prompt column, which they repeat): the
        # prompt is what the two share, up to the first message where they differ
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            raise FtUsageError(
                f"{where}: chosen and rejected part at message {k}, a {chosen[0]['role']} / {rejected[0]['role']} "
                "turn, not at the answer: a pair is two answers to one conversation. Give the shared conversation "
                "once (a prompt column, or the same first messages on both sides).")
    elif prompt is None:
        raise FtUsageError(f"{where}: a pair of answers without a prompt: give the question they answer (a prompt "
                           "column, --map \"question=prompt\"), or write both sides as whole conversations.")
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise FtUsageError(f"{where}: the {side} side does not end with an assistant answer "
                               f"(roles: {', '.join(m['role'] for m in prompt + msgs)}).")
    users = [[m for m in msgs if m["role"] == "user"] for msgs in (chosen, rejected)]
    if len(users[0]) != len(users[1]):  # chosen "...Assistant: yes\n\nHuman: ok\n\nAssistant: good", rejected "...no"
        longer, other = ("chosen", "rejected") if len(users[0]) > len(users[1]) else ("rejected", "chosen")
        extra = users[0 if longer == "chosen" else 1][len(users[1 if longer == "chosen" else 0])]
        raise FtUsageError(
            f"{where}: the {longer} side goes on past its answer: a further user turn ({_short(extra['content'])!r}) "
            f"follows it that the {other} side lacks, so the two are not answers to one conversation (and the loss "
            f"would be on the {longer} side's later turns too). Cut the {longer} side after its first answer, or "
            "give both sides the same turns up to where their answers differ.")
    system = row.get("system")
    if isinstance(system, str) and system and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}] + prompt
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected, where=where)


# ----------------------------------------------------------------------------- tokenised pairs
@dataclass
class PairExample:
    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def input_ids(self) -> list:
        """The longer side: what memory estimates and length reports go by."""
        return max(self.chosen.input_ids, self.rejected.input_ids, key=len)

    @property
    def n_loss_tokens(self) -> int:
        return self.chosen.n_loss_tokens + self.rejected.n_loss_tokens

    def features(self) -> dict:
        return {"input_ids": self.chosen.input_ids, "labels": self.chosen.labels,
                "rejected_input_ids": self.rejected.input_ids, "rejected_labels": self.rejected.labels}


def unpaired(features: list) -> list:
    """A batch of pair features as the rows the model sees: every chosen side, then every rejected side."""
    if not features or "rejected_input_ids" not in features[0]:
        return features
    return ([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
            + [{"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"]} for f in features])


def empty_answer(answer: list) -> bool:
    """An answer with nothing in it: no text and no tool call in any of its assistant turns."""
    return not any(str(m.get("content") or "").strip() or m.get("tool_calls")
                   for m in answer if m["role"] == "assistant")


def tokenize_pairs(pairs: list, tokenizer, max_seq_len: int, overlong: str = "truncate", report=None) -> list:
    """Both sides of every pair tokenised; a pair is kept only when both sides keep an answer token, and its
    chosen answer is not empty (as a supervised example with an empty answer is dropped: it would teach the
    model to end its turn at once; counted in ``report`` as ``dropped_empty``)."""
    from .data import fit_length, tokenize_records

    if pairs and all(empty_answer(p.chosen) for p in pairs):
        raise FtUsageError(
            f"every one of the {counted(len(pairs), 'pair')} has an empty chosen answer, so there is no answer to "
            "prefer (a pair with an empty chosen answer would teach the model to end its turn at once, and is "
            "dropped). Check the chosen column (--map ...=chosen).")
    sides = [p.records() for p in pairs]
    chosen = tokenize_records(tokenizer, [c for c, _ in sides])
    rejected = tokenize_records(tokenizer, [r for _, r in sides])
    out = []
    for pair, c, r in zip(pairs, chosen, rejected):
        if empty_answer(pair.chosen):
            if report is not None:
                report.count("dropped_empty", c)
            continue
        if report is not None:  # the Tokens and Length lines describe the pairs that can train
            report.lengths.append(max(len(c.input_ids), len(r.input_ids)))
        over = max(len(c.input_ids), len(r.input_ids)) - max_seq_len
        # truncate_prompt takes the same stretch out of both sides' prompt: each answer follows the same text
        cut = over if overlong == "truncate_prompt" and over > 0 else None
        fitted = [fit_length(ex, max_seq_len, overlong, cut) for ex in (c, r)]
        if report is not None:  # a pair counts once, under the worse of what befell its two sides
            outcome, ex = min(((why, ex) for (_, why), ex in zip(fitted, (c, r))), key=lambda o: _SEVERITY[o[0]])
            report.count(outcome, ex)
        if fitted[0][0] is not None and fitted[1][0] is not None:
            out.append(PairExample(fitted[0][0], fitted[1][0]))
    return out


_SEVERITY = {"dropped_empty": 0, "dropped_overlong": 1, "dropped_no_answer": 2, "truncated": 3, "prompt_cut": 4,
             "kept": 5}


def pair_warnings(pairs: list) -> list:
    """``core.data.quality_warnings`` of the pairs (read as their chosen sides), pairs whose two answers are
    the same (they teach nothing: their loss is a constant), and pairs whose rejected answer is empty."""
    from .data import quality_warnings

    warnings = quality_warnings(pairs, "pair")
    same = sum(1 for p in pairs if p.chosen == p.rejected)
    if same:
        warnings.append(f"{counted(same, 'pair')} whose chosen and rejected answers are the same (nothing to learn "
                        "from them).")
    # (an empty chosen answer drops its pair, counted in the report: see tokenize_pairs)
    empty = sum(1 for p in pairs if empty_answer(p.rejected) and not empty_answer(p.chosen))
    if empty:
        warnings.append(f"{counted(empty, 'pair')} with an empty rejected answer: they teach only that answering "
                        "beats saying nothing. Check the rejected column (--map ...=rejected) if that is not meant.")
    return warnings


def show_pair(tokenizer, ex: PairExample, limit: int = 400) -> str:
    """The chosen side whole, then the rejected side's answer (its prompt is the same)."""
    from .data import show_loss_tokens

    r = ex.rejected
    start = next((i for i, lab in enumerate(r.labels) if lab != -100), 0)
    answer = TokenizedExample(r.input_ids[start:], r.labels[start:])
    return (f"chosen:\n{show_loss_tokens(tokenizer, ex.chosen, limit)}\n"
            f"rejected (after the same prompt):\n{show_loss_tokens(tokenizer, answer, limit)}")


# ----------------------------------------------------------------------------- the losses
def sequence_logprobs(model, inputs: dict, chunk_rows: int = 0, workspace=None, chunked: bool = True):
    """``(sum of the answer tokens' log-probabilities per row, answer tokens per row)``, both (rows,) fp32."""
    import torch

    from .speed import IGNORE_INDEX, auto_chunk_rows, chunked_token_logprobs, loss_rows

    labels = inputs["labels"]
    if chunked:
        rows, targets, mask, head = loss_rows(model, inputs)
        logp = chunked_token_logprobs(rows, head.weight, targets, chunk_rows or auto_chunk_rows(head.weight.shape[0]),
                                      workspace)
        sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logp.device).index_add(
            0, mask.nonzero()[:, 0], logp)
    else:  # a head the chunked path cannot take (see speed.chunked_loss_blocker): full logits
        forward = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
        logits = model(**forward, use_cache=False).logits[:, :-1].float()
        shift = labels[:, 1:]
        mask = shift != IGNORE_INDEX
        logp = logits.log_softmax(-1).gather(-1, shift.clamp(min=0)[..., None])[..., 0]
        sums = (logp * mask).sum(1)
    return sums, mask.sum(1).to(torch.float32)


def unwrapped(model):
    """The PEFT model under a DistributedDataParallel wrapper (several processes), or the model itself."""
    return getattr(model, "module", model) if not hasattr(model, "disable_adapter") else model


def pair_loss(objective: str, beta: float, policy: tuple, reference: Optional[Any] = None,
              gamma: float = 0.5) -> tuple:
    """``(loss, metrics)`` for a batch whose first half of rows are the chosen sides and second half the
    rejected ones. ``policy``: :func:`sequence_logprobs` with the adapter on; ``reference``: the sums with it
    off (DPO, IPO). Metrics (detached): ``pairs_right``, the share of pairs the adapter ranks the chosen
    answer above the rejected one (DPO, IPO: against the base; ORPO: by odds; SimPO: per token), a tie as
    half, and ``margin``, the mean gap."""
    import torch
    import torch.nn.functional as F

    sums, counts = policy
    n = sums.shape[0] // 2
    if objective == "dpo":
        ref = reference.to(sums.dtype)
        chosen_reward, rejected_reward = beta * (sums[:n] - ref[:n]), beta * (sums[n:] - ref[n:])
        gap = chosen_reward - rejected_reward
        loss = -F.logsigmoid(gap).mean()
    elif objective == "ipo":  # Azar et al. 2023, on mean log-probabilities per token (as TRL computes it)
        per_token = (sums - reference.to(sums.dtype)) / counts.clamp(min=1)
        gap = per_token[:n] - per_token[n:]
        loss = ((gap - 1 / (2 * beta)) ** 2).mean()
    elif objective == "simpo":  # Meng et al. 2024: no reference, length-normalised, a target margin gamma
        mean = sums / counts.clamp(min=1)
        gap = beta * (mean[:n] - mean[n:])
        loss = -F.logsigmoid(gap - gamma).mean()
    elif objective == "orpo":
        mean = sums / counts.clamp(min=1)
        mean = mean.clamp(max=-1e-6)  # log(1 - p) is -inf at p = 1
        log_odds = mean - torch.log(-torch.expm1(mean))
        gap = log_odds[:n] - log_odds[n:]
        nll = -sums[:n].sum() / counts[:n].sum().clamp(min=1)
        loss = nll - beta * F.logsigmoid(gap).mean()
    else:
        raise ValueError(objective)
    gap = gap.detach()
    # a tie counts as half: at DPO's and IPO's first step the adapter is still the base and every pair is one
    right = (gap > 0).float() + 0.5 * (gap == 0).float()
    return loss, {"pairs_right": right.mean(), "margin": gap.mean()}


def pair_step(model, inputs: dict, objective: str, beta: float, gamma: float = 0.5, chunk_rows: int = 0,
              workspace=None, chunked: bool = True) -> tuple:
    """The loss and metrics of one batch of pairs (``core.training.CountingCollator`` builds it)."""
    import torch

    from ..config import REFERENCE_OBJECTIVES

    policy = sequence_logprobs(model, inputs, chunk_rows, workspace, chunked)
    reference = None
    if objective in REFERENCE_OBJECTIVES:  # no-grad: past a DistributedDataParallel wrapper, which only syncs gradients
        peft_model = unwrapped(model)
        with torch.no_grad(), peft_model.disable_adapter(), noiseless_embeddings(peft_model):
            reference, _ = sequence_logprobs(peft_model, inputs, chunk_rows, workspace, chunked)
    return pair_loss(objective, beta, policy, reference, gamma)


@contextmanager
def noiseless_embeddings(model):
    """The reference pass without NEFTune's noise. transformers' NEFTune (``neftune_noise_alpha``) is a forward
    hook on the input embeddings that adds noise while the module is in training mode; the reference is the base
    model as it is (the policy pass keeps its noise), so the embedding module is in eval mode for that pass. Only
    that module's flag changes: dropout elsewhere is as in the policy pass."""
    base = getattr(getattr(model, "base_model", None), "model", model)
    getter = getattr(base, "get_input_embeddings", None)
    embeddings = getter() if getter is not None else None
    if embeddings is None or not hasattr(embeddings, "neftune_noise_alpha") or not embeddings.training:
        yield
        return
    embeddings.training = False
    try:
        yield
    finally:
        embeddings.training = True
