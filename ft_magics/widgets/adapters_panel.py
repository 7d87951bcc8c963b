"""``%lora_adapters`` in a widget frontend: the session's adapters as a table, a selector that makes
one active (or the base model) and shows the swap time, and unload / delete buttons (delete asks
for a confirmation first). Every action goes through the Session, the same as the text commands.
"""
from __future__ import annotations

import html
from typing import Optional

import ipywidgets as widgets

from ..core.memory import human_bytes
from ..errors import FtUsageError

BASE_LABEL = "base"


def adapter_memory_bytes(model, name: str) -> int:
    """Bytes the LoRA weights of adapter ``name`` hold in memory (0 when the model has none)."""
    if model is None or not hasattr(model, "named_parameters"):
        return 0
    total = 0
    for pname, p in model.named_parameters():
        parts = pname.split(".")
        if any(a.startswith("lora_") and b == name for a, b in zip(parts, parts[1:])):
            total += p.numel() * p.element_size()
    return total


def short_modules(modules) -> str:
    """``q_proj, v_proj (x24)`` from full module paths like ``model.layers.0.self_attn.q_proj``."""
    if not modules:
        return "-"
    if isinstance(modules, str):
        return modules
    leaves = [str(m).rsplit(".", 1)[-1] for m in modules]
    kinds = sorted(set(leaves))
    per = len(leaves) // len(kinds) if len(leaves) % len(kinds) == 0 else 0
    return ", ".join(kinds) + (f" (x{per} layers)" if per > 1 else "")



def set_choices(panel, dropdown, options: list, value) -> None:
    """Give ``dropdown`` these ``options`` (only where they changed) and ``value``, with ``panel._refreshing``
    set meanwhile: new options reset a dropdown's value, and its observer must not read that as the user
    choosing."""
    panel._refreshing = True
    try:
        if tuple(dropdown.options) != tuple(options):
            dropdown.options = options
        dropdown.value = value
    finally:
        panel._refreshing = False

class TextLine(widgets.HTML):
    """A status or error line of plain text that wraps at the panel's edge: a Label cuts a long line off
    ("cannot answer: ... or %lora_stop." lost its end). Set :attr:`text`; it is escaped into ``value``."""

    def __init__(self, text: str = "", css_class: Optional[str] = None) -> None:
        # in an HBox beside other widgets the line takes the room left and wraps there, not past the edge
        super().__init__(layout=widgets.Layout(flex="1 1 auto", min_width="0"))
        if css_class:
            self.add_class(css_class)
        self.text = text

    @property
    def text(self) -> str:
        return html.unescape(self.value)

    @text.setter
    def text(self, text: str) -> None:
        self.value = html.escape(text, quote=False)


def adapter_choices(loaded: list, on_disk: list) -> list:
    """A selector's (label, value) options: the base model, the loaded adapters, then those only in the
    adapters folder (labelled so; choosing one loads it)."""
    return [(BASE_LABEL, BASE_LABEL)] + [(n, n) for n in loaded] + [(f"{n} (on disk)", n) for n in on_disk]


