"""Held-out loss and perplexity, and the forgetting check: the same measure on general text that no
adapter was trained on (``ft_magics/data/general.txt``), base and adapter side by side.

Tokenisation is :func:`ft_magics.core.data.prepare`, the same as training, so the loss here is the
loss training reports (answers only for chat data; every token for plain text).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import FtUsageError
from .events import counted

GENERAL_TEXT = Path(__file__).resolve().parent.parent / "data" / "general.txt"


def eval_config(max_seq_len: int, objective: str = "sft", column_map: Optional[str] = None):
    from ..config import TrainConfig

    return TrainConfig.from_dict({"max_seq_len": max_seq_len, "eval_fraction": 0.0, "objective": objective,
                                  "map": column_map})


def heldout_examples(src: Any, tokenizer, namespace: Optional[dict] = None, max_seq_len: int = 512,
                     column_map: Optional[str] = None, notes: Optional[list] = None, model: Any = None) -> list:
    """Every row of ``src`` (file, demo:NAME, variable), tokenised with loss masks; of a DatasetDict with a
    'train' and a 'validation' / 'test' split, that held-out split. Rows of preference pairs (prompt / chosen /
    rejected) give :class:`core.preference.PairExample` s. ``notes`` gets a line when rows longer than
    ``max_seq_len`` were cut (training's data report says so; an evaluation said nothing); ``model``, where given,
    keeps its advice within the model's context window."""
    from .data import prepare

    cfg = eval_config(max_seq_len, data_objective(src, namespace, column_map), column_map)
    examples, held_out, report = prepare(src, tokenizer, cfg, namespace=namespace, model=model)
    if notes is not None and report.over_max:
        longest = report.stats()["max"]
        notes.append(f"{report.over_max:,} of {len(report.lengths):,} examples of {src if isinstance(src, str) else 'the data'} "
                     f"are longer than --max-seq-len {max_seq_len} and were scored cut to it"
                     + (f" ({report.dropped_no_answer:,} cut before their answer were left out)"
                        if report.dropped_no_answer else "") + f"; {report.keep_whole(longest)}.")
    return held_out or examples


def data_objective(src: Any, namespace: Optional[dict] = None, column_map: Optional[str] = None) -> str:
    """"dpo" when ``src``'s rows are preference pairs (chosen / rejected columns, after ``column_map``), else
    "sft": how data given to an evaluation is read."""
    from .data import load_rows, parse_map
    from .preference import pair_columns

    rows, _ = load_rows(src, namespace, max_rows=1)
    if not rows or not isinstance(rows[0], dict):
        return "sft"
    mapping = parse_map(column_map)
    row = {mapping.get(str(k), str(k)): v for k, v in rows[0].items()}
    return "dpo" if pair_columns(row) is not None else "sft"


@contextlib.contextmanager
def _scoring(model, dtype=None):
    """How evaluation runs ``model``: eval mode, no gradients, the fused LoRA layers and, with a 16-bit compute
    ``dtype``, autocast as in training (what a run's own evaluation computes); its mode put back after."""
    import torch

    from .fused_lora import fused_lora
    from .speed import autocast_context

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), fused_lora(model), autocast_context(model, dtype):
            yield
    finally:
        if was_training:
            model.train()


def by_length(items: list, key=lambda e: len(e.input_ids)) -> list:
    """``items`` longest first: batches of similar lengths pad little (a sum over examples does not depend on
    their order). Held-out data in file order padded 8 long rows to 512 tokens for a few hundred real ones."""
    return sorted(items, key=key, reverse=True)


