"""Fuzzing (hypothesis): magic lines, the YAML body and the dataset loader with generated input.

Every case must end in success or a UsageError / FtUsageError (a message, no traceback): never another
exception and never a hang (a SIGALRM watchdog fails a case that runs longer than WATCHDOG_S). Nothing
trains here: the magics run without a model loaded (so they stop after parsing and validation), and the
data cases run load -> normalise -> tokenise with the tiny tokenizer.

Run with ``-s`` to see how many cases each test tried (the total is several thousand).
"""
from __future__ import annotations

import contextlib
import csv
import json
import shlex
import signal
import string

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from IPython.core.error import UsageError  # noqa: E402

from ft_magics.errors import FtUsageError  # noqa: E402
from ft_magics.magics import HelpShown, strip_comment  # noqa: E402

WATCHDOG_S = 30
COUNTS: dict = {}
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


class Hang(Exception):
    pass


@contextlib.contextmanager
def watchdog(seconds=WATCHDOG_S):
    def fire(signum, frame):
        raise Hang(f"case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _count(name):
    COUNTS[name] = COUNTS.get(name, 0) + 1


OUTCOMES: dict = {}


def expect_clean(fn, *a, what: str = "", **kw):
    """Run one case: success, or a usage error with a non-empty message."""
    import io

    with watchdog(), contextlib.redirect_stdout(io.StringIO()):
        try:
            fn(*a, **kw)
            out = "ok"
        except (UsageError, FtUsageError) as exc:
            assert str(exc).strip(), "a usage error must say what is wrong"
            assert "Traceback" not in str(exc)
            out = "usage"
        except HelpShown:  # --help on a line parsed outside a magic (the magic itself ends quietly)
            out = "ok"
    if what:
        OUTCOMES.setdefault(what, {"ok": 0, "usage": 0})[out] += 1
    return out


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    total = sum(COUNTS.values())
    print(f"\nfuzz cases tried: {total} " + json.dumps(COUNTS) + " outcomes " + json.dumps(OUTCOMES))


# ------------------------------------------------------------------ strategies
words = st.text(alphabet=string.ascii_letters + string.digits + "-_./:~", min_size=0, max_size=12)
nasty = st.text(max_size=20)  # any unicode, control characters included
numbers = st.one_of(st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["nan", "inf", "-inf", "1e309", "0x10", "1_000", "", "-0", "2e-4", "true"]))


def flag_strategy(magic):
    flags = sorted({s for a in magic.parser._actions for s in a.option_strings})
    misspelt = st.sampled_from(flags).map(lambda f: f[:-1] if len(f) > 3 else f + "x")
    return st.one_of(st.sampled_from(flags), misspelt, st.sampled_from(["-h", "--help", "--", "-", "---x", "--=1"]))


def line_strategy(magic):
    token = st.one_of(flag_strategy(magic), words, numbers, nasty,
                      st.builds(lambda f, v: f"{f}={v}", flag_strategy(magic), st.one_of(words, numbers)),
                      st.sampled_from(['"', "'", '"a b"', "'unterminated", "\\", "$x", "{x}", "demo:support",
                                       "../..", "/", "~", "base", ".hidden"]))
    return st.lists(token, max_size=8).map(" ".join)


# ------------------------------------------------------------------ magics
@pytest.fixture(scope="module")
def fuzz_shell(tmp_path_factory):
    """One shell for all cases: no model is loaded, so every magic stops after parsing and validation."""
    import os

    from IPython.core.interactiveshell import InteractiveShell

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("fuzz-shell"))
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "ft_magics")
    yield sh
    sh.run_line_magic("unload_ext", "ft_magics")
    os.chdir(cwd)


def _magic(sh, name):
    return sh.magics_manager.registry["FtMagics"].__class__.__dict__[name]


def test_fuzz_lora_train_line_and_body(fuzz_shell):
    from ft_magics.magics import FtMagics

    bodies = st.one_of(st.just("r: 4\n"), st.text(max_size=60))

    @settings(FUZZ, max_examples=1500)
    @given(line=line_strategy(FtMagics.lora_train), body=bodies)
    def run(line, body):
        _count("lora_train line+body")
        r = expect_clean(fuzz_shell.run_cell_magic, "lora_train", line, body)
        try:
            words = shlex.split(strip_comment(line))
        except ValueError:  # unbalanced quotes: refused before anything else
            words = []
        help_line = (words[:1] == ["-h"] or "--help" in words) and body != ""  # (IPython refuses a cell magic
        # with an empty body itself)
        assert r == ("ok" if help_line else "usage")  # no model is loaded, so no case can start training (--help
        # prints the usage and ends)

    run()
    assert COUNTS["lora_train line+body"] >= 1500