class AdaptersPanel:
    """A table, a selector and unload/delete buttons over ``session.adapters``."""

    def __init__(self, session) -> None:
        self.session = session
        self.table = widgets.HTML("")
        self.table.add_class("ft-adapters-table")
        self.selector = widgets.Dropdown(description="active", options=[BASE_LABEL], value=BASE_LABEL)
        self.selector.add_class("ft-adapter-selector")
        self.status = TextLine(css_class="ft-adapter-status")
        self.refresh_button = widgets.Button(description="⟳ refresh", tooltip="Show the session's adapters as they "
                                             "are now (trained, switched or deleted in other cells)")
        self.refresh_button.add_class("ft-adapters-refresh")
        self.unload_button = widgets.Button(description="Unload", tooltip="Drop the selected adapter from memory")
        self.delete_button = widgets.Button(description="Delete…", button_style="warning",
                                            tooltip="Unload the selected adapter and delete its folder")
        self.rename_text = widgets.Text(placeholder="new name", layout=widgets.Layout(width="12em"))
        self.rename_text.add_class("ft-adapter-new-name")
        self.rename_button = widgets.Button(description="Rename",
                                            tooltip="Give the selected adapter, and its folder, the name typed beside")
        self.confirm_label = TextLine()
        self.confirm_button = widgets.Button(description="Yes, delete", button_style="danger")
        self.cancel_button = widgets.Button(description="Cancel")
        self.confirm_box = widgets.HBox([self.confirm_label, self.confirm_button, self.cancel_button],
                                        layout=widgets.Layout(display="none"))
        self.refresh_button.on_click(lambda _b: self.sync())
        self.unload_button.on_click(lambda _b: self.unload())
        self.delete_button.on_click(lambda _b: self.ask_delete())
        self.rename_button.on_click(lambda _b: self.rename())
        self.confirm_button.on_click(lambda _b: self.confirm_delete())
        self.cancel_button.on_click(lambda _b: self.cancel_delete())
        self._pending_delete: Optional[str] = None
        self._refreshing = False
        self.refresh()
        self.selector.observe(self._on_select, names="value")
        self.box = widgets.VBox([
            self.table,
            widgets.HBox([self.selector, self.status]),
            widgets.HBox([self.unload_button, self.delete_button, self.refresh_button, self.rename_text,
                          self.rename_button]),
            self.confirm_box,
        ])
        self.box.add_class("ft-adapters-panel")

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    # ------------------------------------------------------------------ state -> widgets
    def rows(self) -> list:
        s = self.session
        model = s.handle.model if s.handle is not None else None
        out = []
        for a in s.adapters:
            out.append({
                "name": a.name, "active": a.name == s.adapters.active, "r": a.r, "alpha": a.alpha,
                "target_modules": short_modules(a.target_modules),
                "disk": human_bytes(a.size_on_disk()), "memory": human_bytes(adapter_memory_bytes(model, a.name)),
                "steps": a.steps if a.steps is not None else "-",
                "final_loss": f"{a.final_loss:.4f}" if a.final_loss is not None else "-",
                "path": a.path or "-",
            })
        return out

    def refresh(self) -> None:
        rows = self.rows()
        heads = ["", "name", "rank", "alpha", "target modules", "on disk", "in memory", "steps", "final loss", "path"]
        keys = ["name", "r", "alpha", "target_modules", "disk", "memory", "steps", "final_loss", "path"]
        if rows:
            body = "".join(
                "<tr>" + f"<td>{'●' if r['active'] else ''}</td>"
                + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in keys) + "</tr>" for r in rows
            )
            self.table.value = (
                "<table class='ft-adapters'><thead><tr>" + "".join(f"<th>{h}</th>" for h in heads)
                + f"</tr></thead><tbody>{body}</tbody></table>"
            )
        on_disk = self.session.adapters_on_disk(fitting=True)  # after a kernel restart: selecting one loads it
        if not rows:
            self.table.value = ("" if on_disk else
                                "<i>No adapters yet: train one with %%lora_train NAME --data ...</i>")
        if on_disk:
            self.table.value += (f"<p class='ft-adapters-on-disk'>In {html.escape(str(self.session.adapters_dir))}, "
                                 f"not loaded (select one to load it): {html.escape(', '.join(on_disk))}</p>")
        loaded = [BASE_LABEL] + [r["name"] for r in rows]
        names = adapter_choices(loaded[1:], on_disk)
        active = self.session.adapters.active or BASE_LABEL
        set_choices(self, self.selector, names, active if active in loaded else BASE_LABEL)
        has = bool(rows)
        self.unload_button.disabled = self.delete_button.disabled = self.rename_button.disabled = not has

    # ------------------------------------------------------------------ actions
    def _on_select(self, change) -> None:
        if self._refreshing or change["new"] is None:
            return
        self.select(change["new"])

    def select(self, name: str) -> Optional[float]:
        """Make ``name`` active (``base``: no adapter) through ``Session.use``; shows the swap time."""
        from ..adapter_commands import switch

        try:
            said, ms = switch(self.session, name)
        except FtUsageError as exc:
            self.status.text = f"cannot switch: {exc}"
            self.refresh()
            return None
        self.status.text = f"active: {said}"
        self.refresh()
        return ms

    def sync(self) -> None:
        """Redraw from the session (the ⟳ button): adapters trained, switched or deleted in other cells show up."""
        shown = self.selector.value
        self.refresh()
        active = self.selector.value
        self.status.text = f"active: {active}" + (" (switched in another cell)" if active != shown else "")

    def _target(self, done: str) -> Optional[str]:
        """The adapter Unload / Delete act on: the selected one, if it is still the session's active adapter. A
        selection left over from before a switch in another cell (``use`` in a cell, or a run that activated its
        adapter) is refused, the panel redrawn: the button then acts on what it shows."""
        s = self.session
        name = self.selector.value
        active = s.adapters.active or BASE_LABEL
        still_there = name in (None, BASE_LABEL) or name in s.adapters or name in s.adapters_on_disk()
        if name != active and still_there:  # (one that is gone says so in the action's own error)
            self.refresh()
            self.status.text = (f"nothing {done}: the panel was out of date ({active} is active now, switched in "
                                f"another cell, not {name or BASE_LABEL}); it shows the session as it is now.")
            return None
        if name in (None, BASE_LABEL):
            self.status.text = "select an adapter first (the base model cannot be unloaded here)."
            return None
        return name

    def unload(self) -> None:
        name = self._target("unloaded")
        if name is None:
            return
        try:
            self.session.unload_adapter(name)
            self.status.text = f"unloaded {name} (its folder stays on disk)"
        except FtUsageError as exc:
            self.status.text = f"cannot unload: {exc}"
        self.refresh()

    def rename(self) -> None:
        """Rename the selected adapter (its folder and checkpoints too: ``Session.rename_adapter``) to the name
        typed beside the button."""
        name = self._target("renamed")
        if name is None:
            return
        new = self.rename_text.value.strip()
        if not new:
            self.status.text = f"type the new name for {name} in the box beside Rename first."
            return
        try:
            folder = self.session.rename_adapter(name, new)
        except FtUsageError as exc:
            self.status.text = f"cannot rename: {exc}"
        else:
            self.rename_text.value = ""
            self.status.text = f"renamed {name} to {new}" + (f" (folder {folder})" if folder else " (in memory)")
        self.refresh()

    def ask_delete(self) -> None:
        name = self._target("deleted")
        if name is None:
            return
        folder = self.session.deletable_folder(name)
        if name not in self.session.adapters and folder is None:  # gone since the panel was drawn
            try:
                self.session.adapters.require(name, self.session.adapters_on_disk(), self.session.adapters_dir)
            except FtUsageError as exc:
                self.status.text = f"cannot delete: {exc}"
            self.refresh()
            return
        self._pending_delete = name
        self.confirm_label.text = (f"Delete {name} and its folder {folder}?" if folder is not None else
                                   f"Unload {name}? (the folder it was loaded from is kept)")
        self.confirm_box.layout.display = "flex"

    def cancel_delete(self) -> None:
        self._pending_delete = None
        self.confirm_box.layout.display = "none"
        self.status.text = "delete cancelled"

    def confirm_delete(self) -> None:
        name, self._pending_delete = self._pending_delete, None
        self.confirm_box.layout.display = "none"
        if name is None:
            return
        try:
            removed = self.session.delete_adapter(name)
            self.status.text = f"deleted {name}" + (f" and {removed}" if removed else " (the folder it was loaded from is kept)")
        except FtUsageError as exc:
            self.status.text = f"cannot delete: {exc}"
        self.refresh()
