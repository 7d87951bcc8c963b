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

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import FtUsageError
from .events import counted
from .data import (PROMPT_NAMES, Record, TokenizedExample, _is_conversation, _messages, _renamed, _string_field,
                   parse_map)

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
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return _messages(value, f"{where}, {key}")
    if isinstance(value, dict) and ("content" in value or "value" in value):  # one message (role/content, from/value)
        return _messages([value], f"{where}, {key}")
    return [{"role": "assistant", "content": _string_field(row, key, where)}]


def _prompt(row: dict, where: str) -> Optional[list]:
    if row.get("prompt") is None:
        return None
    p = row["prompt"]
    if hasattr(p, "tolist") and not isinstance(p, (str, bytes)):
        p = p.tolist()
    if isinstance(p, list):
        return _messages(p, f"{where}, prompt")
    return [{"role": "user", "content": _string_field(row, "prompt", where)}]


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
    prompt = _prompt(row, where)
    c_raw, r_raw = row["chosen"], row["rejected"]
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


def tokenize_pairs(pairs: list, tokenizer, max_seq_len: int, overlong: str = "truncate", report=None) -> list:
    """Both sides of every pair tokenised; a pair is kept only when both sides keep an answer token."""
    from .data import fit_length, tokenize_records

    sides = [p.records() for p in pairs]
    chosen = tokenize_records(tokenizer, [c for c, _ in sides])
    rejected = tokenize_records(tokenizer, [r for _, r in sides])
    out = []
    for c, r in zip(chosen, rejected):
        if report is not None:
            report.lengths.append(max(len(c.input_ids), len(r.input_ids)))
        fitted = [fit_length(ex, max_seq_len, overlong) for ex in (c, r)]
        if report is not None:  # a pair counts once, under the worse of what befell its two sides
            outcome, ex = min(((why, ex) for (_, why), ex in zip(fitted, (c, r))), key=lambda o: _SEVERITY[o[0]])
            report.count(outcome, ex)
        if fitted[0][0] is not None and fitted[1][0] is not None:
            out.append(PairExample(fitted[0][0], fitted[1][0]))
    return out


_SEVERITY = {"dropped_empty": 0, "dropped_overlong": 1, "dropped_no_answer": 2, "truncated": 3, "kept": 4}


def pair_warnings(pairs: list) -> list:
    """``core.data.quality_warnings`` of the pairs (read as their chosen sides), and pairs whose two answers
    are the same (they teach nothing: their loss is a constant)."""
    from .data import quality_warnings

    warnings = quality_warnings(pairs)
    same = sum(1 for p in pairs if p.chosen == p.rejected)
    if same:
        warnings.append(f"{counted(same, 'pair')} whose chosen and rejected answers are the same (nothing to learn "
                        "from them).")
    blank = lambda answer: not "".join(str(m.get("content") or "") for m in answer).strip()  # noqa: E731
    for side, lesson in (("chosen", "they teach the model to end its turn at once"),
                         ("rejected", "they teach only that answering beats saying nothing")):
        empty = sum(1 for p in pairs if blank(getattr(p, side)) and p.chosen != p.rejected)
        if empty:
            warnings.append(f"{counted(empty, 'pair')} with an empty {side} answer: {lesson}. Check the {side} "
                            f"column (--map ...={side}) if that is not meant.")
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
    answer above the rejected one (DPO, IPO: against the base; ORPO: by odds; SimPO: per token), and
    ``margin``, the mean gap."""
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
    return loss, {"pairs_right": (gap > 0).float().mean(), "margin": gap.mean()}


def pair_step(model, inputs: dict, objective: str, beta: float, gamma: float = 0.5, chunk_rows: int = 0,
              workspace=None, chunked: bool = True) -> tuple:
    """The loss and metrics of one batch of pairs (``core.training.CountingCollator`` builds it)."""
    import torch

    from ..config import REFERENCE_OBJECTIVES

    policy = sequence_logprobs(model, inputs, chunk_rows, workspace, chunked)
    reference = None
    if objective in REFERENCE_OBJECTIVES:  # no-grad: past a DistributedDataParallel wrapper, which only syncs gradients
        peft_model = unwrapped(model)
        with torch.no_grad(), peft_model.disable_adapter():
            reference, _ = sequence_logprobs(peft_model, inputs, chunk_rows, workspace, chunked)
    return pair_loss(objective, beta, policy, reference, gamma)
