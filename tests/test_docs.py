"""Documentation that cannot drift: the README's generated reference, %ft_help, the README sections the
error messages point to, and the notebook generator."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from ft_magics.config import TrainConfig, reference_table
from ft_magics.magics import FtMagics, help_text
from ft_magics.reference import BEGIN, END, current_block, magic_kinds, readme_block

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def registered() -> set:
    return set(FtMagics.magics["line"]) | set(FtMagics.magics["cell"])


def test_readme_reference_block_is_generated_from_the_code():
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert current_block(text) == readme_block(), (
        "README.md's reference is out of date: run .venv/bin/python scripts/gen_reference.py")
    # and the checker script agrees (what a contributor runs)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reference_names_every_magic_flag_and_yaml_key_with_its_default():
    block = readme_block()
    for name in registered():
        assert f"#### `%{name}" in block or f"#### `%%{name}" in block, name
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{f.name}` / `--{f.name.replace('_', '-')}` | `{f.default!r}` |" in block, f.name
    assert reference_table() in block
    # a magic's own flag, with its default from the parser
    assert "| `--max-new-tokens` | `128` |" in block
    assert "| `--bits {4,8,16,32}` |" in block


def test_generated_block_follows_a_new_setting(monkeypatch):
    """The README block is computed from TrainConfig, so a new field changes it (and the check fails until
    the README is regenerated)."""
    import ft_magics.config as config

    @dataclasses.dataclass
    class Extended(TrainConfig):
        brand_new_knob: int = dataclasses.field(default=7, metadata={"help": "A knob added later."})

    monkeypatch.setattr(config, "TrainConfig", Extended)
    block = readme_block()
    assert "| `brand_new_knob` / `--brand-new-knob` | `7` | A knob added later. |" in block
    assert block != current_block(README.read_text())


def test_ft_help_covers_every_registered_magic_with_an_example(shell, capsys):
    shell.run_line_magic("ft_help", "")
    out = capsys.readouterr().out
    kinds = magic_kinds()
    assert set(kinds) == registered()
    sections = re.split(r"\n(?=%)", out)
    for name, k in kinds.items():
        section = next((s for s in sections if s.split("\n", 1)[0].split(" / ")[0].lstrip("%") == name), None)
        assert section is not None, f"%ft_help has no section for %{name}"
        body = section.split("\n", 1)[1]
        # an example: the magic itself used on an indented line of its section
        assert re.search(rf"^\s+%{{1,2}}{name}\b", body, re.M), f"%ft_help %{name} has no example:\n{section}"
    assert "%%lora_train support-bot --data demo:support" in out


def test_ft_help_follows_the_registered_magics(monkeypatch):
    """A magic registered later appears in %ft_help without editing a list."""
    monkeypatch.setitem(FtMagics.magics["line"], "lora_stop_all", "lora_stop")
    monkeypatch.setattr(FtMagics, "lora_stop_all", FtMagics.lora_stop, raising=False)
    assert "%lora_stop_all\n" in help_text()


def test_ft_help_one_magic_shows_every_flag(shell, capsys):
    shell.run_line_magic("ft_help", "%%lora_train")
    out = capsys.readouterr().out
    assert out.startswith("%lora_train / %%lora_train")
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out
    assert "--processes" in out and "--resume" in out
    assert "SUPPRESS" not in out  # a hidden flag's help printed as "==SUPPRESS=="
    with pytest.raises(UsageError, match="no magic %lora_trian.*did you mean 'lora_train'"):
        shell.run_line_magic("ft_help", "lora_trian")
    with pytest.raises(UsageError, match="%ft_help takes one magic's name, got 'lora_train extra'"):
        shell.run_line_magic("ft_help", "lora_train extra")  # was: "no magic %lora_train extra"


def test_unknown_setting_error_points_to_an_ft_help_that_works(shell, capsys):
    with pytest.raises(UsageError, match="See %ft_help lora_train") as err:
        shell.run_cell_magic("lora_train", "x --data demo:support", "rank_of_adapter: 4\n")
    shell.run_line_magic("ft_help", re.search(r"%ft_help (\w+)", str(err.value)).group(1))
    assert "--max-seq-len" in capsys.readouterr().out


def _readme_headings() -> set:
    return {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", README.read_text(), re.M)}


def test_every_readme_section_the_code_names_exists():
    """Error messages say "See README 'SECTION'": each SECTION is a heading of README.md."""
    cited = set()
    for path in (ROOT / "ft_magics").rglob("*.py"):
        cited |= set(re.findall(r"README '([^']+)'", path.read_text()))
    assert {"Troubleshooting: no GPU found", "Troubleshooting: bitsandbytes", "Troubleshooting: out of memory",
            "Troubleshooting: interrupted runs"} <= cited
    missing = cited - _readme_headings()
    assert not missing, f"README.md lacks the sections {missing}"


def test_error_messages_carry_the_readme_pointer():
    from ft_magics.core.checkpoints import require_resumable
    from ft_magics.core.oom import oom_error
    from ft_magics.errors import FtUsageError

    msg = str(oom_error(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), TrainConfig(), bits=4, device="cuda"))
    assert "See README 'Troubleshooting: out of memory'" in msg
    with pytest.raises(FtUsageError, match="Troubleshooting: interrupted runs"):
        require_resumable(Path("/nonexistent/ft_magics/checkpoints"), "nothing")


def test_readme_has_the_newcomer_sections():
    heads = _readme_headings()
    for h in ("Two commands", "Install", "Quickstart: five cells", "Demo notebooks",
              "What runs on the CPU and what needs a GPU", "Architecture", "Benchmarks", "Reference", "Troubleshooting"):
        assert h in heads, h
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "![" in text and (ROOT / "docs" / "dashboard.png").is_file()
    assert (ROOT / "docs" / "dashboard.png").stat().st_size < 150_000
    for nb in sorted((ROOT / "demo_notebooks").glob("0*.ipynb")):
        if not nb.name.endswith(".executed.ipynb"):
            assert f"`{nb.stem}`" in text, f"README's notebook table lacks {nb.stem}"


def test_committed_notebooks_are_what_the_generator_writes(tmp_path):
    """demo_notebooks/*.ipynb are generated by scripts/make_notebooks.py, unexecuted (no outputs)."""
    import nbformat

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_notebooks
    finally:
        sys.path.pop(0)
    make_notebooks.OUT = tmp_path
    make_notebooks.main()
    names = sorted(p.name for p in tmp_path.glob("*.ipynb"))
    assert names == ["01_quickstart.ipynb", "02_bring_your_own_data.ipynb", "03_adapters_at_the_edge.ipynb",
                     "04_memory_full_vs_lora_vs_qlora.ipynb", "05_scale_out.ipynb", "06_preferences.ipynb"]
    for name in names:
        committed = ROOT / "demo_notebooks" / name
        assert committed.read_text() == (tmp_path / name).read_text(), f"regenerate {name}: scripts/make_notebooks.py"
        nb = nbformat.read(committed, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert first.source == make_notebooks.COLAB_INSTALL  # the same Colab cell everywhere
        assert "=== ft_magics demo summary ===" in nb.cells[-1].source


def _run_install_cell(monkeypatch, tmp_path, installed_after: bool, env: dict):
    """Run the notebooks' first cell in a shell where ft_magics is missing; %pip only records its argument."""
    import importlib.util
    import sys

    from IPython.core.interactiveshell import InteractiveShell

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_notebooks import COLAB_INSTALL
    finally:
        sys.path.pop(0)
    calls = []
    real = importlib.util.find_spec

    def find_spec(name, *a, **kw):
        if name == "ft_magics":
            return real("ft_magics") if (installed_after and calls) else None
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    shell = InteractiveShell.instance()
    monkeypatch.setitem(shell.magics_manager.magics["line"], "pip", lambda line: calls.append(line))
    result = shell.run_cell(COLAB_INSTALL.replace("/content/", f"{tmp_path}/"))
    return calls, result


def test_colab_cell_installs_from_the_named_source_and_says_how_when_it_fails(monkeypatch, tmp_path):
    calls, result = _run_install_cell(monkeypatch, tmp_path, True, {"FT_MAGICS_PIP": "git+https://example.org/ft_magics"})
    assert result.success and calls[0] == "install -q git+https://example.org/ft_magics"
    monkeypatch.delenv("FT_MAGICS_PIP")
    wheel = tmp_path / "ft_magics-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    calls, result = _run_install_cell(monkeypatch, tmp_path, True, {})
    assert result.success and calls[0] == f"install -q {wheel}"  # an uploaded wheel is found
    wheel.unlink()
    calls, result = _run_install_cell(monkeypatch, tmp_path, False, {})
    assert calls[0] == "install -q ft-magics"
    assert isinstance(result.error_in_exec, RuntimeError) and "make wheel" in str(result.error_in_exec)


def test_every_magic_answers_help_with_its_usage_and_does_nothing_else(shell, tiny_model_dir, capsys):
    """``%lora_generate --help`` was refused as an unknown flag and ``%lora_adapters --help`` as an unknown
    subcommand, while ``%ft_unload --help`` unloaded the model and ``%lora_stop --help`` would stop a run. Every
    magic now prints its help for --help, and the ones without arguments refuse any other word."""
    from IPython.core.error import UsageError

    from ft_magics.magics import MAGIC_NAMES

    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    session = shell.magics_manager.registry["FtMagics"].session
    capsys.readouterr()
    for name in MAGIC_NAMES["line"]:
        for flag in ("--help", "-h"):
            shell.run_line_magic(name, flag)
            out = capsys.readouterr().out
            assert f"%{name}" in out or "usage" in out.lower() or name in out, (name, flag, out[:200])
    for name in MAGIC_NAMES["cell"]:
        shell.run_cell_magic(name, "--help", "body\n")
        assert capsys.readouterr().out.strip(), name
    assert session.handle is not None  # %ft_unload --help unloaded nothing
    for name in ("ft_unload", "lora_stop"):
        with pytest.raises(UsageError, match=f"%{name} takes no arguments"):
            shell.run_line_magic(name, "now")
    assert session.handle is not None


def test_the_readme_s_plan_example_states_what_ft_plan_prints(shell, capsys):
    """The README said QLoRA fits at batch 4 in 20.1 GB; %ft_plan 8B --memory 24GB prints 19.5 GB (an estimate,
    no timing: the text can say exactly what the tool says)."""
    import re

    shell.run_line_magic("ft_plan", "8B --memory 24GB")
    out = capsys.readouterr().out
    lora = re.search(r"LoRA, 16-bit base: fits at batch 8 with gradient checkpointing, ([\d.]+) GB", out).group(1)
    qlora = re.search(r"QLoRA, NF4 \+ double quant: fits at batch 4, ([\d.]+) GB", out).group(1)
    text = " ".join(README.read_text().split())
    assert (f"`%ft_plan 8B --memory 24GB`: LoRA on a 16-bit base fits at batch 8 with checkpointing ({lora} GB), "
            f"QLoRA at batch 4 with `grad_accum: 2` ({qlora} GB)") in text
