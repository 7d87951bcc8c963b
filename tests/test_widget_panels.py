"""The chat panel, the adapters panel and the memory gauge as a tester drove them in JupyterLab: what they show
at once, after a refusal, after other cells changed the session, on long lines; and the loop note and the
comparison table they and the magics show. Widgets are checked in Python (their values), no browser."""
from __future__ import annotations

import json
import shutil

import pytest

from ft_magics.core.events import MemoryReading

GB = 10 ** 9


@pytest.fixture
def trained(tiny_session, tmp_path):
    """The tiny session with adapters 'first' and 'second' (second active), and the data to train more."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"hi {i}", "completion": "ok"}) + "\n" for i in range(4)))
    for name in ("first", "second"):
        tiny_session.train(name, str(data), {"max_steps": 1, "batch_size": 4, "r": 4}, listeners=[])
    return tiny_session, data


def _values(dropdown) -> list:
    return [value for _label, value in dropdown.options]


# ------------------------------------------------------------------ chat panel
def test_chat_panel_shows_the_message_and_an_answering_bubble_before_the_first_token(trained):
    """After Send the box emptied but the log still said 'No messages yet' for the ~9 s before the first token."""
    from ft_magics.widgets.chat_panel import ChatPanel

    s, _ = trained
    p = ChatPanel(s, max_new_tokens=3)
    seen = {}
    real_chat = s.chat

    def chat(message, **kw):
        seen["log"], seen["status"] = p.log.value, p.status.value  # what the user sees while the model starts
        return real_chat(message, **kw)

    s.chat = chat
    assert p.send("where is my parcel?")
    assert "No messages yet" not in seen["log"] and "where is my parcel?" in seen["log"]
    assert "answering" in seen["log"] and "<b>second</b>" in seen["log"]
    assert seen["status"] == "second is answering…"


def test_a_refused_send_keeps_the_choice_or_says_it_is_gone(trained):
    """A refused Send switched 'answer with' to base without a word: the next Send let base answer."""
    from ft_magics.widgets.chat_panel import ChatPanel

    s, _ = trained
    p = ChatPanel(s, max_new_tokens=3)
    p.adapter.value = "first"
    p.text.value = " ".join(["keep me"] * 2000)  # refused: longer than the tiny model's context
    assert not p.send()
    assert p.status.value.startswith("cannot answer: the prompt is") and p.adapter.value == "first"
    # the adapter chosen is deleted in another cell while the panel still offers it
    s.delete_adapter("first")
    p.text.value = "hello"
    asked = []
    s.chat = lambda *a, **k: asked.append(a)  # nothing may answer in its place
    assert not p.send()
    assert asked == [] and p.text.value == "hello"
    assert p.adapter.value is None and _values(p.adapter) == ["base", "second"]
    assert p.status.value.startswith("cannot answer: first is gone") and "'answer with'" in p.status.value
    assert not p.send() and p.status.value == "cannot answer: choose who answers in 'answer with' first."
    assert asked == []


def test_chat_panel_follows_the_session_when_it_is_used(trained):
    """An open panel kept offering a deleted adapter, lacked a newly trained one, and did not show a text turn
    (%lora_chat ... hello) until the next Send."""
    from ft_magics.widgets.chat_panel import ChatPanel

    s, data = trained
    p = ChatPanel(s, max_new_tokens=2)
    s.train("third", str(data), {"max_steps": 1, "batch_size": 4, "r": 4}, listeners=[])
    s.unload_adapter("first")
    shutil.rmtree(s.adapters_dir / "first")
    s.chat("typed in a cell", max_new_tokens=2)
    assert "third" not in _values(p.adapter) and "typed in a cell" not in p.log.value  # nothing told the panel
    p.refresh_button.click()
    assert _values(p.adapter) == ["base", "second", "third"] and "typed in a cell" in p.log.value
    assert p.status.value == "up to date with the session."
    s.chat("another one", max_new_tokens=2)
    p._last_sync -= 2  # two seconds later (typing redraws at most once a second)
    p.text.value = "I am typing"  # typing redraws it too
    assert "another one" in p.log.value


def test_choosing_an_adapter_deleted_since_the_list_was_drawn_says_so(trained):
    from ft_magics.widgets.chat_panel import ChatPanel

    s, _ = trained
    p = ChatPanel(s, max_new_tokens=2)
    s.delete_adapter("first")
    p.adapter.value = "first"  # still in the stale list
    assert p.adapter.value is None and "first" not in _values(p.adapter)
    assert p.status.value.startswith("first is gone")


def test_chat_status_is_a_wrapping_line_of_escaped_text(trained):
    """A Label cut 'cannot answer: ... or %lora_stop.' off at the panel's edge."""
    import ipywidgets as widgets

    from ft_magics.widgets.chat_panel import ChatPanel

    s, _ = trained
    p = ChatPanel(s, max_new_tokens=2)
    assert isinstance(p.status, widgets.HTML) and not isinstance(p.status, widgets.Label)
    p.status.text = "cannot answer: <b>a & b</b> 'x'"
    assert p.status.value == "cannot answer: &lt;b&gt;a &amp; b&lt;/b&gt; 'x'"
    assert p.status.text == "cannot answer: <b>a & b</b> 'x'"


