"""The IPython layer: parse a line/cell into a typed spec, call the Session, render the result.

Magic methods stay thin. Arguments are declared with IPython's ``magic_arguments`` so ``%%lora_train?``
prints real usage and bad flags raise ``UsageError``; every ``FtUsageError`` from the core becomes a
``UsageError`` (shown without a traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import shlex
import sys
from typing import Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Int, Unicode

from .config import (ALIASES, OBJECTIVES, OPTIMIZERS, TrainConfig, canonical_key, other_tool_pointer, overridden_notes,
                     parse_yaml_body, pop_data_keys)
from .core.events import counted
from .errors import FtUsageError, did_you_mean

README_URL = "README.md"


class HelpShown(Exception):
    """``--help`` / ``-h`` on a magic's line: its help was printed, and the magic does nothing else."""


def user_errors(func):
    """Turn the core's FtUsageError into IPython's UsageError: a message, no traceback; ``--help`` ends quietly."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FtUsageError as exc:
            raise UsageError(str(exc)) from None
        except HelpShown:
            return None

    return wrapper


def no_arguments(magic_func, line: str) -> None:
    """For a magic that takes no arguments: ``--help`` prints its help; anything else is refused before it acts
    (``%ft_unload --help`` unloaded the model, ``%lora_stop --help`` stopped the run)."""
    words = strip_comment(line).split()
    help_asked(magic_func, words)
    if words:
        raise UsageError(f"%{magic_func.__name__} takes no arguments (got {' '.join(words)!r}); "
                         f"see %{magic_func.__name__}? for what it does.")


def help_asked(magic_func, words: list) -> None:
    """Print the magic's help (what ``%magic?`` shows: its usage and every flag) and stop it, when ``words`` (the
    line's) start with ``-h`` or hold ``--help`` anywhere: argparse's own ``--help`` is off in IPython's magic
    parsers, so it was refused as an unknown flag."""
    if words[:1] in (["-h"], ["--help"]) or "--help" in words:
        import inspect

        print(inspect.cleandoc(magic_func.__doc__ or f"%{magic_func.__name__}"))
        raise HelpShown()


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def sampling_arguments(max_new_tokens: int, sampled: bool = True):
    """The decoding flags that %lora_generate and %lora_chat share (``sampled=False``, %lora_compare: the
    ones that keep an answer greedy and reproducible). ``sampling_of(args)`` makes them a Sampling."""
    flags = [argument("--max-new-tokens", type=int, default=max_new_tokens,
                      help=f"Most tokens in the answer. Default {max_new_tokens}.")]
    if sampled:
        flags += [argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples."),
                  argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass when sampling. Default 1.0."),
                  argument("--top-k", type=int, default=None,
                           help="Sample among the K likeliest tokens; 0 = no limit. Default: the model's generation "
                                "config (transformers: 50)."),
                  argument("--seed", type=int, default=None, help="Random seed when sampling.")]
    flags.append(argument("--repetition-penalty", type=float, default=1.0,
                          help="> 1 makes tokens already in the text less likely, greedy too: 1.1-1.3 curbs a small "
                               "model's loops. Default 1.0 (none)."))

    def decorate(func):
        for flag in reversed(flags):
            func = flag(func)
        return func

    return decorate


def sampling_of(args: argparse.Namespace):
    from .core.inference import Sampling

    sampling = Sampling.of(**{k: getattr(args, k) for k in SAMPLING_FLAGS if hasattr(args, k)})
    for note in sampling.notes:
        print(f"Note: {note}")
    return sampling


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment``: a ``#`` outside quotes that starts a word. IPython hands a line
    magic its whole line, and ``%qlora_load   # the demo model`` failed with "unexpected argument 'the'". (The
    free text of %lora_generate / %lora_chat is not passed through here: a message may hold " #42".)"""
    quote = None
    for i, ch in enumerate(line or ""):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line or ""


_NUMBER = re.compile(r"-\d[\d.e+-]*")  # a negative value, not a flag
# generation options of other tools that have no counterpart here (a did-you-mean would point at an unrelated flag)
_NO_STOP_STRINGS = "there are no stop strings here; an answer ends at the model's end of turn or at --max-new-tokens"
ABSENT_FLAGS = {"--stop": _NO_STOP_STRINGS, "--stop-sequence": _NO_STOP_STRINGS}
# %lora_compare answers greedily: sampling flags of %lora_generate / %lora_chat are refused with why
_GREEDY = ("%lora_compare answers greedily, so the columns differ by the model alone (only --max-new-tokens and "
           "--repetition-penalty apply); sampling is for %lora_generate and %lora_chat")
GREEDY_FLAGS = {f: _GREEDY for f in ("--temperature", "--top-p", "--top-k", "--seed", "--do-sample")}


# A magic's line is split as the platform's shell splits words (as IPython's own magics do): on Windows a
# backslash is a path separator, elsewhere an escape character.
POSIX_LINES = os.name != "nt"


def _refuse_unquoted_backslashes(line: str) -> None:
    """An unquoted word with a backslash before a letter, digit or dot (``data\\faq.csv``, ``C:\\Users\\me``) lost it to
    the shell-style split, and the error named a path the user never typed ('datafaq.csv'). A backslash before a
    space or a shell character (``my\\ data/train\\ set.jsonl``, ``v\\#2.jsonl``: what IPython's tab completion writes)
    is the escape it means, and is read as such."""
    from IPython.utils.process import arg_split

    quote, i = None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "\\":
            nxt = line[i + 1:i + 2]
            if nxt and (nxt.isalnum() or nxt in "._-"):  # a Windows path's separator, not an escape
                start = i
                while start > 0 and not (line[start - 1].isspace() and line[start - 2:start - 1] != "\\"):
                    start -= 1
                end = i
                while end < len(line) and not (line[end].isspace() and line[end - 1] != "\\"):
                    end += 1
                word = line[start:end]
                try:
                    read = "".join(arg_split(word, posix=True))
                except ValueError:
                    read = word.replace("\\", "")
                raise UsageError(f"{word}: a backslash on a magic's line is an escape character here, so it would be "
                                 f"read as {read!r}. Write the path with / ({word.replace(chr(92), '/')}) or put it in "
                                 f"quotes ('{word}').")
            i += 1  # the escaped character is taken as it is
        i += 1


