"""Help and reference text generated from the code: ``%ft_help`` and the README's reference block.

The list of magics comes from the names IPython registers for :class:`FtMagics`, their usage and
flags from each magic's ``magic_arguments`` parser, their examples from the docstrings, and the YAML
keys from :func:`ft_magics.config.reference_table`; nothing here is a hand-kept list, so a new magic or
setting shows up in ``%ft_help`` and (after ``scripts/gen_reference.py``) in README.md by itself.
tests/test_docs.py checks that README.md holds exactly what :func:`readme_block` generates.
"""
from __future__ import annotations

import argparse

from IPython.utils.text import dedent

from .errors import FtUsageError, did_you_mean

BEGIN = "<!-- BEGIN GENERATED REFERENCE: scripts/gen_reference.py writes this block; do not edit by hand -->"
END = "<!-- END GENERATED REFERENCE -->"
# the order magics are presented in (any registered magic not listed here follows, alphabetically)
ORDER = ("qlora_load", "lora_train", "lora_generate", "lora_chat", "lora_compare", "lora_serve", "lora_eval", "lora_adapters",
         "lora_stop", "lora_export_job", "ft_plan", "ft_memory", "ft_unload", "ft_help")


def magic_kinds() -> dict:
    """``{name: ('line',) | ('cell',) | ('line', 'cell')}`` for every magic FtMagics registers."""
    from .magics import FtMagics

    kinds: dict = {}
    for kind in ("line", "cell"):
        for name in FtMagics.magics[kind]:
            kinds[name] = kinds.get(name, ()) + (kind,)
    order = [n for n in ORDER if n in kinds] + sorted(n for n in kinds if n not in ORDER)
    return {n: kinds[n] for n in order}


def _func(name: str):
    from .magics import FtMagics

    return getattr(FtMagics, name)


def prefix(kinds: tuple) -> str:
    return "%%" if kinds == ("cell",) else "%"


def title(name: str, kinds: tuple) -> str:
    if kinds == ("line", "cell"):
        return f"%{name} / %%{name}"
    return prefix(kinds) + name


def doc(name: str) -> str:
    """The magic's own docstring (magic_arguments replaces ``__doc__`` with the full argparse help and keeps
    the original as the parser's description)."""
    func = _func(name)
    parser = getattr(func, "parser", None)
    text = parser.description if parser is not None and parser.description else func.__doc__
    return dedent(text or "").strip()


def usage(name: str, kinds: tuple) -> str:
    """One usage line from the magic's argparse parser (without the per-setting flags of %%lora_train)."""
    parser = getattr(_func(name), "parser", None)
    if parser is None:
        return ""
    actions = [a for a in parser._actions if not a.dest.startswith("cfg_") and not isinstance(a, argparse._HelpAction)]
    fmt = argparse.HelpFormatter(parser.prog, width=10_000)
    fmt.add_usage(None, actions, [], prefix="")
    text = " ".join(fmt.format_help().split())
    return prefix(kinds) + text.lstrip("%")


def _help(action) -> str:
    return " ".join((action.help or "").replace("%%", "%").split())


def arguments(name: str, include_config: bool = False) -> list:
    """``[(flag or positional, help)]`` of a magic's parser; the TrainConfig flags only when asked."""
    parser = getattr(_func(name), "parser", None)
    if parser is None:
        return []
    rows = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or (a.dest.startswith("cfg_") and not include_config) \
                or a.help == argparse.SUPPRESS:  # (--no-gradient-checkpointing printed "==SUPPRESS==")
            continue
        label = ", ".join(a.option_strings) if a.option_strings else a.dest.upper()
        if a.choices:
            label += " {" + ",".join(map(str, a.choices)) + "}"
        default = "" if a.default in (None, False, argparse.SUPPRESS) else f"`{a.default}`"
        rows.append((label, default, _help(a)))
    return rows


def has_config_flags(name: str) -> bool:
    parser = getattr(_func(name), "parser", None)
    return parser is not None and any(a.dest.startswith("cfg_") for a in parser._actions)


