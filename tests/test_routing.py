"""Issue 5: per-request adapter routing (mixed batches, LRU store loading), compare and eval."""
from __future__ import annotations

import shutil

import pytest

from ft_magics.errors import FtUsageError
from test_adapters_ops import peft_adapter

PROMPTS = ["How do I reset my password?", "hello world", "Billing, shipping, technical support.", "thanks!"]


@pytest.fixture(scope="module")
def store(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    for i, name in enumerate(["legal", "support", "shop"]):
        peft_adapter(tiny_model_dir, root / name, seed=10 + i, targets=("q_proj", "v_proj", "down_proj"))
    return root


def test_mixed_batch_matches_one_request_at_a_time(tiny_session, store):
    reqs = [("legal", PROMPTS[0]), ("support", PROMPTS[1]), ("base", PROMPTS[2]), ("legal", PROMPTS[3])]
    served = tiny_session.serve(reqs, store=store, capacity=2, max_new_tokens=6)
    assert [s.adapter for s in served] == ["legal", "support", "base", "legal"]
    assert {s.mode for s in served} == {"mixed"}
    assert served[0].cold and served[0].load_ms > 0 and served[1].cold
    assert not served[2].cold and not served[3].cold and served[3].load_ms == 0
    # distinct adapters give distinct answers to the same prompt (the rows really differ)
    same = tiny_session.serve([(a, PROMPTS[0]) for a in ("base", "legal", "support")], max_new_tokens=6,
                              store=store)
    assert len({s.text for s in same}) == 3
    assert not any(s.cold for s in same)  # warm now
    assert tiny_session.adapters.active is None  # the user's selection is left as it was
    assert tiny_session.generate(PROMPTS[2], max_new_tokens=6).text == served[2].text  # slots left disabled
    for name in ("legal", "support"):  # the same adapters loaded the ordinary way, one request at a time
        tiny_session.load_adapter(store / name, f"{name}-direct")
    for (adapter, prompt), s in zip(reqs, served):
        alone = tiny_session.generate(prompt, adapter=adapter if adapter == "base" else f"{adapter}-direct",
                                      max_new_tokens=6)
        assert (s.text, s.new_tokens) == (alone.text, alone.new_tokens), adapter


def test_served_answers_take_the_sampling_settings_of_generate(tiny_session, store):
    """serve() decoded greedily, whatever the caller wanted; it now takes generate's settings: a repetition
    penalty changes a looping greedy answer, a seeded sampled batch is the same twice (and not the greedy one),
    in the mixed batch and in the grouped fallback alike, and a misspelt setting is refused before any work."""
    s = tiny_session
    reqs = [("legal", PROMPTS[0]), ("support", PROMPTS[1]), ("base", PROMPTS[2])]
    greedy = [r.text for r in s.serve(reqs, store=store, max_new_tokens=12)]
    assert [r.text for r in s.serve(reqs, store=store, max_new_tokens=12)] == greedy  # greedy is greedy
    curbed = [r.text for r in s.serve(reqs, store=store, max_new_tokens=12, repetition_penalty=3.0)]
    assert curbed != greedy
    sampled = [s.serve(reqs, store=store, max_new_tokens=12, temperature=1.5, seed=7) for _ in range(2)]
    assert [r.text for r in sampled[0]] == [r.text for r in sampled[1]] != greedy
    assert {r.mode for r in sampled[0]} == {"mixed"}
    s._router.mixed_ok = False  # the grouped path (DoRA adapters, models without mixed batches)
    try:
        grouped = s.serve(reqs, store=store, max_new_tokens=12, temperature=1.5, seed=7)
        assert {r.mode for r in grouped} == {"grouped"}
        assert [r.text for r in s.serve(reqs, store=store, max_new_tokens=12, repetition_penalty=3.0)] == curbed
    finally:
        s._router.mixed_ok = True
    with pytest.raises(FtUsageError, match="unknown generation setting temperatur"):
        s.serve(reqs, store=store, temperatur=0.7)
    for limit in (0, -3, 2.5):  # 0 was read as 'not given', -3 reached generate's own ValueError
        with pytest.raises(FtUsageError, match=rf"a request's max_new_tokens must be a whole number >= 1 \(got {limit}\)"):
            s.serve([{"prompt": "hi", "adapter": "legal", "max_new_tokens": limit}], store=store)


def test_dora_adapters_are_served_in_groups_and_leave_no_hooks_behind(tiny_model_dir, tmp_path):
    """PEFT refuses DoRA adapters in a mixed batch, and its refused generate left a hook on every LoRA layer
    that passed the refused batch's adapter names to every later forward: the grouped retry failed
    ("Length of `adapter_names` should be the same as the number of inputs")."""
    import torch
    from ft_magics import Session

    for i, name in enumerate(["da", "db"]):
        peft_adapter(tiny_model_dir, tmp_path / "store" / name, seed=20 + i, use_dora=True)
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=32)
    reqs = [("da", PROMPTS[0]), ("db", PROMPTS[1]), ("base", PROMPTS[2]), ("da", PROMPTS[3])]
    served = s.serve(reqs, store=tmp_path / "store", max_new_tokens=6)
    assert {x.mode for x in served} == {"grouped"}
    for name in ("da", "db"):
        s.load_adapter(tmp_path / "store" / name, f"{name}-direct")
    for (adapter, prompt), x in zip(reqs, served):
        alone = s.generate(prompt, adapter=adapter if adapter == "base" else f"{adapter}-direct", max_new_tokens=6)
        assert (x.text, x.new_tokens) == (alone.text, alone.new_tokens), adapter
    # what a refused mixed generate leaves, and that the router's clean-up takes it all away
    from ft_magics.core.routing import remove_adapter_name_hooks

    enc = s.tokenizer(["hi", "hello"], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="DoRA"), torch.no_grad():
        s.model.generate(**enc, adapter_names=["da-direct", "db-direct"], max_new_tokens=2)
    assert remove_adapter_name_hooks(s.model) > 0
    assert remove_adapter_name_hooks(s.model) == 0
    assert s.generate(PROMPTS[0], adapter="da-direct", max_new_tokens=6).text == served[0].text
    # one slot: the next DoRA adapter is copied into it in place, magnitudes included (not reloaded)
    s.serve([("da", PROMPTS[0])], store=tmp_path / "store", capacity=1, max_new_tokens=6)
    swapped = s.serve([("db", PROMPTS[1])], store=tmp_path / "store", capacity=1, max_new_tokens=6)[0]
    assert swapped.how == "hot-swapped" and swapped.text == served[1].text


