"""Issue 5 through a real IPython shell: %lora_adapters subcommands, %%lora_compare, %lora_eval."""
from __future__ import annotations

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
    sh.run_line_magic("lora_adapters", "unmerge")
    sh.run_line_magic("lora_adapters", "combine alpha:0.6,beta:0.4 --name mix --method svd")
    assert sess.adapters.active == "mix" and (tmp_path / "adapters" / "mix" / "adapter_config.json").exists()
    sh.run_line_magic("lora_adapters", "export mix exported --merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "exported") is not None
    sh.run_line_magic("lora_adapters", "export beta beta-peft")
    assert (tmp_path / "beta-peft" / "adapter_model.safetensors").exists()
    sh.run_line_magic("lora_adapters", "unload beta")
    assert "beta" not in sess.adapters and b.exists()
    sh.run_line_magic("lora_adapters", "delete alpha")  # no confirmation in text mode
    assert not a.exists()
    out = capsys.readouterr().out
    assert "unloaded adapter 'beta'" in out and "deleted adapter 'alpha' and its folder" in out


def test_adapter_subcommand_mistakes_are_usage_errors(loaded):
    sh, a, _ = loaded
    with pytest.raises(UsageError, match="did you mean 'merge'"):
        sh.run_line_magic("lora_adapters", "merg alpha")
    with pytest.raises(UsageError, match="usage: %lora_adapters combine"):
        sh.run_line_magic("lora_adapters", "combine alpha:1")
    with pytest.raises(UsageError, match="did you mean 'ties'"):
        sh.run_line_magic("lora_adapters", "combine alpha:1 --name x --method tie")
    with pytest.raises(UsageError, match="usage: %lora_adapters export"):
        sh.run_line_magic("lora_adapters", "export alpha")
    with pytest.raises(UsageError, match="no adapter named 'alpah'"):
        sh.run_line_magic("lora_adapters", "unload alpah")
    with pytest.raises(UsageError, match="no adapter is merged"):
        sh.run_line_magic("lora_adapters", "unmerge")


def test_compare_and_eval_magics_print_text_outside_a_notebook(loaded, capsys):
    sh, a, _ = loaded
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
    assert html.startswith("<table") and "<th>alpha<br>" in html and html.count("<tr>") == 3


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
