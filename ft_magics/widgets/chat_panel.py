"""``%lora_chat`` in a widget frontend: the session's conversation, a message box, and a choice of adapter
for each message (any adapter, or the base model, can answer any turn). Answers stream in as they are
generated. Everything goes through ``Session.chat``, the same as the text magic, so the two show one
conversation.
"""
from __future__ import annotations

import html
import time
from typing import Optional

import ipywidgets as widgets

from ..core.chat import left_out_notes
from ..errors import FtUsageError
from .adapters_panel import BASE_LABEL, adapter_choices

REDRAW_S = 0.1  # at most ten redraws a second while an answer streams in


def _bubble(who: str, text: str, kind: str, note: str = "") -> str:
    colour = "#eef4ff" if kind == "user" else "#f3f3f3"
    extra = f" <span style='color:#888'>{html.escape(note)}</span>" if note else ""
    return (f"<div class='ft-chat-{kind}' style='background:{colour};border-radius:6px;padding:4px 8px;margin:3px 0;"
            f"white-space:pre-wrap'><b>{html.escape(who)}</b>{extra}<br>{html.escape(text)}</div>")


class ChatPanel:
    """A conversation view, a message box, an adapter choice per message, Send and New conversation."""

    def __init__(self, session, *, sampling=None, system: Optional[str] = None, adapter: Optional[str] = None,
                 **settings) -> None:
        """``sampling`` (core.inference.Sampling) and/or its fields as keywords: how every answer is decoded."""
        from ..core.inference import Sampling

        self.session = session
        self.sampling = Sampling.of(sampling or Sampling(max_new_tokens=256), **settings)
        self.system = system
        self.log = widgets.HTML("")
        self.log.add_class("ft-chat-log")
        self.adapter = widgets.Dropdown(description="answer with", options=[BASE_LABEL], value=BASE_LABEL)
        self.adapter.add_class("ft-chat-adapter")
        self.text = widgets.Textarea(placeholder="Your message", layout=widgets.Layout(width="100%", height="60px"))
        self.text.add_class("ft-chat-input")
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.send_button.add_class("ft-chat-send")
        self.new_button = widgets.Button(description="New conversation")
        self.new_button.add_class("ft-chat-new")
        self.status = widgets.Label("")
        self.status.add_class("ft-chat-status")
        self.send_button.on_click(lambda _b: self.send())
        self.new_button.on_click(lambda _b: self.new_conversation())
        self.refresh_adapters(adapter or session.adapters.active or BASE_LABEL)
        self.render()
        self.box = widgets.VBox([self.log, self.text,
                                 widgets.HBox([self.adapter, self.send_button, self.new_button]), self.status])
        self.box.add_class("ft-chat-panel")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    # ------------------------------------------------------------------ state -> widgets
    def refresh_adapters(self, prefer: Optional[str] = None) -> None:
        """The choices: the base model, the loaded adapters, then those only in the adapters folder."""
        s = self.session
        names = adapter_choices([a.name for a in s.adapters], s.adapters_on_disk(fitting=True))
        current = prefer or self.adapter.value or s.adapters.active or BASE_LABEL
        values = [v for _label, v in names]
        if tuple(self.adapter.options) != tuple(names):
            self.adapter.options = names
        self.adapter.value = current if current in values else (s.adapters.active or BASE_LABEL)

    def render(self, pending: Optional[tuple] = None) -> None:
        """The conversation so far, plus ``pending`` = (message, answer so far, adapter) while one streams in."""
        conv = self.session.conversation
        parts = []
        if conv is not None and conv.system:
            parts.append(f"<div class='ft-chat-system' style='color:#666'><i>system: {html.escape(conv.system)}</i></div>")
        for t in (conv.turns if conv is not None else []):
            if t.role == "user":
                parts.append(_bubble("you", t.content, "user"))
            else:
                parts.append(_bubble(t.adapter or "model", t.content, "answer", "stopped" if t.stopped else ""))
        if pending is not None:
            message, answer, adapter = pending
            parts.append(_bubble("you", message, "user"))
            parts.append(_bubble(adapter, answer + " …", "answer", "answering"))
        self.log.value = "".join(parts) or "<i>No messages yet: write one below and press Send.</i>"

    # ------------------------------------------------------------------ actions
    def send(self, message: Optional[str] = None) -> bool:
        """Answer ``message`` (default: the text box) with the chosen adapter; True when it was answered.
        On a mistake the message stays in the box and the status says why."""
        message = (self.text.value if message is None else message).strip()
        if not message:
            self.status.value = "write a message first."
            return False
        adapter = self.adapter.value or BASE_LABEL
        self.text.value = ""
        self.send_button.disabled = True
        self.status.value = f"{adapter} is answering…"
        streamed: list = []
        last = [0.0]

        def on_text(t: str) -> None:
            streamed.append(t)
            now = time.monotonic()
            if now - last[0] >= REDRAW_S:
                last[0] = now
                self.render(pending=(message, "".join(streamed), adapter))

        answered = False
        try:
            gen, left_out = self.session.chat(message, adapter=adapter, system=self.system, on_text=on_text,
                                              sampling=self.sampling)
            self.system = None  # applies from the first turn on; the conversation keeps it
            self.status.value = gen.describe(left_out_notes(left_out))
            answered = True
        except FtUsageError as exc:
            self.text.value = message  # nothing typed is lost
            self.status.value = f"cannot answer: {exc}"
        finally:
            self.send_button.disabled = False
            self.render()
            self.refresh_adapters()  # an adapter used from the folder is loaded now
        return answered

    def new_conversation(self) -> None:
        from ..core.chat import Conversation

        # one rule, whether or not a message was sent: the system prompt shown stays for the new conversation
        old = self.session.conversation
        system = self.system if self.system is not None else (old.system if old is not None else None)
        self.session.conversation = Conversation(system=system)
        self.system = None
        self.status.value = "new conversation" + (f" (system prompt kept: {system})" if system else "")
        self.render()