def test_an_interrupted_mixed_batch_leaves_no_hooks_behind(tiny_session, store, monkeypatch):
    """An interrupt inside PEFT's mixed-batch generate left its adapter-name hooks on every layer too."""
    from ft_magics.core.routing import remove_adapter_name_hooks

    reqs = [("legal", PROMPTS[0]), ("support", PROMPTS[1])]
    assert {x.mode for x in tiny_session.serve(reqs, store=store, max_new_tokens=2)} == {"mixed"}

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    # PEFT has registered its hooks by the time it calls the base model's generate
    monkeypatch.setattr(type(tiny_session.model.get_base_model()), "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_session.serve(reqs, store=store, max_new_tokens=4)
    monkeypatch.undo()
    assert remove_adapter_name_hooks(tiny_session.model) == 0
    assert tiny_session.generate(PROMPTS[0], max_new_tokens=4).new_tokens == 4


def slots(session) -> list:
    return sorted(n for n in session.model.peft_config if n.startswith("ft-slot-"))


def test_lru_hot_swaps_the_least_recent_slot_and_stays_exact(tiny_session, store, tmp_path):
    first = tiny_session.serve([("legal", "a"), ("support", "b")], store=store, capacity=2, max_new_tokens=2)
    assert [s.how for s in first] == ["loaded", "loaded"]
    assert tiny_session._router.in_memory() == ["legal", "support"]
    assert tiny_session.serve([("legal", "a")], store=store, max_new_tokens=2)[0].how == "resident"
    served = tiny_session.serve([("shop", PROMPTS[0])], store=store, max_new_tokens=6)
    assert served[0].cold and served[0].how == "hot-swapped" and served[0].load_ms > 0
    assert tiny_session._router.in_memory() == ["legal", "shop"]  # support (least recent) went
    assert len(slots(tiny_session)) == 2
    # the hot-swapped slot answers exactly like the adapter loaded the ordinary way
    tiny_session.load_adapter(store / "shop", "shop-direct")
    direct = tiny_session.generate(PROMPTS[0], adapter="shop-direct", max_new_tokens=6)
    assert (served[0].text, served[0].new_tokens) == (direct.text, direct.new_tokens)
    # an adapter with other target modules cannot be hot-swapped: the slot is replaced instead
    peft_adapter(tiny_session.handle.source, store / "mlp-only", seed=4, targets=("gate_proj",))
    try:
        odd = tiny_session.serve([("mlp-only", PROMPTS[1])], store=store, max_new_tokens=4)
        assert odd[0].how == "reloaded"
        tiny_session.load_adapter(store / "mlp-only", "mlp-direct")
        assert odd[0].text == tiny_session.generate(PROMPTS[1], adapter="mlp-direct", max_new_tokens=4).text
    finally:

        shutil.rmtree(store / "mlp-only")
    assert len(slots(tiny_session)) == 2
    # a batch needing more adapters than fit runs in chunks, never holding more than capacity
    served = tiny_session.serve([("support", "x"), ("legal", "y"), ("shop", "z"), ("base", "w")],
                                store=store, capacity=1, max_new_tokens=2)
    assert [s.adapter for s in served] == ["support", "legal", "shop", "base"]
    assert len(tiny_session._router.in_memory()) == 1


def test_grouped_fallback_reports_swap_time(tiny_session, store):
    tiny_session.serve([("legal", "a")], store=store, max_new_tokens=2)
    tiny_session._router.mixed_ok = False
    served = tiny_session.serve([("legal", PROMPTS[0]), ("base", PROMPTS[0])], store=store, max_new_tokens=4)
    assert {s.mode for s in served} == {"grouped"}
    assert all(s.swap_ms >= 0 for s in served)
    tiny_session.load_adapter(store / "legal", "legal-direct")
    assert served[0].text == tiny_session.generate(PROMPTS[0], adapter="legal-direct", max_new_tokens=4).text
    assert served[1].text == tiny_session.generate(PROMPTS[0], adapter="base", max_new_tokens=4).text


def test_routing_errors_name_the_fix(tiny_session, store):
    with pytest.raises(FtUsageError, match="no adapter 'legl'.*did you mean 'legal'"):
        tiny_session.serve([("legl", "hi")], store=store)
    with pytest.raises(FtUsageError, match=r"request 2 \(legal\) has an empty prompt"):
        tiny_session.serve([("base", "hi"), ("legal", "  ")], store=store)
    with pytest.raises(FtUsageError, match=r"the store .*no-such-store does not exist: give the folder"):
        tiny_session.serve([("legal", "hi")], store=store / "no-such-store")
    with pytest.raises(FtUsageError, match="capacity must be at least 1"):
        tiny_session.serve([("legal", "hi")], store=store / "..", capacity=0)
    assert "legal" not in tiny_session.adapters  # nothing loaded by a refused batch


def test_an_adapter_whose_config_contradicts_its_weights_is_refused_in_one_line(tiny_session, store, tmp_path):
    """An adapter folder copied and its config's r edited by hand: serve printed a raw RuntimeError traceback, and
    use / load a 1,700-line message blaming the base model."""
    import json

    bad = tmp_path / "bad-store" / "edited"
    shutil.copytree(store / "legal", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    true_r, config["r"] = config["r"], config["r"] + 4
    (bad / "adapter_config.json").write_text(json.dumps(config))
    said = rf"says r={true_r + 4}, but its weights have rank {true_r} .*put \"r\": {true_r} back in adapter_config.json"
    with pytest.raises(FtUsageError, match=said) as err:
        tiny_session.serve([("base", "hi"), ("edited", "hi")], store=bad.parent, max_new_tokens=3)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(FtUsageError, match=said):
        tiny_session.load_adapter(bad, "edited")
    assert "edited" not in tiny_session.adapters
    from ft_magics.core.adapters import adapter_card

    card = adapter_card("edited", bad)  # the card read the config alone: r it could not load with
    assert f"r={true_r + 4} alpha=" in card and "Warning" in card and f"its weights have rank {true_r}" in card
    assert "Warning" not in adapter_card("legal", store / "legal")
    assert tiny_session.serve([("legal", "hi")], store=store, max_new_tokens=3)[0].adapter == "legal"  # still serving
    from pathlib import Path

    from ft_magics.core.adapters import unfit_error

    torch_says = RuntimeError("Error(s) in loading state_dict:\n" + "\n".join(f"\tsize mismatch {i}" for i in range(1680)))
    assert str(unfit_error(Path("a"), "tiny", torch_says)) == ("adapter a does not fit the loaded model tiny: Error(s) in "
                                                               "loading state_dict: size mismatch 0 (and 1,679 more lines)")


def test_an_adapter_retrained_by_another_process_is_read_again_when_next_used(tiny_session, store, tmp_path, capsys):
    """Another notebook retrained adapter 'legal' in the shared folder: this session went on answering with the
    weights it had loaded, while %lora_adapters info showed the new run."""
    s = tiny_session
    folder = s.adapters_dir / "legal"
    shutil.copytree(store / "legal", folder)
    s.load_adapter(folder, "legal")
    s.use(None)
    old = s.generate(PROMPTS[0], adapter="legal", max_new_tokens=6).text
    new = s.generate(PROMPTS[0], adapter=s.load_adapter(store / "support", "support-ref"), max_new_tokens=6).text
    assert old != new
    capsys.readouterr()
    assert s.generate(PROMPTS[0], adapter="legal", max_new_tokens=6).text == old and "changed on disk" not in \
        capsys.readouterr().out  # unchanged: nothing read again
    shutil.copytree(store / "support", tmp_path / "incoming")  # what an atomic save elsewhere does: a new folder
    shutil.rmtree(folder)
    (tmp_path / "incoming").rename(folder)
    s.use(None)
    assert s.generate(PROMPTS[0], adapter="legal", max_new_tokens=6).text == new
    assert "changed on disk since this session loaded 'legal' (retrained elsewhere?): reloaded it" in capsys.readouterr().out
    assert s.adapters.active is None  # the selection stays as it was
    shutil.rmtree(folder)  # and serve, which answers with the session's own copy, reads it again too
    shutil.copytree(store / "shop", folder)
    served = s.serve([("legal", PROMPTS[0])], store=store, max_new_tokens=6)[0]
    assert served.how == "refreshed" and served.cold
    assert served.text == s.generate(PROMPTS[0], adapter=s.load_adapter(store / "shop", "shop-ref"), max_new_tokens=6).text
    # an adapter this session trained is watched the same way (its entry came from the run, not from a load)
    s.train("own", [{"prompt": p, "completion": "ok"} for p in PROMPTS] * 2, dict(max_steps=1, batch_size=4, r=4),
            listeners=[])
    shutil.copytree(store / "legal", tmp_path / "incoming2")  # copytree keeps the files' times and sizes
    shutil.rmtree(s.adapters_dir / "own")
    (tmp_path / "incoming2").rename(s.adapters_dir / "own")
    capsys.readouterr()
    s.generate(PROMPTS[0], adapter="own", max_new_tokens=2)
    assert "changed on disk since this session loaded 'own'" in capsys.readouterr().out


def test_a_slot_serves_the_folder_as_it_is_now_and_one_router_holds_capacity_across_stores(tiny_session, store,
                                                                                            tmp_path):
    """A slot kept the weights it read before its folder was rewritten (a retrain, a job) and served them as
    'resident' while generate answered the new ones; a call naming another store (even a refused one) made a new
    router and left the old one's slots in the model, uncounted against capacity."""
    from test_adapters_ops import peft_adapter

    s, mine = tiny_session, tmp_path / "mine"
    shutil.copytree(store, mine)
    before = s.serve([("legal", PROMPTS[0])], store=mine, capacity=2, max_new_tokens=6)[0]
    shutil.rmtree(mine / "legal")
    peft_adapter(s.handle.source, mine / "legal", seed=99, targets=("q_proj", "v_proj", "down_proj"))
    after = s.serve([("legal", PROMPTS[0])], store=mine, max_new_tokens=6)[0]
    s.load_adapter(mine / "legal", "legal-now")
    now = s.generate(PROMPTS[0], adapter="legal-now", max_new_tokens=6)
    assert after.how == "reloaded" and after.cold and (after.text, after.new_tokens) == (now.text, now.new_tokens)
    assert before.text != after.text  # (the two adapters answer differently: the test can tell them apart)
    assert s.serve([("legal", PROMPTS[0])], store=mine, max_new_tokens=6)[0].how == "resident"
    s.serve([("support", "b")], store=mine, max_new_tokens=2)
    with pytest.raises(FtUsageError, match="no adapter 'legal' in memory or in the store"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        s.serve([("legal", "a")], store=tmp_path / "empty", capacity=2)
    assert sorted(s._router.in_memory()) == ["legal", "support"]  # kept by the refused call
    assert s.serve([("legal", "a")], store=mine, max_new_tokens=2)[0].how == "resident"
    # the store's own 'legal' (other weights) replaces the slot read from mine/legal, within capacity
    assert s.serve([("legal", "a"), ("shop", "b")], store=store, max_new_tokens=2)[0].how in ("reloaded", "hot-swapped")
    assert len(slots(s)) == 2 and sorted(s._router.in_memory()) == ["legal", "shop"]
    with pytest.raises(FtUsageError, match="reserved for the adapters Session.serve"):
        s.load_adapter(store / "support", name=slots(s)[0])  # it took the slot over, serving support as legal
    s.unload_adapter("legal-now")


def test_serve_arguments_of_the_wrong_type_are_refused_before_any_work(tiny_session, store):
    s = tiny_session
    loaded = set(s.model.peft_config) if hasattr(s.model, "peft_config") else set()
    for kwargs, message in (({"max_new_tokens": "x"}, "max_new_tokens must be a number"),
                            ({"capacity": "two"}, "capacity must be a number"),
                            ({"capacity": 1.5}, "capacity must be a whole number"),
                            ({"store": 5}, "store must be text or a path"),
                            ({"system": 5}, "system must be text")):
        with pytest.raises(FtUsageError, match=message):
            s.serve([("legal", "hi")], **{"store": store, **kwargs})
    for request, message in ((("legal", 123), "a request's prompt is text \\(got int"),
                             (("", "hi"), "a request's adapter is an adapter's name, or 'base'"),
                             ({"adapter": "  ", "prompt": "hi"}, "got '  '")):
        with pytest.raises(FtUsageError, match=message):
            s.serve([request], store=store)
    assert (set(s.model.peft_config) if hasattr(s.model, "peft_config") else set()) == loaded  # nothing loaded
    served = s.serve([("legal", "hi"), (None, "hi")], store=store, max_new_tokens="3", capacity="2")
    assert [r.adapter for r in served] == ["legal", "base"] and all(r.new_tokens <= 3 for r in served)


def test_compare_is_greedy_and_reproducible(tiny_session, store):
    tiny_session.load_adapter(store / "legal", "legal")
    cmp1 = tiny_session.compare("How do I reset my password?\n---\nhello world", max_new_tokens=5)
    cmp2 = tiny_session.compare(["How do I reset my password?", "hello world"], ["legal"], max_new_tokens=5)
    assert cmp1.columns == ["base", "legal"] and len(cmp1.prompts) == 2
    assert all(cmp1.cells[k].text == cmp2.cells[k].text for k in cmp1.cells)
    assert cmp1.cells[(0, "base")].text == tiny_session.generate(PROMPTS[0], adapter="base", max_new_tokens=5).text
    assert cmp1.tokens_per_s("legal") > 0
    html = cmp1.to_html()
    assert html.count("<tr>") == 3 and "tok/s" in html
    assert "Prompt 2: hello world" in cmp1.to_text()
    assert tiny_session.adapters.active == "legal"
    # one adapter name as a string (it was split into letters: "no adapter named 'l'"), a name given twice (two
    # identical columns), and no prompt at all (an empty comparison)
    one = tiny_session.compare(["hello world"], "legal", max_new_tokens=5)
    assert one.columns == ["base", "legal"] and one.cells[(0, "legal")].text == cmp1.cells[(1, "legal")].text
    assert tiny_session.compare(["hello world"], ["legal", "legal"], max_new_tokens=2).columns == ["base", "legal"]
    with pytest.raises(FtUsageError, match="compare needs at least one prompt"):
        tiny_session.compare([], ["legal"])
    with pytest.raises(FtUsageError, match=r"no prompt to compare: write it after the flags"):
        tiny_session.compare("\n---\n", ["legal"])


def test_eval_report_keeps_its_columns_apart_when_a_perplexity_explodes():
    """An adapter that forgot everything (demo model: general-text perplexity 8,875,394) ran its cells
    together ("ppl 53.13loss 15.9988") and printed "+16705062.9%"."""
    from ft_magics.core.evaluation import EvalReport

    r = EvalReport(columns=["base", "add"])
    r.add("add_eval.jsonl", "base", 3.3165, 27.56, 32)
    r.add("add_eval.jsonl", "add", 1.0324, 2.81, 32)
    r.add("general text (forgetting check)", "base", 3.9727, 53.13, 832)
    r.add("general text (forgetting check)", "add", 15.9988, 8875394.84, 832)
    lines = r.to_text().splitlines()
    assert "53.13 " in lines[2] and "ppl 8.88e+06" in lines[2]
    ends = {line.index(c) + len(c) for line, c in zip(lines[:3], ("add", "ppl 2.81", "ppl 8.88e+06"))}
    assert len(ends) == 1  # right-aligned under its header
    assert "167,051x the base's" in lines[3] and "%" not in lines[3]
    assert "167,051x the base's" in r.to_html()
    # the table says what the text says: each set's tokens and the forgetting verdict (both were missing)
    html = r.to_html()
    assert "add_eval.jsonl (32 tok)" in html and "(general text got worse: some forgetting)" in html
    r.add("general text (forgetting check)", "add", 3.99, 54.0, 832)
    assert "+1.6% vs base" in r.to_text()


def test_eval_reports_loss_perplexity_and_forgetting(tiny_session, store):
    import math

    tiny_session.load_adapter(store / "legal", "legal")
    report = tiny_session.evaluate("legal", "demo:support-eval", max_seq_len=128)
    assert report.columns == ["base", "legal"]
    assert report.sets == ["demo:support-eval", "general text (forgetting check)"]
    for key, (loss, ppl, tokens) in report.results.items():
        assert loss > 0 and ppl == pytest.approx(math.exp(loss)) and tokens > 100
    assert report.loss("demo:support-eval", "base") != report.loss("demo:support-eval", "legal")
    text = report.to_text()
    assert "forgetting check" in text
    for s in report.sets:  # each set's name whole, with its token count, and the columns aligned
        assert f"{s} ({report.results[(s, 'base')][2]} tok)" in text
    assert len({line.index("loss") for line in text.splitlines()[1:3]}) == 1
    base_only = tiny_session.evaluate("base", "demo:support-eval", max_seq_len=128)
    assert base_only.loss("demo:support-eval", "base") == pytest.approx(report.loss("demo:support-eval", "base"))


def test_eval_loss_without_full_vocabulary_logits_equals_the_standard_loss(tiny_model_dir, monkeypatch):
    """%lora_eval sums the loss over the answer rows through the chunked loss (no batch x length x vocab
    logits, the head never called as a module); the same loss as the logits + cross_entropy it replaced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft_magics.core import speed
    from ft_magics.core.data import TokenizedExample
    from ft_magics.core.evaluation import loss_and_perplexity

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 19, 12, 30, 5):
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        examples.append(TokenizedExample(ids, [-100] * (n // 2) + ids[n // 2:]))
    head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    chunked = loss_and_perplexity(model, tok, examples, batch_size=2)
    assert head_calls == []  # no full logits
    monkeypatch.setattr(speed, "chunked_loss_blocker", lambda m: "forced standard loss")
    standard = loss_and_perplexity(model, tok, examples, batch_size=2)
    hook.remove()
    assert head_calls  # the standard path did call the head
    assert chunked[2] == standard[2] == sum(len(e.input_ids) - len(e.input_ids) // 2 for e in examples)
    assert abs(chunked[0] - standard[0]) < 1e-5 * standard[0]


def test_an_interrupt_ends_a_generation_at_the_next_token_and_keeps_its_text(tiny_session, store):
    """The kernel's stop button (SIGINT) during %lora_generate: the answer so far comes back, marked
    stopped, the SIGINT handler and the layers are as before; in a comparison it ends the comparison."""
    import os
    import signal

    tiny_session.load_adapter(store / "legal", "legal")
    handler = signal.getsignal(signal.SIGINT)
    steps = []

    def interrupt_at_the_third_token(module, args):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    hook = tiny_session.model.get_base_model().register_forward_pre_hook(interrupt_at_the_third_token)
    try:
        gen = tiny_session.generate("hello world", adapter="legal", max_new_tokens=400)
    finally:
        hook.remove()
    assert gen.stopped and gen.new_tokens == 3 and gen.text  # the token being made when it came is kept
    assert signal.getsignal(signal.SIGINT) is handler
    assert not any("forward" in vars(m) for m in tiny_session.model.modules())
    again = tiny_session.generate("hello world", adapter="legal", max_new_tokens=5)
    assert not again.stopped and again.new_tokens == 5
    import ft_magics.core.inference as inf

    real = inf.generate
    inf.generate = lambda *a, **kw: (lambda g: (setattr(g, "stopped", True), g)[1])(real(*a, **kw))
    try:
        with pytest.raises(FtUsageError, match="comparison stopped by an interrupt after 1 of 4 answers"):
            tiny_session.compare("a\n---\nb", ["legal"], max_new_tokens=2)
    finally:
        inf.generate = real
    assert tiny_session.adapters.active == "legal"  # the comparison put the selection back


def test_compare_times_no_one_time_cost_in_its_first_column(tiny_session, store, monkeypatch):
    """The first generation after a load pays one-time costs (on the CPU, bitsandbytes' inference repack):
    compare pays them before timing, so the base column is not charged for them. The cost is sized from an
    uncharged compare's own time, so the check holds on a slow or loaded machine."""
    import time

    tiny_session.load_adapter(store / "legal", "legal")
    plain = tiny_session.compare("hello world", ["legal"], max_new_tokens=3).cells[(0, "base")].seconds
    cost = max(1.0, 10 * plain)
    model = tiny_session.model
    real = type(model).generate
    first = []

    def generate(self, *a, **kw):
        if not first:
            first.append(1)
            time.sleep(cost)  # a one-time cost
        return real(self, *a, **kw)

    monkeypatch.setattr(type(model), "generate", generate)
    cmp = tiny_session.compare("hello world", ["legal"], max_new_tokens=3)
    assert first and cmp.cells[(0, "base")].seconds < cost / 2, (plain, cost, cmp.cells[(0, "base")].seconds)


def test_the_generate_footer_measures_decoding_not_one_time_work_before_the_first_token(tiny_session):
    """The first generate after a load, a switch or training pays one-time work in its first forward (on the
    CPU bitsandbytes repacks 4-bit weights for its inference kernel): the footer's tok/s leaves it out, as the
    time from the first new token to the last does; ``seconds`` keeps the whole call. The delay is sized from
    the undelayed answer's own time, so the check holds on a slow or loaded machine."""
    import time

    s = tiny_session
    lm = s.model.get_base_model() if hasattr(s.model, "get_base_model") else s.model
    s.generate("hello world", max_new_tokens=4)  # the warm-up, for both answers below
    plain = s.generate("hello world", max_new_tokens=12)
    delay = max(1.0, 10 * plain.seconds)  # counted, it would bring the delayed answer's rate under 1/10 of plain's
    forwards = []

    def slow_first_forward(module, args):
        forwards.append(1)
        if len(forwards) == 1:  # the prompt's forward, before the first new token
            time.sleep(delay)

    hook = lm.register_forward_pre_hook(slow_first_forward)
    try:
        delayed = s.generate("hello world", max_new_tokens=12)
    finally:
        hook.remove()
    assert delayed.text == plain.text and delayed.new_tokens == plain.new_tokens >= 8  # greedy: the same answer
    assert delayed.seconds >= delay  # the whole call still holds the delay
    assert delayed.tokens_per_s > plain.tokens_per_s / 3  # a generous factor: the machine is shared
    assert "decode tok/s" in delayed.describe()


def test_adapters_in_the_adapters_folder_are_listed_and_load_when_used_by_name(tiny_session, store, capsys):
    """After a kernel restart the session knows no adapters, but the adapters folder still holds them:
    list names them, and use / evaluate / compare / generate load them by name (the active one stays)."""
    from ft_magics.adapter_commands import run

    for name in ("legal", "support"):
        shutil.copytree(store / name, tiny_session.adapters_dir / name)
    (tiny_session.adapters_dir / "half").mkdir()  # no adapter_config.json: not an adapter
    assert tiny_session.adapters_on_disk() == ["legal", "support"]
    run(tiny_session, ["list"])
    assert "not loaded (used by name, they load): legal, support" in capsys.readouterr().out
    report = tiny_session.evaluate("legal", "demo:support-eval", general=False, max_seq_len=64)
    assert report.columns == ["base", "legal"] and "legal" in tiny_session.adapters
    assert tiny_session.adapters.active is None  # loading for the evaluation changed no selection
    tiny_session.compare("hello", ["support"], max_new_tokens=2)
    assert "support" in tiny_session.adapters and tiny_session.adapters_on_disk() == []
    tiny_session.unload_adapter("legal")
    tiny_session.use("legal")
    assert tiny_session.adapters.active == "legal"
    with pytest.raises(FtUsageError, match="no adapter named 'half'"):
        tiny_session.use("half")


def test_adapters_trained_on_another_base_are_listed_apart_and_kept_out_of_the_selectors(tiny_session, store,
                                                                                          tmp_path, capsys):
    from transformers import AutoConfig, LlamaForCausalLM

    from ft_magics.adapter_commands import run
    from ft_magics.widgets.adapters_panel import AdaptersPanel
    from ft_magics.widgets.chat_panel import ChatPanel
    from test_adapters_ops import peft_adapter

    cfg = AutoConfig.from_pretrained(tiny_session.handle.source)
    cfg.hidden_size, cfg.intermediate_size = 32, 64  # another base: every layer has other shapes
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other-base")
    peft_adapter(tmp_path / "other-base", tiny_session.adapters_dir / "elsewhere")
    shutil.copytree(store / "legal", tiny_session.adapters_dir / "legal")
    assert tiny_session.adapters_on_disk() == ["elsewhere", "legal"]
    assert tiny_session.adapters_on_disk(fitting=True) == ["legal"]
    assert "does not fit the loaded model" in tiny_session.misfit("elsewhere") and tiny_session.misfit("legal") is None
    run(tiny_session, ["list"])
    out = capsys.readouterr().out
    assert "(used by name, they load): legal\n" in out and "trained on another base model" in out
    assert out.rstrip().splitlines()[-2].endswith(": elsewhere")
    for values in ([v for _l, v in AdaptersPanel(tiny_session).selector.options],
                   [v for _l, v in ChatPanel(tiny_session).adapter.options]):
        assert "legal" in values and "elsewhere" not in values


def test_per_call_adapter_loads_on_demand_from_the_adapters_folder(tiny_session, store):
    shutil.copytree(store / "legal", tiny_session.adapters_dir / "legal")
    gen = tiny_session.generate(PROMPTS[0], adapter="legal", max_new_tokens=5)
    assert gen.adapter == "legal" and "legal" in tiny_session.adapters
    assert tiny_session.adapters.active is None  # a per-call adapter does not change the selection
    assert gen.text == tiny_session.serve([("legal", PROMPTS[0])], max_new_tokens=5)[0].text
    with pytest.raises(FtUsageError, match="no adapter named 'nope'"):
        tiny_session.generate("hi", adapter="nope", max_new_tokens=2)


def test_qlora_base_routes_mixed_batches_and_exports_merged(tiny_model_dir, store, tmp_path):
    """4-bit NF4 base (bitsandbytes, CPU): mixed batch per row, and export --merged through the
    documented path (the base rebuilt in full precision from its source, then merged)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ft_magics import Session

    q = Session(adapters_dir=tmp_path / "adapters")
    q.load(str(tiny_model_dir), bits=4)
    served = q.serve([("legal", PROMPTS[0]), ("base", PROMPTS[1]), ("support", PROMPTS[2])], store=store,
                     max_new_tokens=4)
    assert [s.mode for s in served] == ["mixed"] * 3 and [s.how for s in served] == ["loaded", "base", "loaded"]
    q.load_adapter(store / "legal", "legal")
    assert served[0].text == q.generate(PROMPTS[0], adapter="legal", max_new_tokens=4).text
    default = q.export_adapter("legal", tmp_path / "merged-default", merged=True)
    assert AutoModelForCausalLM.from_pretrained(default).dtype == q.handle.dtype  # the compute dtype
    out = q.export_adapter("legal", tmp_path / "merged", merged=True, dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32 and not getattr(merged.config, "quantization_config", None)
    full = Session(adapters_dir=tmp_path / "a32")
    full.load(str(tiny_model_dir), bits=32)
    full.load_adapter(store / "legal", "legal")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, full.model(input_ids=ids).logits, atol=1e-4)


def test_malformed_requests_and_sizes_say_what_was_given():
    from ft_magics.core.planner import resolve_model
    from ft_magics.core.routing import as_request

    with pytest.raises(FtUsageError, match=r"got a tuple of 3 items\. A request with its own answer length: "
                                           r"\{'adapter': NAME, 'prompt': TEXT, 'max_new_tokens': N\}"):
        as_request(("bot", "hi", 4))
    assert as_request({"adapter": "bot", "prompt": "hi", "max_new_tokens": 4}).max_new_tokens == 4
    with pytest.raises(FtUsageError, match="'0B': a model size must be positive"):
        resolve_model("0B")


def test_evaluation_batches_examples_of_similar_length_and_autocasts_as_training_does(tiny_model_dir, monkeypatch):
    """Held-out examples are scored longest first, so a batch pads to lengths like its own (file order padded
    short rows to long ones), with the same loss; with a 16-bit compute dtype the forward runs under autocast,
    as the training run's own evaluation does, and without one it does not."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ft_magics.core import evaluation
    from ft_magics.core.data import TokenizedExample

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    g = torch.Generator().manual_seed(1)
    lengths = [40, 5, 38, 6, 35, 7, 33, 8]
    examples = []
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        examples.append(TokenizedExample(ids, [-100] * (n // 2) + ids[n // 2:]))
    widths, real = [], evaluation._padded
    monkeypatch.setattr(evaluation, "_padded", lambda batch, pad, dev: widths.append(
        (max(len(e.input_ids) for e in batch), len(batch))) or real(batch, pad, dev))
    casts = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda *a: casts.append(torch.is_autocast_enabled("cpu")))
    loss, _, count = evaluation.loss_and_perplexity(model, tok, examples, batch_size=2)
    padded = sum(w * n for w, n in widths)
    assert widths == [(40, 2), (35, 2), (8, 2), (6, 2)] and padded < 2 * 40 + 2 * 38 + 2 * 35 + 2 * 33
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    assert evaluation.loss_and_perplexity(model, tok, shuffled, batch_size=2)[0] == pytest.approx(loss, rel=1e-6)
    assert casts and not any(casts)
    casts.clear()
    evaluation.loss_and_perplexity(model, tok, examples, batch_size=2, dtype=torch.bfloat16)
    assert casts and all(casts)
    hook.remove()


def test_serve_cells_read_one_request_per_line_or_per_block():
    from ft_magics.core.routing import requests_of_text

    reqs = requests_of_text("# a comment\nlegal: Is this clause fine: yes or no?\n\nbase:  What is LoRA? \n")
    assert [(r.adapter, r.prompt) for r in reqs] == [("legal", "Is this clause fine: yes or no?"), ("base", "What is LoRA?")]
    reqs = requests_of_text("legal: first line\nsecond line\n---\nsupport: one\n---\n")
    assert [(r.adapter, r.prompt) for r in reqs] == [("legal", "first line\nsecond line"), ("support", "one")]
    with pytest.raises(FtUsageError, match=r"request 2 \('Note that'\) names no adapter: write each request as "
                                           r"ADAPTER: PROMPT.*a prompt of several lines goes between lines of ---"):
        requests_of_text("legal: hi\nNote that\n")
    with pytest.raises(FtUsageError, match=r"request 1 \('what is: this'\) names no adapter"):
        requests_of_text("what is: this\n")
    with pytest.raises(FtUsageError, match="no request in the cell"):
        requests_of_text("# only a comment\n\n")
    # a '#' line inside a block is the prompt's (a code comment); before a request, or one request per line, a comment
    reqs = requests_of_text("# header\n---\n# about the next\nbase: Translate:\n# add one\nx = x + 1\n---\n")
    assert [(r.adapter, r.prompt) for r in reqs] == [("base", "Translate:\n# add one\nx = x + 1")]
    assert [r.adapter for r in requests_of_text("# first\nlegal: a\n# between\nbase: b\n")] == ["legal", "base"]


def test_the_serve_magic_answers_each_request_with_its_adapter_and_says_how(shell, tiny_model_dir, store, capsys):
    """The edge pattern had no magic: Session.serve was the only way to route requests to adapters."""
    shutil.copytree(store / "legal", "adapters/legal")
    shutil.copytree(store / "support", "adapters/support")
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    capsys.readouterr()
    shell.run_line_magic("lora_serve", "")
    assert "Serving    nothing yet" in capsys.readouterr().out
    cell = f"legal: {PROMPTS[0]}\nsupport: {PROMPTS[1]}\nbase: {PROMPTS[2]}\n"
    shell.run_cell_magic("lora_serve", "--max-new-tokens 5 --capacity 2", cell)
    out = capsys.readouterr().out
    session = shell.magics_manager.registry["FtMagics"].session
    again = session.serve([("legal", PROMPTS[0]), ("support", PROMPTS[1]), ("base", PROMPTS[2])], max_new_tokens=5)
    for s, prompt, how in zip(again, PROMPTS, ("loaded from the store in", "loaded from the store in", "base model")):
        answer = "\n".join("  " + t for t in (s.text.strip() or "(an empty answer)").splitlines())
        assert f"[{s.adapter} · {how}" in out and f"] {prompt}\n{answer}\n" in out
    assert "(3 requests in one mixed batch: " in out and " tokens/s)" in out
    shell.run_line_magic("lora_serve", "")
    listing = capsys.readouterr().out
    assert "Serving    2 of 2 slots in use" in listing and "  legal  (from " in listing and "  support  (from " in listing
    shell.run_cell_magic("lora_serve", "--max-new-tokens 2", "# a comment first\nsupport: hi\n")  # was: the slots
    assert "[support · in memory · " in capsys.readouterr().out
    shell.run_line_magic("lora_adapters", "delete support")  # a deleted adapter's slot goes with its folder
    shell.run_line_magic("lora_serve", "")
    listing = capsys.readouterr().out
    assert "Serving    1 of 2 slots in use" in listing and "support" not in listing.split("Serving")[-1]
    session.load_adapter("adapters/legal", "mine")
    session.merge_adapter("mine")
    with pytest.raises(Exception, match=r"cannot serve requests \(each would be answered with it in the weights, the "
                                        r"base's too\) while adapter 'mine' is merged"):
        shell.run_line_magic("lora_serve", "base: hi")
    session.unmerge_adapter()
    shell.run_line_magic("lora_serve", f"--max-new-tokens 5 legal: {PROMPTS[0]}")  # one request on the line
    assert "[legal · in memory · " in capsys.readouterr().out
    with pytest.raises(Exception, match="no adapter 'nope' in memory or in the store"):
        shell.run_cell_magic("lora_serve", "", "nope: hi\n")
    with pytest.raises(Exception, match="names no adapter"):
        shell.run_cell_magic("lora_serve", "", "just a prompt\n")


def test_a_refused_batch_changes_nothing_and_names_the_request_at_fault(tiny_session, store):
    """A prompt past the model's context was refused inside the mixed batch as a ValueError, which the router
    read as "this model cannot mix adapters": every later batch ran one adapter at a time, unsaid. It was refused
    after the batch's adapters were loaded, named no request and gave the padded length. A refused call with a
    lower capacity also emptied a slot first; 'Base' got no hint."""
    s = tiny_session
    s.serve([("legal", "a"), ("support", "b")], store=store, capacity=2, max_new_tokens=2)
    held = s._router.in_memory()
    limit = s.model.config.max_position_embeddings
    long = " ".join(["word"] * (limit + 10))
    with pytest.raises(FtUsageError, match=r"request 2 \(shop\): the prompt is [\d,]+ tokens .* Nothing was run"):
        s.serve([("legal", "hi"), ("shop", long)], store=store, max_new_tokens=2)
    assert s._router.in_memory() == held and s._router.mixed_ok  # nothing loaded; mixing stays on
    assert {r.mode for r in s.serve([("legal", "a"), ("support", "b")], store=store, max_new_tokens=2)} == {"mixed"}
    with pytest.raises(FtUsageError, match="no adapter 'nope'"):
        s.serve([("nope", "hi")], store=store, capacity=1)
    assert sorted(s._router.in_memory()) == sorted(held)  # the refused call emptied no slot
    with pytest.raises(FtUsageError, match=r"no adapter 'Base' .*\(did you mean 'base'\?\)"):
        s.serve([("Base", "hi")], store=store)