# ------------------------------------------------------------------ adapters panel
def test_adapters_panel_refreshes_and_refuses_to_act_on_a_stale_selection(trained):
    """After `%lora_adapters use first` in another cell the panel still showed second as active, and Unload /
    Delete acted on it; adapters trained after the panel was drawn were missing."""
    from ft_magics.widgets.adapters_panel import AdaptersPanel

    s, data = trained
    p = AdaptersPanel(s)
    assert p.selector.value == "second"
    s.use("first")  # another cell
    p.unload_button.click()
    assert "second" in s.adapters and "first" in s.adapters  # nothing unloaded
    assert p.status.value.startswith("nothing unloaded: the panel was out of date (first is active now")
    assert p.selector.value == "first" and "●</td><td>first" in p.table.value
    s.use("second")
    p.delete_button.click()
    assert p.confirm_box.layout.display != "flex" and (s.adapters_dir / "first").is_dir()
    assert p.status.value.startswith("nothing deleted: the panel was out of date (second is active now")
    s.train("third", str(data), {"max_steps": 1, "batch_size": 4, "r": 4}, listeners=[])  # makes it active
    p.refresh_button.click()
    assert _values(p.selector) == ["base", "first", "second", "third"] and p.selector.value == "third"
    assert "third" in p.table.value and p.status.value == "active: third (switched in another cell)"
    p.unload_button.click()  # now in step with the session: acts on what it shows
    assert "third" not in s.adapters and p.status.value.startswith("unloaded third")


def test_adapters_panel_status_lines_wrap():
    import ipywidgets as widgets

    from ft_magics.widgets.adapters_panel import TextLine

    line = TextLine("a <long> line", css_class="x")
    assert isinstance(line, widgets.HTML) and line.value == "a &lt;long&gt; line" and "x" in line._dom_classes
    assert line.layout.min_width == "0"  # beside a selector it shrinks and wraps instead of running off


# ------------------------------------------------------------------ memory gauge
def _reading(used):
    return MemoryReading(kind="cpu", used_bytes=used, peak_bytes=used, total_bytes=16 * GB,
                         available_bytes=8 * GB, label="CPU process RSS")


def test_memory_gauge_bars_cover_the_whole_window_its_caption_names():
    """The bars showed the last 60 readings (60 s) under a caption 'last 5.0 min' with the 5 minutes' range:
    a spike 4 minutes ago was in the caption's max and in no bar."""
    from ft_magics.widgets.memory_gauge import MemoryGauge, buckets, sparkline

    readings = iter([3 * GB] + [1 * GB] * 299)  # a spike, then 299 quiet seconds
    g = MemoryGauge(interval=1.0, probe=lambda: _reading(next(readings)))
    for _ in range(300):
        g.sample()
    bars = g.spark.value.split("<span style='font-family:monospace'>")[1].split("</span>")[0]
    assert len(bars) == 60 and bars[0] == "█" and set(bars[1:]) == {"▁"}
    assert "last 5.0 min, each bar the highest of 5 s, 1.0 GB–3.0 GB" in g.spark.value
    assert isinstance(g.label.text, str) and g.label.text.startswith("RAM (CPU)")
    assert buckets([1, 9, 2, 3], width=2) == [9, 3] and buckets([1, 2], width=60) == [1, 2]
    assert sparkline([5, 0, 0, 0, 0, 10], width=3) == "▅▁█"


# ------------------------------------------------------------------ loop note, comparison table
def test_a_loop_of_a_long_sentence_is_noted_and_normal_text_is_not():
    """A 300-token answer repeating a 40-token sentence got no note: only stretches of up to 32 tokens counted."""
    import random

    from ft_magics.core.inference import repeats_itself

    rng = random.Random(0)
    intro = [rng.randrange(1000) for _ in range(60)]
    sentence = [rng.randrange(1000) for _ in range(40)]
    looped = (intro + sentence * 7)[:300]  # cut mid-sentence by max_new_tokens
    assert repeats_itself(looped)
    assert repeats_itself((intro + [rng.randrange(1000) for _ in range(100)] * 3)[:330])  # 100-token period
    prose = [rng.randrange(1000) for _ in range(300)]
    assert not repeats_itself(prose)
    assert not repeats_itself(prose[:200] + sentence * 2)  # one sentence said again once: 80 tokens, no loop
    line = [rng.randrange(1000) for _ in range(60)]
    assert not repeats_itself(prose[:100] + line + line)  # a 60-token line quoted once more: twice, 120 tokens
    item = [11, 12, 13]  # a list whose items start alike
    assert not repeats_itself(sum((item + [rng.randrange(1000) for _ in range(10)] for _ in range(20)), []))
    # the short rule as it was
    assert repeats_itself([7, 1, 2, 3] + [4, 5, 6] * 4) and not repeats_itself([4, 5, 6] * 3)


def test_comparison_shows_an_empty_answer_and_left_aligned_headers():
    from ft_magics.core.inference import Comparison, Generation

    def gen(text):
        return Generation(text=text, adapter="x", new_tokens=1, seconds=1.0)

    cmp = Comparison(prompts=["p"], columns=["base", "a"], cells={(0, "base"): gen(""), (0, "a"): gen("hi")},
                     swap_ms={})
    page = cmp.to_html()
    assert "(empty answer)" in page and "(empty answer)" in cmp.to_text()
    assert page.count("<th style='text-align:left'>") == 3 and "<th>" not in page


def test_comparison_text_wraps_to_the_terminal_width(monkeypatch):
    """The text comparison was wrapped at 100 columns whatever the terminal: in 80 columns each line broke again."""
    import os
    import shutil

    from ft_magics.core.inference import Comparison, Generation

    answer = " ".join(["I can provide a gift for you."] * 12)
    cmp = Comparison(prompts=["p"], columns=["a"], cells={(0, "a"): Generation(text=answer, adapter="a",
                                                                               new_tokens=80, seconds=1.0)},
                     swap_ms={})
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(100, 24): os.terminal_size((80, 24)))
    assert max(len(line) for line in cmp.to_text().splitlines()) <= 79
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=(100, 24): os.terminal_size((200, 24)))
    widest = max(len(line) for line in cmp.to_text().splitlines() if line.startswith("    "))
    assert 90 <= widest <= 100  # wide terminals keep the readable 100