def _padded(batch: list, pad: int, device):
    """``(input_ids, attention_mask, labels)`` of tokenised examples, right-padded to the longest."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, e in enumerate(batch):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


class PairScores(tuple):
    """How one model scores held-out preference pairs: ``(right, n)``, the ``right`` of ``n`` pairs whose chosen
    answer it finds more likely than the rejected one, by each answer's mean token log-probability after the shared
    prompt (the sum would favour the shorter answer). It unpacks as that pair (``right, n = report.pairs[col]``);
    ``chosen`` / ``rejected`` hold each answer's summed log-probability, in the pairs' order (what DPO's implicit
    rewards are made of)."""

    def __new__(cls, right: int, n: int, chosen: tuple = (), rejected: tuple = ()):
        scores = super().__new__(cls, (right, n))
        scores.chosen, scores.rejected = tuple(chosen), tuple(rejected)
        return scores

    @property
    def right(self) -> int:
        return self[0]

    @property
    def n(self) -> int:
        return self[1]


def pair_scores(model, tokenizer, pairs: list, batch_size: int = 8, on_batch=None, dtype=None) -> PairScores:
    """:class:`PairScores` of ``model`` on ``pairs``."""
    from .preference import sequence_logprobs
    from .speed import _causal_lm, attention_for, chunked_loss_blocker, without_padding_mask

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    chunked = chunked_loss_blocker(model) is None
    right = 0
    sums_of = {}  # id(pair) -> (chosen sum, rejected sum)
    ordered = by_length(pairs, key=lambda p: max(len(p.chosen.input_ids), len(p.rejected.input_ids)))
    with _scoring(model, dtype):
        for i in range(0, len(ordered), batch_size):
            batch = ordered[i:i + batch_size]
            ids, mask, labels = _padded([p.chosen for p in batch] + [p.rejected for p in batch], pad, device)
            inputs = without_padding_mask({"input_ids": ids, "attention_mask": mask, "labels": labels})
            with attention_for(inputs, _causal_lm(model)):  # as the training run's own evaluation of pairs
                sums, counts = sequence_logprobs(model, inputs, chunked=chunked)
            per_token = sums / counts.clamp(min=1)
            right += int((per_token[:len(batch)] > per_token[len(batch):]).sum())
            for k, p in enumerate(batch):
                sums_of[id(p)] = (float(sums[k]), float(sums[len(batch) + k]))
            if on_batch is not None:
                on_batch()
    chosen, rejected = zip(*(sums_of[id(p)] for p in pairs)) if pairs else ((), ())
    return PairScores(right, len(pairs), tuple(chosen), tuple(rejected))


@dataclass
class Rewards:
    """DPO's implicit rewards of an adapter against the base on held-out pairs, as TRL reports them: a reward is
    ``beta * (log p_adapter(answer) - log p_base(answer))`` over the answer's tokens; the margin is the chosen
    answer's reward less the rejected one's, and the accuracy the share of pairs whose margin is above 0."""
    beta: float
    chosen: float  # mean reward of the chosen answers
    rejected: float
    margin: float
    right: int
    n: int

    @classmethod
    def of(cls, adapter: PairScores, base: PairScores, beta: float) -> Optional["Rewards"]:
        if not adapter.n or len(adapter.chosen) != len(base.chosen):
            return None
        rc = [beta * (a - b) for a, b in zip(adapter.chosen, base.chosen)]
        rr = [beta * (a - b) for a, b in zip(adapter.rejected, base.rejected)]
        margins = [c - r for c, r in zip(rc, rr)]
        n = len(margins)
        return cls(beta, sum(rc) / n, sum(rr) / n, sum(margins) / n, sum(m > 0 for m in margins), n)

    def text(self) -> str:
        return (f"reward accuracy {self.right}/{self.n} ({100 * self.right / self.n:.0f}%), margin {self.margin:+.3f} "
                f"(chosen {self.chosen:+.3f}, rejected {self.rejected:+.3f})")


def general_examples(tokenizer, max_seq_len: int = 512) -> list:
    """The bundled general-text sample, one example per paragraph."""
    from .data import prepare

    examples, _, _ = prepare(str(GENERAL_TEXT), tokenizer, eval_config(max_seq_len), txt_mode="blocks")
    return examples


def loss_and_perplexity(model, tokenizer, examples: list, batch_size: int = 8, on_batch=None,
                        dtype=None) -> tuple[float, float, int]:
    """Token-weighted mean cross-entropy over the loss-bearing tokens, its perplexity, and the token count:
    the eval loss a training run reports too (``speed.summed_loss``, batch by batch).
    ``on_batch()`` is called after each batch (progress); ``dtype``: the compute dtype to autocast to."""
    if not examples:
        raise FtUsageError("no examples to evaluate (every row was empty or cut away).")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    total, count = 0.0, 0
    from .speed import _causal_lm, attention_for, chunked_loss_blocker, summed_loss, without_padding_mask

    chunked = chunked_loss_blocker(model) is None  # the summed loss over the answer rows only, no full logits

    examples = by_length(examples)
    with _scoring(model, dtype):
        for i in range(0, len(examples), batch_size):
            ids, mask, labels = _padded(examples[i:i + batch_size], pad, device)
            # right padding: the causal mask alone, and on the CPU ft_magics' attention, as training evaluates
            inputs = without_padding_mask({"input_ids": ids, "attention_mask": mask, "labels": labels})
            with attention_for(inputs, _causal_lm(model)):
                batch_total, batch_count = summed_loss(model, inputs, chunked)
            total, count = total + float(batch_total), count + int(batch_count)
            if on_batch is not None:
                on_batch()
    if count == 0:
        raise FtUsageError("no loss-bearing tokens to evaluate.")
    loss = total / count
    return loss, math.exp(min(loss, 50.0)), count


def _ppl(ppl: float) -> str:
    """A perplexity to two decimals, or to three significant digits once it is past 100,000."""
    return f"{ppl:.2f}" if ppl < 1e5 else f"{ppl:.3g}"


def normalised_answer(text: str) -> str:
    return " ".join((text or "").split()).casefold()


def first_line(text: str) -> str:
    return next((line for line in (text or "").splitlines() if line.strip()), "")


def answer_scores(model, tokenizer, cases: list, batch_size: int = 8, on_batch=None) -> tuple:
    """Greedy answers to ``cases`` (data.AnswerCase): ``(exact, first line, n, answers)``. Exact: the whole
    answer equals the reference, whitespace and case aside; first line: its first non-empty line does (a
    label, a category, a one-line verdict). Answers get the reference's length in tokens and 8 more."""
    from .inference import generate_batch

    limit = min(512, max(len(tokenizer(c.reference, add_special_tokens=False)["input_ids"]) for c in cases) + 8)
    answers = []
    for i in range(0, len(cases), batch_size):
        chunk = cases[i:i + batch_size]
        answers += [text for text, _ in generate_batch(model, tokenizer, [c.prompt for c in chunk], max_new_tokens=limit,
                                                       contexts=[(c.system, c.history) for c in chunk])]
        if on_batch is not None:
            on_batch()
    exact = sum(normalised_answer(a) == normalised_answer(c.reference) for a, c in zip(answers, cases))
    first = sum(normalised_answer(first_line(a)) == normalised_answer(first_line(c.reference))
                for a, c in zip(answers, cases))
    return exact, first, len(cases), answers


def batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


class EvalProgress:
    """Progress lines for an evaluation of ``total`` batches: none in its first ``after_s`` seconds (a quick
    evaluation prints nothing), then one at most every ``every_s`` seconds, and one for the last batch."""

    def __init__(self, total: int, write, after_s: float = 3.0, every_s: float = 5.0):
        self.total, self.write, self.after_s, self.every_s = total, write, after_s, every_s
        self.done, self.what = 0, ""
        self.started, self.last = time.monotonic(), None

    def tick(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.started < self.after_s:
            return
        if self.last is not None and now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        self.write(f"evaluating: {self.done}/{self.total} batches ({self.done / max(self.total, 1):.0%}), "
                   f"{self.what}, {now - self.started:.0f} s")


@dataclass
class EvalReport:
    columns: list  # "base" and the adapter
    results: dict = field(default_factory=dict)  # (set label, column) -> (loss, ppl, tokens)
    sets: list = field(default_factory=list)
    answers: dict = field(default_factory=dict)  # column -> (exact, first line, n, answers): greedy answers scored
    cases: list = field(default_factory=list)  # the questions answered (data.AnswerCase), in the answers' order
    pairs: dict = field(default_factory=dict)  # column -> PairScores: preference data
    notes: list = field(default_factory=list)  # what was done to the data to score it (rows cut to max_seq_len)
    reward_beta: float = 0.1  # DPO's beta for the implicit rewards (the adapter's own where its run had one)
    reward_beta_why: str = "DPO's usual"

    def pair_cell(self, column: str) -> str:
        right, n = self.pairs[column][:2]
        return f"{right}/{n} ({100 * right / n:.0f}%)"

    def rewards(self) -> Optional[Rewards]:
        """The adapter's implicit DPO rewards against the base on the held-out pairs (None without both)."""
        if len(self.columns) < 2 or not all(c in self.pairs for c in self.columns[:2]):
            return None
        return Rewards.of(self.pairs[self.columns[1]], self.pairs[self.columns[0]], self.reward_beta)

    def _rewards_line(self) -> str:
        r = self.rewards()
        return (f"DPO rewards of {self.columns[1]} vs the base on the held-out pairs (beta {r.beta:g}, "
                f"{self.reward_beta_why}): {r.text()}") if r is not None else ""

    def answer_cell(self, column: str) -> str:
        exact, first, n = self.answers[column][:3]
        return f"exact {exact}/{n} ({100 * exact / n:.0f}%), first line {first}/{n} ({100 * first / n:.0f}%)"

    def misses(self, column: str) -> list:
        """``[(case, answer)]`` of the questions ``column``'s greedy answer did not match as a whole."""
        answers = self.answers[column][3] if len(self.answers.get(column, ())) > 3 else []
        return [(c, a) for c, a in zip(self.cases, answers)
                if normalised_answer(a) != normalised_answer(c.reference)]

    def _misses_lines(self, column: str, shown: int = 3) -> list:
        """The first few questions the adapter (the last column) answered otherwise, each with both answers."""
        missed = self.misses(column)
        if not missed:
            return []

        def clip(text: str, n: int = 70) -> str:
            text = " ".join(str(text).split())
            return text if len(text) <= n else text[:n - 3] + "..."

        head = (f"{column} answered {counted(len(missed), 'question')} otherwise"
                + (f" (the first {shown}; EvalReport.misses({column!r}) holds them all)" if len(missed) > shown else "")
                + ":")
        return [head] + [f"  Q: {clip(c.prompt)}\n     expected: {clip(c.reference)}\n     answered: {clip(a) or '(nothing)'}"
                         for c, a in missed[:shown]]

    def add(self, label: str, column: str, loss: float, ppl: float, tokens: int) -> None:
        if label not in self.sets:
            self.sets.append(label)
        self.results[(label, column)] = (loss, ppl, tokens)

    def loss(self, label: str, column: str) -> float:
        return self.results[(label, column)][0]

    def forgetting(self) -> Optional[float]:
        """Relative change of general-text perplexity, adapter vs base (+0.10 = 10% worse)."""
        general = [s for s in self.sets if s.startswith("general")]
        if not general or len(self.columns) < 2:
            return None
        base, adapter = (self.results[(general[0], c)][1] for c in self.columns[:2])
        return adapter / base - 1.0

    def _cell(self, s: str, c: str, sep: str = " ") -> str:
        loss, ppl, _ = self.results[(s, c)]
        return f"loss {loss:.4f}{sep}ppl {_ppl(ppl)}"

    def _forgetting_line(self, f: float) -> str:
        change = f"{f + 1:,.0f}x the base's" if f >= 9 else f"{f * 100:+.1f}% vs base"  # +900% and up: a factor
        return f"forgetting check: perplexity on general text {change}"

    def to_text(self) -> str:
        labels = [self._set_label(s) for s in self.sets]
        width = max([33] + [len(label) for label in labels]) + 1  # each set's whole name, tokens included
        cells = [[self._cell(s, c) for c in self.columns] for s in self.sets]
        col = max([26] + [len(x) + 2 for row in cells for x in row])  # a wide perplexity keeps its gap
        lines = [f"{'':<{width}}" + "".join(f"{c[:col - 2]:>{col}}" for c in self.columns)]
        for label, row in zip(labels, cells):
            lines.append(f"{label:<{width}}" + "".join(f"{x:>{col}}" for x in row))
        for c in self.columns:
            if c in self.answers:
                lines.append(f"greedy answers, {c}: {self.answer_cell(c)} match the reference")
        if self.columns[-1] in self.answers:
            lines += self._misses_lines(self.columns[-1])
        for c in self.columns:
            if c in self.pairs:
                lines.append(f"held-out pairs, {c}: the chosen answer is the more likely one (per token) in {self.pair_cell(c)}")
        if self.rewards() is not None:
            lines.append(self._rewards_line())
        if self.forgetting() is not None:
            lines.append(self._forgetting_verdict())
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _set_label(self, s: str) -> str:
        """A scored set with its token count: what the losses are over (the same in the text and the table)."""
        return f"{s} ({self.results[(s, self.columns[0])][2]} tok)"

    def _forgetting_verdict(self) -> str:
        f = self.forgetting()
        verdict = ("the loss is not a number: the adapter's weights are not finite" if math.isnan(f) else
                   "general text got worse: some forgetting" if f > 0.05 else
                   "general text unchanged: no sign of forgetting" if f > -0.05 else "general text got better")
        return f"{self._forgetting_line(f)} ({verdict})"

    def to_html(self) -> str:
        import html

        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        rows = "".join(
            f"<tr><td>{html.escape(self._set_label(s))}</td>" + "".join(f"<td>{self._cell(s, c, '<br>')}</td>" for c in self.columns)
            + "</tr>" for s in self.sets)
        if self.answers:
            rows += ("<tr><td>greedy answers matching the reference</td>"
                     + "".join(f"<td>{self.answer_cell(c) if c in self.answers else ''}</td>" for c in self.columns)
                     + "</tr>")
        if self.pairs:
            rows += ("<tr><td>held-out pairs whose chosen answer is the more likely one (per token)</td>"
                     + "".join(f"<td>{self.pair_cell(c) if c in self.pairs else ''}</td>" for c in self.columns)
                     + "</tr>")
        foot = ""
        if self.columns[-1] in self.answers and self.misses(self.columns[-1]):
            foot += f"<pre>{html.escape(chr(10).join(self._misses_lines(self.columns[-1])), quote=False)}</pre>"
        foot += f"<p>{html.escape(self._rewards_line(), quote=False)}</p>" if self.rewards() is not None else ""
        foot += f"<p>{html.escape(self._forgetting_verdict(), quote=False)}</p>" if self.forgetting() is not None else ""
        foot += "".join(f"<p>Note: {html.escape(n)}</p>" for n in self.notes)
        return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>{foot}"

    def _repr_html_(self) -> str:
        return self.to_html()

    def __str__(self) -> str:
        return self.to_text()
