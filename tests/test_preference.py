"""Preference training (objective: dpo / orpo / ipo / simpo): pair rows in their common shapes, the answer-only loss mask,
the chunked sequence log-probabilities, the two losses against their formulas, and the whole flow through
the magics on a tiny random model."""
from __future__ import annotations

import json
import math
import re

import pytest

from ft_magics.errors import FtUsageError

torch = pytest.importorskip("torch")

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
BOT = lambda text: {"role": "assistant", "content": text}  # noqa: E731

# the preferred answer is on the subject; the rejected one is not
PAIRS = [{"prompt": f"Question {i}: how do I reset my password?", "chosen": "Category: account\nAnswer: Use the reset link.",
          "rejected": "The quick brown fox jumps over the lazy dog."} for i in range(48)]


@pytest.fixture(scope="module")
def tok():
    from conftest import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _cfg(**kw):
    from ft_magics.config import TrainConfig

    return TrainConfig.from_dict({"objective": "dpo", **kw})


# --------------------------------------------------------------------------- rows -> pairs
@pytest.mark.parametrize("row", [
    {"prompt": "Name a colour", "chosen": "Blue", "rejected": "Dog"},  # TRL's standard form
    {"prompt": [USER("Name a colour")], "chosen": [BOT("Blue")], "rejected": [BOT("Dog")]},  # TRL's conversational
    {"chosen": [USER("Name a colour"), BOT("Blue")], "rejected": [USER("Name a colour"), BOT("Dog")]},  # implicit prompt
    {"prompt": "Name a colour", "chosen": [USER("Name a colour"), BOT("Blue")],  # UltraFeedback: whole conversations
     "rejected": [USER("Name a colour"), BOT("Dog")]},
    {"chosen": "\n\nHuman: Name a colour\n\nAssistant: Blue", "rejected": "\n\nHuman: Name a colour\n\nAssistant: Dog"},
    {"question": "Name a colour", "response_j": "Blue", "response_k": "Dog"},  # StackExchange-paired columns
    {"Prompt": "Name a colour", "Chosen": "Blue", "Rejected": "Dog"},
    # Dahoas/full-hh-rlhf, rm-static: the prompt is the HH transcript so far, the answers follow "Assistant:"
    {"prompt": "\n\nHuman: Name a colour\n\nAssistant:", "response": " Blue", "chosen": " Blue", "rejected": " Dog"},
    {"prompt": "\n\nHuman: Name a colour\n\nAssistant:", "chosen": "\n\nHuman: Name a colour\n\nAssistant: Blue",
     "rejected": "\n\nHuman: Name a colour\n\nAssistant: Dog"},
])
def test_pair_rows_in_their_common_shapes_become_the_same_pair(row):
    from ft_magics.core.preference import normalise_pairs

    (pair,), desc = normalise_pairs([row])
    assert (pair.prompt, pair.chosen, pair.rejected) == ([USER("Name a colour")], [BOT("Blue")], [BOT("Dog")])
    assert desc.startswith("preference pairs")


def test_a_system_column_and_a_shared_conversation_stay_in_the_prompt():
    from ft_magics.core.preference import normalise_pairs

    talk = [USER("hi"), BOT("hello"), USER("Name a colour")]
    (pair,), _ = normalise_pairs([{"chosen": talk + [BOT("Blue")], "rejected": talk + [BOT("Dog")], "system": "Be brief."}])
    assert pair.prompt == [{"role": "system", "content": "Be brief."}] + talk
    assert pair.chosen == [BOT("Blue")] and pair.rejected == [BOT("Dog")]


