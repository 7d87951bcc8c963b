"""Issue 5: adapters made anywhere load here and back, `use base` / unmerge restore the base bit for
bit, merge/combine/export, mismatch refusals and the training lock. Tiny random Llama on the CPU."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ft_magics.errors import FtUsageError

PROMPT_IDS = [[5, 17, 42, 99, 3, 250, 7, 61]]


def peft_adapter(model_dir: Path, out: Path, seed: int = 1, r: int = 4, targets=("q_proj", "v_proj"), **config) -> Path:
    """An adapter made by plain peft (non-zero B so it changes outputs), saved in PEFT's format; ``config``:
    more LoraConfig settings (``use_dora=True``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
                     task_type="CAUSAL_LM", **config)
    model = get_peft_model(base, cfg)
    model.save_pretrained(out)
    return out


def pristine(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits(model):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(PROMPT_IDS)).logits


@pytest.fixture(scope="module")
def made_by_peft(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft-made")
    return {
        "a": peft_adapter(tiny_model_dir, root / "a", seed=1),
        "b": peft_adapter(tiny_model_dir, root / "b", seed=2),
        "mlp-only": peft_adapter(tiny_model_dir, root / "mlp-only", seed=3, r=8, targets=("gate_proj", "up_proj", "down_proj")),
    }


def test_peft_adapter_loads_here_with_identical_outputs(tiny_session, tiny_model_dir, made_by_peft):
    import torch
    from peft import PeftModel

    tiny_session.load_adapter(made_by_peft["a"], "a")
    ours = logits(tiny_session.model)
    theirs = logits(PeftModel.from_pretrained(pristine(tiny_model_dir), str(made_by_peft["a"])).eval())
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, logits(pristine(tiny_model_dir)))  # the adapter really changes the outputs


def test_use_base_is_bit_identical_to_pristine_base(tiny_session, tiny_model_dir, made_by_peft):
    import torch

    want = logits(pristine(tiny_model_dir))
    tiny_session.load_adapter(made_by_peft["a"], "a")
    tiny_session.load_adapter(made_by_peft["b"], "b")
    tiny_session.use("base")
    assert torch.equal(logits(tiny_session.model), want)
    with tiny_session.model.disable_adapter():  # PEFT's own context manager, same guarantee
        assert torch.equal(logits(tiny_session.model), want)


def test_adapter_saved_here_loads_in_plain_peft(tiny_session, tiny_model_dir, made_by_peft, tmp_path):
    import torch
    from peft import PeftModel

    tiny_session.load_adapter(made_by_peft["a"], "a")
    tiny_session.load_adapter(made_by_peft["b"], "b")
    tiny_session.combine_adapters("a:0.7,b:0.3", "mix", method="linear")
    ours = logits(tiny_session.model)
    saved = tiny_session.adapters_dir / "mix"
    assert json.loads((saved / "ft_run.json").read_text())["combined_from"] == {"a": 0.7, "b": 0.3}
    theirs = logits(PeftModel.from_pretrained(pristine(tiny_model_dir), str(saved)).eval())
    assert torch.equal(ours, theirs)
    # export (PEFT format) of a loaded adapter round-trips too
    out = tiny_session.export_adapter("b", tmp_path / "export-b")
    tiny_session.use("b")
    assert torch.equal(logits(tiny_session.model),
                       logits(PeftModel.from_pretrained(pristine(tiny_model_dir), str(out)).eval()))


def test_combine_methods_and_refusals(tiny_session, made_by_peft):
    import torch

    tiny_session.load_adapter(made_by_peft["a"], "a")
    tiny_session.load_adapter(made_by_peft["mlp-only"], "mlp-only")
    with pytest.raises(FtUsageError, match="same r") as err:
        tiny_session.combine_adapters({"a": 0.5, "mlp-only": 0.5}, "bad", method="linear")
    assert ".." not in str(err.value)  # PEFT's sentence keeps one full stop
    import shutil

    for src, dst in (("a", "disk-a"), ("mlp-only", "disk-mlp")):  # only in the adapters folder: loaded for the combine
        shutil.copytree(made_by_peft[src], tiny_session.adapters_dir / dst)
    with pytest.raises(FtUsageError, match="same r"):
        tiny_session.combine_adapters({"disk-a": 0.5, "disk-mlp": 0.5}, "bad", method="linear")
    assert "disk-a" not in tiny_session.adapters and "disk-mlp" not in tiny_session.adapters  # as it found them
    assert "disk-a" in tiny_session.adapters_on_disk()
    assert tiny_session.combine_adapters({"a": 0.5, "mlp-only": 0.5}, "cat-mix", method="cat") == "cat-mix"
    assert tiny_session.adapters.active == "cat-mix"
    tiny_session.load_adapter(made_by_peft["b"], "b")
    before = logits(tiny_session.model)
    tiny_session.combine_adapters({"a": 0.5, "b": 0.5}, "ties-mix", method="ties")
    assert tiny_session.adapters.active == "ties-mix" and not torch.equal(logits(tiny_session.model), before)
    with pytest.raises(FtUsageError, match="already exists on disk"):
        tiny_session.unload_adapter("ties-mix")
        tiny_session.combine_adapters({"a": 0.5, "b": 0.5}, "ties-mix", method="ties")
    with pytest.raises(FtUsageError, match="did you mean 'svd'"):
        tiny_session.combine_adapters({"a": 1.0}, "x", method="svdd")
    with pytest.raises(FtUsageError, match="no adapter named 'zz'"):
        tiny_session.combine_adapters("a:0.5,zz:0.5", "y")