def test_fuzz_other_magic_lines(fuzz_shell):
    from ft_magics.magics import FtMagics, parse_args

    sub = st.sampled_from(["list", "use", "load", "lst", "", "delete"])

    @settings(FUZZ, max_examples=400)
    @given(line=line_strategy(FtMagics.qlora_load), gen_line=line_strategy(FtMagics.lora_generate),
           body=st.one_of(st.none(), st.text(max_size=40)), sub=sub, rest=st.lists(st.one_of(words, nasty), max_size=3))
    def run(line, gen_line, body, sub, rest):
        _count("qlora_load / lora_generate / lora_adapters lines")
        # %qlora_load would load a model: fuzz its parser only (the same call the magic makes first)
        expect_clean(parse_args, FtMagics.qlora_load, line)
        if body is None:
            expect_clean(fuzz_shell.run_line_magic, "lora_generate", gen_line)
        else:
            expect_clean(fuzz_shell.run_cell_magic, "lora_generate", gen_line, body)
        import shlex

        expect_clean(fuzz_shell.run_line_magic, "lora_adapters", " ".join([sub] + [shlex.quote(w) for w in rest]))

    run()
    assert COUNTS["qlora_load / lora_generate / lora_adapters lines"] >= 400


# ------------------------------------------------------------------ the YAML body
def _config_keys():
    from ft_magics.config import ALIASES, TrainConfig

    return TrainConfig.keys() + list(ALIASES)


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=15),
                         st.sampled_from(["all-linear", "qv", "cosine", "answers", "chat", "2e-4", "1e309", "yes"]))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                   st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)


def test_fuzz_yaml_body():
    import yaml

    from ft_magics.config import TrainConfig, parse_yaml_body

    keys = st.one_of(st.sampled_from(_config_keys()), st.text(max_size=12), st.integers(), st.none())
    structured = st.dictionaries(keys, yaml_values, max_size=6).map(
        lambda d: yaml.safe_dump(d, allow_unicode=True, default_flow_style=False))
    plausible_values = st.one_of(st.integers(1, 64), st.floats(1e-5, 0.5), st.booleans(),
                                 st.sampled_from(["all-linear", "qv", "cosine", "linear", "answers", "all", "auto",
                                                  "chat", "truncate", "drop", "[q_proj, v_proj]"]))
    plausible = st.dictionaries(st.sampled_from(_config_keys()), plausible_values, max_size=5).map(
        lambda d: yaml.safe_dump(d, default_flow_style=False))
    text = st.one_of(plausible, plausible, structured, st.text(max_size=80),
                     st.lists(st.sampled_from(["r: 8", "alpha: x", "- a", "key", ": :", "\t", "{", "[1, 2",
                                               "&a [*a]", "!!python/object:os.system ls", "lr: .inf", "%YAML 1.2",
                                               "---", "r: !!binary aGk=", "save_every: -3", "a: &x 1\nb: *x",
                                               "[a, b]: 1", "? {a: 1}\n: 2", "data: [a, b]", "eval:"]),
                              max_size=6).map("\n".join))

    @settings(FUZZ, max_examples=1500)
    @given(body=text)
    def run(body):
        _count("yaml body")
        expect_clean(lambda: TrainConfig.from_dict(parse_yaml_body(body)), what="yaml")

    run()
    assert COUNTS["yaml body"] >= 1500
    assert OUTCOMES["yaml"]["ok"] >= 10 and OUTCOMES["yaml"]["usage"] >= 100  # both paths were exercised


# ------------------------------------------------------------------ the dataset loader
@pytest.fixture(scope="module")
def tiny_tokenizer():
    from conftest import build_tiny_tokenizer

    return build_tiny_tokenizer()


texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "hello", "\x00", "<|im_end|>", "\n\n", "😀" * 5]))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(texts, inner, max_size=3)), max_leaves=8)
roles = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "bot", "narrator", "", None])
message = st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, json_values)})
sharegpt_turn = st.fixed_dictionaries({"from": roles, "value": texts})
good_rows = st.one_of(
    st.fixed_dictionaries({"prompt": texts, "completion": texts}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}),
    st.fixed_dictionaries({"instruction": texts, "input": texts, "output": texts}),
    st.fixed_dictionaries({"conversations": st.lists(sharegpt_turn, max_size=4)}),
    st.fixed_dictionaries({"text": texts}),
    st.fixed_dictionaries({"question": texts, "answer": texts}),
)
rows_strategy = st.one_of(st.lists(st.one_of(good_rows, good_rows, json_values), max_size=6),
                          st.lists(st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=30),
                                                          "completion": st.text(min_size=1, max_size=30)}),
                                   min_size=1, max_size=6))


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        keys = sorted({k for r in rows if isinstance(r, dict) for k in r}) or ["text"]
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(keys)
            for r in rows:
                w.writerow([json.dumps(r.get(k)) if isinstance(r, dict) and not isinstance(r.get(k), str)
                            else (r.get(k) if isinstance(r, dict) else "") for k in keys])
    elif kind == "txt":
        path.write_text("\n\n".join(str(r) for r in rows))
    elif kind == "garbage":
        path.write_bytes(bytes(hash(str(rows)) % 256 for _ in range(64)) + b"\xff\xfe{[")
    return path


def test_fuzz_dataset_loader(tiny_tokenizer, tmp_path_factory):
    from ft_magics.config import TrainConfig
    from ft_magics.core.data import prepare

    folder = tmp_path_factory.mktemp("fuzz-data")
    cfg_st = st.fixed_dictionaries({
        "format": st.sampled_from(["auto", "chat", "prompt-completion", "alpaca", "sharegpt", "text"]),
        "max_seq_len": st.integers(16, 96),
        "overlong": st.sampled_from(["truncate", "drop"]),
        "train_on": st.sampled_from(["answers", "all"]),
        "eval_fraction": st.sampled_from([0.0, 0.0, 0.25, 0.5]),
        "map": st.sampled_from([None, None, "question=prompt,answer=completion", "a=b", "=", "x"]),
        "text_field": st.sampled_from([None, None, "text", "body"]),
    })
    kinds = st.sampled_from(["object", "variable", "jsonl", "json", "csv", "txt", "garbage", "dataframe"])

    @settings(FUZZ, max_examples=800)
    @given(rows=rows_strategy, kind=kinds, cfgd=cfg_st, n=st.integers(0, 10**6))
    def run(rows, kind, cfgd, n):
        _count("dataset loader")
        with watchdog():
            try:
                cfg = TrainConfig.from_dict(cfgd)
            except FtUsageError:
                return
        namespace = {}
        if kind == "object":
            src = rows
        elif kind == "variable":
            namespace["my_rows"] = rows
            src = "my_rows"
        elif kind == "dataframe":
            import pandas as pd

            try:
                src = pd.DataFrame([r for r in rows if isinstance(r, dict)])
            except Exception:  # noqa: BLE001 - pandas refusing odd input is not what is tested here
                return
        else:
            src = str(_write(folder / f"d{n}.{'bin' if kind == 'garbage' else kind}", rows, kind))
        expect_clean(prepare, src, tiny_tokenizer, cfg, namespace=namespace, what="data")

    run()
    assert COUNTS["dataset loader"] >= 800
    assert OUTCOMES["data"]["ok"] >= 10 and OUTCOMES["data"]["usage"] >= 100  # both paths were exercised


# ------------------------------------------------------------------ adapter names
def test_fuzz_adapter_names_never_leave_the_adapters_folder(tmp_path):
    from ft_magics.core.adapters import validate_name

    root = (tmp_path / "adapters").resolve()
    parts = st.one_of(words, st.sampled_from(["..", ".", "/", "\\", "~", "", "base", "\x00", "a b", "\u2215"]))

    @settings(FUZZ, max_examples=1000)
    @given(name=st.one_of(st.text(max_size=70), st.lists(parts, max_size=4).map("".join)))
    def run(name):
        _count("adapter names")
        with watchdog():
            try:
                ok = validate_name(name)
            except FtUsageError as exc:
                assert str(exc).strip()
                return
        assert ok and "/" not in ok and "\\" not in ok and ".." not in ok and not ok.startswith(".")
        assert (root / ok).resolve().parent == root

    run()
    assert COUNTS["adapter names"] >= 1000