def test_whole_conversations_beside_a_prompt_column_keep_their_system_turn():
    """UltraFeedback-style rows whose conversations open with a system turn: the prompt is what both sides
    share (before, the prompt column was put in front of the whole conversation: user, system, user, answer)."""
    from ft_magics.core.preference import normalise_pairs

    sysm = {"role": "system", "content": "Be brief."}
    (pair,), _ = normalise_pairs([{"prompt": "Name a colour", "chosen": [sysm, USER("Name a colour"), BOT("Blue")],
                                   "rejected": [sysm, USER("Name a colour"), BOT("Dog")]}])
    assert (pair.prompt, pair.chosen, pair.rejected) == ([sysm, USER("Name a colour")], [BOT("Blue")], [BOT("Dog")])


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "p", "chosen": "a", "rejected": None}], r"index 0: field 'rejected' is missing or null"),
    ([{"chosen": [USER("a"), BOT("x")], "rejected": [USER("b"), BOT("y")]}],
     r"chosen and rejected part at message 0, a user / user turn, not at the answer"),
    ([{"chosen": [BOT("x")], "rejected": [BOT("y")]}], r"a pair of answers without a prompt"),
    ([{"chosen": "a", "rejected": "b"}], r"plain text and there is no prompt column.*--map"),
    ([{"prompt": "p", "answer": "a"}], r"needs rows with a chosen and a rejected answer.*--map.*objective: sft"),
    ([{"prompt": "p", "chosen": [USER("x"), BOT("a"), USER("y")], "rejected": [USER("x"), BOT("a"), USER("z")]}],
     r"part at message 2, a user / user turn"),
    ([{"prompt": "p", "chosen": [BOT("a"), USER("y")], "rejected": [BOT("b")]}],
     r"the chosen side does not end with an assistant"),
    # one side's answer goes on with a user turn the other lacks: trained silently, the unshared turn in the answer
    ([{"chosen": "\n\nHuman: hi\n\nAssistant: yes\n\nHuman: ok\n\nAssistant: good",
       "rejected": "\n\nHuman: hi\n\nAssistant: no"}],
     r"index 0: the chosen side goes on past its answer: a further user turn \('ok'\) follows it that the rejected "
     r"side lacks.*Cut the chosen side after its first answer"),
    ([{"prompt": "p", "chosen": [BOT("a")], "rejected": [BOT("b"), USER("more?"), BOT("c")]}],
     r"index 0: the rejected side goes on past its answer: a further user turn \('more\?'\)"),
    ([{"prompt": "\n\nHuman: hi\n\nAssistant: Sure,", "chosen": " yes", "rejected": " no"}],
     r"index 0: the prompt is a Human:/Assistant: transcript whose last Assistant: turn already holds text \('Sure,'\)"
     r".*End each prompt at its final \"Assistant:\" marker.*--map"),
])
def test_bad_pair_rows_are_refused_with_the_cause_and_the_fix(tok, rows, match):
    from ft_magics.core.data import prepare

    with pytest.raises(FtUsageError, match=match):
        prepare(rows, tok, _cfg())


def test_pair_settings_that_cannot_apply_are_refused():
    with pytest.raises(FtUsageError, match="packing: true does not apply to objective: dpo"):
        _cfg(packing=True)
    with pytest.raises(FtUsageError, match="train_on: all does not apply"):
        _cfg(objective="orpo", train_on="all")
    with pytest.raises(FtUsageError, match="beta must be positive"):
        _cfg(beta=-0.1)
    with pytest.raises(FtUsageError, match="simpo_gamma must be >= 0"):
        _cfg(objective="simpo", simpo_gamma=-1)
    with pytest.raises(FtUsageError, match="objective 'kto' is not one of sft, dpo, orpo, ipo, simpo"):
        _cfg(objective="kto")
    assert (_cfg(objective="simpo").pair_beta, _cfg(objective="ipo").pair_beta) == (2.0, 0.1)  # beta 0: usual
    assert _cfg(objective="simpo", beta=0.5).pair_beta == 0.5
    from ft_magics.config import TrainConfig

    named = TrainConfig.from_dict({"pref_beta": 0.3, "stage": "orpo"})  # LLaMA-Factory's names
    assert (named.objective, named.beta) == ("orpo", 0.3)


def test_only_the_answer_carries_loss_and_both_sides_share_the_prompt(tok):
    from ft_magics.core.data import prepare

    talk = [USER("hi"), BOT("hello there"), USER("Name a colour")]
    rows = [{"chosen": talk + [BOT("Blue")], "rejected": talk + [BOT("Dog food")]}] * 2
    train, _, report = prepare(rows, tok, _cfg())
    ex = train[0]
    first = [next(i for i, lab in enumerate(side.labels) if lab != -100) for side in (ex.chosen, ex.rejected)]
    assert first[0] == first[1] and ex.chosen.input_ids[:first[0]] == ex.rejected.input_ids[:first[0]]
    for side, answer in ((ex.chosen, "Blue"), (ex.rejected, "Dog food")):
        said = tok.decode([t for t in side.labels if t != -100])
        assert said.startswith(answer) and "hello there" not in said  # the earlier answer is prompt here
    assert "DPO compares each pair's chosen and rejected answer" in report.text()
    assert "rejected (after the same prompt)" in report.text()


def test_a_pair_is_dropped_as_one_when_either_answer_is_cut_away(tok):
    from ft_magics.core.data import prepare

    long_prompt = "word " * 60
    rows = [{"prompt": "short", "chosen": "yes", "rejected": "no"},
            {"prompt": long_prompt, "chosen": "yes", "rejected": "no"}]
    train, _, report = prepare(rows, tok, _cfg(max_seq_len=40))
    assert len(train) == 1 and report.dropped_no_answer == 1 and report.truncated == 1


