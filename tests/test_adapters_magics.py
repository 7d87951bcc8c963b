"""Issue 5 through a real IPython shell: %lora_adapters subcommands, %%lora_compare, %lora_eval."""
from __future__ import annotations

import json
import re

import pytest
from IPython.core.error import UsageError

from test_adapters_ops import peft_adapter


@pytest.fixture
def loaded(shell, tiny_model_dir, tmp_path):
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    a = peft_adapter(tiny_model_dir, tmp_path / "adapters" / "alpha", seed=5)
    b = peft_adapter(tiny_model_dir, tmp_path / "outside" / "beta", seed=6)
    return shell, a, b


def magics(shell):
    from ft_magics.magics import _loaded

    return _loaded[id(shell)]


def test_adapter_subcommands_end_to_end(loaded, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    sh, a, b = loaded
    sess = magics(sh).session
    sh.run_line_magic("lora_adapters", f"load {a}")
    sh.run_line_magic("lora_adapters", f"load {b} --name beta")
    sh.run_line_magic("lora_adapters", "use alpha")
    sh.run_line_magic("lora_adapters", "merge alpha")
    sh.run_line_magic("lora_adapters", "list")
    out = capsys.readouterr().out
    assert "merged 'alpha' into the base weights" in out and "alpha" in out and "[merged]" in out
    with pytest.raises(UsageError, match="unmerge first"):
        sh.run_line_magic("lora_adapters", "use beta")
    with pytest.raises(UsageError, match="cannot rename an adapter while adapter 'alpha' is merged"):
        sh.run_line_magic("lora_adapters", "rename alpha first")
    sh.run_line_magic("lora_adapters", "unmerge")
    capsys.readouterr()
    sh.run_line_magic("lora_adapters", "combine alpha:0.6,beta --name mix --method svd")
    said = capsys.readouterr().out
    assert "combined alpha x 0.6, beta x 1 (svd) into adapter 'mix'" in said  # the weights used
    told = re.search(r"combining by SVD: one decomposition of each adapted layer's update \((\d+) layers\)", said)
    assert told and int(told.group(1)) > 0 and said.index(told.group(0)) < said.index("combined alpha")
    assert sess.adapters.active == "mix" and (tmp_path / "adapters" / "mix" / "adapter_config.json").exists()
    sh.run_line_magic("lora_adapters", "export mix exported --merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "exported") is not None
    sh.run_line_magic("lora_adapters", "export beta beta-peft")
    assert (tmp_path / "beta-peft" / "adapter_model.safetensors").exists()
    sh.run_line_magic("lora_adapters", "rename mix blend")
    assert f"renamed adapter 'mix' to 'blend'; its folder is now {(tmp_path / 'adapters' / 'blend').resolve()}" in capsys.readouterr().out
    assert sess.adapters.active == "blend" and not (tmp_path / "adapters" / "mix").exists()
    sh.run_line_magic("lora_adapters", "unload beta")
    assert "beta" not in sess.adapters and b.exists()
    sh.run_line_magic("lora_adapters", "delete alpha")  # no confirmation in text mode
    assert not a.exists()
    out = capsys.readouterr().out
    assert "unloaded adapter 'beta'" in out and "deleted adapter 'alpha' and its folder" in out
    assert "The base model is active now" not in out  # alpha was not the active one
    sh.run_line_magic("lora_adapters", "delete blend")  # the active one: the base answers from now on, said
    assert capsys.readouterr().out.rstrip().endswith("The base model is active now (it was 'blend').")
    assert sess.adapters.active is None


def test_an_export_does_not_silently_replace_another_adapter_s_export(loaded, capsys, tmp_path):
    """Exporting into a folder that held another adapter's export replaced it without a word, and exporting into
    the folder a loaded adapter came from left that adapter's name on another adapter's files ('info ps' showed
    the other card; a reload would load the other weights). A merged export loaded as an adapter was told only
    'no adapter_config.json', and its model card did not say what was merged into it."""
    sh, a, b = loaded
    sess = magics(sh).session
    sh.run_line_magic("lora_adapters", f"load {a}")
    sh.run_line_magic("lora_adapters", f"load {b} --name beta")
    sh.run_line_magic("lora_adapters", "export alpha out/shared")
    sh.run_line_magic("lora_adapters", "export alpha out/shared")  # its own earlier export: replaced, as before
    with pytest.raises(UsageError, match=r"out/shared holds the export of another adapter \('alpha'\); exporting "
                                         r"'beta' there replaces it\. Choose another folder, or add --overwrite"):
        sh.run_line_magic("lora_adapters", "export beta out/shared")
    assert json.loads((tmp_path / "out" / "shared" / "ft_run.json").read_text())["name"] == "alpha"
    sh.run_line_magic("lora_adapters", "export beta out/shared --overwrite")
    assert json.loads((tmp_path / "out" / "shared" / "ft_run.json").read_text())["name"] == "beta"
    sh.run_line_magic("lora_adapters", "load out/shared --name ps")
    with pytest.raises(UsageError, match=r"is where adapter 'ps' was loaded from in this session.*%lora_adapters "
                                         r"unload ps"):
        sh.run_line_magic("lora_adapters", "export alpha out/shared --overwrite")
    assert json.loads((tmp_path / "out" / "shared" / "ft_run.json").read_text())["name"] == "beta"

    sh.run_line_magic("lora_adapters", "export alpha merged-alpha --merged")
    with pytest.raises(UsageError, match=r"it is a standalone model with adapter 'alpha' merged in \(export "
                                         r"--merged\), which loads as the base model: %qlora_load .*merged-alpha"):
        sh.run_line_magic("lora_adapters", "load merged-alpha --name m")
    capsys.readouterr()
    sh.run_line_magic("qlora_load", f"{tmp_path / 'merged-alpha'} --bits 32")
    assert "Merged     adapter 'alpha'" in capsys.readouterr().out
    assert sess.handle is not None


def test_an_interrupted_merged_export_ends_in_one_line_and_leaves_nothing(loaded, tmp_path, monkeypatch):
    """The stop button during `export NAME DIR --merged` printed a raw KeyboardInterrupt traceback from inside
    PEFT's merge_and_unload."""
    sh, a, _ = loaded
    sess = magics(sh).session
    sh.run_line_magic("lora_adapters", f"load {a}")
    before = sess.generate("hello", adapter="alpha", max_new_tokens=5).text

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", stopped)
    with pytest.raises(UsageError, match=r"^%lora_adapters export interrupted: undone, so the model and the adapters "
                                         r"are as they were and nothing was written\.$"):
        sh.run_line_magic("lora_adapters", "export alpha out/merged --merged")
    assert not (tmp_path / "out" / "merged").exists()
    assert sess.generate("hello", adapter="alpha", max_new_tokens=5).text == before


def test_a_merge_into_16_bit_weights_says_greedy_answers_can_part(shell, tiny_model_dir, tmp_path, capsys):
    """A tester saw a merged adapter answer differently from the unmerged one on a 16-bit base (the sum W + BA is
    rounded to 16 bits; the unmerged update is added at full precision) with nothing saying it could."""
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 16")
    a = peft_adapter(tiny_model_dir, tmp_path / "adapters" / "alpha", seed=5)
    shell.run_line_magic("lora_adapters", f"load {a}")
    capsys.readouterr()
    shell.run_line_magic("lora_adapters", "merge alpha")
    dtype = str(magics(shell).session.handle.dtype).replace("torch.", "")
    assert dtype in ("bfloat16", "float16")
    assert (f"The merged weights are {dtype}: the sum is rounded, so greedy answers can part from the unmerged "
            "adapter's") in capsys.readouterr().out


def test_adapter_subcommand_mistakes_are_usage_errors(loaded):
    sh, a, _ = loaded
    with pytest.raises(UsageError, match="did you mean 'merge'"):
        sh.run_line_magic("lora_adapters", "merg alpha")
    with pytest.raises(UsageError, match="usage: %lora_adapters combine"):
        sh.run_line_magic("lora_adapters", "combine alpha:1")
    with pytest.raises(UsageError, match="did you mean 'ties'"):
        sh.run_line_magic("lora_adapters", "combine alpha:1 --name x --method tie")
    with pytest.raises(UsageError, match=r"every weight in 'alpha:0,beta:0' is 0, so the combined adapter would do "
                                         r"nothing"):  # it made an adapter that changed nothing, without a word
        sh.run_line_magic("lora_adapters", "combine alpha:0,beta:0 --name x")
    with pytest.raises(UsageError, match="usage: %lora_adapters export"):
        sh.run_line_magic("lora_adapters", "export alpha")
    with pytest.raises(UsageError, match="rename needs the name and the new name; usage: %lora_adapters rename NAME NEW"):
        sh.run_line_magic("lora_adapters", "rename alpha")
    with pytest.raises(UsageError, match="did you mean 'rename'"):
        sh.run_line_magic("lora_adapters", "renam alpha x")
    with pytest.raises(UsageError, match="unknown subcommand 'remove' \\(did you mean 'delete'\\?\\)"):
        sh.run_line_magic("lora_adapters", "remove alpha")  # the closest spelling is 'rename'
    with pytest.raises(UsageError, match="no adapter named 'alpah'"):
        sh.run_line_magic("lora_adapters", "unload alpah")
    with pytest.raises(UsageError, match="no adapter is merged"):
        sh.run_line_magic("lora_adapters", "unmerge")


def test_compare_and_eval_magics_print_text_outside_a_notebook(loaded, capsys, monkeypatch):
    from ft_magics.core import evaluation

    sh, a, _ = loaded
    real = evaluation.EvalProgress.__init__  # "quick" made independent of how busy the machine is
    monkeypatch.setattr(evaluation.EvalProgress, "__init__",
                        lambda self, total, write: real(self, total, write, after_s=3600.0))
    sh.run_line_magic("lora_adapters", f"load {a}")
    sh.run_cell_magic("lora_compare", "--adapters alpha --max-new-tokens 4", "hello world\n---\nthanks!\n")
    out = capsys.readouterr().out
    assert "Prompt 1: hello world" in out and "Prompt 2: thanks!" in out
    assert "[base]" in out and "[alpha]" in out and "tokens/s: base" in out
    assert "separate several prompts" not in out
    sh.run_cell_magic("lora_compare", "--adapters alpha --max-new-tokens 2", "hello world\nthanks!\n")
    out = capsys.readouterr().out  # one prompt of two lines, and a word on how to give two
    assert "Prompt 1: hello world\nthanks!" in out and "Prompt 2" not in out
    assert "one prompt of 2 lines; separate several prompts with a line of ---" in out
    with pytest.raises(UsageError, match="no prompt"):
        sh.run_cell_magic("lora_compare", "", "---\n")
    sh.run_line_magic("lora_eval", "alpha --data demo:support-eval --max-seq-len 96")
    out = capsys.readouterr().out
    assert "demo:support-eval" in out and "general text" in out and "forgetting check" in out
    assert out.count("ppl") >= 4
    assert "evaluating:" not in out  # an evaluation quicker than after_s prints no progress
    with pytest.raises(UsageError, match="did you mean"):
        sh.run_line_magic("lora_eval", "alpha --dta demo:support-eval")


def test_compare_shows_an_html_table_in_a_notebook(loaded, monkeypatch):
    import IPython.display

    sh, a, _ = loaded
    sh.run_line_magic("lora_adapters", f"load {a}")
    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    monkeypatch.setattr(sh, "kernel", object(), raising=False)  # what a Jupyter kernel's shell has
    sh.run_cell_magic("lora_compare", "--max-new-tokens 3", "hello world\n---\nthanks!")
    html = shown[0].data
    assert html.startswith("<table") and "<th style='text-align:left'>alpha<br>" in html and html.count("<tr>") == 3


def test_a_copied_or_damaged_adapter_folder_is_listed_for_what_it_is(shell, tiny_model_dir, tmp_path, capsys):
    """A file manager's copy ('alpha copy') was missing from the list and could not be loaded by its folder's
    name; with no model loaded, damaged folders were listed as ones that load."""
    import shutil

    a = peft_adapter(tiny_model_dir, tmp_path / "adapters" / "alpha", seed=5)
    shutil.copytree(a, tmp_path / "adapters" / "alpha copy")
    shutil.copytree(a, tmp_path / "adapters" / "broken")
    (tmp_path / "adapters" / "broken" / "adapter_config.json").write_text("{not json")
    capsys.readouterr()
    shell.run_line_magic("lora_adapters", "list")  # no model loaded
    out = capsys.readouterr().out
    assert "on disk in adapters: alpha (no model is loaded: %qlora_load one, then use them by name)\n" in out
    assert "unreadable: broken:" in out and "active:" not in out  # (it said "active: base" with no model)
    assert ("under a folder name that is no adapter name: 'alpha copy'; rename the folder (e.g. to alpha-copy), or "
            "load it with %lora_adapters load \"adapters/alpha copy\" --name alpha-copy.") in out
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match=r"request 1 \('alpha copy: hi'\) names the folder 'alpha copy', but an adapter "
                                         r"name has no spaces: load it with %lora_adapters load .*--name alpha-copy"):
        shell.run_cell_magic("lora_serve", "", "alpha copy: hi")
    with pytest.raises(UsageError, match=r"request 1 \('what is: this'\) names no adapter"):  # no such folder: prose
        shell.run_cell_magic("lora_serve", "", "what is: this")
    shell.run_line_magic("lora_adapters", "load 'adapters/alpha copy'")
    assert "alpha-copy" in magics(shell).session.adapters
    with pytest.raises(UsageError, match=r"broken/adapter_config.json is corrupt .*the adapter cannot be loaded"):
        shell.run_line_magic("lora_adapters", "use broken")


def test_tilde_of_an_unknown_user_is_a_usage_error_not_a_crash(shell):
    """Found by tests/test_fuzz.py: pathlib raises RuntimeError for '~0' (no user named 0)."""
    from IPython.core.error import UsageError

    from ft_magics.errors import FtUsageError
    from ft_magics.paths import user_path

    with pytest.raises(FtUsageError, match=r"'~0/x': no user '0' to expand '~' for; write the full path"):
        user_path("~0/x")
    assert str(user_path("~/a")).endswith("/a") and not str(user_path("~/a")).startswith("~")
    shell.run_line_magic("load_ext", "ft_magics")
    with pytest.raises(UsageError, match="no user '0'"):
        shell.run_line_magic("lora_adapters", "load ~0")


def test_on_disk_adapter_after_a_restart_can_be_deleted_and_unload_says_it_is_not_loaded(loaded, capsys):
    sh, a, _ = loaded  # alpha sits in adapters/ and this session has not loaded it
    with pytest.raises(UsageError, match=r"'alpha' is not loaded \(its folder .* is on disk\)"):
        sh.run_line_magic("lora_adapters", "unload alpha")
    assert a.exists()
    sh.run_line_magic("lora_adapters", "delete alpha")
    assert not a.exists() and "deleted adapter 'alpha'" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no adapter named 'alpha'"):
        sh.run_line_magic("lora_adapters", "delete alpha")
    for op in ("delete base", "unload base", "info base"):  # was "no adapter named 'base' (did you mean 'base'?)"
        with pytest.raises(UsageError, match="'base' is the base model itself, not an adapter") as err:
            sh.run_line_magic("lora_adapters", op)
        assert "did you mean" not in str(err.value)


def test_a_trailing_comment_on_a_magic_line_is_not_an_argument(loaded, capsys):
    """The README's own cells carried comments ('%qlora_load   # the demo model ...'): IPython hands the whole
    line to the magic, and they failed with "unexpected argument 'the'" or a bare usage line."""
    from ft_magics.magics import strip_comment

    assert strip_comment("demo --bits 4   # the demo model") == "demo --bits 4"
    assert strip_comment('--system "be # terse" x') == '--system "be # terse" x'  # quoted: kept
    assert strip_comment("a#b") == "a#b" and strip_comment("# only") == ""
    sh, _, _ = loaded
    capsys.readouterr()
    sh.run_line_magic("lora_adapters", "list   # * marks the active one")
    assert "alpha" in capsys.readouterr().out
    sh.run_line_magic("ft_plan", "7B --seq-len 256  # a 7B model")
    assert "seq_len 256" in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"unexpected extra; usage: %lora_adapters list"):  # not a bare usage line
        sh.run_line_magic("lora_adapters", "list extra")