def test_dora_adapters_are_refused_by_combine_and_nothing_is_added(tiny_session, tiny_model_dir, tmp_path):
    """PEFT's add_weighted_adapter mixes A and B but not DoRA's magnitudes (demo model: the mix answered
    garbage); combining DoRA adapters is refused, and the model keeps only what it had."""
    for name, seed in (("da", 1), ("db", 2)):
        tiny_session.load_adapter(peft_adapter(tiny_model_dir, tmp_path / name, seed=seed, use_dora=True), name)
    with pytest.raises(FtUsageError, match="DoRA adapters .use_dora. do not combine"):
        tiny_session.combine_adapters({"da": 0.5, "db": 0.5}, "dmix")
    assert sorted(tiny_session.model.peft_config) == ["da", "db"] and "dmix" not in tiny_session.adapters.names()


def test_merge_then_unmerge_restores_base_exactly(tiny_session, tiny_model_dir, made_by_peft):
    import torch

    tiny_session.load_adapter(made_by_peft["a"], "a")
    tiny_session.load_adapter(made_by_peft["b"], "b")
    tiny_session.use("a")
    with_adapter = logits(tiny_session.model)
    weights = {n: (p.detach(), p.clone()) for n, p in tiny_session.model.named_parameters() if "lora_" not in n}
    tiny_session.merge_adapter("a")
    assert tiny_session.merged_adapter == "a"
    # merged into copies: the original tensors (which may be views into a mapped weights file) are not written
    assert all(torch.equal(p, copy) for p, copy in weights.values())
    changed = [n for n, p in tiny_session.model.get_base_model().named_parameters()
               if p.data_ptr() not in {w.data_ptr() for w, _ in weights.values()}]
    assert changed and all(".weight" in n for n in changed)
    assert torch.allclose(logits(tiny_session.model), with_adapter, atol=1e-4)  # merged = same function
    with pytest.raises(FtUsageError, match="unmerge first"):
        tiny_session.use("b")
    with pytest.raises(FtUsageError, match="unmerge first"):
        tiny_session.generate("hi", adapter="base", max_new_tokens=2)
    import shutil

    shutil.copytree(made_by_peft["b"], tiny_session.adapters_dir / "ondisk")  # in the adapters folder, not loaded
    for call in (lambda: tiny_session.use("ondisk"), lambda: tiny_session.generate("hi", adapter="ondisk")):
        # was "no adapter named 'ondisk' (did you mean 'ondisk'?)", listing it as on disk
        with pytest.raises(FtUsageError, match="cannot load adapter 'ondisk' while adapter 'a' is merged.*unmerge"):
            call()
    with pytest.raises(FtUsageError, match="cannot train while adapter 'a' is merged"):
        tiny_session.train("x", [{"text": "hello"}], {"max_steps": 1})
    assert tiny_session.unmerge_adapter() == "a"
    assert torch.equal(logits(tiny_session.model), with_adapter)
    assert {n: p.data_ptr() for n, p in tiny_session.model.named_parameters() if "lora_" not in n} == {
        n: w.data_ptr() for n, (w, _) in weights.items()}  # the very tensors are back
    tiny_session.use("base")
    assert torch.equal(logits(tiny_session.model), logits(pristine(tiny_model_dir)))
    with pytest.raises(FtUsageError, match="no adapter is merged"):
        tiny_session.unmerge_adapter()


def test_merge_refused_on_4bit_base(tiny_model_dir, made_by_peft, tmp_path):
    from ft_magics import Session

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(tiny_model_dir), bits=4, device="cpu")
    s.load_adapter(made_by_peft["a"], "a")
    with pytest.raises(FtUsageError, match="16- or 32-bit base.*export NAME DIR --merged"):
        s.merge_adapter("a")