def test_sft_on_pair_rows_names_the_objective_setting(tok):
    from ft_magics.config import TrainConfig
    from ft_magics.core.data import prepare

    with pytest.raises(FtUsageError, match="set objective: dpo"):
        prepare(PAIRS[:4], tok, TrainConfig())


# --------------------------------------------------------------------------- the log-probabilities and losses
def test_chunked_token_logprobs_match_full_logits_in_value_and_gradient():
    from ft_magics.core.speed import chunked_token_logprobs

    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64)
    t = torch.randint(0, 50, (37,))
    weights = torch.randn(37, dtype=torch.float64)  # a loss that weighs rows differently, as DPO's does
    got = chunked_token_logprobs(h, w, t, chunk_rows=8)
    (got * weights).sum().backward()
    g_chunked, h.grad = h.grad.clone(), None
    want = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0]
    (want * weights).sum().backward()
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(g_chunked, h.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(chunked_token_logprobs(h, w, t, 8).double(), want, atol=1e-5)


def _peft_pair_batch(tiny_model_dir, tok):
    """The tiny model with a LoRA adapter whose B is not zero (policy != reference), and a batch of 2 pairs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ft_magics.core.data import prepare
    from ft_magics.core.training import CountingCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    train, _, _ = prepare([PAIRS[0], {"prompt": "hi", "chosen": "Use the reset link.", "rejected": "thanks!"}],
                          tok, _cfg())
    batch = CountingCollator(tok)([e.features() for e in train])
    return model, batch


def _sums(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(1), mask.sum(1).float()


@pytest.mark.parametrize("objective", ["dpo", "orpo", "ipo", "simpo"])
@pytest.mark.parametrize("chunked", [True, False])
def test_the_pair_losses_match_their_formulas_in_value_and_gradient(tiny_model_dir, tok, objective, chunked):
    """DPO: -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))), the reference being the model with the
    adapter off; ORPO: the chosen answers' mean NLL - beta log sigmoid(log odds_c - log odds_r); IPO:
    (per-token log-ratio gap - 1/(2 beta))^2; SimPO: -log sigmoid(beta (mean_c - mean_r) - gamma), per-token
    means, no reference. Computed here from full logits with separate forwards, against core.preference
    (chunked head, one batch of 2n rows)."""
    from ft_magics.core.preference import pair_step

    model, batch = _peft_pair_batch(tiny_model_dir, tok)
    beta, gamma = 0.3, 0.7
    loss, metrics = pair_step(model, batch, objective, beta, gamma, chunked=chunked)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    sums, counts = _sums(model, batch)
    n = sums.shape[0] // 2
    if objective in ("dpo", "ipo"):
        with torch.no_grad(), model.disable_adapter():
            ref, _ = _sums(model, batch)
    if objective == "dpo":
        gap = beta * ((sums[:n] - ref[:n]) - (sums[n:] - ref[n:]))
        want = -torch.nn.functional.logsigmoid(gap).mean()
    elif objective == "ipo":
        gap = (sums[:n] - ref[:n]) / counts[:n] - (sums[n:] - ref[n:]) / counts[n:]
        want = ((gap - 1 / (2 * beta)) ** 2).mean()
    elif objective == "simpo":
        gap = beta * (sums[:n] / counts[:n] - sums[n:] / counts[n:])
        want = -torch.nn.functional.logsigmoid(gap - gamma).mean()
    else:
        mean = sums / counts
        odds = mean - torch.log1p(-torch.exp(mean))
        gap = odds[:n] - odds[n:]
        want = -sums[:n].sum() / counts[:n].sum() - beta * torch.nn.functional.logsigmoid(gap).mean()
    want.backward()
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-5
    assert float(metrics["pairs_right"]) == float(((gap > 0).float() + 0.5 * (gap == 0).float()).mean())
    assert any(g.abs().sum() > 0 for g in got.values())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[name], p.grad, atol=1e-6, rtol=1e-4), name


def test_gradient_accumulation_gives_the_step_of_the_whole_batch(tiny_model_dir, tmp_path):
    """A pair loss is a mean over the batch's pairs: under grad_accum the Trainer must divide it, or the step
    doubles (SGD, where the step's size shows)."""
    from ft_magics import Session

    weights = []
    for bs, ga in ((8, 1), (4, 2)):
        s = Session(adapters_dir=tmp_path / f"ga{ga}")
        s.load(str(tiny_model_dir), bits=32)
        s.train("g", PAIRS[:8], {"objective": "dpo", "batch_size": bs, "grad_accum": ga, "max_steps": 2,
                                 "optimizer": "sgd", "learning_rate": 0.5, "warmup": 0, "max_grad_norm": 0,
                                 "group_by_length": False, "lr_scheduler": "constant"}, listeners=[])
        weights.append({n: p.detach().clone() for n, p in s.model.named_parameters() if "lora_B" in n})
    moved = max(float(w.abs().max()) for w in weights[0].values())
    assert moved > 1e-4
    for n in weights[0]:
        assert torch.allclose(weights[0][n], weights[1][n], atol=1e-5 + 1e-3 * moved), n


# --------------------------------------------------------------------------- training, evaluation, the magics
def _margin(session, name, pairs_ex):
    """Mean over pairs of (adapter's log-ratio chosen/rejected) - (base's): > 0 when the adapter moved toward the
    chosen answers, relative to the base, which is what DPO optimises."""
    from ft_magics.core.adapters import BASE, activate
    from ft_magics.core.preference import sequence_logprobs
    from ft_magics.core.training import CountingCollator, training_layout

    batch = CountingCollator(session.tokenizer)([e.features() for e in pairs_ex])
    n = len(pairs_ex)
    ratios = {}
    with torch.no_grad(), training_layout(session.model):
        for col in (BASE, name):
            activate(session.model, col)
            sums, _ = sequence_logprobs(session.model, batch)
            ratios[col] = sums[:n] - sums[n:]
    return float((ratios[name] - ratios[BASE]).mean())


@pytest.mark.parametrize("objective", ["dpo", "orpo", "ipo", "simpo"])
def test_a_preference_run_moves_the_4bit_adapter_toward_the_chosen_answers(tiny_model_dir, tmp_path, objective):
    from ft_magics import Session
    from ft_magics.core.data import prepare

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(tiny_model_dir), bits=4)
    held_out = [{"prompt": f"Please, how do I reset my password {i}?", "chosen": PAIRS[0]["chosen"],
                 "rejected": PAIRS[0]["rejected"]} for i in range(6)]
    s.namespace.update(pairs=PAIRS, held=held_out)
    r = s.train("pref", "pairs", {"objective": objective, "max_steps": 10, "learning_rate": 5e-3, "batch_size": 8,
                                  "eval_steps": 5}, eval_data="held", listeners=[])
    assert r.status == "completed" and r.adapter_path
    losses = [loss for _, loss in r.record["loss_history"]]
    if objective == "dpo":
        assert abs(losses[0] - math.log(2)) < 1e-4  # the adapter starts as the base: every gap is 0
    assert losses[-1] < losses[0] - 0.1 and r.eval_loss < losses[0]
    saved = json.loads((tmp_path / "adapters" / "pref" / "ft_run.json").read_text())
    assert saved["settings"]["objective"] == objective  # and the beta it used, the objective's usual one:
    assert saved["settings"]["beta"] == (2.0 if objective == "simpo" else 0.1)
    _, held_ex, _ = prepare("pairs", s.tokenizer, _cfg(objective=objective), namespace=s.namespace, eval_src="held")
    margin = _margin(s, "pref", held_ex)
    assert margin > 0.5
    report = s.evaluate("pref", general=True)
    assert set(report.pairs) == {"base", "pref"} and report.pairs["pref"][1] == 6
    assert "held-out pairs, pref: the chosen answer is the more likely one (per token)" in report.to_text()
    # DPO's implicit rewards against the base, as TRL reports them: beta x the log-ratio margin measured above
    right, n = report.pairs["pref"]  # unpacks as (right, n), as before the rewards (06_preferences reads it so)
    assert (right, n) == (report.pairs["pref"].right, 6)
    rewards = report.rewards()
    beta, why = (0.1, "as its " + objective.upper() + " run") if objective in ("dpo", "ipo") else (0.1, "DPO's usual")
    assert rewards.n == 6 and rewards.right == 6 and rewards.margin == pytest.approx(beta * margin, rel=0.05)
    assert rewards.chosen - rewards.rejected == pytest.approx(rewards.margin)
    assert f"DPO rewards of pref vs the base on the held-out pairs (beta {beta:g}, {why}): reward accuracy 6/6" in report.to_text()
    assert "reward accuracy 6/6" in report.to_html()
    assert report.loss(report.sets[0], "pref") < report.loss(report.sets[0], "base")  # chosen answers, as text


