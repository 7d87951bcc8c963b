"""``%lora_chat`` in a widget frontend: the session's conversation, a message box, and a choice of adapter
for each message (any adapter, or the base model, can answer any turn). Answers stream in as they are
generated. Everything goes through ``Session.chat``, the same as the text magic, so the two show one
conversation. The session tells no view when it changes, so the panel redraws from it whenever it is used
(typing, choosing, any button, ⟳ refresh): turns of the text magic and adapters trained or deleted in other
cells show up then.
"""
from __future__ import annotations

import html
import time
from typing import Optional

import ipywidgets as widgets

from ..core.chat import left_out_notes
from ..errors import FtUsageError
from .adapters_panel import BASE_LABEL, TextLine, adapter_choices, set_choices

REDRAW_S = 0.1  # at most ten redraws a second while an answer streams in
SYNC_S = 1.0  # typing redraws the panel from the session at most once a second (it reads the adapters folder)


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
        self.refresh_button = widgets.Button(description="⟳ refresh", tooltip="Show the conversation and the "
                                             "adapters as they are now (after other cells used or changed them)")
        self.refresh_button.add_class("ft-chat-refresh")
        self.status = TextLine(css_class="ft-chat-status")
        self.send_button.on_click(lambda _b: self.send())
        self.new_button.on_click(lambda _b: self.new_conversation())
        self.refresh_button.on_click(lambda _b: self.sync(said=True))
        self._refreshing = False
        self._busy = False  # an answer is being generated: the panel shows it, not the session
        self._last_sync = 0.0
        self.status.text = self.refresh_adapters(adapter or session.adapters.active or BASE_LABEL)
        self.render()
        self.adapter.observe(self._on_choose, names="value")
        self.text.observe(self._on_typing, names="value")
        self.box = widgets.VBox([self.log, self.text,
                                 widgets.HBox([self.adapter, self.send_button, self.new_button, self.refresh_button]),
                                 self.status])
        self.box.add_class("ft-chat-panel")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    # ------------------------------------------------------------------ state -> widgets
    def refresh_adapters(self, prefer: Optional[str] = None) -> str:
        """The choices: the base model, the loaded adapters, then those only in the adapters folder. The choice
        stays as it was (``prefer``: make that the choice); one that is gone (deleted or unloaded in another
        cell) is cleared, not swapped for another model that would then answer unasked: the returned note
        says so ("" when nothing was cleared)."""
        s = self.session
        names = adapter_choices([a.name for a in s.adapters], s.adapters_on_disk(fitting=True))
        current = prefer if prefer is not None else self.adapter.value
        values = [v for _label, v in names]
        set_choices(self, self.adapter, names, current if current in values else None)
        if current is None or current in values:
            return ""
        return f"{current} is gone (deleted or unloaded in another cell): choose who answers in 'answer with'."

    def sync(self, said: bool = False) -> None:
        """Redraw the conversation and the adapter choices from the session; ``said``: the status says so."""
        if self._busy:
            return
        self._last_sync = time.monotonic()
        gone = self.refresh_adapters()
        self.render()
        if gone or said:
            self.status.text = gone or "up to date with the session."

    def _on_choose(self, change) -> None:
        if not self._refreshing and not self._busy:
            self.sync()  # a choice from a list drawn before an adapter was deleted is cleared, and says so

    def _on_typing(self, change) -> None:
        if not self._busy and change["new"] and time.monotonic() - self._last_sync >= SYNC_S:
            self.sync()

    def render(self, pending: Optional[tuple] = None) -> None:
        """The conversation so far, plus ``pending`` = (message, answer so far, adapter) while one streams in."""
        conv = self.session.conversation
        parts = []
        for entry in (conv.entries() if conv is not None else []):
            if entry[0] == "system":
                said = html.escape(entry[1]) if entry[1] is not None else "(none from here on)"
                parts.append(f"<div class='ft-chat-system' style='color:#666'><i>system: {said}</i></div>")
            elif entry[0] == "user":
                parts.append(_bubble("you", entry[1], "user"))
            else:
                parts.append(_bubble(entry[2], entry[1], "answer", "stopped" if entry[3] else ""))
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
            self.status.text = "write a message first."
            return False
        gone = self.refresh_adapters()  # what other cells changed: the choices, and the turns this one follows
        self.render()
        adapter = self.adapter.value
        if adapter is None:
            self.status.text = "cannot answer: " + (gone or "choose who answers in 'answer with' first.")
            return False
        self._busy = True
        self.text.value = ""
        self.send_button.disabled = True
        self.status.text = f"{adapter} is answering…"
        self.render(pending=(message, "", adapter))  # the message shows at once, not with the first token
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
            self.status.text = gen.describe(left_out_notes(left_out))
            answered = True
        except FtUsageError as exc:
            self.text.value = message  # nothing typed is lost
            self.status.text = f"cannot answer: {exc}"
        finally:
            self._busy = False
            self.send_button.disabled = False
            self.render()
            gone = self.refresh_adapters()  # an adapter used from the folder is loaded now
            if gone:
                self.status.text += f" ({gone})"
        return answered

    def new_conversation(self) -> None:
        from ..core.chat import Conversation

        # one rule, whether or not a message was sent: the system prompt shown stays for the new conversation
        old = self.session.conversation
        system = self.system if self.system is not None else (old.system if old is not None else None)
        self.session.conversation = Conversation(system=system)
        self.system = None
        self.status.text = "new conversation" + (f" (system prompt kept: {system})" if system else "")
        self.render()
        gone = self.refresh_adapters()
        if gone:
            self.status.text += f" ({gone})"