# --------------------------------------------------------------------------- %ft_help
def help_text(name: str | None = None) -> str:
    """All magics with usage and examples, or one magic in full (every flag) when ``name`` is given."""
    kinds = magic_kinds()
    if name:
        key = name.strip().lstrip("%")
        if len(key.split()) > 1:
            raise FtUsageError(f"%ft_help takes one magic's name, got {key!r}: e.g. %ft_help {key.split()[0].lstrip('%')}.")
        if key not in kinds:
            raise FtUsageError(f"no magic %{key}{did_you_mean(key, list(kinds))}. %ft_help lists them all.")
        return _one(key, kinds[key], full=True)
    out = ["ft_magics — LoRA / QLoRA fine-tuning in the notebook. Full reference: README.md (section Reference).",
           "%ft_help NAME shows one magic with every flag; %lora_train? shows IPython's own help.", "",
           "Quick start:", "  %load_ext ft_magics", "  %qlora_load",
           "  %%lora_train support-bot --data demo:support --max-steps 60", "  r: 16",
           "  %%lora_generate --adapter support-bot", "  How do I reset my password?", ""]
    for n, k in kinds.items():
        out.append(_one(n, k, full=False))
    return "\n".join(out)


def _one(name: str, kinds: tuple, full: bool) -> str:
    lines = [title(name, kinds)]
    u = usage(name, kinds)
    if u:
        lines.append("  usage: " + u + (" [--KEY VALUE for every setting]" if has_config_flags(name) else ""))
    lines += ["  " + l if l else "" for l in doc(name).splitlines()]
    if full:
        args = arguments(name, include_config=True)
        if args:
            lines.append("  arguments:")
            lines += [f"    {label:<34} {text}" + (f" [default {d.strip('`')}]" if d and "Default" not in text else "")
                      for label, d, text in args]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- README block
def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def readme_block() -> str:
    """The README's reference section body (between BEGIN and END), as markdown."""
    from .config import ALIASES, OTHER_TOOLS, reference_table

    out = [BEGIN, "", "### Magics", "",
           "Generated from the magics' own parsers and docstrings (`%ft_help` shows the same in the notebook; "
           "`%ft_help NAME`, `%NAME --help` or `%%NAME?` one magic in full).", ""]
    for name, kinds in magic_kinds().items():
        out.append(f"#### `{title(name, kinds)}`")
        out.append("")
        u = usage(name, kinds)
        if u:
            out += ["```", u, "```", ""]
        out += ["```", doc(name), "```", ""]
        args = arguments(name)
        if args:
            out += ["| argument | default | meaning |", "| --- | --- | --- |"]
            out += [f"| `{_md_escape(label)}` | {_md_escape(d)} | {_md_escape(text)} |" for label, d, text in args]
            out.append("")
        if has_config_flags(name):
            out += ["Every setting in the table below is also a `--kebab-case` flag of this magic (flags win over the "
                    "YAML body); an on/off setting also takes `--no-NAME` and a value (`--no-packing`, "
                    "`--chunked-loss false`).", ""]
    out += ["### Training settings (YAML keys of `%%lora_train` / `%%lora_export_job`)", "",
            "Generated from `ft_magics.config.TrainConfig`. The names transformers and peft use are accepted "
            "too, as keys and as flags: " + ", ".join(f"`{a}`" for a in ALIASES) + ". A key given twice "
            "(also under two names) is refused. Settings of other tools that live elsewhere here or need nothing ("
            + ", ".join(f"`{k}`" for k in OTHER_TOOLS) + ") are translated where the meaning is the same "
            "(`completion_only_loss: false`, `report_to: none`, `bf16: true` on a model loaded to compute in bf16, "
            "`load_in_4bit: true` on a 4-bit base, `adam_beta1: 0.9`, `per_device_eval_batch_size` equal to "
            "`batch_size`), else refused with what to write instead; "
            "a body with several such keys is answered in one message that names them all.",
            "", reference_table(), "", END]
    return "\n".join(out)


def replace_block(readme: str, block: str) -> str:
    """README text with the generated block replaced (the markers must be present once)."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError("README.md must contain the generated-reference markers exactly once.")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def current_block(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    return BEGIN + rest.split(END, 1)[0] + END