def test_dpo_through_the_magics_reports_pairs_and_evaluates_them(shell, tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PAIRS))
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 4")
    capsys.readouterr()
    out = shell.run_cell_magic("lora_train", f"polite --data {path}",
                               "objective: dpo\nmax_steps: 4\neval_fraction: 0.1\nlearning_rate: 5e-3\n")
    text = capsys.readouterr().out
    assert "preference pairs" in text and "pairs right" in text and "DPO compares" in text
    assert "Training 'polite': 43 pairs (DPO)" in text  # 48 less the eval_fraction
    shell.run_cell_magic("lora_train", f"polite2 --data {path} --dry-run", "objective: orpo\nbatch_size: 16\n")
    assert "Dry run: 48 training pairs -> 3 optimizer steps of 16" in capsys.readouterr().out
    shell.run_cell_magic("lora_train", f"polite2 --data {path} --dry-run", "objective: orpo\neval_fraction: 0.1\n")
    assert "training pairs" in (out := capsys.readouterr().out) and "; 5 eval pairs, at the end;" in out
    shell.run_line_magic("lora_eval", "polite --no-general --answers 2")  # the chosen answers are the references
    text = capsys.readouterr().out
    assert "held-out pairs, polite" in text and "greedy answers, polite:" in text
    # plain SFT on the same file says how to train on the pairs
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="set objective: dpo"):
        shell.run_cell_magic("lora_train", f"sft --data {path}", "max_steps: 1\n")
    assert out is None or getattr(out, "status", "completed") == "completed"