def parse_args(magic_func, line: str) -> argparse.Namespace:
    """``parse_argstring`` with a "did you mean" for unknown flags and no silent abbreviations; a trailing
    ``# comment`` is not part of the arguments."""
    from IPython.utils.process import arg_split

    parser = magic_func.parser
    parser.allow_abbrev = False
    line = strip_comment(line)
    try:
        words = arg_split(line, posix=POSIX_LINES)
        help_asked(magic_func, words)  # (--help wins over what else the line holds)
        if POSIX_LINES:
            _refuse_unquoted_backslashes(line)
    except ValueError as exc:  # unbalanced quotes
        raise UsageError(f"cannot parse the magic line ({exc}); check the quotes.") from None
    words = _spelled_out_switches(parser, words)
    _refuse_repeats(parser, words)
    flags = [s for a in parser._actions for s in a.option_strings]
    try:
        args, extra = parser.parse_known_args(words)
    except UsageError as exc:  # "arguments are required: name" for "-x": the unknown flag is the cause to name
        extra = [w for w in words if w.startswith("-") and w.split("=", 1)[0] not in flags and not _NUMBER.fullmatch(w)]
        if not str(exc).startswith("the following arguments are required"):
            raise
        if not extra:
            raise UsageError(f"%{magic_func.__name__}: {exc}. See %{magic_func.__name__}? for usage.") from None
    if extra:
        bad = extra[0]
        if bad.startswith("-"):
            flag = bad.split("=", 1)[0]
            if flag in ABSENT_FLAGS and "--max-new-tokens" in flags:  # another tool's option: say what is here
                raise UsageError(f"unknown flag {flag}: {ABSENT_FLAGS[flag]}. See %{magic_func.__name__}? for every flag.")
            if flag in GREEDY_FLAGS and magic_func.__name__ == "lora_compare":
                raise UsageError(f"unknown flag {flag}: {GREEDY_FLAGS[flag]}.")
            pointer = other_tool_pointer(flag[2:]) if "--max-steps" in flags or "--bits" in flags else None
            if pointer:  # --bf16: a setting of another tool, and where it lives here
                raise UsageError(f"unknown flag {flag}: another tool's setting; here write {pointer}.")
            setting = canonical_key(flag[2:].lower())
            if "--bits" in flags and setting in TrainConfig.keys():  # Unsloth's load takes max_seq_length
                raise UsageError(f"unknown flag {flag}: {setting} is a training setting here, not the load's; write "
                                 f"'{setting}: VALUE' in the %%lora_train cell's body (or --{setting.replace('_', '-')} "
                                 "on its line, where it has a flag).")
            raise UsageError(
                f"unknown flag {flag}{did_you_mean(flag, flags)}. See %{magic_func.__name__}? for every flag."
            )
        i = words.index(bad) if bad in words else 0
        hint = (_unquoted_path(words, i) or _unquoted_map(words, i) or _list_hint(parser, words, i)
                or _switch_hint(parser, words, i))
        raise UsageError(f"unexpected argument {bad!r}{hint}. See %{magic_func.__name__}? for usage.")
    return args


LIST_SETTINGS = ("cfg_target_modules",)  # settings whose flag takes a comma-separated list


def _list_hint(parser, words: list, i: int) -> str:
    """A hint when ``words[i]`` is a second item of a list setting written with a space (--target-modules q_proj
    v_proj)."""
    action = parser._option_string_actions.get(words[i - 2]) if i >= 2 else None
    if action is not None and action.dest in LIST_SETTINGS:
        return f": a list is written with commas ({words[i - 2]} {words[i - 1]},{words[i]})"
    return ""


def _switch_hint(parser, words: list, i: int) -> str:
    """A hint when ``words[i]`` follows an on/off flag as a value it does not take (--use-dora maybe)."""
    action = parser._option_string_actions.get(words[i - 1]) if i >= 1 else None
    if isinstance(action, argparse.BooleanOptionalAction):
        flag = words[i - 1]
        return f": {flag} is on or off ({flag} true, {flag} false, or {flag} alone for on)"
    return ""


def _unquoted_map(words: list, i: int) -> str:
    """A hint when ``words[i]`` is the rest of a --map whose column names have spaces and no quotes (--map Customer
    question=prompt,Agent answer=completion)."""
    for start in range(i - 1, max(i - 6, 0) - 1, -1):
        if words[start] == "--map":
            end = next((j for j in range(i + 1, len(words)) if words[j].startswith("--")), len(words))
            joined = " ".join(words[start + 1:end])
            return f": a --map with spaces in column names needs quotes (--map \"{joined}\")" if "=" in joined else ""
        if words[start].startswith("-"):
            break
    return ""


def _unquoted_path(words: list, i: int) -> str:
    """A hint when ``words[i]`` is the rest of a path with a space that was not quoted (--data my data/x.jsonl)."""
    import os

    for start in range(i - 1, max(i - 4, 0) - 1, -1):  # "my data/x.jsonl", "my big data/x.jsonl"
        joined = " ".join(words[start:i + 1])
        if words[start].startswith("-"):
            break
        if os.path.exists(os.path.expanduser(joined)):
            flag = f"{words[start - 1]} " if start and words[start - 1].startswith("-") else ""
            return f": a path with spaces needs quotes ({flag}\"{joined}\")"
    return ""


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _refuse_repeats(parser, words: list) -> None:
    """A setting given twice on one line (``--r 4 --r 8``, ``--lr 1e-3 --learning-rate 2e-4``) is refused, as a
    key given twice in a YAML body is: argparse would keep the last one without a word."""
    seen: dict = {}
    for word in words:
        action = parser._option_string_actions.get(word.split("=", 1)[0]) if word.startswith("--") else None
        if action is None or isinstance(action, (argparse._AppendAction, argparse._CountAction)):
            continue
        if action.dest in seen:
            raise UsageError(f"{seen[action.dest]} and {word.split('=', 1)[0]} both set {action.dest.removeprefix('cfg_')}"
                             "; keep one.")
        seen[action.dest] = word.split("=", 1)[0]


def _spelled_out_switches(parser, words: list) -> list:
    """``--use-dora true`` / ``--use-dora=false`` (as a YAML body would say it) -> ``--use-dora`` / ``--no-use-dora``
    for the on/off flags (argparse's BooleanOptionalAction takes no value)."""
    switches = {s for a in parser._actions if isinstance(a, argparse.BooleanOptionalAction)
                for s in a.option_strings if not s.startswith("--no-")}
    out, words = [], list(words)
    while words:
        word = words.pop(0)
        flag, eq, value = word.partition("=")
        if flag in switches and not eq and words and words[0].lower() in _TRUE | _FALSE:
            value = words.pop(0)  # --flag VALUE
        elif not (flag in switches and value.lower() in _TRUE | _FALSE):  # not --flag=VALUE either
            out.append(word)
            continue
        out.append(flag if value.lower() in _TRUE else "--no-" + flag[2:])
    return out


_TOKEN = re.compile(r"""\s*("[^"]*"|'[^']*'|\S+)""")


PROSE_FLAGS = ("--system",)  # flags whose value is a sentence: unquoted, only its first word would be taken


def split_leading_flags(magic_func, line: str, message_optional: bool = False) -> tuple[str, str]:
    """``--flag [value] ... free text [--flag [value] ...]`` -> (the flags, the free text verbatim).

    The free text of a line magic (a prompt) may hold apostrophes and question marks that a shell-style
    split would choke on, so only the flags are tokenised; the rest is kept as typed. Flags typed after the
    text count too, when everything from the first of them to the end is this magic's own flags and their
    values (``%lora_generate Hi there --max-new-tokens 40``): before, they were silently part of the prompt.

    A sentence-valued flag (``--system``) given unquoted just before the text took its first word alone
    (``--system You are a pirate. Say hello`` used "You" as the system prompt). Where the magic needs no
    message (``message_optional``: %lora_chat sets the system prompt alone) the flag takes the whole text;
    elsewhere where the sentence ends cannot be told, and the user is asked to quote it.
    """
    help_asked(magic_func, line.split()[:1])  # "-h" would be the prompt
    leading, text, trailing = _split_flags(magic_func, line)
    own = {o for a in magic_func.parser._actions for o in a.option_strings}
    if any(m.group(1).split("=", 1)[0] not in own for m in re.finditer(r"(?:^|\s)(--[\w-]+)", leading)):
        parse_args(magic_func, leading)  # an unknown flag before the text is the error to name, before any note
    _note_flags_in_text(magic_func, text)
    prose = _open_prose_flag(leading)
    if prose is None or not text:
        return (leading + " " + trailing).strip(), text
    start, flag, word = prose
    if message_optional:
        return f"{leading[:start]}{flag} {shlex.quote(word + ' ' + text)} {trailing}".strip(), ""
    raise UsageError(
        f"{flag} {word} {text}: an unquoted {flag} value is one word, so where the {flag} text ends and the message "
        f"begins cannot be told. Quote it: %{magic_func.__name__} {flag} \"{word} ...\" then the message.")