def test_eval_batch_size_below_one_is_a_usage_error(loaded):
    sh, _, _ = loaded
    with pytest.raises(UsageError, match=r"--batch-size must be at least 1 \(got 0\)"):
        sh.run_line_magic("lora_eval", "alpha --data demo:support-eval --batch-size 0 --no-general")


def test_chat_remembers_the_conversation_across_turns_and_adapters(loaded, capsys, monkeypatch):
    from ft_magics.core import inference

    sh, _, _ = loaded
    seen = []
    real = inference.build_prompt
    monkeypatch.setattr(inference, "build_prompt", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    sh.run_line_magic("lora_chat", "")  # nothing said yet: a line, not an error that stops Run All
    assert capsys.readouterr().out.startswith("no conversation yet: write a message, e.g. %lora_chat Hello!")
    sh.run_line_magic("lora_chat", "--max-new-tokens 3 My name is Ada?")  # a final ? is part of the message
    first_answer = magics(sh).session.conversation.turns[1].content
    sh.run_cell_magic("lora_chat", "--adapter alpha --max-new-tokens 3", "What is my name?\n")
    conv = magics(sh).session.conversation
    assert [t.role for t in conv.turns] == ["user", "assistant"] * 2
    assert [t.adapter for t in conv.turns[1::2]] == ["base", "alpha"]
    # the second turn's prompt carries the first exchange before the new question
    assert "My name is Ada?" in seen[-1] and first_answer in seen[-1] and seen[-1].index("Ada") < seen[-1].index("What is")
    out = capsys.readouterr().out
    assert "[base · 3 tokens" in out and "turn 1]" in out and "[alpha · 3 tokens" in out and "turn 2]" in out
    sh.run_line_magic("lora_chat", "")
    out = capsys.readouterr().out
    assert "you: My name is Ada?" in out and "alpha: " in out and "[2 exchanges;" in out
    sh.run_line_magic("lora_chat", "--new --system 'Be brief.'")
    sh.run_line_magic("lora_chat", "--max-new-tokens 2 Hi")
    assert "My name" not in seen[-1] and "Be brief." in seen[-1]
    assert magics(sh).session.conversation.exchanges == 1
    assert sh.transform_cell("%lora_chat Why?").strip() == "get_ipython().run_line_magic('lora_chat', 'Why?')"


def test_a_refused_chat_turn_leaves_the_conversation_as_it_was(loaded, capsys):
    """A turn refused for an unknown adapter (or as too long) had already set its --system, and --new had
    already forgotten the conversation; --system alone printed the transcript and did nothing."""
    sh, _, _ = loaded
    sess = magics(sh).session
    sh.run_line_magic("lora_chat", "--max-new-tokens 2 first turn")
    before = (sess.conversation.system, [(t.role, t.content) for t in sess.conversation.turns])
    for flags in ("--system SYS-X --adapter nope", "--new --adapter nope", "--new --system SYS-Z --adapter nope"):
        with pytest.raises(UsageError, match="no adapter named 'nope'"):
            sh.run_line_magic("lora_chat", f"{flags} hi")
        assert (sess.conversation.system, [(t.role, t.content) for t in sess.conversation.turns]) == before, flags
    sh.run_line_magic("lora_chat", "--system 'Be terse.'")
    assert "system prompt from the next turn on: Be terse." in capsys.readouterr().out
    assert sess.conversation.system == "Be terse." and sess.conversation.exchanges == 1
    sh.run_line_magic("lora_chat", "--new --max-new-tokens 2 again")
    assert sess.conversation.exchanges == 1 and sess.conversation.system is None  # --new with a turn: begun afresh


def test_chat_leaves_out_the_oldest_turns_that_outgrow_the_context(loaded, capsys):
    sh, _, _ = loaded
    sess = magics(sh).session
    limit = sess.model.config.max_position_embeddings
    words = " ".join(["hello"] * (limit // 3))
    sh.user_ns["words"] = words
    for _ in range(3):
        sh.run_line_magic("lora_chat", "--max-new-tokens 2 {words}")
    out = capsys.readouterr().out
    assert "oldest exchange" in out and "left out to fit the context" in out
    assert sess.conversation.exchanges == 3  # kept in the transcript, only left out of the prompt


def test_a_prompt_past_the_context_is_refused_and_a_long_answer_is_cut_to_fit(loaded, capsys):
    sh, _, _ = loaded
    limit = magics(sh).session.model.config.max_position_embeddings
    sh.user_ns["words"] = " ".join(["hello"] * (limit + 10))
    with pytest.raises(UsageError, match=rf"reads at most {limit:,} \(max_position_embeddings\): shorten it"):
        sh.run_line_magic("lora_generate", "--max-new-tokens 2 {words}")
    sh.user_ns["words"] = " ".join(["hello"] * (limit - 40))
    sh.run_line_magic("lora_generate", "--max-new-tokens 500 {words}")
    assert "answer limit lowered to" in capsys.readouterr().out


def test_an_answer_cut_inside_a_multibyte_character_drops_the_partial_character():
    from ft_magics.core.inference import _decoded

    class Tok:  # byte-level BPE: the first two of an emoji's four bytes decode to U+FFFD
        def decode(self, ids, skip_special_tokens=True):
            return {(1,): "Hi \ufffd", (2,): "Hi 🌱", (3,): "  \ufffd", (4,): "a\ufffd\ufffd"}[tuple(ids)]

    assert _decoded(Tok(), [1]) == "Hi" and _decoded(Tok(), [2]) == "Hi 🌱" and _decoded(Tok(), [3]) == ""
    assert _decoded(Tok(), [4]) == "a\ufffd"  # only the last, partial character goes


def test_compare_has_a_line_form_that_keeps_the_question_mark(loaded, capsys):
    sh, a, _ = loaded
    sh.run_line_magic("lora_adapters", f"load {a}")
    sh.run_cell("%lora_compare --adapters alpha --max-new-tokens 2 How do I reset my password?")
    out = capsys.readouterr().out
    assert "Prompt 1: How do I reset my password?" in out and "[base]" in out and "[alpha]" in out
    assert "Prompt 2" not in out and "the text sent holds" not in out
    # options typed after the first word were sent as the prompt without a word
    sh.run_cell("%lora_compare alpha --data pairs.jsonl")
    out = capsys.readouterr().out
    assert "(the text sent holds '--data': %lora_compare has no --data flag; flags go before the text" in out
    sh.run_cell("%lora_compare alpha --max-new-tokens 2 --prompt hi")
    assert ("(the text sent holds '--max-new-tokens': --max-new-tokens is a flag of %lora_compare, but a flag after "
            "the text counts only where everything after it is this magic's flags") in capsys.readouterr().out


def test_combine_takes_name_equals_weight_and_refuses_a_name_given_twice(loaded, tmp_path):
    sh, a, b = loaded
    sess = magics(sh).session
    sh.run_line_magic("lora_adapters", f"load {a}")
    sh.run_line_magic("lora_adapters", f"load {b} --name beta")
    with pytest.raises(UsageError, match="adapter 'alpha' is named twice"):
        sh.run_line_magic("lora_adapters", "combine alpha=0.5,alpha=0.5 --name twice")
    assert "twice" not in sess.adapters and not (tmp_path / "adapters" / "twice").exists()
    sh.run_line_magic("lora_adapters", "combine alpha=0.6,beta=0.4 --name mix")
    record = json.loads((tmp_path / "adapters" / "mix" / "ft_run.json").read_text())
    assert record["combined_from"] == {"alpha": 0.6, "beta": 0.4}


def test_eval_alone_uses_the_active_adapter_and_the_rows_its_run_held_out(shell, tiny_model_dir, capsys):
    from test_foundation import ROWS

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.user_ns["rows"] = ROWS
    shell.run_cell_magic("lora_train", "held --data rows --no-widgets",
                         "max_steps: 2\nbatch_size: 4\neval_fraction: 0.25\nmax_seq_len: 64\n")
    run_eval = magics(shell).session.runs[-1].eval_loss
    capsys.readouterr()
    shell.run_line_magic("lora_eval", "--no-general")
    out = capsys.readouterr().out
    assert "held out in training (eval_fraction 0.25, seed 42)" in out and "held" in out.splitlines()[0]
    assert "only the forgetting check" not in out
    # the same examples as the run's own evaluation: the same loss
    row = next(line for line in out.splitlines() if line.startswith("held out in training"))
    assert run_eval is not None and f"loss {run_eval:.4f}" in row
    # without held-out rows and without --data, --no-general leaves nothing to evaluate: said so
    shell.run_cell_magic("lora_train", "noeval --data rows --no-widgets", "max_steps: 1\nbatch_size: 4\n")
    capsys.readouterr()
    shell.run_line_magic("lora_eval", "--max-seq-len 64")
    out = capsys.readouterr().out
    assert "general text" in out and "noeval" in out.splitlines()[0]
    assert "only the forgetting check: no held-out examples are known for 'noeval'" in out
    with pytest.raises(UsageError, match="--data is required"):
        shell.run_line_magic("lora_eval", "--no-general")
    # after a restart (the kernel no longer holds the rows the run read): the reason is the variable, not "unknown"
    magics(shell).session.heldout.clear()
    capsys.readouterr()
    shell.run_line_magic("lora_eval", "held --max-seq-len 64")
    said = (r"\(only the forgetting check: its run held out \d+ rows of variable rows, which this kernel cannot read "
            r"again as the run read it \(a notebook variable\)")
    assert re.search(said, capsys.readouterr().out)
    with pytest.raises(UsageError, match=r"--data is required: its run held out \d+ rows of variable rows.*--data FILE"):
        shell.run_line_magic("lora_eval", "held --no-general")


def test_eval_after_a_restart_rebuilds_the_held_out_split_from_the_run_s_record(shell, tiny_model_dir, tmp_path,
                                                                                capsys):
    from test_foundation import ROWS

    data = tmp_path / "mine" / "rows.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.run_cell_magic("lora_train", "held --data mine/rows.jsonl --no-widgets",
                         "max_steps: 2\nbatch_size: 4\neval_fraction: 0.25\nmax_seq_len: 64\nseed: 7\n")
    run_eval = magics(shell).session.runs[-1].eval_loss
    record = json.loads((tmp_path / "adapters" / "held" / "ft_run.json").read_text())
    assert record["data"]["spec"] == {"data": str(data), "eval": None}  # absolute: a %cd does not lose it
    shell.user_ns["rows"] = ROWS
    shell.run_cell_magic("lora_train", "fromvar --data rows --no-widgets", "max_steps: 1\nbatch_size: 4\neval_fraction: 0.25\n")
    assert "spec" not in json.loads((tmp_path / "adapters" / "fromvar" / "ft_run.json").read_text())["data"]
    # a new kernel: nothing of the runs is in memory, only their records on disk
    shell.run_line_magic("ft_unload", "")
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    capsys.readouterr()
    shell.run_line_magic("lora_eval", "held --no-general --max-seq-len 64")
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("held out in training"))
    assert "eval_fraction 0.25, seed 7" in row and run_eval is not None and f"loss {run_eval:.4f}" in row
    # a variable is gone with its kernel: --data is asked for, as before
    with pytest.raises(UsageError, match="--data is required"):
        shell.run_line_magic("lora_eval", "fromvar --no-general")
    # other rows in the file now: the split could hold trained rows, so it is refused, not silently rebuilt
    data.write_text("".join(json.dumps(r) + "\n" for r in reversed(ROWS)))
    with pytest.raises(UsageError, match=r"'held''s held-out examples cannot be rebuilt: .*rows.jsonl changed since"):
        shell.run_line_magic("lora_eval", "held --no-general")
    data.unlink()
    with pytest.raises(UsageError, match=r"read its data from .*rows.jsonl, which is gone.*--data FILE"):
        shell.run_line_magic("lora_eval", "held --no-general")


def test_adapter_info_tells_how_it_was_trained_loaded_or_only_on_disk(shell, tiny_model_dir, tmp_path, capsys):
    from test_foundation import ROWS

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.user_ns["rows"] = ROWS
    shell.run_cell_magic("lora_train", "told --data rows --no-widgets", "max_steps: 2\nbatch_size: 4\nr: 4\n")
    run = magics(shell).session.runs[-1]
    capsys.readouterr()
    shell.run_line_magic("lora_adapters", "info told")
    card = capsys.readouterr().out
    assert card.startswith("Adapter    told  (loaded, active)")
    assert "LoRA       r=4 alpha=32" in card and "Base       tiny-llama, 32-bit" in card
    # all-linear, which PEFT writes as every layer's full path: the kinds of layer, once each
    assert "on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\n" in card and "layers.0" not in card
    assert "Trained    2 steps in" in card and "completed" in card
    assert f"-> {run.final_loss:.4f}" in card and f"{run.first_loss:.4f} ->" in card
    assert f"Data       variable rows: prompt-completion, {len(ROWS)} rows ({len(ROWS)} train / 0 eval)" in card
    assert "Settings   " in card and "r 4" in card and "max_steps 2" in card and "batch_size 4" in card
    # an SFT run recorded before beta's default changed (0.1, now 0): beta does not apply to SFT, and is not shown
    path = magics(shell).session.adapters_dir / "told" / "ft_run.json"
    record = json.loads(path.read_text())
    record["settings"]["beta"] = 0.1
    path.write_text(json.dumps(record))
    shell.run_line_magic("lora_adapters", "info told")
    assert "beta" not in capsys.readouterr().out
    # a PEFT folder made elsewhere, on disk only: its LoRA shape, and no run it does not have
    peft_adapter(tiny_model_dir, tmp_path / "adapters" / "outsider", seed=3)
    shell.run_line_magic("lora_adapters", "info outsider")
    card = capsys.readouterr().out
    assert "(on disk, not loaded)" in card and "LoRA       r=" in card and "Trained" not in card
    assert "outsider" not in magics(shell).session.adapters  # describing loads nothing
    with pytest.raises(UsageError, match="no adapter named 'nope'"):
        shell.run_line_magic("lora_adapters", "info nope")


def test_export_finds_an_adapter_only_on_disk_and_unwritable_folders_are_usage_errors(loaded, tmp_path):
    from test_foundation import ROWS

    sh, a, _ = loaded  # alpha sits in adapters/ and this session has not loaded it (as after a restart)
    sh.run_line_magic("lora_adapters", "export alpha deep/a/b/alpha-peft")
    assert (tmp_path / "deep/a/b/alpha-peft/adapter_model.safetensors").exists()
    # /proc takes no new files, even from root: each is found before any work, as a usage error
    with pytest.raises(UsageError, match=r"cannot write the export to /proc: .* Choose a folder you can write to"):
        sh.run_line_magic("lora_adapters", "export alpha /proc/ft-magics-test")
    sh.user_ns["rows"] = ROWS
    with pytest.raises(UsageError, match=r"cannot write the adapter to /proc/ft-magics-test"):
        sh.run_line_magic("lora_train", "x --data rows --max-steps 1 --output-dir /proc/ft-magics-test --no-widgets")
    assert "x" not in magics(sh).session.adapters
    with pytest.raises(UsageError, match=r"cannot write the job to /proc/ft-magics-job"):
        sh.run_line_magic("lora_export_job", "x /proc/ft-magics-job --data rows")
    (tmp_path / "notes.jsonl").write_text("{}\n")  # a file is named as a file (it said "it holds other files")
    with pytest.raises(UsageError, match=r"notes\.jsonl is a file, not a folder: an export writes a folder"):
        sh.run_line_magic("lora_adapters", "export alpha notes.jsonl")
    assert (tmp_path / "notes.jsonl").read_text() == "{}\n"


def test_a_misspelled_adapter_after_a_restart_points_at_the_one_on_disk(loaded):
    sh, a, _ = loaded  # alpha is only in adapters/, as after a kernel restart
    for line in ("lora_generate", "--adapter alpah hello"), ("lora_adapters", "use alpah"), ("lora_adapters", "info alpah"):
        # before: "no adapter named 'alpah'. No adapters yet: train one with %%lora_train."
        with pytest.raises(UsageError, match=r"no adapter named 'alpah' \(did you mean 'alpha'\?\)\. "
                                             r"In \S*/adapters \(used by name, they load\): alpha\."):
            sh.run_line_magic(*line)
    sh.run_line_magic("lora_adapters", "use alpha")
    with pytest.raises(UsageError, match=r"no adapter named 'alpah' \(did you mean 'alpha'\?\)\. Known adapters: alpha"):
        sh.run_line_magic("lora_adapters", "use alpah")  # loaded now, and nothing else on disk: the registry's words


def test_delete_removes_only_the_adapters_own_folder_and_names_what_is_on_disk(shell, tiny_model_dir, tmp_path, capsys):
    """`load adapters/po --name a2` then `delete a2` deleted adapters/po (adapter po's folder) and left
    adapters/a2; a name that clashes with another adapter's folder is refused at load; a missing name in a
    session whose adapters are all on disk said "No adapters yet"."""
    sh = shell
    sh.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    assert magics(sh).session.adapters_dir.resolve() == (tmp_path / "adapters").resolve()
    for name in ("po", "a2"):
        peft_adapter(tiny_model_dir, tmp_path / "adapters" / name, seed=len(name))
    with pytest.raises(UsageError, match=r"adapters/a2 holds another adapter named 'a2'; load .* under another name \(--name\)"):
        sh.run_line_magic("lora_adapters", "load adapters/po --name a2")
    sh.run_line_magic("lora_adapters", "load adapters/po --name copy")
    capsys.readouterr()
    sh.run_line_magic("lora_adapters", "delete copy")
    assert "the folder it was loaded from was kept" in capsys.readouterr().out
    assert (tmp_path / "adapters" / "po" / "adapter_config.json").is_file()
    with pytest.raises(UsageError, match=r"no adapter named 'nope'\..* \(used by name, they load\): a2, po"):
        sh.run_line_magic("lora_adapters", "delete nope")
    sh.run_line_magic("lora_adapters", "delete po")  # on disk only: its own folder goes
    assert not (tmp_path / "adapters" / "po").exists() and (tmp_path / "adapters" / "a2").exists()


def test_using_an_adapter_trained_on_another_base_says_so(shell, tiny_model_dir, tmp_path, capsys):
    """The README's DPO-over-SFT recipe trains on an exported model; `use` of that adapter on the plain base
    said only "active adapter" (the adapter was measured against another model)."""
    import shutil

    from test_foundation import ROWS

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    shell.user_ns["rows"] = ROWS
    shell.run_line_magic("qlora_load", f"{other} --bits 32")
    shell.run_cell_magic("lora_train", "over --data rows --no-widgets", "max_steps: 1\nbatch_size: 4\nr: 4\n")
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.run_cell_magic("lora_train", "plain --data rows --no-widgets", "max_steps: 1\nbatch_size: 4\nr: 4\n")
    capsys.readouterr()
    shell.run_line_magic("lora_adapters", "use over")
    out = capsys.readouterr().out
    assert "Note: 'over' was trained on other-base, not on the model loaded now (tiny-llama)" in out
    shell.run_line_magic("lora_adapters", "use plain")
    assert "Note" not in capsys.readouterr().out
    shell.run_line_magic("lora_adapters", "unload over")
    shell.run_line_magic("lora_adapters", f"load {tmp_path / 'adapters' / 'over'} --name again")  # load says it too
    assert "Note: 'again' was trained on other-base" in capsys.readouterr().out
    # two folders of one name: "trained on tiny-llama, not on ... (tiny-llama)" told nothing; the paths tell them apart
    twin = tmp_path / "elsewhere" / tiny_model_dir.name
    shutil.copytree(tiny_model_dir, twin)
    shell.run_line_magic("qlora_load", f"{twin} --bits 32")
    shell.run_cell_magic("lora_train", "twin --data rows --no-widgets", "max_steps: 1\nbatch_size: 4\nr: 4\n")
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    capsys.readouterr()
    shell.run_line_magic("lora_adapters", "use twin")
    out = capsys.readouterr().out
    assert f"Note: 'twin' was trained on {twin}, not on the model loaded now ({tiny_model_dir})" in out, out
    # the same base in other bits: %lora_eval's losses moved from the run's (0.035 -> 0.047) without a word
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 16")
    capsys.readouterr()
    shell.run_line_magic("lora_adapters", "use plain")
    assert ("Note: 'plain' was trained on tiny-llama in 32-bit, not on the model loaded now (tiny-llama in 16-bit): "
            "its answers and losses assume that base (%qlora_load --bits 32 to use it as trained)") in \
        capsys.readouterr().out
    shell.run_line_magic("lora_eval", "plain --data rows --no-general")
    assert "Note: 'plain' was trained on tiny-llama in 32-bit" in capsys.readouterr().out
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    capsys.readouterr()
    shell.run_line_magic("lora_eval", "plain --data rows --no-general")
    assert "Note" not in capsys.readouterr().out


def test_a_long_eval_prints_its_progress_by_batches(loaded, capsys, monkeypatch):
    """%lora_eval says how far it is once it has run a while: batches done of all the passes (base and
    adapter, each set), what is being scored, the last batch included."""
    from ft_magics.core import evaluation

    sh, a, _ = loaded
    sh.run_line_magic("lora_adapters", f"load {a}")
    real = evaluation.EvalProgress.__init__
    monkeypatch.setattr(evaluation.EvalProgress, "__init__",
                        lambda self, total, write: real(self, total, write, after_s=0.0, every_s=0.0))
    sh.run_line_magic("lora_eval", "alpha --data demo:support-eval --max-seq-len 96 --batch-size 16")
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("evaluating:")]
    n_eval = len(evaluation.heldout_examples("demo:support-eval", magics(sh).session.tokenizer, {}, 96))
    per_column = -(-n_eval // 16) + -(-len(evaluation.general_examples(magics(sh).session.tokenizer, 96)) // 16)
    total = 2 * per_column  # base and alpha
    assert len(lines) == total, lines
    assert lines[0].startswith(f"evaluating: 1/{total} batches") and "base on demo:support-eval" in lines[0]
    assert lines[-1].startswith(f"evaluating: {total}/{total} batches (100%)") and "alpha on general text" in lines[-1]


def test_a_truncated_adapter_in_the_adapters_folder_does_not_break_list(loaded, capsys, tmp_path):
    """A folder whose config is fine but whose weights file was cut short: 'list' raised safetensors' own error
    (the other commands already said 'corrupt or truncated'), so no adapter could be listed."""
    import shutil

    sh, a, _ = loaded
    broken = tmp_path / "adapters" / "broken"
    shutil.copytree(a, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    capsys.readouterr()
    sh.run_line_magic("lora_adapters", "list")
    out = capsys.readouterr().out
    assert "alpha" in out and "broken" in out
    assert "corrupt or truncated" in out
    with pytest.raises(UsageError, match="corrupt or truncated"):
        sh.run_line_magic("lora_adapters", "use broken")
    # a delete killed part-way (weights gone) and a config cut short: damaged, not "trained on another base model"
    for name, damage in (("noweights", lambda f: (f / "adapter_model.safetensors").unlink()),
                         ("cutconfig", lambda f: (f / "adapter_config.json").write_text(
                             (f / "adapter_config.json").read_text()[:100]))):
        shutil.copytree(a, tmp_path / "adapters" / name)
        damage(tmp_path / "adapters" / name)
    sh.run_line_magic("lora_adapters", "list")
    out = capsys.readouterr().out
    assert "another base model" not in out
    assert "unreadable: noweights: " in out and "no adapter_model.safetensors" in out
    assert "unreadable: cutconfig: " in out and "is corrupt" in out


def test_an_adapter_loaded_by_name_keeps_its_folder_after_a_cd(shell, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Adapters loaded by name were recorded with a relative path: after %cd, info found no folder and delete
    removed the other project's adapters/NAME instead of this one's."""
    a, b = tmp_path / "cdA", tmp_path / "cdB"
    ours = peft_adapter(tiny_model_dir, a / "adapters" / "other", seed=5)
    theirs = peft_adapter(tiny_model_dir, b / "adapters" / "other", seed=6)
    monkeypatch.chdir(a)
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.run_line_magic("lora_adapters", "use other")
    monkeypatch.chdir(b)
    capsys.readouterr()
    shell.run_line_magic("lora_adapters", "info other")
    assert str(ours) in capsys.readouterr().out
    shell.run_line_magic("lora_adapters", "delete other")
    assert (theirs / "adapter_model.safetensors").exists()  # another project's adapter of the same name
    assert "other" not in magics(shell).session.adapters


def test_the_adapters_folder_stays_where_the_model_was_loaded_and_output_dir_expands_the_home(
        shell, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """After a %cd, new runs saved into another adapters folder than the earlier ones, and delete kept this
    session's own folder ("the folder it was loaded from was kept"); --output-dir ~/x made a folder named '~'."""
    a, b, home = tmp_path / "cdA", tmp_path / "cdA" / "sub", tmp_path / "home"
    b.mkdir(parents=True)
    shell.user_ns["rows"] = [{"prompt": "hi", "completion": "there"}] * 4
    monkeypatch.chdir(a)
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.run_line_magic("lora_train", "h1 --data rows --max-steps 1 --no-widgets")
    monkeypatch.chdir(b)
    shell.run_line_magic("lora_train", "h2 --data rows --max-steps 1 --no-widgets")
    assert (a / "adapters" / "h2" / "adapter_config.json").exists() and not (b / "adapters").exists()
    capsys.readouterr()
    shell.run_line_magic("lora_adapters", "delete h1")
    assert f"deleted adapter 'h1' and its folder {(a / 'adapters' / 'h1').resolve()}" in capsys.readouterr().out
    assert not (a / "adapters" / "h1").exists()
    monkeypatch.setenv("HOME", str(home))
    shell.run_line_magic("lora_train", "h3 --data rows --max-steps 1 --no-widgets --output-dir ~/out")
    assert (home / "out" / "h3" / "adapter_config.json").exists() and not (b / "~").exists()


def test_an_interrupted_lora_eval_says_so_and_changes_nothing(loaded, capsys, monkeypatch):
    """The stop button during %lora_eval printed a 100-frame traceback through transformers and bitsandbytes."""
    from ft_magics.core import evaluation

    sh, a, _ = loaded
    sh.run_line_magic("lora_adapters", f"load {a}")
    line = "alpha --data demo:support-eval --max-seq-len 96 --no-general"
    capsys.readouterr()
    sh.run_line_magic("lora_eval", line)
    before = capsys.readouterr().out
    real_tick, calls = evaluation.EvalProgress.tick, []

    def tick(self):
        calls.append(1)
        if len(calls) == 2:  # the second batch: mid-evaluation, adapter switched on for scoring
            raise KeyboardInterrupt
        real_tick(self)

    monkeypatch.setattr(evaluation.EvalProgress, "tick", tick)
    with pytest.raises(UsageError, match=r"%lora_eval interrupted: no scores for 'alpha'; the model and adapters are as "
                                         r"they were\.$"):
        sh.run_line_magic("lora_eval", line)
    monkeypatch.setattr(evaluation.EvalProgress, "tick", real_tick)
    assert magics(sh).session.adapters.active == "alpha"
    sh.run_line_magic("lora_eval", line)

    def scores(out):  # the progress lines come by the clock: how many depends on the machine's load
        return [x for x in out.splitlines() if not x.startswith("evaluating: ")]

    assert scores(capsys.readouterr().out) == scores(before)


def test_compare_with_nothing_loaded_names_the_adapters_on_disk(loaded, capsys):
    """In a fresh kernel %lora_compare (no --adapters) answered with the base alone, without a word of the
    adapters in the adapters folder that --adapters would compare."""
    sh, _, _ = loaded
    capsys.readouterr()
    sh.run_line_magic("lora_compare", "--max-new-tokens 2 hello")
    out = capsys.readouterr().out
    assert "(only the base: no adapter is loaded." in out and "compare them with --adapters alpha" in out
    sh.run_line_magic("lora_compare", "--adapters alpha --max-new-tokens 2 hello")
    assert "only the base" not in capsys.readouterr().out


def test_compare_says_when_it_lowered_the_answer_limit_and_refuses_an_empty_adapter_list(loaded, capsys):
    """--max-new-tokens 100000 answered with 502 tokens and no word (generate says 'answer limit lowered'), and
    '--adapters ,' compared the base alone."""
    from IPython.core.error import UsageError

    sh, _, _ = loaded
    capsys.readouterr()
    sh.run_line_magic("lora_compare", "--max-new-tokens 100000 hello")
    assert "Note: answer limit lowered to " in capsys.readouterr().out
    with pytest.raises(UsageError, match="--adapters ',' names no adapter"):
        sh.run_line_magic("lora_compare", "--adapters , hello")


def test_lora_eval_says_when_rows_were_cut_to_max_seq_len(loaded, capsys, tmp_path):
    """Training's data report says how many rows exceed max_seq_len; %lora_eval cut them without a word."""
    import json

    sh, a, _ = loaded
    sh.run_line_magic("lora_adapters", f"load {a}")
    rows = [{"prompt": "short?", "completion": "yes."}] * 3 + [{"prompt": "long " * 80, "completion": "ok."}]
    (tmp_path / "ev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    sh.run_line_magic("lora_eval", f"alpha --data {tmp_path / 'ev.jsonl'} --max-seq-len 48 --no-general")
    out = capsys.readouterr().out
    assert re.search(r"Note: 1 of 4 examples of \S+ev\.jsonl are longer than --max-seq-len 48 and were scored cut "
                     r"to it \(1 cut before their answer were left out\); --max-seq-len \d+ keeps every example whole\.", out), out
    sh.run_line_magic("lora_eval", f"alpha --data {tmp_path / 'ev.jsonl'} --max-seq-len 512 --no-general")
    assert "Note:" not in capsys.readouterr().out
    # a row longer than the model's context (512 here): no --max-seq-len scores it whole, and none is advised
    (tmp_path / "ev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [{"prompt": "q", "completion": "word " * 700}]))
    sh.run_line_magic("lora_eval", f"alpha --data {tmp_path / 'ev.jsonl'} --no-general")
    out = capsys.readouterr().out
    assert "is beyond the model's context window (512), so no max_seq_len keeps it whole" in out, out


def test_load_takes_the_name_list_shows_on_disk(loaded, capsys):
    """'list' names alpha as on disk; 'load alpha' said 'adapter folder alpha does not exist'."""
    sh, a, _ = loaded
    sh.run_line_magic("lora_adapters", "load alpha")
    assert "loaded adapter 'alpha' from alpha" in capsys.readouterr().out
    assert "alpha" in magics(sh).session.adapters
    with pytest.raises(UsageError, match="adapter folder nothere does not exist"):
        sh.run_line_magic("lora_adapters", "load nothere")


def test_refusals_about_a_merged_or_vanished_adapter_name_the_right_thing(shell, tiny_model_dir, tmp_path, capsys):
    """delete while merged said 'cannot unload'; info on a loaded adapter whose folder was deleted outside the tool
    said the folder does not exist as if nothing were loaded, and delete then said that folder 'was kept'."""
    import shutil

    from IPython.core.error import UsageError

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                              for i in range(8)))
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    for name in ("m1", "m2"):
        shell.run_cell_magic("lora_train", f"{name} --data d.jsonl --max-steps 1 --no-widgets", "r: 4\n")
    shell.run_line_magic("lora_adapters", "merge m1")
    with pytest.raises(UsageError, match="cannot delete an adapter while adapter 'm1' is merged"):
        shell.run_line_magic("lora_adapters", "delete m1")
    shell.run_line_magic("lora_adapters", "unmerge")
    shutil.rmtree(tmp_path / "adapters" / "m2")
    with pytest.raises(UsageError, match=r"adapter 'm2' is loaded and answers, but its folder .* is gone"):
        shell.run_line_magic("lora_adapters", "info m2")
    capsys.readouterr()
    shell.run_line_magic("lora_adapters", "delete m2")
    said = capsys.readouterr().out
    assert "deleted adapter 'm2' from memory; its folder" in said and "was already gone" in said


def test_lora_eval_refuses_a_length_beyond_the_model_s_context(shell, tiny_model_dir, tmp_path):
    """--max-seq-len 2048 on a model of 512 positions scored rows past its context and reported a loss (the
    refusal for cut answers even suggested it); the default is 512 or the model's context if shorter."""
    from IPython.core.error import UsageError

    (tmp_path / "ev.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                              for i in range(3)))
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    with pytest.raises(UsageError, match=r"--max-seq-len 2048 is beyond the model's context \(512 tokens"):
        shell.run_line_magic("lora_eval", "base --data ev.jsonl --no-general --max-seq-len 2048")
    session = shell.magics_manager.registry["FtMagics"].session
    session.model.config.max_position_embeddings = 128  # a model that reads fewer than the default 512
    report = session.evaluate(None, "ev.jsonl", general=False)
    assert report.results and not report.notes


def test_deleting_a_folder_another_loaded_adapter_was_read_from_is_refused(loaded):
    """`load adapters/alpha --name copy` then `delete alpha` removed the folder copy was read from; 'info copy'
    then blamed a deletion "outside ft_magics"."""
    sh, a, _ = loaded
    sh.run_line_magic("lora_adapters", f"load {a} --name copy")
    with pytest.raises(UsageError, match=r"the folder of 'alpha' .* is also where the loaded adapter 'copy' was read "
                                         r"from; unload 'copy' first"):
        sh.run_line_magic("lora_adapters", "delete alpha")
    assert a.exists()
    sh.run_line_magic("lora_adapters", "unload copy")
    sh.run_line_magic("lora_adapters", "delete alpha")
    assert not a.exists()


def test_eval_and_generate_flag_mistakes_name_the_flag_typed(loaded):
    """--max-seq-len 10 was refused as 'max_seq_len must be between 16 and 1048576' (the training key), and --stop
    as 'did you mean --top-p?' (an unrelated flag; there are no stop strings)."""
    sh, a, _ = loaded
    sh.run_line_magic("lora_adapters", f"load {a}")
    with pytest.raises(UsageError, match=r"--max-seq-len must be at least 16 tokens \(got 10\)"):
        sh.run_line_magic("lora_eval", "alpha --data demo:support-eval --max-seq-len 10 --no-general")
    with pytest.raises(UsageError, match=r"unknown flag --stop: there are no stop strings here; an answer ends at the "
                                         r"model's end of turn or at --max-new-tokens"):
        sh.run_line_magic("lora_generate", '--stop "x" hello')


def test_a_comparison_s_notes_say_which_answers_they_are_about():
    """'Note: the answer repeats itself' followed a comparison in which only the base column looped; a blank answer
    of whitespace tokens read '(empty)'."""
    from ft_magics.core.inference import LOOP_NOTE, Comparison, Generation

    def gen(text, note=""):
        return Generation(text=text, adapter="x", new_tokens=3, seconds=1.0, note=note, decode_seconds=0.5)

    cmp = Comparison(prompts=["p1", "p2"], columns=["base", "a"],
                     cells={(0, "base"): gen("la la la", LOOP_NOTE), (0, "a"): gen("fine"),
                            (1, "base"): gen("   ", "cut"), (1, "a"): gen("ok", "cut")}, swap_ms={})
    assert cmp.notes() == [f"{LOOP_NOTE} (base, prompt 1)", "cut (base, prompt 2; a, prompt 2)"]
    assert "(blank: whitespace only)" in cmp.to_text()
    every = Comparison(prompts=["p"], columns=["base"], cells={(0, "base"): gen("x", "cut")}, swap_ms={})
    assert every.notes() == ["cut"]  # about every answer: no label
    listed = Comparison(prompts=["fruit?"], columns=["base"], cells={(0, "base"): gen("1. Banana\n2. Orange\n\nBye")},
                        swap_ms={})  # the text view joined an answer's lines into one ("1. Banana 2. Orange")
    assert "    1. Banana\n    2. Orange\n\n    Bye\n" in listed.to_text(width=60)


def test_use_of_an_adapter_on_disk_says_it_was_loaded(loaded, capsys):
    """`use alpha` (only on disk) printed 'swapped in 0.04 ms': the load from disk went unmentioned."""
    sh, a, _ = loaded
    capsys.readouterr()
    sh.run_line_magic("lora_adapters", "use alpha")
    assert re.search(r"active adapter: alpha \(loaded from disk and switched in \d+ ms\)", capsys.readouterr().out)
    sh.run_line_magic("lora_adapters", "use base")
    sh.run_line_magic("lora_adapters", "use alpha")
    assert re.search(r"active adapter: alpha \(swapped in [\d.]+ ms\)", capsys.readouterr().out)


def test_an_adapter_whose_folder_went_is_kept_until_the_user_drops_it(loaded, tmp_path, capsys):
    """A tester deleted a loaded adapter's folder, then renamed it: the rename dropped it from memory and failed to
    read it back from the missing folder (a traceback, and the only copy lost); unload said "its folder stays on
    disk" while it dropped the last copy."""
    import shutil

    from ft_magics.errors import FtUsageError

    sh, a, _ = loaded
    sess = magics(sh).session
    sh.run_line_magic("lora_adapters", "use alpha")
    before = sess.generate("hello", max_new_tokens=5).text
    shutil.rmtree(a)
    with pytest.raises(UsageError, match=r"^cannot rename 'alpha': its folder .*alpha is gone \(deleted or moved "
                                         r"outside ft_magics\), .* export alpha DIR, then %lora_adapters load DIR "
                                         r"--name alpha2\.$"):
        sh.run_line_magic("lora_adapters", "rename alpha alpha2")
    with pytest.raises(FtUsageError, match=r"only in memory now: its folder .* is gone .* unloading it would lose "
                                           r"it\. Keep it with %lora_adapters export alpha DIR"):
        sess.unload_adapter("alpha")
    assert sess.adapters.names() == ["alpha"] and sess.adapters.active == "alpha"
    assert sess.generate("hello", max_new_tokens=5).text == before
    capsys.readouterr()
    sh.run_line_magic("lora_adapters", "list")
    assert "(only in memory: its folder" in capsys.readouterr().out
    sh.run_line_magic("lora_adapters", f"export alpha {tmp_path / 'kept'}")  # the way out the messages name
    sh.run_line_magic("lora_adapters", f"load {tmp_path / 'kept'} --name alpha2")
    assert sess.generate("hello", adapter="alpha2", max_new_tokens=5).text == before
    sess.delete_adapter("alpha")  # the other way out: dropped on purpose
    assert "alpha" not in sess.adapters


def test_an_interrupted_load_says_what_is_loaded_now(loaded, tiny_model_dir, monkeypatch):
    """The stop button during %qlora_load printed a 100-line traceback, and nothing said the previous model was
    already let go (a load frees it first, to make room)."""
    import ft_magics.core.loading as loading

    sh, _, _ = loaded
    sess = magics(sh).session
    real = loading.load_model

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "load_model", stopped)
    with pytest.raises(UsageError, match=r"^%qlora_load interrupted: no model is loaded now \(tiny-llama and its "
                                         r"adapters were let go first, to make room for the new one\); run "
                                         r"%qlora_load again\.$"):
        sh.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    assert sess.handle is None
    monkeypatch.setattr(loading, "load_model", real)
    sh.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    monkeypatch.setattr(loading, "plan_load", stopped)  # before anything was let go
    with pytest.raises(UsageError, match=r"^%qlora_load interrupted before it let go of tiny-llama: that model and "
                                         r"its adapters are loaded as they were\.$"):
        sh.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    assert sess.handle is not None and sess.generate("hello", max_new_tokens=2).text is not None


def test_a_load_says_the_chat_goes_on(loaded, tiny_model_dir, capsys):
    """A tester's chat went on across %qlora_load of another model, with nothing to say so: the load's card now
    says the conversation is kept and how to start over."""
    sh, _, _ = loaded
    sess = magics(sh).session
    sh.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    assert "the chat so far" not in capsys.readouterr().out  # no conversation yet: nothing to say
    sess.chat("hello", max_new_tokens=2)
    sh.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    assert ("Note       the chat so far (1 exchange) is kept: the next %lora_chat continues it on this model; "
            "%lora_chat --new starts over") in capsys.readouterr().out


def test_alpha_is_shown_as_written(loaded, capsys):
    """`alpha: 32` in a YAML body showed as alpha=32.0 in list and info, beside alpha=32 for the default."""
    sh, _, _ = loaded
    sess = magics(sh).session
    sess.train("al", [{"prompt": f"q{i}?", "completion": f"a{i}"} for i in range(8)],
               {"max_steps": 1, "batch_size": 4, "alpha": 32.0}, listeners=[])
    capsys.readouterr()
    sh.run_line_magic("lora_adapters", "list")
    sh.run_line_magic("lora_adapters", "info al")
    out = capsys.readouterr().out
    assert "al                   r=16 alpha=32 steps=1" in out and "LoRA       r=16 alpha=32 dropout" in out
    assert "32.0" not in out