def test_pairs_that_are_all_the_same_answer_twice_are_refused_and_some_are_warned_of(tok):
    """When every pair's chosen and rejected answers were equal, the run warned, then trained at grad 0 with a
    flat loss of 0.6931 and saved an adapter that learned nothing. Now it is refused; some such pairs warn."""
    from ft_magics.core.data import prepare

    same = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"a{i}"} for i in range(4)]
    with pytest.raises(FtUsageError, match=r"in every one of the 4 pairs the chosen and the rejected answer are the "
                                           r"same, so DPO has nothing to learn"):
        prepare(same, tok, _cfg())
    mixed = same[:2] + [{"prompt": "q", "chosen": "good", "rejected": "bad"}]
    _, _, report = prepare(mixed, tok, _cfg())
    assert any("2 pairs whose chosen and rejected answers are the same" in w for w in report.warnings)


def test_pairs_with_an_empty_answer_are_warned_of(tok):
    """An empty rejected answer - a missing value in a column, mostly - trained without a word: it is warned of.
    An empty chosen answer was kept with a warning while the README says examples whose answer is empty are
    dropped and counted: such a pair is dropped now, as SFT drops such an example, and counted."""
    from ft_magics.core.data import prepare

    rows = [{"prompt": f"q{i}", "chosen": "a good answer", "rejected": "" if i % 2 else "bad"} for i in range(6)]
    rows.append({"prompt": "q", "chosen": " ", "rejected": "bad"})
    train, _, report = prepare(rows, tok, _cfg())
    assert ("3 pairs with an empty rejected answer: they teach only that answering beats saying nothing. Check the "
            "rejected column (--map ...=rejected) if that is not meant.") in report.warnings
    assert len(train) == 6 and report.dropped_empty == 1
    assert len(report.lengths) == 6  # the Tokens line describes the pairs that train
    assert ("Dropped    1 pair with no answer to learn from (empty or blank: it would teach the model to end its "
            "turn at once)") in report.text()
    assert not any("empty chosen" in w for w in report.warnings)
    _, _, report = prepare(rows[:1], tok, _cfg())
    assert not any("empty" in w for w in report.warnings) and report.dropped_empty == 0
    with pytest.raises(FtUsageError, match=r"every one of the 2 pairs has an empty chosen answer.*--map \.\.\.=chosen"):
        prepare([{"prompt": f"q{i}", "chosen": "", "rejected": "bad"} for i in range(2)], tok, _cfg())