def _note_flags_in_text(magic_func, text: str) -> None:
    """Say so where the free text (a prompt, a message) holds what looks like a flag: ``%lora_compare bot --data x``
    sent 'bot --data x' to the models without a word (flags go first, or all at the end: see _split_flags)."""
    if text.rstrip().endswith("?"):  # "What does --seed do?" asks about a flag
        return
    found = [m.group(1) for m in re.finditer(r"(?:^|\s)(--[A-Za-z][\w-]*)", text)]
    if not found:
        return
    own = {o for a in magic_func.parser._actions for o in a.option_strings}
    name = magic_func.__name__
    first = found[0].split("=", 1)[0]
    why = (f"{first} is a flag of %{name}, but a flag after the text counts only where everything after it is "
           "this magic's flags and their values" if first in own else f"%{name} has no {first} flag")
    print(f"(the text sent holds {first!r}: {why}; flags go before the text, e.g. %{name} {first} ... then "
          "the text)")


def cell_flags(magic_func, line: str) -> str:
    """The first line of a cell magic whose body is the message: flags only, where an unquoted ``--system`` takes
    the rest of the line (``%%lora_chat --system Be terse.``: no message follows it on that line to be told apart)."""
    flags, text = split_leading_flags(magic_func, line, message_optional=True)
    if not text:
        return flags
    try:  # an unknown flag is named as such; only words that are no flag's get the message below
        parse_args(magic_func, line)
        return line
    except UsageError as exc:
        if not str(exc).startswith("unexpected argument"):
            raise
    raise UsageError(f"{text!r} on the first line of %%{magic_func.__name__}: that line holds flags only; the "
                     "message goes in the cell body below it.")


def _open_prose_flag(flags: str) -> Optional[tuple]:
    """``(offset, flag, value)`` when the last of ``flags`` is a sentence-valued flag with an unquoted value."""
    tokens = [(m.start(1), m.group(1)) for m in _TOKEN.finditer(flags)]
    if len(tokens) < 2 or tokens[-2][1] not in PROSE_FLAGS or tokens[-1][1][:1] in "\"'":
        return None
    return tokens[-2][0], tokens[-2][1], tokens[-1][1]


def _split_flags(magic_func, line: str) -> tuple[str, str, str]:
    """(the flags before the text, the text, the flags after it)."""
    arity = {s: a.nargs != 0 for a in magic_func.parser._actions for s in a.option_strings}
    end = _flags_end(line, 0, arity, known_only=False)
    text = line[end:].strip()
    if text.endswith("?"):  # a question ends the line: "What does --seed do?" asks about a flag, it sets none
        return line[:end], text, ""
    for m in re.finditer(r"(?:^|\s)(--[\w-]+)", text):
        if _flags_end(text, m.start(1), arity, known_only=True) == len(text.rstrip()):
            trailing = text[m.start(1):]
            try:
                parse_args(magic_func, trailing)
            except UsageError as exc:
                name = magic_func.__name__
                raise UsageError(f"{exc} ({trailing!r} after the message was read as flags; to send it as part of "
                                 f"the message, put the message in the cell body: %%{name} on the first line, "
                                 "the message below)") from None
            return line[:end], text[:m.start()].strip(), trailing
    return line[:end], text, ""


def _flags_end(line: str, pos: int, arity: dict, known_only: bool) -> int:
    """Where the run of ``--flag [value]`` tokens starting at ``pos`` ends (``known_only``: a token that is
    not one of ``arity``'s flags ends it, as free text)."""
    while True:
        m = _TOKEN.match(line, pos)
        flag = m.group(1).split("=", 1)[0] if m is not None else ""
        if m is None or not flag.startswith("--") or (known_only and flag not in arity):
            return pos
        pos = m.end()
        if arity.get(flag) and "=" not in m.group(1):
            v = _TOKEN.match(line, pos)
            pos = v.end() if v is not None else pos