def test_export_merged_loads_in_plain_transformers(tiny_session, made_by_peft, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_session.load_adapter(made_by_peft["a"], "a")
    want = logits(tiny_session.model)
    out = tiny_session.export_adapter("a", tmp_path / "merged", merged=True)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.allclose(logits(model), want, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template == tiny_session.tokenizer.chat_template
    # a folder not written by an export is never overwritten
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FtUsageError, match="not written by an export"):
        tiny_session.export_adapter("a", tmp_path / "precious", merged=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    # nor another adapter's folder: 'export one adapters/two' replaced the trained adapter two, silently
    trained = tiny_session.train("two", [{"prompt": "hi", "completion": "there"}] * 4, {"max_steps": 1},
                                 listeners=[])
    weights = (Path(trained.adapter_path) / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FtUsageError, match=r"not written by an export \(it holds a trained adapter\)"):
        tiny_session.export_adapter("a", trained.adapter_path)
    assert (Path(trained.adapter_path) / "adapter_model.safetensors").read_bytes() == weights
    # an earlier export is replaced, PEFT format or merged
    assert tiny_session.export_adapter("a", tmp_path / "merged", merged=True) == out
    peft_out = tiny_session.export_adapter("a", tmp_path / "peft")
    assert tiny_session.export_adapter("two", peft_out, overwrite=True) == peft_out  # another's: asked for


def test_an_adapter_already_merged_into_the_loaded_model_is_refused(tiny_session, made_by_peft, tmp_path):
    """Export --merged, load that model, ask for the same adapter again (by name from the adapters folder,
    or by path under another name): its update would count twice, silently. Refused, naming the way out;
    other adapters, and the same adapter on its own base, still load."""
    import json
    import shutil

    from ft_magics import Session

    s = tiny_session
    shutil.copytree(made_by_peft["a"], s.adapters_dir / "a")
    s.load_adapter(s.adapters_dir / "a", "a")
    out = s.export_adapter("a", tmp_path / "merged", merged=True)
    record = json.loads((out / "config.json").read_text())["ft_magics_merged"]
    assert [e["name"] for e in record] == ["a"] and len(record[0]["fingerprint"]) == 16

    m = Session(adapters_dir=s.adapters_dir)
    m.load(str(out), bits=32)
    with pytest.raises(FtUsageError, match=r"the adapter in .*a \('a', by its weights\) is already merged into the loaded model \(merged, exported .*--adapter base"):
        m.generate("hello", adapter="a", max_new_tokens=2)
    with pytest.raises(FtUsageError, match="already merged"):
        m.load_adapter(made_by_peft["a"], "renamed")  # the same weights under another name
    assert "a" not in m.adapters_on_disk(fitting=True) and m.adapters.names() == []
    from ft_magics import adapter_commands

    lines = []
    adapter_commands.run(m, ["list"], out=lines.append)
    assert any("already merged into merged (applied again, their update would count twice): a" in l for l in lines)
    assert not any("trained on another base model" in l for l in lines)
    assert m.generate("hello", adapter="base", max_new_tokens=2).new_tokens >= 1  # the session is intact
    m.load_adapter(made_by_peft["b"], "b")  # another adapter fits
    assert s.generate("hello", adapter="a", max_new_tokens=2).adapter == "a"  # and 'a' on its own base


def test_mismatched_adapter_refused_naming_why(tiny_session, tmp_path, made_by_peft):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    other_dir = tmp_path / "wide-llama"
    cfg = LlamaConfig(vocab_size=tiny_session.model.config.vocab_size, hidden_size=96, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(other_dir)
    wide = peft_adapter(other_dir, tmp_path / "wide")
    cfgjson = json.loads((wide / "adapter_config.json").read_text())
    assert cfgjson["base_model_name_or_path"]
    with pytest.raises(FtUsageError, match=r"layer model\.layers\.0\.self_attn\.q_proj is 64->64 here.*wide-llama"):
        tiny_session.load_adapter(wide, "wide")
    odd = tmp_path / "odd"
    shutil.copytree(made_by_peft["a"], odd)
    cfgjson = json.loads((odd / "adapter_config.json").read_text())
    cfgjson["target_modules"] = ["query_key_value"]
    (odd / "adapter_config.json").write_text(json.dumps(cfgjson))
    with pytest.raises(FtUsageError, match="targets module\\(s\\) query_key_value"):
        tiny_session.load_adapter(odd, "odd")
    assert "wide" not in tiny_session.adapters and "odd" not in tiny_session.adapters


def test_delete_only_inside_adapters_folder(tiny_session, made_by_peft, tmp_path):
    import shutil

    inside = tiny_session.adapters_dir / "a"
    shutil.copytree(made_by_peft["a"], inside)
    tiny_session.load_adapter(inside, "a")
    tiny_session.load_adapter(made_by_peft["b"], "b")  # lives outside the adapters folder
    assert tiny_session.delete_adapter("a") == str(inside.resolve())
    assert not inside.exists()
    assert tiny_session.delete_adapter("b") is None
    assert made_by_peft["b"].exists()


def test_swap_merge_generate_fail_clearly_while_training_holds_the_model(tiny_session, made_by_peft):
    tiny_session.load_adapter(made_by_peft["a"], "a")
    holding, release = threading.Event(), threading.Event()

    def fake_run():  # what _train_guarded does: hold the session lock for the whole run
        with tiny_session._lock:
            holding.set()
            release.wait(10)

    t = threading.Thread(target=fake_run)
    t.start()
    try:
        assert holding.wait(10)
        for call in (lambda: tiny_session.use("base"), lambda: tiny_session.merge_adapter("a"),
                     lambda: tiny_session.generate("hello", max_new_tokens=2),
                     lambda: tiny_session.combine_adapters("a:1", "c"),
                     lambda: tiny_session.serve([("a", "hi")])):
            with pytest.raises(FtUsageError, match="background training run is using the model"):
                call()
    finally:
        release.set()
        t.join()
    assert tiny_session.use("base") >= 0.0  # free again once the run ends


def test_fast_swaps_match_plain_peft_for_every_adapter(tiny_session, tiny_model_dir, made_by_peft):
    """activate() sets the LoRA layers' flags directly (sub-millisecond); outputs must equal PEFT's."""
    import torch
    from peft import PeftModel

    for name in ("a", "b", "mlp-only"):
        tiny_session.load_adapter(made_by_peft[name], name)
    want = {n: logits(PeftModel.from_pretrained(pristine(tiny_model_dir), str(made_by_peft[n])).eval())
            for n in ("a", "b", "mlp-only")}
    base = logits(pristine(tiny_model_dir))
    for name in ("b", "a", "base", "mlp-only", "a", "base", "b"):
        ms = tiny_session.use(name)
        assert ms < 50
        assert torch.equal(logits(tiny_session.model), base if name == "base" else want[name]), name
    assert tiny_session.model.active_adapter == "b"


def test_real_background_run_blocks_swap_merge_generate_until_it_ends(tiny_session, made_by_peft):
    """A real background %%lora_train run (tiny model), paused inside its first step boundary by a
    listener, holds the model: swap, merge and generate fail with the message; afterwards they work."""
    from conftest import pause_at_first_step

    tiny_session.load_adapter(made_by_peft["a"], "a")
    pause = pause_at_first_step()
    in_step, release = pause.in_step, pause.release

    rows = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(16)]
    thread = tiny_session.train("bg", rows, {"max_steps": 3, "batch_size": 4, "max_seq_len": 32, "r": 4},
                                listeners=[pause], background=True)
    try:
        assert in_step.wait(120), "the background run never reached its first step"
        assert tiny_session.training_in_progress and tiny_session.training_in_background == "bg"
        from ft_magics import adapter_commands

        lines = []
        adapter_commands.run(tiny_session, ["list"], out=lines.append)
        assert lines[0].startswith("training 'bg' in the background") and any(l.startswith("* a ") for l in lines)
        # the adapter being trained is named as such, not as unknown ("No adapters yet")
        with pytest.raises(FtUsageError, match="adapter 'bg' is training in the background; it is saved"):
            tiny_session.adapter_card("bg")
        with pytest.raises(FtUsageError, match="training 'bg' is in progress in the background; stop it first"):
            tiny_session.train("other", rows, {"max_steps": 1}, listeners=[])
        for what, call in (("switch adapters", lambda: tiny_session.use("base")),
                           ("merge an adapter", lambda: tiny_session.merge_adapter("a")),
                           ("generate", lambda: tiny_session.generate("hello", max_new_tokens=2))):
            with pytest.raises(FtUsageError, match=f"cannot {what} while a background training run"):
                call()
    finally:
        release.set()
        thread.join(120)
    assert not tiny_session.training_in_progress
    assert tiny_session.runs[-1].steps == 3 and "bg" in tiny_session.adapters
    assert tiny_session.generate("hello", adapter="a", max_new_tokens=2).adapter == "a"


def test_a_dotted_adapter_name_is_refused_with_a_fix_and_a_dotted_folder_loads_under_a_dotless_name(
        tiny_session, made_by_peft, tmp_path):
    """PEFT cannot hold '.' in an adapter name (its layer dictionaries refuse it): %%lora_train kb0.05 crashed
    inside PEFT with a KeyError after the data was read. Refused up front, naming a name that works."""
    import shutil

    s = tiny_session
    rows = [{"prompt": f"q{i}", "completion": "a"} for i in range(8)]
    with pytest.raises(FtUsageError, match=r"adapter name 'kb0.05' is not allowed \('.' cannot be part of one.*'kb0_05'"):
        s.train("kb0.05", rows, {"max_steps": 1, "batch_size": 2}, listeners=[])
    assert s.adapters.names() == [] and not hasattr(s.model, "peft_config")  # nothing attached
    dotted = tmp_path / "llama-3.1-lora"
    shutil.copytree(made_by_peft["a"], dotted)
    assert s.load_adapter(dotted) == "llama-3_1-lora"
    assert s.generate("hi", adapter="llama-3_1-lora", max_new_tokens=2).adapter == "llama-3_1-lora"


def test_a_loaded_adapter_keeps_the_files_exact_weights_and_its_reexport_is_still_refused_by_its_merge(
        tiny_model_dir, tmp_path):
    """On a 4-bit base with bf16 compute, PEFT's fast load (low_cpu_mem_usage) came back with every LoRA
    value rounded to bf16, and `export NAME DIR` of the loaded adapter wrote those values: a different file,
    whose hash no longer matched the one a merged export records, so the merged model took the adapter a
    second time (its update counted twice). Loading now keeps the file's values, the re-export holds the
    same weights, and the merged model refuses the re-export, and a bf16-rounded copy, by any name."""
    import torch
    from safetensors.torch import load_file, save_file

    from ft_magics import Session

    trained = Session(adapters_dir=tmp_path / "adapters")
    trained.load(str(tiny_model_dir), bits=4)
    assert trained.handle.dtype == torch.bfloat16
    trained.train("ev", "demo:support", {"max_steps": 2, "batch_size": 2, "r": 4, "learning_rate": 1e-2})
    saved = load_file(str(tmp_path / "adapters" / "ev" / "adapter_model.safetensors"))
    assert not all(torch.equal(v, v.bfloat16().float()) for v in saved.values())  # fp32 values, not bf16 ones

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(tiny_model_dir), bits=4)
    s.load_adapter(tmp_path / "adapters" / "ev", "ev")
    loaded = {n.replace(".ev.", "."): p.detach() for n, p in s.model.named_parameters() if ".ev." in n}
    assert set(saved) <= set(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())

    copy = s.export_adapter("ev", tmp_path / "peft")
    exported = load_file(str(copy / "adapter_model.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], v) for k, v in saved.items())
    rounded = tmp_path / "rounded"  # what an export by the earlier ft_magics wrote
    rounded.mkdir()
    for f in copy.iterdir():
        if f.is_file():
            (rounded / f.name).write_bytes(f.read_bytes())
    save_file({k: v.bfloat16().float() for k, v in saved.items()}, str(rounded / "adapter_model.safetensors"))

    merged = s.export_adapter("ev", tmp_path / "merged", merged=True)
    m = Session(adapters_dir=tmp_path / "elsewhere")
    m.load(str(merged), bits=32)
    for folder in (copy, rounded):
        with pytest.raises(FtUsageError, match="already merged"):
            m.load_adapter(folder, "again")
    assert m.adapters.names() == []


@pytest.mark.parametrize("weights", ["a:nan,b:1", "a:1e400,b:1", {"a": float("inf"), "b": 1.0}, "a:x,b:1"])
def test_combine_refuses_weights_that_are_not_finite_numbers(tiny_session, made_by_peft, weights):
    """'combine m1:nan,m2:1' saved an adapter of NaNs (its record held a bare NaN, not JSON) and made it active:
    generation then gave garbage without a word."""
    tiny_session.load_adapter(made_by_peft["a"], "a")
    tiny_session.load_adapter(made_by_peft["b"], "b")
    with pytest.raises(FtUsageError, match=r"for adapter 'a' is not a (finite )?number; write e\.g\. a:0\.7,b:0\.3"):
        tiny_session.combine_adapters(weights, "mix")
    assert "mix" not in tiny_session.adapters and not (tiny_session.adapters_dir / "mix").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_and_exported_adapters_have_the_modes_the_umask_gives(tiny_session, tmp_path, umask):
    """Atomic saves write into mkdtemp/mkstemp files (0700 / 0600) and safetensors writes its weights 0600: an
    adapter or export was unreadable to a server or another user although the umask allowed it. Every file and
    folder gets what an ordinary open/mkdir would give under the umask."""
    import os
    import stat

    old = os.umask(umask)
    try:
        tiny_session.train("x", [{"prompt": "hi", "completion": "there"}] * 4, {"max_steps": 1}, listeners=[])
        tiny_session.export_adapter("x", tmp_path / "exp")
        tiny_session.export_adapter("x", tmp_path / "merged", merged=True)
    finally:
        os.umask(old)
    for root in (tiny_session.adapters_dir / "x", tmp_path / "exp", tmp_path / "merged"):
        for p in [root, *root.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(stat.S_IMODE(p.stat().st_mode)))


def test_a_plain_export_keeps_the_run_record(tiny_session, tmp_path):
    """A plain export wrote only {name, exported_from} as its record: loaded again it listed steps=- loss=-."""
    run = tiny_session.train("x", [{"prompt": "hi", "completion": "there"}] * 4, {"max_steps": 2}, listeners=[])
    out = tiny_session.export_adapter("x", tmp_path / "exp")
    record = json.loads((out / "ft_run.json").read_text())
    assert record["steps"] == 2 and record["final_loss"] == run.record["final_loss"]
    assert record["exported_from"] == str(tiny_session.adapters_dir.resolve() / "x")
    tiny_session.load_adapter(out, "again")
    info = tiny_session.adapters.require("again")
    assert info.steps == 2 and info.final_loss == run.record["final_loss"]
    # an export may replace its own earlier export, but not under an adapter loaded from that folder
    with pytest.raises(FtUsageError, match="is where adapter 'again' was loaded from"):
        tiny_session.export_adapter("x", tmp_path / "exp")
    tiny_session.unload_adapter("again")
    assert tiny_session.export_adapter("x", tmp_path / "exp") == out


def test_an_output_folder_that_is_a_file_is_named_as_such(tiny_session, tmp_path):
    (tmp_path / "afile").write_text("x")
    for where in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(FtUsageError, match=r"afile is a file, not a folder\. Give a folder's path"):
            tiny_session.train("x", [{"prompt": "hi", "completion": "there"}] * 4, {"max_steps": 1},
                               output_dir=where, listeners=[])


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_combining_rslora_adapters_gives_the_weighted_sum_of_their_updates(tiny_session, tiny_model_dir, tmp_path,
                                                                           method):
    """PEFT's combination copies the first adapter's config, use_rslora included, onto a result whose matrices
    already hold each adapter's scaling: the result was scaled by sqrt(r) once more (a copy at weight 1 scored
    another loss than its source). Now the combined update is exactly the weighted sum, and it saves as such."""
    import torch
    from peft import PeftModel

    a = peft_adapter(tiny_model_dir, tmp_path / "rs-a", seed=4, r=8, use_rslora=True)
    b = peft_adapter(tiny_model_dir, tmp_path / "rs-b", seed=5, r=8, use_rslora=True)
    tiny_session.load_adapter(a, "rs-a")
    tiny_session.load_adapter(b, "rs-b")
    model = tiny_session.model
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    want = 0.7 * layer.get_delta_weight("rs-a") + 0.3 * layer.get_delta_weight("rs-b")
    if method == "linear":  # linear mixes A and B separately: exact for one adapter only
        want = layer.get_delta_weight("rs-a")
        tiny_session.combine_adapters({"rs-a": 1.0}, "mix", method=method)
    else:
        tiny_session.combine_adapters({"rs-a": 0.7, "rs-b": 0.3}, "mix", method=method)
    torch.testing.assert_close(layer.get_delta_weight("mix"), want, rtol=1e-5, atol=1e-6)
    assert model.peft_config["rs-a"].use_rslora  # the source keeps its own setting
    ours = logits(model)
    theirs = logits(PeftModel.from_pretrained(pristine(tiny_model_dir), str(tiny_session.adapters_dir / "mix")).eval())
    torch.testing.assert_close(ours, theirs)


def test_adapters_whose_weights_are_not_finite_are_refused_before_they_break_answers(tiny_session, tiny_model_dir,
                                                                                     made_by_peft, tmp_path):
    """An adapter holding a NaN loaded without a word: greedy answers were empty, sampling ended in torch's
    'probability tensor contains either inf, nan', and %lora_eval called a loss of nan 'general text got
    better'. A combination with a weight like 1e30 overflowed the same way. Both are now refused, leaving
    nothing behind; a NaN model's sampling error names the cause, and the eval verdict says the loss is nan."""
    import torch
    from safetensors.torch import load_file, save_file

    from ft_magics.core.evaluation import EvalReport
    from ft_magics.core.inference import Sampling, generate

    bad = tmp_path / "nan-adapter"
    import shutil

    shutil.copytree(made_by_peft["a"], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(FtUsageError, match=r"not finite numbers \(NaN or inf\) in 1 tensor"):
        tiny_session.load_adapter(bad, "nan")
    assert "nan" not in tiny_session.adapters and not hasattr(tiny_session.model, "peft_config")

    tiny_session.load_adapter(made_by_peft["a"], "a")
    tiny_session.load_adapter(made_by_peft["b"], "b")
    with pytest.raises(FtUsageError, match="the combination 'big' overflows"):
        tiny_session.combine_adapters("a:1e38,b:1e38", "big", method="cat")
    assert "big" not in tiny_session.adapters and "big" not in tiny_session.model.peft_config
    assert not (tiny_session.adapters_dir / "big").exists()

    model = tiny_session.model
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".a." in key:
                p.fill_(float("nan"))  # as a diverged run leaves it
    tiny_session.use("a")
    with pytest.raises(FtUsageError, match="next-token probabilities are not finite"):
        generate(model, tiny_session.handle.tokenizer, "hi", sampling=Sampling(temperature=0.7, max_new_tokens=3),
                 adapter_label="a")

    report = EvalReport(columns=["base", "a"], sets=["general text"])
    report.results = {("general text", "base"): (2.0, 7.4, 10), ("general text", "a"): (float("nan"), float("nan"), 10)}
    assert "the loss is not a number" in report.to_text()


@pytest.mark.parametrize("name", ["a", "lo"])
def test_an_adapter_named_like_part_of_lora_trains_saves_and_reloads_the_same_without_an_alarm(tiny_model_dir, tmp_path,
                                                                                             name):
    """PEFT warned that an adapter named 'a' (any part of 'lora_') "may be reinitialised during loading": it is
    not, here. It reloads in a fresh session and in plain PEFT with the outputs it had, and nothing warns."""
    import torch
    from peft import PeftModel

    from ft_magics import Session

    import warnings

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(tiny_model_dir), bits=32)
    with warnings.catch_warnings():
        s.train(name, [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(8)],
                {"max_steps": 3, "learning_rate": 1e-2}, listeners=[])
        before = logits(s.model)
        fresh = Session(adapters_dir=tmp_path / "adapters")
        fresh.load(str(tiny_model_dir), bits=32)
        fresh.load_adapter(tmp_path / "adapters" / name, name)
    torch.testing.assert_close(logits(fresh.model), before)
    theirs = PeftModel.from_pretrained(pristine(tiny_model_dir), str(tmp_path / "adapters" / name)).eval()
    torch.testing.assert_close(logits(theirs), before)
    assert not torch.equal(before, logits(pristine(tiny_model_dir)))
    # (pytest resets warning filters per test: whether the alarm shows is checked as a notebook would run it)
    import subprocess
    import sys

    script = (f"from ft_magics import Session\ns = Session(adapters_dir={str(tmp_path / 'again')!r})\n"
              f"s.load({str(tiny_model_dir)!r}, bits=32)\n"
              f"s.train({name!r}, [{{'prompt': 'q', 'completion': 'a'}}] * 4, {{'max_steps': 1}}, listeners=[])\n"
              f"s.load_adapter({str(tmp_path / 'adapters' / name)!r}, 'x')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "should not be contained in the prefix" not in proc.stderr


@pytest.mark.parametrize("bad", ["1", "mlp", "layers", "q_proj"])
def test_a_name_that_is_part_of_the_layer_paths_is_refused_before_it_can_spoil_other_adapters(tiny_model_dir, tmp_path,
                                                                                              bad):
    """PEFT drops every saved key holding '.NAME.' of another loaded adapter: with an adapter named '1' (or 'mlp')
    in the session, every adapter saved afterwards lacked layer 1's (the MLP's) weights, and loaded without a word."""
    from safetensors import safe_open

    from ft_magics.session import Session

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(tiny_model_dir), bits=32)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]
    cfg = dict(max_steps=1, batch_size=2, r=4, max_seq_len=32)
    with pytest.raises(FtUsageError, match=rf"adapter name '{bad}' is also part of the model's layer names \("):
        s.train(bad, rows, cfg)
    ok = s.train("bot", rows, cfg)
    with safe_open(str(tmp_path / "adapters" / "bot" / "adapter_model.safetensors"), "pt") as f:
        layers = {k.split("layers.")[1].split(".")[0] for k in f.keys()}
    assert ok.status == "completed" and layers == {"0", "1"}  # the tiny model's two layers, both saved
    with pytest.raises(FtUsageError, match="is also part of the model's layer names"):
        s.load_adapter(str(tmp_path / "adapters" / "bot"), name=bad)
    s.train("bot", rows, cfg)  # an adapter's own name is no layer name: retraining it is fine


def _raise_on_call(monkeypatch, owner, attr, nth):
    """``owner.attr`` raises KeyboardInterrupt (an interrupt landing there) on its ``nth`` call."""
    real, calls = getattr(owner, attr), {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(owner, attr, wrapper)
    return lambda: monkeypatch.setattr(owner, attr, real)


def _lora_layer_count(model):
    return sum(1 for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A"))


def test_an_interrupted_first_load_or_attach_leaves_the_bare_base(tiny_session, made_by_peft, monkeypatch):
    """An interrupt inside PEFT's wrap of the base (the first adapter loaded, or the first trained) left its LoRA
    layers in the base's own modules: the 'base' answered as the adapter, and the name was blocked for good."""
    import torch
    from peft.tuners.lora.model import LoraModel

    import ft_magics.core.adapters as adapters

    s = tiny_session
    base = logits(s.model)
    undo = _raise_on_call(monkeypatch, adapters, "load_exact", 1)
    with pytest.raises(KeyboardInterrupt):
        s.load_adapter(made_by_peft["a"], "a")
    undo()
    assert _lora_layer_count(s.model) == 0 and not hasattr(s.model, "peft_config") and "a" not in s.adapters
    assert torch.equal(logits(s.model), base)
    rows = [{"prompt": f"q{i}?", "completion": f"answer {i}."} for i in range(8)]
    cfg = {"max_steps": 1, "batch_size": 4, "r": 4, "max_seq_len": 32}
    undo = _raise_on_call(monkeypatch, LoraModel, "_create_and_replace", 3)
    with pytest.raises(KeyboardInterrupt):
        s.train("f1", rows, cfg, listeners=[])
    undo()
    assert _lora_layer_count(s.model) == 0 and not hasattr(s.model, "peft_config") and torch.equal(logits(s.model), base)
    assert s.train("f1", rows, cfg, listeners=[]).status == "completed"  # the name is free, the base clean
    trained = logits(s.model)
    # retrained under its name (the only adapter), interrupted while the new one attaches: the old one was
    # dropped first; it is loaded again from its folder, active as it was (it was listed, answering as the bare
    # base; then it was left unloaded, the base active, under 'the adapters are as they were')
    undo = _raise_on_call(monkeypatch, LoraModel, "_create_and_replace", 3)
    with pytest.raises(KeyboardInterrupt):
        s.train("f1", rows, dict(cfg, seed=7), listeners=[])
    undo()
    assert "f1" in s.adapters and s.adapters.active == "f1" and torch.equal(logits(s.model), trained)
    s.use(None)
    assert torch.equal(logits(s.model), base)


def test_an_interrupted_merge_puts_every_layer_back(tiny_session, made_by_peft, monkeypatch):
    """An interrupt after some layers merged left them merged while the session said nothing was: the adapter's
    answers were garbage and unmerge refused ('no adapter is merged')."""
    import torch
    from peft.tuners.lora.layer import Linear

    s = tiny_session
    s.load_adapter(made_by_peft["a"], "a")
    s.load_adapter(made_by_peft["b"], "b")
    s.use("a")
    before = logits(s.model)
    weights = {n: p.detach().clone() for n, p in s.model.named_parameters() if "lora_" not in n}
    undo = _raise_on_call(monkeypatch, Linear, "merge", 4)
    with pytest.raises(KeyboardInterrupt):
        s.merge_adapter("b")
    undo()
    assert s.merged_adapter is None and not any(getattr(m, "merged_adapters", []) for m in s.model.modules())
    after = {n: p.detach() for n, p in s.model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(weights[n], after[n]) for n in weights)  # bit for bit
    s.use("a")
    assert torch.equal(logits(s.model), before)
    s.merge_adapter("b")  # and a merge runs through afterwards
    assert s.merged_adapter == "b"


def test_loading_a_file_as_an_adapter_says_it_is_a_file(tiny_session, tmp_path):
    (tmp_path / "mydata.jsonl").write_text("{}\n")
    with pytest.raises(FtUsageError, match=r"mydata\.jsonl is a file, not an adapter folder"):
        tiny_session.load_adapter(tmp_path / "mydata.jsonl")


def test_rename_moves_folder_record_checkpoints_and_keeps_the_adapter_active_with_its_weights(tiny_session, made_by_peft,
                                                                                          tmp_path):
    import shutil

    from ft_magics.core.checkpoints import checkpoint_root

    s = tiny_session
    run = s.train("x", [{"prompt": "hi", "completion": "there"}] * 4, {"max_steps": 2}, listeners=[])
    s.load_adapter(made_by_peft["b"], "b")  # outside the adapters folder
    s.use("x")
    before = logits(s.model)
    stale = checkpoint_root(s.adapters_dir, "x")
    (stale / "checkpoint-1").mkdir(parents=True)  # what a stopped run leaves for --resume
    assert s.rename_adapter("x", "y") == str((s.adapters_dir / "y").resolve())
    assert not (s.adapters_dir / "x").exists() and (s.adapters_dir / "y" / "adapter_config.json").exists()
    assert json.loads((s.adapters_dir / "y" / "ft_run.json").read_text())["name"] == "y"
    assert (checkpoint_root(s.adapters_dir, "y") / "checkpoint-1").is_dir() and not stale.exists()
    info = s.adapters.require("y")
    assert "x" not in s.adapters and s.adapters.active == "y" and info.origin == "trained"
    assert info.steps == 2 and info.final_loss == run.record["final_loss"]
    assert torch_equal(logits(s.model), before)  # the same weights answer, under the new name
    assert "x" not in s.model.peft_config and "y" in s.model.peft_config
    # an adapter loaded from elsewhere is renamed in memory; its folder keeps its name
    assert s.rename_adapter("b", "c") is None and made_by_peft["b"].is_dir() and "c" in s.adapters
    assert s.adapters.active == "y"
    # refusals name the cause; nothing moves
    with pytest.raises(FtUsageError, match="'c' exists|loaded under that name"):
        s.rename_adapter("y", "c")
    with pytest.raises(FtUsageError, match="no adapter named 'nope'"):
        s.rename_adapter("nope", "z")
    with pytest.raises(FtUsageError, match="not allowed"):
        s.rename_adapter("y", "a.b")
    (checkpoint_root(s.adapters_dir, "cut") / "checkpoint-3").mkdir(parents=True)  # a killed run of 'cut'
    with pytest.raises(FtUsageError, match=r"a cut-short run of 'cut' left checkpoints in .*--resume continues it"):
        s.rename_adapter("y", "cut")
    assert (checkpoint_root(s.adapters_dir, "y") / "checkpoint-1").is_dir() and (s.adapters_dir / "y").is_dir()
    shutil.copytree(made_by_peft["a"], s.adapters_dir / "taken")  # on disk, not loaded
    with pytest.raises(FtUsageError, match="exists"):
        s.rename_adapter("y", "taken")
    assert (s.adapters_dir / "y").is_dir() and s.adapters.active == "y"
    # on disk only (after a restart): the folder is renamed, nothing is loaded
    assert s.rename_adapter("taken", "free") == str((s.adapters_dir / "free").resolve()) and "free" not in s.adapters


def test_a_rename_that_fails_midway_puts_everything_back(tiny_session, monkeypatch):
    from ft_magics.core import adapters

    s = tiny_session
    s.train("x", [{"prompt": "hi", "completion": "there"}] * 4, {"max_steps": 2}, listeners=[])
    before = logits(s.model)
    record = (s.adapters_dir / "x" / "ft_run.json").read_text()
    undo = _raise_on_call(monkeypatch, adapters, "load_folder", 1)  # the reload under the new name
    with pytest.raises(KeyboardInterrupt):
        s.rename_adapter("x", "y")
    undo()
    assert (s.adapters_dir / "x" / "ft_run.json").read_text() == record and not (s.adapters_dir / "y").exists()
    assert s.adapters.active == "x" and "y" not in s.adapters and "y" not in s.model.peft_config
    assert torch_equal(logits(s.model), before)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