def test_llama_factory_sharegpt_pairs_are_read_and_under_sft_are_named(tok):
    """LLaMA-Factory's preference rows (a ShareGPT 'conversations' prompt, chosen / rejected as one from/value
    message each) were refused ("field 'chosen' must be a string, got dict"); under objective: sft the error
    said only that no answer was found."""
    from ft_magics.config import TrainConfig
    from ft_magics.core.data import prepare
    from ft_magics.core.preference import normalise_pairs

    rows = [{"conversations": [{"from": "human", "value": f"Q{i}"}], "chosen": {"from": "gpt", "value": "good"},
             "rejected": {"from": "gpt", "value": "bad"}} for i in range(3)]
    pairs, desc = normalise_pairs(rows)
    assert desc == "preference pairs (columns conversations -> prompt)"
    assert pairs[1].prompt == [{"role": "user", "content": "Q1"}]
    assert pairs[1].chosen == [{"role": "assistant", "content": "good"}]
    assert pairs[1].rejected == [{"role": "assistant", "content": "bad"}]
    train, _, _ = prepare(rows, tok, _cfg())
    assert len(train) == 3
    with pytest.raises(FtUsageError, match=r"has none .*Also: columns 'chosen' and 'rejected' are not used: "
                                           r"objective: sft trains on the conversation alone\. To train on the "
                                           r"preference pairs, set objective: dpo"):
        prepare(rows, tok, TrainConfig.from_dict({}))
    messages = [{"messages": [{"role": "user", "content": "Q"}], "chosen": "good", "rejected": "bad"}]
    assert normalise_pairs(messages)[0][0].prompt == [{"role": "user", "content": "Q"}]