def _config_flags(func):
    """Add a ``--kebab-case`` flag for every TrainConfig field (flags win over the YAML body)."""
    for f in reversed(dataclasses.fields(TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        # the names users bring from transformers / peft (--lr, --lora-alpha, ...) as second spellings
        flags = [flag] + ["--" + a.replace("_", "-") for a, target in ALIASES.items() if target == f.name]
        help_text = f"{f.metadata['help']} Default: {f.default!r}.".replace("%", "%%")
        if f.metadata.get("tristate"):  # true / false / auto: --flag [VALUE], and --no-flag for false
            func = argument(*["--no-" + s[2:] for s in flags], dest=f"cfg_{f.name}", action="store_const",
                            const=False, default=None, help=argparse.SUPPRESS)(func)
            func = argument(*flags, dest=f"cfg_{f.name}", nargs="?", const=True, default=None, metavar="true|false|auto",
                            help=f"{help_text} --no-{f.name.replace('_', '-')} turns it off.")(func)
        elif isinstance(f.default, bool):
            func = argument(*flags, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                            help=help_text)(func)
        else:
            func = argument(*flags, dest=f"cfg_{f.name}", default=None, metavar=f.name.upper(), help=help_text)(func)
    return func


def _training_body(args: argparse.Namespace, cell: Optional[str]) -> dict:
    """The YAML settings of a %%lora_train / %%lora_export_job body; a ``data:`` / ``eval:`` there fills
    ``args.data`` / ``args.eval`` where the line gave none (the line wins, as for every setting)."""
    body = parse_yaml_body(cell or "")
    for which, src in pop_data_keys(body).items():
        given = getattr(args, which)
        if given is None:
            setattr(args, which, src)
        elif given != src:  # the line wins, as for every setting: said, since the body names other data
            print(f"Note: the body's {which}: {src} is not used: --{which} {given} on the line wins.")
    return body


def _config_overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


@magics_class
class FtMagics(Magics):
    """LoRA / QLoRA fine-tuning magics. Settings: ``%config FtMagics``."""

    default_model = Unicode("demo", config=True, help="Model %qlora_load uses when none is given.")
    default_bits = Int(4, config=True, help="Bits %qlora_load uses when --bits is not given (4 = QLoRA).")
    adapters_dir = Unicode("adapters", config=True, help="Folder where %%lora_train saves adapters.")
    widgets = Bool(True, config=True, help="Show live widgets in a widget frontend (text elsewhere).")

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._session = None
        self._adapters_dir_seen = None  # the adapters_dir setting the session was last given
        self._background_view = None  # the dashboard of the last --background run, shown again where it was lost

    @property
    def session(self):
        if self._session is None:
            from .session import Session

            self._session = Session(adapters_dir=self.adapters_dir,
                                    namespace=self.shell.user_ns if self.shell is not None else {})
        if self.adapters_dir != self._adapters_dir_seen:  # set, or changed with %config FtMagics.adapters_dir
            self._adapters_dir_seen = self.adapters_dir
            self._session.adapters_dir = __import__("pathlib").Path(self.adapters_dir)
            if self._session.handle is not None:
                self._session._pin_adapters_dir()  # (else at the load: a later %cd moves it no more)
        return self._session

    # ------------------------------------------------------------------ %qlora_load
    @magic_arguments()
    @argument("model", nargs="?", default=None,
              help="'demo' (embedded SmolLM2-135M-Instruct), a hub id, a local model folder or a .gguf file.")
    @argument("--bits", type=int, default=None, choices=(4, 8, 16, 32),
              help="Weight precision: 4 = NF4 + double quantisation (QLoRA), 8, 16 or 32. Default 4.")
    @argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
              help="Compute dtype; auto picks bf16 where the hardware is fast at it.")
    @argument("--device", default="auto", help="auto, cpu or cuda[:N].")
    @argument("--trust-remote-code", action="store_true",
              help="Allow a model's own Python code to run (off by default: it runs arbitrary code).")
    @argument("--allow-pickle", action="store_true",
              help="Allow pickle .bin weights (they can run arbitrary code when loaded).")
    @line_magic
    @user_errors
    def qlora_load(self, line=""):
        """Load a base model, by default the embedded demo model in 4-bit NF4, and print its card.

        Examples::

            %qlora_load
            %qlora_load ./my-model --bits 16
            %qlora_load HuggingFaceTB/SmolLM2-135M-Instruct --bits 4
        """
        args = parse_args(self.qlora_load, line)
        before = self.session.handle.name if self.session.handle is not None else None
        try:
            handle = self.session.load(
                self.default_model if args.model is None else args.model, bits=args.bits or self.default_bits,
                dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                allow_pickle=args.allow_pickle,
            )
        except KeyboardInterrupt:  # the stop button in the slowest cell a user runs: one line on what is loaded now
            if self.session.handle is not None:
                end_as_interrupted(f"%qlora_load interrupted before it let go of {self.session.handle.name}: that "
                                   "model and its adapters are loaded as they were")
            end_as_interrupted("%qlora_load interrupted: no model is loaded now" + (
                f" ({before} and its adapters were let go first, to make room for the new one)" if before else "")
                + "; run %qlora_load again")
        print(handle.card())

    # ------------------------------------------------------------------ %%lora_train
    @magic_arguments()
    @argument("name", help="Adapter name (also its folder name under the adapters folder).")
    @argument("--data", default=None, help="Training data: a file, a folder, a glob pattern (data/*.jsonl), "
              "demo:NAME, a notebook variable, or a Hugging Face Hub dataset id (owner/name[:split]).")
    @argument("--eval", default=None, help="Held-out data (same kinds as --data).")
    @argument("--output-dir", default=None, help="Folder to save the adapter in (default: adapters/ in the working "
                                                 "folder of the %%qlora_load; a later %%cd does not move it).")
    @argument("--no-widgets", action="store_true", help="Text progress instead of the live dashboard.")
    @argument("--dry-run", action="store_true",
              help="Read and check the data, show the report and an example, make the memory checks and say how "
                   "many steps the run would take; train nothing.")
    @argument("--background", action="store_true",
              help="Train on a thread so the kernel stays free (Stop button or %%lora_stop).")
    @argument("--resume", action="store_true",
              help="Continue NAME from its latest complete checkpoint (same --data and settings as before).")
    @argument("--processes", type=int, default=None,
              help="Run the same job on N processes (CPU: gloo; GPUs: one per process) and stream its progress "
                   "here; the cell waits for them (not with --background). batch_size is per process. See "
                   "%%lora_export_job.")
    @argument("--launcher", default=None, choices=("accelerate", "torchrun", "notebook"),
              help="What starts the processes: accelerate launch (default), torchrun, or accelerate's notebook "
                   "launcher where it can fork this kernel (else accelerate launch).")
    @_config_flags
    @line_cell_magic
    @user_errors
    def lora_train(self, line="", cell=None):
        """Train a LoRA adapter NAME. The cell body is YAML settings; flags on the line win.
        (``%lora_train NAME --data ...`` on one line uses the defaults.) The body may also name the data
        (``data: train.jsonl``, ``eval: held-out.jsonl``) instead of ``--data`` / ``--eval``.

        Example::

            %%lora_train support-bot --data demo:support --max-steps 60
            r: 16
            alpha: 32
            target_modules: all-linear
            learning_rate: 2e-4

        Preference pairs (prompt / chosen / rejected) train with ``objective: dpo``, ``orpo``, ``ipo`` or ``simpo``::

            %%lora_train polite --data demo:support-pairs --eval demo:support-pairs-eval
            objective: orpo
            max_steps: 30
        """
        args = parse_args(self.lora_train, line)
        body = _training_body(args, cell)
        loaded = self.session.loaded_as  # (bf16: true, load_in_4bit: true are read against it)
        cfg = TrainConfig.from_dict(body, check=False, **loaded)  # checked with the flags over it
        overrides = _config_overrides(args)
        cfg = TrainConfig.from_dict(overrides, base=cfg, **loaded)
        for note in overridden_notes({canonical_key(k) for k in body} | set(overrides), cfg):
            print("Note: " + note)
        from .widgets import training_view

        if args.dry_run:
            from .widgets.text import TextReporter

            if args.processes is not None or args.launcher is not None or args.background:
                raise UsageError("--dry-run checks a run without starting one: leave out --processes, --launcher and "
                                 "--background.")
            self.session.train(args.name, args.data, cfg, eval_data=args.eval, output_dir=args.output_dir,
                               listeners=[TextReporter()], resume=args.resume, dry_run=True)
            return None
        if args.background and (args.processes is not None or args.launcher is not None):
            raise UsageError(
                "--processes/--launcher cannot be combined with --background: the cell follows the processes until "
                "they end. To keep the kernel free, write the job with %%lora_export_job NAME DIR (same flags and "
                "body), run `ft-magics train DIR/job.yaml` in a terminal, then %lora_adapters load DIR/adapters/NAME.")
        live = self._background_view if self.session.training_in_progress else None
        if live is not None and hasattr(live, "box"):  # a dashboard (a text view has nothing to show again)
            from IPython.display import display

            display(live.box)  # re-running its cell replaced the output that held the live dashboard
            raise UsageError(f"training {self.session.training_in_background!r} is in progress in the background "
                             "(its live dashboard is shown again above); stop it first (its Stop button or "
                             "%lora_stop) or wait for it to finish.")
        view = training_view(self.widgets and not args.no_widgets, background=args.background, session=self.session)
        try:  # a run catches its own interrupts (it stops at the next step and saves); one that reaches here came
            # before the run started, while the data was read (a traceback through the tokenizer, before)
            if args.processes is not None or args.launcher is not None:  # several processes: core/jobs.py
                result = self.session.train_processes(args.name, args.data, cfg,
                                                      processes=args.processes if args.processes is not None else 1,
                                                      launcher=args.launcher or "accelerate", eval_data=args.eval,
                                                      output_dir=args.output_dir, listeners=[view], resume=args.resume)
            else:
                result = self.session.train(
                    args.name, args.data, cfg, eval_data=args.eval, output_dir=args.output_dir, listeners=[view],
                    background=args.background, resume=args.resume,
                )
        except KeyboardInterrupt:
            end_as_interrupted(f"%%lora_train {args.name} interrupted before its first step: nothing was trained or "
                               "saved, and the model and adapters are as they were")
        if args.background:
            self._background_view = view
            if not hasattr(view, "stop_hint"):  # a dashboard says it beside its Stop button, for as long as it holds
                print(f"Training {args.name!r} in the background; the kernel is free. Stop it with %lora_stop.")
        elif getattr(result, "status", None) == "interrupted":
            saved = (f"its adapter is saved to {result.adapter_path}" if result.adapter_path else "no adapter was saved")
            end_as_interrupted(f"training {args.name!r} was interrupted at step {result.steps}; {saved}")
        return None

    # ------------------------------------------------------------------ %lora_export_job
    @magic_arguments()
    @argument("name", help="Adapter name the job trains.")
    @argument("dir", help="Folder to write job.yaml, the data and the accelerate configs into.")
    @argument("--data", default=None, help="Training data, as for %%lora_train (a notebook variable is exported to DIR).")
    @argument("--eval", default=None, help="Held-out data (same kinds as --data).")
    @argument("--processes", type=int, default=1, help="Processes `ft-magics train` starts by default. Default 1.")
    @argument("--output-dir", default=None, help="Where the job writes the adapter, in OUTPUT_DIR/NAME (default: "
                                                 "DIR/adapters; a relative path is read from the working folder).")
    @_config_flags
    @line_cell_magic
    @user_errors
    def lora_export_job(self, line="", cell=None):
        """Write a standalone training job: DIR/job.yaml (settings, model and data reference), the data
        when it is a notebook variable, and accelerate configs. The cell body is YAML settings, as for
        %%lora_train. Run it without a notebook, on one or many GPUs or machines::

            %%lora_export_job support-bot jobs/support --data demo:support --max-steps 60
            r: 16

            $ ft-magics train jobs/support/job.yaml
            $ accelerate launch --config_file jobs/support/accelerate.yaml -m ft_magics.train jobs/support/job.yaml

        The adapter lands in DIR/adapters/NAME; load it with %lora_adapters load PATH.
        """
        args = parse_args(self.lora_export_job, line)
        body = _training_body(args, cell)
        loaded = self.session.loaded_as  # (bf16: true, load_in_4bit: true are read against it)
        cfg = TrainConfig.from_dict(body, check=False, **loaded)  # checked with the flags over it
        cfg = TrainConfig.from_dict(_config_overrides(args), base=cfg, **loaded)
        from .core.jobs import load_job, run_commands
        from .widgets.text import TextReporter

        path = self.session.export_job(args.name, args.dir, args.data, cfg, eval_data=args.eval,
                                       processes=args.processes, output_dir=args.output_dir, listeners=[TextReporter()])
        spec = load_job(path)
        print(f"job written to {path}\n  adapter will be saved to {spec.adapter_dir}\n  run it with:\n"
              + "\n".join(f"    {command}" for command in run_commands(path)))

    # ------------------------------------------------------------------ %%lora_generate
    @magic_arguments()
    @argument("--adapter", default=None, help="Adapter to answer with, or 'base'. Default: the active one.")
    @sampling_arguments(max_new_tokens=128)
    @argument("--system", default=None, help="System prompt.")
    @argument("--no-stream", action="store_true", help="Print the answer at the end instead of streaming it.")
    @argument("--raw", action=argparse.BooleanOptionalAction, default=None,
              help="Continue the text as typed (no chat template, no turns), or --no-raw: send it as a user turn. "
                   "Default: raw where the tokenizer has no chat template and the base model, or an adapter trained "
                   "on plain text, answers.")
    @line_cell_magic
    @user_errors
    def lora_generate(self, line="", cell=None):
        """Answer the cell body (the user message) with the model, through the chat template.

        Examples::

            %%lora_generate --adapter support-bot
            How do I reset my password?

            %lora_generate --adapter support-bot How do I reset my password?

        In the line form a final ? belongs to the question (IPython would otherwise read it as a help
        request); %lora_generate? alone still shows this help. Flags may also follow the message
        (``%lora_generate How do I reset my password? --max-new-tokens 40``); a line ending in ? is all message
        ("What does --seed do?"). Interrupting the kernel (the
        stop button) ends the answer at the next token and keeps what was generated; the cell then ends as an
        error, so the cells queued after it are skipped.
        """
        if cell is None:  # line form: the flags first, then the message as typed
            line, prompt = split_leading_flags(self.lora_generate, line)
        else:
            line, prompt = cell_flags(self.lora_generate, line), cell
        args = parse_args(self.lora_generate, line)
        if not prompt.strip():
            raise UsageError("give the user message after the flags (%lora_generate --adapter NAME How do I ...?) "
                             "or in the cell body:\n%%lora_generate\nHow do I reset my password?")
        on_text = None if args.no_stream else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        gen = self.session.generate(prompt.strip(), adapter=args.adapter, system=args.system, on_text=on_text,
                                    sampling=sampling_of(args), raw=args.raw)
        if args.no_stream:
            print(gen.text)
        else:
            print()
        _answer_footer(gen, [f"system prompt: {_clipped(args.system)}"] if args.system else [])

    # ------------------------------------------------------------------ %%lora_chat
    @magic_arguments()
    @argument("--adapter", default=None, help="Adapter to answer this turn with, or 'base'. Default: the active one.")
    @argument("--system", default=None, help="System prompt of the conversation from this turn on.")
    @argument("--new", action="store_true", help="Start a new conversation (alone: just forget the old one).")
    @sampling_arguments(max_new_tokens=256)
    @argument("--no-stream", action="store_true", help="Print the answer at the end instead of streaming it.")
    @line_cell_magic
    @user_errors
    def lora_chat(self, line="", cell=None):
        """Chat with the model: each call is the next turn of one conversation, which remembers what was
        said (the chat template carries the earlier turns). Switch adapters between turns to hear each
        one continue the same conversation.

        Examples::

            %%lora_chat --adapter support-bot
            My order hasn't arrived.

            %lora_chat It was order 1234, placed last Tuesday.
            %lora_chat --adapter base And what would you say?
            %lora_chat                    (the conversation so far; in a notebook, the chat panel)
            %lora_chat --new              (forget it and start again)

        In a notebook ``%lora_chat`` alone shows a chat panel: a message box, Send, and a choice of the
        adapter (or base model) that answers each message; it shows the same conversation as the magic.

        The oldest turns are left out (and you are told) when the conversation outgrows the model's
        context. Interrupting the kernel ends the answer at the next token and keeps it in the history (the
        cell then ends as an error, so the cells queued after it are skipped).
        """
        if cell is None:
            line, message = split_leading_flags(self.lora_chat, line, message_optional=True)
        else:
            line, message = cell_flags(self.lora_chat, line), cell
        args = parse_args(self.lora_chat, line)
        session = self.session
        if not message.strip():
            from .widgets import widget_frontend

            given = [f"--{k.replace('_', '-')}" for k in ("adapter", *SAMPLING_FLAGS, "no_stream")
                     if getattr(args, k, None) != self.lora_chat.parser.get_default(k)]
            if given and not (self.widgets and widget_frontend()):  # they shape an answer; without a message there
                # is none (only --system and --new persist; the panel takes them as its settings)
                print(f"{', '.join(given)} applies to a turn: give a message too (e.g. %lora_chat {given[0]} ... "
                      "Hello); only --system and --new act on their own.")
            if args.new:
                from .core.chat import Conversation

                session.conversation = Conversation(system=args.system or None)
                if not (self.widgets and widget_frontend()):
                    print("started a new conversation" + (f" (system prompt: {args.system})" if args.system else "") + ".")
                    return
            elif args.system is not None:  # the system prompt of the next turns, typed or sent from the panel
                from .core.chat import Conversation

                session.conversation = session.conversation or Conversation()
                session.conversation.system = args.system or None
                if not (self.widgets and widget_frontend()):
                    print((f"system prompt from the next turn on: {args.system}" if args.system else
                           "no system prompt from the next turn on.")
                          + (" The turns so far stay in the conversation, and the model reads them under it "
                             "(%lora_chat --new starts afresh)." if session.conversation.turns else ""))
                    return
            on_disk = session.adapters_on_disk() if args.adapter not in (None, "base") else []
            if args.adapter not in (None, "base") and args.adapter not in session.adapters and args.adapter not in on_disk:
                session.adapters.require(args.adapter, on_disk, session.adapters_dir)  # "no adapter named ..."
            if self.widgets and widget_frontend():  # the chat panel: a message box and an adapter per message
                from IPython.display import display

                from .widgets.chat_panel import ChatPanel

                session._require_model()
                display(ChatPanel(session, sampling=sampling_of(args), adapter=args.adapter,
                                  system=None if args.new else args.system))
                return
            conv = session.conversation
            if conv is None or not conv.turns:  # a normal state (after --new, too): said, not an error that stops Run All
                print("no conversation yet: write a message, e.g. %lora_chat Hello! (or in the cell body of "
                      "%%lora_chat)." + (f" The next one is asked under the system prompt: {conv.system}"
                                         if conv is not None and conv.system else ""))
                return
            print(conv.transcript())
            print(f"[{counted(conv.exchanges, 'exchange')}; %lora_chat --new starts over]")
            return
        on_text = None if args.no_stream else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        gen, left_out = session.chat(message.strip(), adapter=args.adapter, system=args.system, new=args.new,
                                     on_text=on_text, sampling=sampling_of(args))
        if args.no_stream:
            print(gen.text)
        else:
            print()
        from .core.chat import left_out_notes

        _answer_footer(gen, [f"turn {session.conversation.exchanges}"] + left_out_notes(left_out))

    # ------------------------------------------------------------------ %lora_adapters
    @line_magic
    @user_errors
    def lora_adapters(self, line=""):
        """Adapters of this session (no argument in a notebook: the adapters panel).

        Subcommands::

            list                                  (default in a terminal)
            info NAME                             how it was trained: data, settings, losses, speed
            use NAME|base                         switch the active adapter (milliseconds)
            load PATH [--name N]                  any PEFT LoRA adapter folder
            unload NAME                           drop from memory, keep the folder
            delete NAME                           drop and delete its folder (only inside adapters/; a
                                                  run cut short before it saved: its checkpoints)
            rename NAME NEW                       its folder, record and checkpoints too; stays active
            merge NAME                            fold into the base weights (16/32-bit base)
            unmerge                               restore the base weights exactly
            combine a:0.7,b:0.3 --name NEW [--method linear|cat|svd|ties]
            export NAME DIR [--merged [--dtype D]] [--overwrite]
                                                  PEFT folder, or a standalone merged model (another
                                                  adapter's export there: only with --overwrite)

        Examples::

            %lora_adapters
            %lora_adapters use support-bot
            %lora_adapters export support-bot out/peft
        """
        line = strip_comment(line)
        if not line.strip() and self.widgets:  # no arguments in a widget frontend: the adapters panel
            from .widgets import widget_frontend

            if widget_frontend():
                from IPython.display import display

                from .widgets.adapters_panel import AdaptersPanel

                display(AdaptersPanel(self.session))
                return
        from . import adapter_commands

        try:
            words = shlex.split(line or "")
        except ValueError as exc:
            raise UsageError(f"cannot parse the magic line ({exc}); check the quotes.") from None
        help_asked(self.lora_adapters, words[:1])
        try:
            adapter_commands.run(self.session, words)
        except KeyboardInterrupt:  # the stop button in a merged export, a combine, a cold load: one line, not a traceback
            cmd = words[0] if words else "list"
            end_as_interrupted(f"%lora_adapters {cmd} interrupted: " + (
                "undone, so the model and the adapters are as they were and nothing was written"
                if cmd in UNDONE_ON_INTERRUPT else "see %lora_adapters list for what is loaded and on disk now"))

    # ------------------------------------------------------------------ %%lora_compare
    @magic_arguments()
    @argument("--adapters", default=None,
              help="Comma-separated adapters to compare with the base. Default: every loaded adapter.")
    @sampling_arguments(max_new_tokens=64, sampled=False)
    @argument("--system", default=None, help="System prompt.")
    @line_cell_magic
    @user_errors
    def lora_compare(self, line="", cell=None):
        """Answer each prompt with the base and each adapter, side by side (greedy, so reproducible),
        with tokens/s per column. Prompts are separated by lines of ``---``.

        Examples::

            %%lora_compare --adapters support-bot,legal
            How do I reset my password?
            ---
            Can I return a gift?

            %lora_compare --adapters support-bot How do I reset my password?
        """
        if cell is None:  # line form: the flags first, then one prompt as typed
            line, cell = split_leading_flags(self.lora_compare, line)
        else:
            line = cell_flags(self.lora_compare, line)
        args = parse_args(self.lora_compare, line)
        adapters = [a.strip() for a in args.adapters.split(",") if a.strip()] if args.adapters is not None else None
        if adapters == []:  # "--adapters ," compared the base alone without a word
            raise UsageError(f"--adapters {args.adapters!r} names no adapter: give names separated by commas, e.g. "
                             "--adapters a,b (or leave --adapters out to compare every loaded one).")
        cmp = self.session.compare(cell or "", adapters, max_new_tokens=args.max_new_tokens, system=args.system,
                                   repetition_penalty=args.repetition_penalty)
        self._show(cmp)
        on_disk = self.session.adapters_on_disk(fitting=True) if adapters is None and cmp.columns == ["base"] else []
        if on_disk:  # a fresh kernel: nothing loaded, so the base alone answered
            shown = ", ".join(on_disk[:5]) + (", ..." if len(on_disk) > 5 else "")
            print(f"(only the base: no adapter is loaded. In {self.session.adapters_dir}: {shown}; compare them with "
                  f"--adapters {','.join(on_disk[:2])})")
        if len(cmp.prompts) == 1 and "\n" in cmp.prompts[0]:  # one prompt per line is a natural first guess
            lines = cmp.prompts[0].count("\n") + 1
            print(f"(the cell held one prompt of {lines} lines; separate several prompts with a line of ---)")

    # ------------------------------------------------------------------ %%lora_serve
    @magic_arguments()
    @argument("--store", default=None, help="Folder the adapters are read from. Default: the adapters folder.")
    @argument("--capacity", type=int, default=None,
              help="Most adapters the router keeps in memory (least recently used first out). Default 4, or the "
                   "last call's.")
    @sampling_arguments(max_new_tokens=64)
    @argument("--system", default=None, help="System prompt for every request.")
    @line_cell_magic
    @user_errors
    def lora_serve(self, line="", cell=None):
        """Answer a batch of requests, each with its own adapter (or the base), as a service of one base and many
        task adapters would: one line per request, ``ADAPTER: PROMPT``. Adapters not in memory are read from the
        store into at most --capacity slots, and the mixed batch runs in one generate call. Each answer says how its
        adapter was found (resident, loaded, hot-swapped, reloaded) and what that cost. A prompt of several lines
        goes in a block between lines of ``---``. The line form takes one request; ``%lora_serve`` alone shows the
        slots in memory.

        Examples::

            %%lora_serve --max-new-tokens 48
            support-bot: How do I reset my password?
            legal: Is this clause enforceable?
            base: What is LoRA?

            %lora_serve support-bot: Where is my order?
        """
        listing = cell is None
        if listing:  # line form: the flags, then one request as typed, or nothing (the slots)
            line, cell = split_leading_flags(self.lora_serve, line)
            listing = not cell.strip() or cell.lstrip().startswith("#")
        else:
            line = cell_flags(self.lora_serve, line)
        args = parse_args(self.lora_serve, line)
        if listing:
            print(self.session.serving_text())
            return
        from .core.routing import requests_of_text, served_text
        from .paths import user_path

        requests = requests_of_text(cell, store=user_path(args.store) if args.store else self.session.adapters_dir)
        served = self.session.serve(requests, store=args.store, capacity=args.capacity,
                                    max_new_tokens=args.max_new_tokens, system=args.system, sampling=sampling_of(args))
        print(served_text(requests, served))

    # ------------------------------------------------------------------ %lora_eval
    @magic_arguments()
    @argument("name", nargs="?", default=None,
              help="Adapter to evaluate against the base, or 'base' alone. Default: the active adapter.")
    @argument("--data", default=None,
              help="Held-out data, the same kinds as %%lora_train --data. Default: the examples held out when "
                   "NAME was trained (--eval or eval_fraction), if any: read again from the run's files after a "
                   "restart (not from a variable).")
    @argument("--map", default=None, help="Column mapping for --data, as for %%lora_train (q=prompt,reply=completion).")
    @argument("--no-general", action="store_true", help="Skip the forgetting check on general text.")
    @argument("--max-seq-len", type=int, default=None,
              help="Truncate examples to this many tokens (at most the model's context). Default 512, or the "
                   "context of a model that reads fewer.")
    @argument("--batch-size", type=int, default=8, help="Examples per forward pass. Default 8.")
    @argument("--answers", type=int, default=0,
              help="Also answer N held-out questions greedily with the base and the adapter and count the answers "
                   "that match the reference (whole, and first line). Default 0: none.")
    @line_magic
    @user_errors
    def lora_eval(self, line=""):
        """Loss and perplexity on held-out data, base vs adapter, plus a forgetting check: the same on a
        bundled general-text sample no adapter was trained on.

        Examples::

            %lora_eval support-bot --data demo:support-eval
            %lora_eval                 (the active adapter, on what its training run held out)
        """
        args = parse_args(self.lora_eval, line)
        name = args.name or self.session.adapters.active or "base"
        try:
            report = self.session.evaluate(name, args.data, general=not args.no_general, batch_size=args.batch_size,
                                           max_seq_len=args.max_seq_len, answers=args.answers, column_map=args.map,
                                           progress=lambda line: print(line, flush=True))
        except KeyboardInterrupt:  # the stop button: scoring changes nothing, so there is nothing to keep or undo
            end_as_interrupted(f"%lora_eval interrupted: no scores for {name!r}; the model and adapters are as they "
                               "were")
        self._show(report)
        if name != "base":
            from .adapter_commands import _note_other_base

            _note_other_base(self.session, name, print)  # its run's eval loss was on that base
        if args.data is None and not any(str(label).startswith("held out in training") for label in report.sets):
            why = self.session.unknown_heldout_why(name)
            print("(only the forgetting check: " + (f"{why}; " if why else
                                                     f"no held-out examples are known for {name!r}; ")
                  + "--data FILE scores it on yours)")

    def _show(self, result) -> None:
        """An HTML table in a notebook (a kernel with a rich frontend), text elsewhere."""
        if self.shell is not None and getattr(self.shell, "kernel", None) is not None:
            from IPython.display import HTML, display

            display(HTML(result.to_html()))
        else:
            print(result.to_text())

    # ------------------------------------------------------------------ %ft_memory
    @magic_arguments()
    @argument("off", nargs="?", default=None, help="'off' stops the live gauge.")
    @argument("--interval", type=float, default=1.0, help="Seconds between readings of the live gauge. Default 1.")
    @argument("--once", action="store_true", help="Print one reading as text instead of the live gauge.")
    @line_magic
    @user_errors
    def ft_memory(self, line=""):
        """Live memory gauge (VRAM on CUDA, RAM on the CPU) with a sparkline; ``off`` stops it.

        Examples::

            %ft_memory
            %ft_memory --interval 0.5
            %ft_memory --once
            %ft_memory off
        """
        from .widgets.memory_gauge import memory_magic

        args = parse_args(self.ft_memory, line)
        memory_magic(args.off, interval=args.interval, once=args.once, use_widgets=self.widgets)

    # ------------------------------------------------------------------ small commands
    @line_magic
    @user_errors
    def lora_stop(self, line=""):
        """Stop the background training run at the next step boundary (the adapter is saved).

        Example::

            %%lora_train support-bot --data demo:support --background
            %lora_stop
        """
        no_arguments(self.lora_stop, line)
        if self.session.stop_pending:  # a second %lora_stop: the first one is on its way
            print("a stop is already on its way: the run stops at its next step and saves the adapter.")
            return
        print("stopping at the next step..." if self.session.stop() else "no training run in progress.")

    @line_magic
    @user_errors
    def ft_unload(self, line=""):
        """Free the model, its adapters and caches without restarting the kernel.

        Example::

            %ft_unload
        """
        no_arguments(self.ft_unload, line)
        from .core.memory import human_bytes, read_memory, rss_bytes

        before, gpu = rss_bytes(), read_memory(None)  # a CUDA reading only where CUDA is in use
        had_model = self.session.handle is not None
        self.session.unload()  # also drops caches when no model is loaded
        what = "model unloaded" if had_model else "no model was loaded (caches freed)"
        msg = f"{what}; process memory {human_bytes(before)} -> {human_bytes(rss_bytes())}"
        if gpu.kind == "cuda":
            msg += f"; CUDA allocated {human_bytes(gpu.used_bytes)} -> {human_bytes(read_memory(None).used_bytes)}"
        print(msg)

    @magic_arguments()
    @argument("model", nargs="?", default=None,
              help="A local model folder, a known hub id (e.g. meta-llama/Llama-2-70b-hf), 'demo', or a size like 7B. "
                   "Default: the loaded model, else the demo model.")
    @argument("--seq-len", type=int, default=512, help="Tokens per example. Default 512.")
    @argument("--batch-size", type=int, default=8, help="Examples per step. Default 8.")
    @argument("--r", type=int, default=16, help="LoRA rank for the adapter size. Default 16.")
    @argument("--gradient-checkpointing", action="store_true", help="Plan activations with gradient checkpointing.")
    @argument("--memory", default=None,
              help="Say what fits in this much memory (24GB, 16GiB, 80) and at which batch; 'here': this machine's "
                   "GPU (or RAM without one).")
    @argument("--optimizer", default="adamw", choices=OPTIMIZERS,
              help="The optimizer (as the optimizer setting): adamw_8bit keeps Adam's states in 8 bits. Default adamw.")
    @argument("--objective", default="sft", choices=OBJECTIVES,
              help="dpo / orpo / ipo / simpo plan a preference run: each example is a pair (two rows); DPO and IPO "
                   "under full fine-tuning also keep a frozen reference copy. Default sft.")
    @line_magic
    @user_errors
    def ft_plan(self, line=""):
        """Estimated memory for full fine-tuning, LoRA and QLoRA of MODEL, with the formula. Loads nothing.

        Examples::

            %ft_plan 7B --seq-len 2048 --batch-size 4
            %ft_plan 8B --memory 24GB            (what fits in 24 GB, at which batch)
            %ft_plan meta-llama/Llama-2-70b-hf
            %ft_plan ./my-model
        """
        # argparse takes "--memory -5GB"'s value for a flag ("expected one argument"): join a signed value to
        # its flag, so that parse_memory says what is wrong with it
        line = re.sub(r"(--memory)\s+(?=[-+]\s*[\d.])", r"\1=", line)
        first = strip_comment(line).split()[:1]
        if first and re.match(r"^-\d", first[0]):  # argparse reads "-7B" as an unknown flag: the planner says
            self.session.plan(first[0])  # what is wrong with it as a size
        args = parse_args(self.ft_plan, line)
        memory = None
        if args.memory:  # checked before anything is printed
            from .core.planner import memory_here, parse_memory

            memory = memory_here() if args.memory.strip().lower() == "here" else (parse_memory(args.memory), "")
        p = self.session.plan(args.model, seq_len=args.seq_len, batch_size=args.batch_size, r=args.r,
                              gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                              objective=args.objective)
        print(p.table())
        report = self.session.last_data_report
        stats = report.stats() if report is not None and args.model is None and "--seq-len" not in line else {}
        if stats and stats["max"] < args.seq_len:  # the default length, far from the data just trained on
            print(f"\nseq_len {args.seq_len} is the default; the last run's examples were {stats['max']:,} tokens at "
                  f"most (p95 {stats['p95']:,}): --seq-len {stats['max']} plans for them.")
        if memory is not None:
            print()
            print(p.fit_text(*memory))
        if 60e9 <= p.dims.params <= 80e9:  # the seed's table is of a 70B model
            from .core.planner import seed_comparison

            print()
            print(seed_comparison(p))

    @line_magic
    @user_errors
    def ft_help(self, line=""):
        """Usage of every ft_magics magic with examples; ``%ft_help NAME`` shows one magic with every flag.

        Examples::

            %ft_help
            %ft_help lora_train
        """
        help_asked(self.ft_help, strip_comment(line).split())
        print(help_text(strip_comment(line).strip() or None))


# every magic FtMagics registers (what unloading the extension removes); %ft_help lists the same names
MAGIC_NAMES = {kind: list(names) for kind, names in FtMagics.magics.items()}


def help_text(name=None) -> str:
    """%ft_help's text, generated from the registered magics (ft_magics/reference.py)."""
    from .reference import help_text as _help_text

    return _help_text(name)


_loaded: dict = {}


def get_session():
    """The Session behind the magics of the running IPython (so a notebook cell can use the Python API)."""
    from IPython import get_ipython

    ip = get_ipython()
    magics = _loaded.get(id(ip)) if ip is not None else None
    if magics is None:
        raise FtUsageError("ft_magics is not loaded in this IPython: run %load_ext ft_magics first.")
    return magics.session


_PROMPT_LINE = re.compile(r"^([ \t]*)%(lora_generate|lora_chat|lora_compare|lora_serve)[ \t]+(\S.*?)\s*$")


def _clipped(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[:n - 3] + "...")


def _answer_footer(gen, notes=()) -> None:
    """``[adapter · N tokens · tok/s · ...]`` under a generated answer; an answer an interrupt stopped then ends
    the cell as one (:func:`end_as_interrupted`)."""
    print(f"[{gen.describe(notes)}]")
    if gen.stopped:
        end_as_interrupted(f"the answer was stopped by the interrupt after {counted(gen.new_tokens, 'token')} "
                           "(kept above)")


# %lora_adapters subcommands that put everything back when interrupted (their in-place work undoes on BaseException,
# their files are written whole or not at all)
UNDONE_ON_INTERRUPT = ("load", "merge", "combine", "export")


def end_as_interrupted(what: str) -> None:
    """After a magic kept what an interrupt left it (a saved adapter, the answer so far), end the cell as an
    error: Jupyter then skips the cells queued after it, as an interrupt does anywhere else. Returning normally
    let the next queued training cell start, so one press of the stop button did not stop the notebook."""
    from IPython import get_ipython

    in_jupyter = getattr(get_ipython(), "kernel", None) is not None  # a terminal has no queue of cells to skip
    raise UsageError(f"{what}." + (" The interrupt also skips the cells queued after this one." if in_jupyter else ""))


def prompts_keep_question_marks(lines: list) -> list:
    """IPython input transformer: ``%lora_generate ... How do I reset my password?`` is a prompt.

    IPython reads a line that ends in ``?`` as a help request for its last word (``password``), so the
    natural way to ask a question never reached the magic. Such lines are turned into the call IPython
    would make for any other line magic, before its help syntax is looked for. ``%lora_generate?`` (no
    text) is still help, and a cell magic's body is left as typed."""
    first = next((line for line in lines if line.strip()), "")
    if first.lstrip().startswith("%%"):
        return lines
    out = []
    for line in lines:
        m = _PROMPT_LINE.match(line)
        if m is not None and m.group(3).endswith("?"):
            end = "\n" if line.endswith("\n") else ""
            line = f"{m.group(1)}get_ipython().run_line_magic({m.group(2)!r}, {m.group(3)!r}){end}"
        out.append(line)
    return out


def load_ipython_extension(ipython) -> None:
    magics = FtMagics(ipython)
    ipython.register_magics(magics)
    _loaded[id(ipython)] = magics
    cleanup = getattr(ipython, "input_transformers_cleanup", None)
    if cleanup is not None and prompts_keep_question_marks not in cleanup:
        cleanup.append(prompts_keep_question_marks)


def unload_ipython_extension(ipython) -> None:
    magics = _loaded.pop(id(ipython), None)
    cleanup = getattr(ipython, "input_transformers_cleanup", None)
    if cleanup is not None and prompts_keep_question_marks in cleanup:
        cleanup.remove(prompts_keep_question_marks)
    gauge = sys.modules.get("ft_magics.widgets.memory_gauge")  # %ft_memory's thread ends with the extension
    if gauge is not None:
        gauge.stop_gauge()
    registry = ipython.magics_manager.magics
    for kind, names in MAGIC_NAMES.items():
        for n in names:
            registry[kind].pop(n, None)
    if magics is not None:
        ipython.magics_manager.registry.pop("FtMagics", None)
        session = magics._session
        if session is not None:
            if session.handle is not None:  # what a %reload_ext costs, said: the next %load_ext starts empty
                n = len(session.adapters)
                print(f"ft_magics unloaded: the model {session.handle.name}"
                      + (f" and {counted(n, 'adapter')} in memory were" if n else " in memory was")
                      + " freed (adapter folders stay on disk); load it again with %qlora_load.")
            session.unload()