def test_pairs_dropped_by_truncation_are_counted_as_pairs(tok):
    from ft_magics.core.data import prepare

    rows = [{"prompt": "word " * 200, "chosen": "good", "rejected": "bad"}] + [
        {"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    _, _, report = prepare(rows, tok, _cfg(max_seq_len=64))
    assert "Dropped    1 pair whose answer was cut away entirely by truncation" in report.text(), report.text()


def test_the_data_report_counts_pairs_as_pairs(tok):
    """The small-set and duplicate warnings said "examples" of preference pairs."""
    from ft_magics.core.data import prepare

    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(3)] * 2
    rows.append({"prompt": "word " * 200, "chosen": "good", "rejected": "bad"})
    _, _, report = prepare(rows, tok, _cfg(max_seq_len=64))
    text = report.text()
    assert "only 6 pairs train (of 7 rows read" in text and "3 exact duplicate pairs: 3 pairs appear more" in text
    assert " examples" not in text.split("Example")[0].replace("100-500 high-quality examples", "")


def test_truncate_prompt_takes_the_same_stretch_out_of_both_sides_of_a_pair(tok):
    from ft_magics.core.data import prepare

    rows = [{"prompt": "Read: " + "word " * 200 + "Question: which?", "chosen": "the good one, surely",
             "rejected": "bad"}] + [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    train, _, report = prepare(rows, tok, _cfg(max_seq_len=64, overlong="truncate_prompt"))
    assert len(train) == 4 and report.prompt_cut == 1 and report.dropped_no_answer == 0
    pair = next(p for p in train if len(p.chosen.input_ids) > 20)
    c, r = pair.chosen, pair.rejected
    assert len(c.input_ids) <= 64 and len(r.input_ids) <= 64
    start = lambda ex: next(i for i, lab in enumerate(ex.labels) if lab != -100)  # noqa: E731
    assert c.input_ids[:start(c)] == r.input_ids[:start(r)]  # the same prompt before each answer
    assert "the good one, surely" in tok.decode(c.input_ids[start(c):]) and "Question: which?" in tok.decode(c.input_ids)


def test_an_hh_transcript_prompt_becomes_the_earlier_turns_and_the_answers_lose_the_marker_s_space(tok):
    """Dahoas/full-hh-rlhf rows (the prompt itself an HH transcript) rendered the "Human:" / "Assistant:" markers
    and blank lines inside one user turn, and kept each answer's leading space."""
    from ft_magics.core.data import prepare
    from ft_magics.core.preference import normalise_pairs

    row = {"prompt": "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: How do I reset my password?\n\nAssistant:",
           "chosen": " Use the reset link.", "rejected": " no"}
    (pair,), _ = normalise_pairs([row])
    assert pair.prompt == [USER("hi"), BOT("hello there"), USER("How do I reset my password?")]
    assert (pair.chosen, pair.rejected) == ([BOT("Use the reset link.")], [BOT("no")])
    train, _, report = prepare([row] * 2, tok, _cfg())
    shown = tok.decode(train[0].chosen.input_ids)
    assert "Human:" not in shown and "Assistant:" not in shown and "\n\n" not in shown
    # a plain prompt is read as before: the answers as written
    (plain,), _ = normalise_pairs([{"prompt": "Human rights: name one", "chosen": " life", "rejected": " no"}])
    assert plain.prompt == [USER("Human rights: name one")] and plain.chosen == [BOT(" life")]


def test_neftune_noise_stays_out_of_the_reference_pass(tiny_model_dir, tok, monkeypatch):
    """With neftune_noise_alpha, the reference pass (adapter off) went through the same noise hook, so policy and
    reference saw differently noised inputs. The reference is the clean base now; the policy keeps its noise."""
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    from ft_magics.core import preference

    model, batch = _peft_pair_batch(tiny_model_dir, tok)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.zero_()  # the adapter is the base: any gap between policy and reference is the noise
    model.train()
    with torch.no_grad(), model.disable_adapter():
        clean = preference.sequence_logprobs(model, batch)[0]
    seen = {}

    def spy(objective, beta, policy, reference=None, gamma=0.5):
        seen["policy"], seen["reference"] = policy[0].detach(), reference
        return torch.zeros(()), {}

    monkeypatch.setattr(preference, "pair_loss", spy)
    handle = activate_neftune(model, 50.0)  # as the Trainer does for neftune_noise_alpha
    try:
        preference.pair_step(model, batch, "dpo", 0.1)
        assert model.base_model.model.get_input_embeddings().training  # the flag is put back
    finally:
        deactivate_neftune(model, handle)
    assert torch.allclose(seen["reference"], clean, atol=1e-5)  # the clean base
    assert not torch.allclose(seen["policy"], clean, atol=1e-3)  # the policy pass is noised


def _stop_at(session, k):
    from ft_magics.core.events import Listener

    class StopAt(Listener):
        def on_step(self, e):
            if e.step == k:
                session.stop()

    return StopAt()


def test_resume_under_another_objective_is_refused_and_another_beta_is_named(tiny_session):
    """A dpo checkpoint resumed as orpo (or with another beta) carried on silently, --dry-run included."""
    from ft_magics.core.events import Recorder

    s = tiny_session
    cfg = {"objective": "dpo", "max_steps": 4, "batch_size": 4, "save_every": 1, "save_every_minutes": 0,
           "max_seq_len": 64, "r": 4}
    part = s.train("pref", PAIRS[:8], cfg, listeners=[_stop_at(s, 1)])
    assert part.status != "completed"
    ckpts = s.adapters_dir / ".checkpoints" / "pref"
    before = sorted(p.name for p in ckpts.iterdir())
    for dry in (False, True):
        for objective in ("orpo", "sft"):
            with pytest.raises(FtUsageError, match=r"checkpoint-\d+ of 'pref' was made with objective: dpo; this run "
                                                   rf"asks for objective: {objective}, another loss.*Resume with "
                                                   r"objective: dpo, or train afresh without --resume"):
                s.train("pref", PAIRS[:8], dict(cfg, objective=objective), resume=True, dry_run=dry, listeners=[])
    assert sorted(p.name for p in ckpts.iterdir()) == before  # refused before any work
    dry = Recorder()  # --dry-run --resume names the change too (the warning lived in the run's own start)
    s.train("pref", PAIRS[:8], dict(cfg, beta=0.3), resume=True, dry_run=True, listeners=[dry])
    said = [e.text for e in dry.events if type(e).__name__ == "Message"]
    assert any("resuming 'pref' with different beta (0.1 before, 0.3 now)" in t for t in said), said
    assert any(re.search(r"the run would resume 'pref' from checkpoint-(\d+) \(step \1 of 4: \d+ steps? left\)", t)
               for t in said), said
    assert sorted(p.name for p in ckpts.iterdir()) == before
    rec = Recorder()
    done = s.train("pref", PAIRS[:8], dict(cfg, beta=0.3), resume=True, listeners=[rec])
    warn = [e.text for e in rec.events if type(e).__name__ == "Message" and "different" in e.text]
    assert done.status == "completed"
    assert warn and "resuming 'pref' with different beta (0.1 before, 0.3 now)" in warn[0], warn


def test_trl_loss_type_reads_as_the_objective_and_simpo_gamma_elsewhere_is_noted():
    from ft_magics.config import TrainConfig, overridden_notes

    for loss_type, objective in (("ipo", "ipo"), ("sigmoid", "dpo"), ("simpo", "simpo"), ("nll", "sft")):
        assert TrainConfig.from_dict({"loss_type": loss_type}).objective == objective
    with pytest.raises(FtUsageError, match=r"'loss_type': 'hinge' is another tool's setting; here write objective: "
                                           r"dpo, ipo, orpo or simpo"):
        TrainConfig.from_dict({"loss_type": "hinge"})
    cfg = TrainConfig.from_dict({"objective": "dpo", "simpo_gamma": 1.0})
    assert overridden_notes({"objective", "simpo_gamma"}, cfg) == [
        "simpo_gamma is SimPO's target margin: objective: dpo does not use it (objective: simpo does)."]
    assert overridden_notes({"objective", "simpo_gamma"}, TrainConfig.from_dict({"objective": "simpo"})) == []


def test_dpo_starts_from_an_sft_adapter_with_init_from(tiny_session, tmp_path):
    """DPO after SFT (TRL's usual flow) started from a fresh adapter: re-using the SFT adapter's name replaced it,
    and nothing could start from its weights. init_from copies a saved adapter's weights into the new one (the SFT
    folder is left as it is; the DPO reference stays the base), and refuses what cannot fit."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    from ft_magics.core.events import Message, Recorder

    s = tiny_session
    rows = [{"prompt": f"question {i}", "chosen": "yes", "rejected": "no"} for i in range(16)]
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    base_cfg = {"max_steps": 4, "batch_size": 4, "r": 4, "learning_rate": 5e-3, "seed": 1}
    sft = s.train("sft", sft_rows, base_cfg, listeners=[])
    sft_weights = load_file(str(Path(sft.adapter_path) / "adapter_model.safetensors"))
    rec = Recorder()
    dpo = s.train("dpo", rows, dict(base_cfg, objective="dpo", max_steps=1, learning_rate=1e-12, init_from="sft"),
                  listeners=[rec])
    assert any("starts from the weights of the adapter in" in m.text and "init_from" in m.text
               for m in rec.of(Message))
    # a step at a learning rate of 1e-12 leaves the weights where they started: the SFT adapter's, not fresh ones
    dpo_weights = load_file(str(Path(dpo.adapter_path) / "adapter_model.safetensors"))
    assert dpo_weights.keys() == sft_weights.keys()
    assert all(torch.allclose(dpo_weights[k].float(), sft_weights[k].float(), atol=1e-6) for k in sft_weights)
    assert dpo.record["loss_history"][0][1] != pytest.approx(0.6931, abs=1e-4)  # not the base: it starts as SFT
    assert dpo.record["settings"]["init_from"] == "sft"
    fresh = s.train("fresh", rows, dict(base_cfg, objective="dpo", max_steps=1), listeners=[])
    assert fresh.record["loss_history"][0][1] == pytest.approx(0.6931, abs=1e-3)  # a fresh adapter starts at log 2
    # the SFT folder is untouched; training under its own name from itself works too
    assert load_file(str(Path(sft.adapter_path) / "adapter_model.safetensors")).keys() == sft_weights.keys()
    again = s.train("sft", rows, dict(base_cfg, objective="dpo", max_steps=1, init_from="sft"), listeners=[])
    assert again.status == "completed"

    with pytest.raises(FtUsageError, match=r"init_from: 'sfft' is neither an adapter in .* \(did you mean 'sft'\?\)"):
        s.train("x", rows, dict(base_cfg, objective="dpo", init_from="sfft"), listeners=[])
    with pytest.raises(FtUsageError, match=r"another shape \(r 4 there, 8 here\).*Set r: 4"):
        s.train("x", rows, dict(base_cfg, objective="dpo", r=8, init_from="fresh"), listeners=[])
    with pytest.raises(FtUsageError, match=r"adapts other layers than this run"):
        s.train("x", rows, dict(base_cfg, objective="dpo", target_modules="qv", init_from="fresh"), listeners=[])
    assert "x" not in s.adapters  # a refused start leaves no adapter behind


def test_dpo_rewards_are_beta_times_the_log_ratios_against_the_base_pair_by_pair():
    from ft_magics.core.evaluation import EvalReport, PairScores, Rewards

    base = PairScores(1, 3, chosen=(-10.0, -20.0, -5.0), rejected=(-12.0, -18.0, -5.0))
    adapter = PairScores(2, 3, chosen=(-8.0, -19.0, -5.0), rejected=(-13.0, -18.5, -5.0))
    r = Rewards.of(adapter, base, beta=0.5)
    # chosen rewards 0.5 x (2, 1, 0); rejected 0.5 x (-1, -0.5, 0): margins 1.5, 0.75, 0 (a tie is not right)
    assert (r.right, r.n) == (2, 3)
    assert r.chosen == pytest.approx(0.5) and r.rejected == pytest.approx(-0.25) and r.margin == pytest.approx(0.75)
    report = EvalReport(columns=["base", "a"], pairs={"base": base, "a": adapter})
    assert report.rewards() is not None and "reward accuracy 2/3 (67%), margin +0.150 (chosen +0.100, rejected -0.050)" in report.to_text()
    assert EvalReport(columns=["base"], pairs={"base": base}).rewards() is None  # the base alone: no rewards
