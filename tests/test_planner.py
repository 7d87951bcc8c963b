"""Memory planner (ft_magics/core/planner.py) and %ft_plan."""
from __future__ import annotations

import json
import re
import sys

import pytest

from ft_magics.core import planner
from ft_magics.errors import FtUsageError


def test_seed_70b_table_reproduced():
    p = planner.plan("meta-llama/Llama-2-70b-hf", seq_len=512, batch_size=1)
    n = p.dims.params
    q = p.mode("QLoRA, NF4 + double quant")
    lora = p.mode("LoRA, 16-bit base")
    full = p.mode("full fine-tuning (bf16 + AdamW)")
    # the seed's figures are weights (+ grads for full) at 16 / 4 bits
    assert abs(lora.weights / 1e9 - 140) < 5
    assert abs(q.weights / 1e9 - 36) < 2
    assert abs((full.weights + 2 * n) / 1e9 - 280) < 10  # weights + 16-bit grads
    assert full.total > 3.5 * 280e9  # with Adam states and a master copy it is ~16 B/param
    text = planner.seed_comparison(p)
    assert "280" in text and "140" in text and "36" in text


def test_nf4_double_quant_bits():
    assert abs(planner.NF4_BITS - 4.127) < 1e-3


def test_parameter_count_and_folder_and_errors(tiny_model_dir):
    d = planner.resolve_model("7B")
    assert d.params == 7e9 and d.hidden == 4096 and 30 <= d.layers <= 36
    folder = planner.resolve_model(str(tiny_model_dir))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert folder.hidden == cfg["hidden_size"] and folder.layers == cfg["num_hidden_layers"]
    # parameter count from config matches the real model
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert abs(folder.params - real) / real < 0.01
    assert planner.resolve_model("demo").vocab == 49152
    assert planner.resolve_model("Llama-2-7b-hf").layers == 32
    with pytest.raises(FtUsageError, match="did you mean"):
        planner.resolve_model("meta-llama/Llama-2-7b-hg")
    with pytest.raises(FtUsageError):
        planner.resolve_model("12")


def test_hub_ids_of_current_models_and_cached_configs_resolve(tmp_path, monkeypatch):
    """%ft_plan meta-llama/Llama-3.1-8B was "unknown model"; a hub model in the local cache is planned from its
    own config; a head width other than hidden / heads (Qwen3, Gemma) is counted as it is."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM, Qwen3Config

    for name, layers, entry in (("meta-llama/Llama-3.1-8B-Instruct", 32, "meta-llama/Llama-3.1-8B"),
                                ("Qwen/Qwen2.5-14B-Instruct", 48, "Qwen/Qwen2.5-14B"),
                                ("gemma-2-9b-it", 42, "google/gemma-2-9b"), ("Llama-3.2-1B", 16, None)):
        d = planner.resolve_model(name)  # a variant keeps its name and says whose shape it is planned with
        assert d.layers == layers and d.source == "built-in table" + (f", the shape of {entry}" if entry else ""), name
    cfg = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    snap = tmp_path / "models--someone--tiny-qwen3" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(cfg.to_json_string())
    (tmp_path / "models--someone--tiny-qwen3" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-qwen3" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    d = planner.resolve_model("someone/tiny-qwen3")
    assert d.source == "its config in the local Hugging Face cache" and d.head_dim == 32 and d.q_width == 128
    assert abs(d.params - real) / real < 0.01  # q and o are 64 x 128 here, not 64 x 64
    with pytest.raises(FtUsageError, match="unknown model"):
        planner.resolve_model("someone/not-cached")


def test_known_table_param_counts_consistent():
    """The built-in parameter counts agree with what their shapes imply (catches typos in the table)."""
    for name in planner.KNOWN_MODELS:
        d = planner.resolve_model(name)
        shape_params = d.body_linear_params + d.embed_params
        assert abs(shape_params - d.params) / d.params < 0.03, name


def test_gradient_checkpointing_and_chunked_loss_lower_activations():
    base = planner.plan("demo", seq_len=512, batch_size=8)
    ckpt = planner.plan("demo", seq_len=512, batch_size=8, gradient_checkpointing=True)
    std = planner.plan("demo", seq_len=512, batch_size=8, chunked_loss=False)
    q = "QLoRA, NF4 + double quant"
    assert ckpt.mode(q).activations < base.mode(q).activations < std.mode(q).activations


def test_ft_plan_magic(shell, capsys):
    shell.run_line_magic("ft_plan", "7B --seq-len 1024 --batch-size 2")
    out = capsys.readouterr().out
    assert "QLoRA" in out and "ESTIMATES" in out and "seq_len 1024" in out
    shell.run_line_magic("ft_plan", "meta-llama/Llama-2-70b-hf")
    assert "The often-quoted 70B table" in capsys.readouterr().out
    from IPython.core.error import UsageError

    with pytest.raises(UsageError):
        shell.run_line_magic("ft_plan", "no-such-model-xyz")
    with pytest.raises(UsageError, match="--r must be a positive LoRA rank"):  # it planned a rank-0 adapter
        shell.run_line_magic("ft_plan", "7B --r 0")
    shell.run_line_magic("ft_plan", "400B")
    assert "often-quoted 70B table" not in capsys.readouterr().out  # the seed's comparison is of a 70B model only


def test_an_8bit_optimizer_is_planned_at_10_bytes_per_trained_parameter(shell, capsys):
    from ft_magics.config import TrainConfig
    from ft_magics.core import planner

    fp32, q8 = planner.plan("7B"), planner.plan("7B", optimizer="adamw_8bit")
    lora = fp32.dims.lora_params(16)
    for mode in ("LoRA, 16-bit base", "QLoRA, NF4 + double quant"):
        assert (fp32.mode(mode).adapter_optimizer, q8.mode(mode).adapter_optimizer) == (16 * lora, 10 * lora)
    full = "full fine-tuning (bf16 + AdamW)"
    assert (fp32.mode(full).adapter_optimizer, q8.mode(full).adapter_optimizer) == (14 * fp32.dims.params,
                                                                                     8 * fp32.dims.params)
    shell.run_line_magic("ft_plan", "7B --optimizer adamw_8bit")
    out = capsys.readouterr().out
    assert "optimizer adamw_8bit" in out and "adapter 10 B/adapter param (fp32 w, grad, 8-bit Adam m,v 2)" in out
    # training's own check counts the same bytes as the planner
    assert planner.adapter_bytes(TrainConfig(optimizer="adamw_8bit").optimizer) == 10
    assert planner.adapter_bytes(TrainConfig().optimizer) == 16


def test_session_plan_loads_nothing():
    from ft_magics import Session

    s = Session()
    p = s.plan("Qwen2.5-0.5B", seq_len=128, batch_size=1)
    assert p.dims.name == "Qwen/Qwen2.5-0.5B" and s.handle is None if hasattr(s, "handle") else True


def test_load_ext_is_fast_and_torch_free(tmp_path):
    """A generous bound here; the 0.3 s goal itself is timed in the benchmark."""
    import subprocess

    code = ("import time; from IPython.core.interactiveshell import InteractiveShell; sh = InteractiveShell.instance();"
            "t = time.perf_counter(); sh.run_line_magic('load_ext', 'ft_magics'); dt = time.perf_counter() - t;"
            "import sys; print(dt, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    dt, torch_loaded = out.stdout.split()
    assert torch_loaded == "False"
    assert float(dt) < 2.0


def test_each_optimizer_is_planned_at_the_state_it_keeps(tmp_path):
    """%ft_plan --optimizer counted Adafactor, SGD, Lion and RMSprop as AdamW (8 bytes of state per trained
    parameter). Each optimizer the `optimizer` setting takes, made as the Trainer makes it and stepped once on
    LoRA-shaped matrices, keeps what the planner says (8-bit states carry a small absmax on top)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from ft_magics.config import OPTIMIZERS

    for name in OPTIMIZERS:
        args = TrainingArguments(output_dir=str(tmp_path), optim="adamw_torch_fused" if name == "adamw" else name,
                                 use_cpu=True, report_to="none")
        cls, kw = Trainer.get_optimizer_cls_and_kwargs(args)
        params = [torch.nn.Parameter(torch.randn(16, 576)), torch.nn.Parameter(torch.randn(576, 16))]
        opt = cls(params, **kw)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        kept = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                   if torch.is_tensor(t) and t.numel() > 1) / sum(p.numel() for p in params)
        assert abs(kept - planner.optimizer_states(name)[0]) <= 0.3, (name, kept)
    lora = planner.resolve_model("7B").lora_params(16)
    assert planner.plan("7B", optimizer="sgd").mode("LoRA, 16-bit base").adapter_optimizer == 8 * lora
    assert "SGD: no state 0" in planner.plan("7B", optimizer="sgd").table()


def test_what_fits_in_a_given_memory_and_at_which_batch(shell, capsys):
    """--memory: per mode, the first of (smaller batch with grad_accum, down to 2; then checkpointing) whose
    planned total fits; the advice's settings must fit and the plan's own batch without them must not."""
    from IPython.core.error import UsageError

    assert planner.parse_memory("24GB") == 24e9 and planner.parse_memory("16GiB") == 16 * 2**30
    assert planner.parse_memory("80") == 80e9 and planner.parse_memory("512 MB") == 512e6
    for bad in ("lots", "0", "-3GB", "24 apples"):
        with pytest.raises(FtUsageError, match="--memory"):
            planner.parse_memory(bad)

    p = planner.plan("8B", seq_len=512, batch_size=8)
    text = p.fit_text(24e9)
    lines = {line.split(":")[0].strip(): line for line in text.splitlines()[1:]}
    full, lora, qlora = (lines[m.mode] for m in p.modes)
    assert "does not fit, even at batch 1" in full and "or QLoRA" in full
    assert "fits at batch 8 with gradient checkpointing" in lora
    assert "fits at batch 4," in qlora and "batch_size: 4, grad_accum: 2: 8 examples per step" in qlora

    def total(mode, batch, ckpt):
        return planner.plan("8B", seq_len=512, batch_size=batch, gradient_checkpointing=ckpt).mode(mode).total

    lm, qm = p.modes[1].mode, p.modes[2].mode
    assert total(lm, 8, True) <= 24e9 < min(total(lm, 8, False), total(lm, 4, False), total(lm, 2, False))
    assert total(qm, 4, False) <= 24e9 < total(qm, 8, False)
    assert "fits at batch 8, " in planner.plan("8B").fit_text(1e12)  # plenty: the plan as it is

    shell.run_line_magic("ft_plan", "8B --memory 24GB")
    out = capsys.readouterr().out
    assert "In 24.0 GB:" in out and "grad_accum: 2" in out
    shell.run_line_magic("ft_plan", "8B --memory 10MB")
    assert "In 10.0 MB:" in capsys.readouterr().out  # it said "In 0.0 GB"
    with pytest.raises(UsageError, match="--memory 'lots' is not a size"):
        shell.run_line_magic("ft_plan", "8B --memory lots")
    assert capsys.readouterr().out == ""  # refused before the table was printed
    shell.run_line_magic("ft_plan", "demo --memory here")
    mem, where = planner.memory_here()  # the GPU's memory where there is one, else the RAM
    assert f"In {mem / 1e9:.1f} GB ({where}):" in capsys.readouterr().out


def test_a_partial_model_name_is_answered_with_the_models_that_hold_it():
    with pytest.raises(FtUsageError, match=r"unknown model 'mistral' \(did you mean 'mistralai/Mistral-7B-v0.1' or "
                       r"'mistralai/Mistral-7B-Instruct-v0.2' or 'mistralai/Mistral-7B-v0.3'\?\)"):
        planner.resolve_model("mistral")


def test_a_preference_run_is_planned_at_two_rows_per_pair_and_dpo_full_keeps_a_reference(shell, capsys):
    """objective: dpo / orpo put each pair's two sides in the batch: the activations of twice the batch. DPO's
    reference model is a second frozen copy under full fine-tuning only; under LoRA / QLoRA it is the base
    itself with the adapter off, as core.preference runs it."""
    from ft_magics.core import planner

    sft, dpo, orpo, double = (planner.plan("7B", objective="sft"), planner.plan("7B", objective="dpo"),
                              planner.plan("7B", objective="orpo"), planner.plan("7B", batch_size=16))
    full, lora, q = "full fine-tuning (bf16 + AdamW)", "LoRA, 16-bit base", "QLoRA, NF4 + double quant"
    for mode in (full, lora, q):
        assert dpo.mode(mode).activations == orpo.mode(mode).activations == double.mode(mode).activations
        assert dpo.mode(mode).activations > sft.mode(mode).activations
    assert dpo.mode(full).weights == sft.mode(full).weights + 2 * sft.dims.params  # the frozen reference
    assert orpo.mode(full).weights == sft.mode(full).weights  # no reference
    assert dpo.mode(lora).weights == sft.mode(lora).weights and dpo.mode(q).weights == sft.mode(q).weights
    assert "fits at" in dpo.fit_text(200e9) and dpo.fit_text(40e9) != sft.fit_text(40e9)
    shell.run_line_magic("ft_plan", "7B --objective dpo")
    out = capsys.readouterr().out
    assert "objective dpo (each pair is two rows" in out and "a second, frozen bf16 copy" in out
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="invalid choice"):
        shell.run_line_magic("ft_plan", "7B --objective kto")


MIXTRAL_8X7B = {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 32000}


def test_a_mixture_of_experts_counts_every_expert_in_memory_and_the_routed_ones_in_activations(tmp_path, shell, capsys):
    """Mixtral-8x7B's config was planned as a dense 7.24B model (its MLP once, not eight times): it has 46.7B
    parameters, ~24 GB in NF4. Weights and the all-linear adapter count every expert; activations the routed ones.
    A dense config's figures are as before."""
    folder = tmp_path / "mixtral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    d = planner.resolve_model(str(folder))
    assert abs(d.params - 46.7e9) / 46.7e9 < 0.02
    p = planner.plan(d, seq_len=512, batch_size=1)
    assert 23e9 < p.mode("QLoRA, NF4 + double quant").weights < 26e9
    dense_cfg = {k: v for k, v in MIXTRAL_8X7B.items() if "expert" not in k} | {"model_type": "mistral"}
    dense = planner.dims_from_config(dense_cfg, "mistral")
    assert dense.params == 7_241_732_096 and dense.lora_params(16) == 41_943_040  # Mistral-7B, as before
    dense_plan = planner.plan(dense, seq_len=1024, batch_size=2, lora_dropout=True)
    assert [(m.weights, m.adapter_optimizer, m.activations) for m in dense_plan.modes] == [
        (14483464192, 101384249344, 13808697344), (14483464192, 671088640, 20828323840),
        (4124842113.0, 671088640, 20828323840)]
    assert [m.activations for m in planner.plan(dense, seq_len=1024, batch_size=2, gradient_checkpointing=True).modes] \
        == [1603272704, 960200704, 960200704]  # checkpointed: 64-row loss chunks
    # the adapter: r * (3h + 5 * width) per expert (PEFT's fused gate_up at rank 2r, down at r) and the router
    h, i, r = 4096, 14336, 16
    assert d.lora_params(r) - dense.lora_params(r) == 32 * (8 * r * (3 * h + 5 * i) + r * (h + 8) - 3 * r * (h + i))
    # activations: the two routed experts' MLPs, each with its copy of the input, and the router's 8 logits
    lora = "LoRA, 16-bit base"
    moe_act, dense_act = (planner.plan(x, seq_len=512, batch_size=1, chunked_loss=False).mode(lora).activations
                          for x in (d, dense))
    assert moe_act - dense_act == 512 * 32 * 2 * (4 * i + h + 8)
    shell.run_line_magic("ft_plan", str(folder))
    out = capsys.readouterr().out
    assert "46.7B parameters" in out and "8 experts of width 14336 in each of 32 layers" in out
    assert "activations count the 2 routed to each token (num_experts_per_tok)" in out


def test_moe_configs_match_the_real_models_and_peft_adapters():
    """Tiny Mixtral, Qwen3-MoE and OLMoE built by transformers: the planner's parameter count is the model's and
    its adapter size PEFT's all-linear one. Full-size Qwen-MoE (shared expert) and DeepSeek-V3 (shared experts,
    first layers dense) configs give their published sizes; a config without experts-per-token says what it assumed."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    small = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_experts_per_tok=2)
    for cfg in (MixtralConfig(intermediate_size=96, num_local_experts=4, **small),
                Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, head_dim=32, num_experts=4, **small),
                OlmoeConfig(intermediate_size=48, num_experts=4, **small)):
        model = AutoModelForCausalLM.from_config(cfg)
        real = sum(p.numel() for p in model.parameters())
        d = planner.dims_from_config(cfg.to_dict(), cfg.model_type)
        assert d.moe_layers == 2 and d.experts == 4 and abs(d.params - real) / real < 0.005, cfg.model_type
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        assert d.lora_params(4) == sum(p.numel() for p in adapter.parameters() if p.requires_grad), cfg.model_type

    qwen_moe = planner.dims_from_config(dict(  # Qwen1.5-MoE-A2.7B: 14.3B
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=5632, num_experts=60,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts_per_tok=4, vocab_size=151936))
    assert abs(qwen_moe.params - 14.3e9) / 14.3e9 < 0.02 and qwen_moe.mlp_active(True) == (5, 4 * 1408 + 5632)
    deepseek = planner.dims_from_config(dict(  # DeepSeek-V3: 671B (without its multi-token-prediction layer)
        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1, vocab_size=129280))
    assert abs(deepseek.params - 671e9) / 671e9 < 0.02 and (deepseek.moe_layers, deepseek.dense_layers) == (58, 3)
    assert "3 dense layers" in deepseek.experts_text() and "shared experts of width 2048" in deepseek.experts_text()
    unsure = planner.dims_from_config({k: v for k, v in MIXTRAL_8X7B.items() if k != "num_experts_per_tok"})
    assert unsure.experts_per_token == 2 and "assumed" in unsure.experts_text()


def test_an_unreadable_config_json_is_a_usage_error_that_names_the_file_and_the_fix(tmp_path, shell):
    """An invalid config.json gave a JSONDecodeError traceback, one without the sizes a TypeError (int(None))."""
    from IPython.core.error import UsageError

    broken, partial, wordy = tmp_path / "broken", tmp_path / "partial", tmp_path / "wordy"
    for folder, text in ((broken, '{"model_type": "llama",'), (partial, '{"model_type": "llama"}'),
                         (wordy, json.dumps(MIXTRAL_8X7B | {"hidden_size": "big"}))):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    with pytest.raises(UsageError, match=r"broken/config.json is not valid JSON \(.* at line 1, column 24\)\. "
                                         r"Fix the file, or plan from a parameter count instead \(e.g. %ft_plan 7B\)"):
        shell.run_line_magic("ft_plan", str(broken))
    with pytest.raises(UsageError, match=r"partial/config.json has no hidden size \(hidden_size / n_embd / d_model\), "
                                         r"layer count .*vocabulary size \(vocab_size\).* %ft_plan 7B"):
        shell.run_line_magic("ft_plan", str(partial))
    with pytest.raises(UsageError, match=r"wordy/config.json has a size that is not a whole number.* %ft_plan 7B"):
        shell.run_line_magic("ft_plan", str(wordy))


def test_counts_of_a_trillion_parameters_and_more_are_readable(shell, capsys):
    """%ft_plan 7T printed "7e+03B parameters"."""
    assert [planner.format_count(n) for n in (135e6, 46.7e9, 999e9, 999.6e9, 7e12, 1.5e12, 2e15)] == [
        "0.135B", "46.7B", "999B", "1T", "7T", "1.5T", "2,000T"]
    shell.run_line_magic("ft_plan", "7T")
    assert "(7T parameters" in capsys.readouterr().out


def test_a_negative_memory_is_refused_as_not_positive_not_as_a_missing_value(shell, capsys):
    """%ft_plan 7B --memory -5GB said "argument --memory: expected one argument": argparse read -5GB as a flag."""
    from IPython.core.error import UsageError

    for value in ("-5GB", "=-5GB", "-0.5", "  -16GiB"):
        with pytest.raises(UsageError, match=r"--memory must be positive \(got .-[\d.]+\w*.\): .*--memory 24GB"):
            shell.run_line_magic("ft_plan", f"7B --memory{'' if value.startswith('=') else ' '}{value}")
    assert capsys.readouterr().out == ""
    with pytest.raises(UsageError, match="expected one argument"):  # a missing value is still one
        shell.run_line_magic("ft_plan", "7B --memory --seq-len 128")


def test_counts_of_a_tiny_model_are_read_in_thousands(shell, tiny_model_dir, capsys):
    """%ft_plan of a model under 100k parameters printed '9.96e-08T parameters' and '(0.0M adapter params)'."""
    assert [planner.format_count(n) for n in (99_600, 1_500, 999_000)] == ["99.6K", "1.5K", "999K"]
    shell.run_line_magic("ft_plan", str(tiny_model_dir))
    out = capsys.readouterr().out
    assert "e-0" not in out and "T parameters" not in out and "(0.0M adapter params)" not in out
    assert re.search(r"\(\d+(\.\d+)?K parameters", out) and re.search(r"\(\d+(\.\d+)?K adapter params\)", out), out


def test_a_plan_from_a_small_count_has_a_shape_that_adds_up_and_every_column_stays_apart():
    """'%ft_plan 7M' showed 2 layers of width 512 beside a 32,000-token vocabulary: the embeddings alone (16.4M)
    outweighed the model, and QLoRA's weights (0.05 GB) came out above 16-bit LoRA's (0.01). The shape now adds
    up to the count, embeddings included. A very long sequence or a long optimizer name ran the table's columns
    together, and the full row said AdamW for adamw_8bit."""
    from ft_magics.core.planner import dims_from_count, plan

    for n in (7e6, 30e6, 135e6, 1.5e9, 7e9, 70e9):
        d = dims_from_count(n, "x")
        body = d.layers * 12 * d.hidden ** 2
        assert d.embed_params < n and abs(d.embed_params + body - n) / n < 0.35, (n, d.layers, d.hidden)
        p = plan(d)
        assert p.mode("QLoRA, NF4 + double quant").weights < p.mode("LoRA, 16-bit base").weights, n
    assert dims_from_count(7e9, "x").hidden == 4096
    table = plan("7B", seq_len=2 ** 20, batch_size=10 ** 4, optimizer="paged_adamw_8bit").table()
    header, *rows = [line for line in table.splitlines() if line.startswith(("mode", "full", "LoRA,", "QLoRA,"))]
    assert rows[0].startswith("full fine-tuning (bf16 + paged_adamw_8bit)  ")
    for line in rows:  # five figures, each set off by at least two spaces
        assert len([f for f in line.split() if f.replace(".", "").isdigit()]) == 5, line
    assert "full fine-tuning (bf16 + AdamW)" in plan("7B").table()


def test_ft_plan_without_a_model_plans_the_loaded_one(shell, tiny_model_dir, capsys):
    """%ft_plan alone planned the demo's table entry (HuggingFaceTB/SmolLM2-135M) whatever was loaded; it plans
    the loaded model from its own config, and the demo model when none is loaded."""
    shell.run_line_magic("ft_plan", "")
    assert "Memory plan for HuggingFaceTB/SmolLM2-135M" in capsys.readouterr().out
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    capsys.readouterr()
    shell.run_line_magic("ft_plan", "")
    out = capsys.readouterr().out
    assert "(loaded)" in out and "2 layers, hidden 64" in out and "SmolLM2" not in out


def test_a_hub_id_planned_from_another_table_entry_keeps_its_name_and_says_whose_shape():
    """%ft_plan HuggingFaceTB/SmolLM2-135M-Instruct printed 'Memory plan for HuggingFaceTB/SmolLM2-135M' (the
    table entry it matched), as if the id had been misread."""
    from ft_magics.core.planner import resolve_model

    d = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert d.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and d.source.endswith("the shape of HuggingFaceTB/SmolLM2-135M")
    assert (resolve_model("meta-llama/Llama-2-7b-hf").source, resolve_model("demo").name) == (
        "built-in table", "HuggingFaceTB/SmolLM2-135M")


def test_ft_plan_after_a_run_says_its_default_length_is_not_the_data_s(shell, tiny_model_dir, capsys, tmp_path):
    """After a run on 20-token examples, %ft_plan planned 512-token rows without a word: a user read its
    activations as what the run needs."""
    import json

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                                              for i in range(8)))
    shell.run_line_magic("qlora_load", f"{tiny_model_dir} --bits 32")
    shell.run_cell_magic("lora_train", "p --data d.jsonl --max-steps 1 --no-widgets", "r: 4\n")
    report = shell.magics_manager.registry["FtMagics"].session.last_data_report
    capsys.readouterr()
    shell.run_line_magic("ft_plan", "")
    out = capsys.readouterr().out
    assert f"seq_len 512 is the default; the last run's examples were {report.stats()['max']} tokens at most" in out
    shell.run_line_magic("ft_plan", "--seq-len 64")
    assert "is the default" not in capsys.readouterr().out


def _tiny(cfg_cls, **kw):
    """A transformers config of a tiny model (vocabulary 320, width 64, 2 layers) with ``kw`` on top."""
    return cfg_cls(**{**dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4), **kw})


def test_a_softcapped_model_is_planned_with_the_standard_loss_and_its_eager_attention_scores(tmp_path, shell, capsys):
    """%ft_plan google/gemma-2-2b counted one loss chunk and no attention scores for LoRA and QLoRA, but training
    refuses the chunked loss where final_logit_softcapping is set (core.speed.chunked_loss_blocker) and
    transformers runs Gemma-2's attention eagerly (SDPA cannot soft-cap: seq x seq scores per head). The plan
    counts both and says why; gradient_checkpointing: auto's estimate (core.training._activations) too."""
    from types import SimpleNamespace

    from transformers import Gemma2Config

    from ft_magics.config import TrainConfig
    from ft_magics.core.training import _activations

    cfg = _tiny(Gemma2Config, intermediate_size=96, num_key_value_heads=2, head_dim=16).to_dict()
    plain = planner.dims_from_config(cfg | {"final_logit_softcapping": None, "attn_logit_softcapping": None})
    capped = planner.dims_from_config(cfg)  # Gemma2Config's defaults: 30 and 50
    assert (plain.standard_loss_only, plain.eager_attention) == ("", "")
    assert capped.standard_loss_only and capped.eager_attention
    seq, batch = 96, 2
    tokens, lora = seq * batch, "LoRA, 16-bit base"
    a, b = (planner.plan(d, seq_len=seq, batch_size=batch).mode(lora).activations for d in (plain, capped))
    chunk = planner.chunk_bytes(min(planner.auto_chunk_rows(320), tokens), 320)
    scores = tokens * 2 * 4 * seq * 8  # layers * heads * seq keys * 8 B per token
    assert b - a == tokens * 320 * 10 - chunk + scores
    # a config that leaves the keys out has Gemma2Config's soft-capping too
    bare = {k: v for k, v in cfg.items() if "softcapping" not in k}
    assert planner.dims_from_config(bare).standard_loss_only == "its config sets final_logit_softcapping=30.0"
    # the built-in table's Gemma-2 entries: the full logits at batch 8 (10.5 GB for gemma-2-2b) and the scores
    g = planner.plan("google/gemma-2-2b", seq_len=512, batch_size=8)
    assert g.mode("QLoRA, NF4 + double quant").activations > 512 * 8 * (256000 * 10 + 26 * 8 * 512 * 8)
    text = g.table()
    assert "training cannot use the chunked loss" in text and "runs its attention eagerly" in text
    assert "standard loss, as its config sets final_logit_softcapping=30.0" in text and "one chunk" not in text
    # gradient_checkpointing: auto estimates with the same correction
    model = SimpleNamespace(config=Gemma2Config(**cfg))
    examples = [SimpleNamespace(input_ids=[0] * seq)] * batch
    _, need = _activations(TrainConfig(batch_size=batch), model, examples, checkpointing=False)
    assert need == planner.activation_bytes(capped, seq, batch, False, True) > planner.activation_bytes(
        plain, seq, batch, False, True)


def test_the_moe_adapter_counts_routed_experts_only_where_peft_adapts_them():
    """A tiny Qwen2-MoE's all-linear adapter is 7,560 parameters (attention, shared expert and its gate): PEFT does
    not adapt its routed experts or router, which the planner counted (23,016). The planner's tables of which
    types PEFT adapts agree with PEFT's own list of types whose fused experts it converts."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    cfg = _tiny(Qwen2MoeConfig, num_key_value_heads=2, num_experts_per_tok=2, intermediate_size=96,
                moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=4)
    model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())
    d = planner.dims_from_config(cfg.to_dict())
    assert abs(d.params - real) / real < 0.005 and not d.experts_adapted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert d.lora_params(4) == sum(p.numel() for p in adapter.parameters() if p.requires_grad) == 7560
    assert "counts none of the routed experts nor the router (PEFT adapts only the attention and the shared " \
           "expert here)" in d.experts_text()
    for t in planner.EXPERTS_ADAPTED:
        assert _MODEL_TO_CONVERSION_PATTERN.get(t) in ("mixtral", "qwen2_moe"), t
    for t in planner.EXPERTS_NOT_ADAPTED:
        assert t not in _MODEL_TO_CONVERSION_PATTERN, t
    unknown = planner.dims_from_config(MIXTRAL_8X7B | {"model_type": "somebody_moe"})
    assert "assumed: PEFT's handling of model_type somebody_moe" in unknown.experts_text()


def test_a_config_without_tie_word_embeddings_takes_its_architecture_s_default():
    """gemma-2-2b's config.json leaves tie_word_embeddings out (Gemma2Config ties by default): it was planned
    untied, 3.2B parameters instead of 2.61B. The table of tied-by-default types agrees with transformers."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    gemma_2_2b = dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000)
    d = planner.dims_from_config(gemma_2_2b)
    assert d.tied and abs(d.params - 2.61e9) / 2.61e9 < 0.01
    assert not planner.dims_from_config(gemma_2_2b | {"tie_word_embeddings": False}).tied  # given: as given
    assert not planner.dims_from_config(gemma_2_2b | {"model_type": "llama"}).tied
    for t in planner.TIED_BY_DEFAULT | {"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "mixtral"}:
        cls = CONFIG_MAPPING[t]
        default = getattr(cls, "tie_word_embeddings", None)
        assert (default if default is not None else cls().tie_word_embeddings) == (t in planner.TIED_BY_DEFAULT), t


def test_planned_shapes_and_totals_never_fall_as_the_parameter_count_rises():
    """A size's shape switched its width-to-depth ratio at 5e8 and 3e9: 499M had 42 layers of 960 (QLoRA 8.51 GB
    at seq 512, batch 8), 500M 19 of 1408 (5.96 GB); 2.99B 21.24 GB, 3B 17.00 GB; 30M 16 layers, 50M 15."""
    sizes = sorted({round(10 ** (6 + k / 40)) for k in range(241)} | {499e6, 500e6, 2.99e9, 3e9, 30e6, 50e6})
    last = None
    for n in sizes:
        d = planner.dims_from_count(n, "x")
        p = planner.plan(d, seq_len=512, batch_size=8)
        now = ((d.layers, d.hidden, d.intermediate, d.heads, d.vocab),
               [m.total for m in p.modes] + [m.activations for m in p.modes] + [d.lora_params(16)])
        if last is not None:
            assert all(a <= b for a, b in zip(last[0], now[0])), (n, last[0], now[0])
            assert all(a <= b for a, b in zip(last[1], now[1])), n
        last = now
    assert (planner.dims_from_count(7e9, "x").hidden, planner.dims_from_count(7e9, "x").layers) == (4096, 33)


def test_gpt2_and_gpt_neox_are_planned_with_their_own_layers_and_encoders_are_refused(tmp_path, shell, capsys):
    """GPT-2 (fused c_attn, two-matrix MLP, biases, learned positions) was planned as Llama: 0.190B parameters
    instead of 0.124B, and a tiny one's adapter at 47,104 instead of 32,768. BERT and T5 were planned as causal
    LMs; a decoder the planner does not model says its figures assume a Llama-style one."""
    import warnings

    from IPython.core.error import UsageError
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

    for cfg in (GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128),
                _tiny(GPTNeoXConfig, intermediate_size=96)):
        model = AutoModelForCausalLM.from_config(cfg)
        d = planner.dims_from_config(cfg.to_dict() | {"tie_word_embeddings": None})  # as config.json leaves it
        assert d.params == sum(p.numel() for p in model.parameters()), cfg.model_type
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
        assert d.lora_params(16) == sum(p.numel() for p in adapter.parameters() if p.requires_grad), cfg.model_type
        assert not d.notes
    gpt2 = planner.dims_from_config(dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                                         n_positions=1024))
    assert gpt2.params == 124_439_808  # gpt2's published count
    bert = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 768, "num_hidden_layers": 12,
            "vocab_size": 30522}
    t5 = {"model_type": "t5", "is_encoder_decoder": True, "d_model": 512, "num_layers": 6, "vocab_size": 32128}
    for name, cfg, kind in (("bert", bert, "an encoder-only model"), ("t5", t5, "an encoder-decoder model")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UsageError, match=f"config.json is {kind}.* ft_magics fine-tunes causal .* Plan a decoder"):
            shell.run_line_magic("ft_plan", str(tmp_path / name))
    falcon = planner.dims_from_config(dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, vocab_size=320))
    text = planner.plan(falcon).table()
    assert "Note: not a Llama-style decoder (model_type falcon): the figures assume one" in text


def test_what_does_not_fit_names_an_8bit_optimizer_where_it_would_and_seq_len_only_where_it_helps():
    """%ft_plan 7B --memory 80GiB: full fine-tuning "does not fit ... choose a smaller model or a shorter
    --seq-len, or QLoRA", though adamw_8bit fits at batch 4 (83.7 GB) and no sequence length brings weights,
    gradients and Adam states (112 GB) under 86 GB."""
    full = planner.plan("7B").fit_text(80 * 2**30).splitlines()[1]
    assert "does not fit, even at batch 1 with gradient checkpointing (112.9 GB); with --optimizer adamw_8bit it " \
           "fits at batch 4 (83.7 GB); otherwise choose a smaller model or QLoRA." in full
    assert planner.plan("7B", batch_size=4, optimizer="adamw_8bit").mode(
        "full fine-tuning (bf16 + AdamW)").total <= 80 * 2**30
    assert "with --optimizer" not in planner.plan("7B", optimizer="adamw_8bit").fit_text(50e9)  # already 8-bit
    # where the activations are what does not fit, a shorter sequence is named
    long = planner.plan("7B", seq_len=131072, batch_size=1).fit_text(30e9).splitlines()[3]
    assert long.startswith("  QLoRA") and long.endswith("choose a smaller model or a shorter --seq-len.")


def test_session_plan_reads_its_arguments_as_training_does():
    """Session.plan(gradient_checkpointing='no') planned with checkpointing (a truthy string)."""
    from ft_magics import Session

    s, ckpt = Session(), planner.plan("7B", gradient_checkpointing=True)
    assert not s.plan("7B", gradient_checkpointing="no").gradient_checkpointing
    assert s.plan("7B", gradient_checkpointing="true").modes[2].total == ckpt.modes[2].total
    with pytest.raises(FtUsageError, match="gradient_checkpointing must be true, false or auto, got 'maybe'"):
        s.plan("7B", gradient_checkpointing="maybe")
    with pytest.raises(FtUsageError, match="'auto' is decided at run time"):
        s.plan("7B", gradient_checkpointing="auto")


def test_a_path_a_config_json_and_size_spellings_are_planned(tmp_path, shell, capsys):
    """%ft_plan 7e9 / 7bn / 7G / 7,000M were unknown models; ./my-model (absent) listed the built-in table
    instead of saying there is no such folder; Mistral-7B-Instruct-v0.2 was unknown. Session.plan refused a
    pathlib.Path ("got PosixPath") and called a config.json file an unknown model."""
    from IPython.core.error import UsageError

    from ft_magics import Session

    for spelling in ("7e9", "7bn", "7G", "7,000M", "7000m", "0.007T"):
        assert planner.resolve_model(spelling).params == 7e9, spelling
    folder = tmp_path / "mixtral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    for model in (folder, folder / "config.json", str(folder / "config.json")):
        assert Session().plan(model).dims.experts == 8, model
    for missing in ("./my-model", "~/no-such-model-here", "models/a/b"):
        with pytest.raises(UsageError, match=f"no such folder: '{re.escape(missing)}'"):
            shell.run_line_magic("ft_plan", missing)
    d = planner.resolve_model("mistralai/Mistral-7B-Instruct-v0.2")
    assert (d.vocab, d.source) == (32000, "built-in table")
    assert planner.resolve_model("mistralai/Mistral-7B-Instruct-v0.3").source.endswith("shape of mistralai/Mistral-7B-v0.3")


def test_the_printed_loss_chunk_is_what_the_plan_counts():
    """The table said 'one chunk of 128 rows * vocab * 4 B, at most 64 MB', but counted fp32 and 16-bit copies
    (6 B), 64 rows with checkpointing: a chunk of a 256,000 vocabulary is ~100 MB."""
    for ckpt, rows in ((False, 128), (True, 64)):
        p = planner.plan("7B", gradient_checkpointing=ckpt)
        assert f"one chunk of {rows} rows * vocab * 6 B (fp32 logits and their 16-bit copy" in p.table()
        assert planner.chunk_bytes(rows, 32000) == rows * 32000 * 6


def test_the_readme_s_ft_plan_totals_are_what_the_planner_prints():
    """The README's demo-notebook row of %ft_plan totals (7B, 13B, 70B at seq 512, batch 1) had drifted."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `%ft_plan` totals, full / LoRA / QLoRA"))
    written = re.findall(r"([\d.]+) / ([\d.]+) / ([\d.]+) GB", row)
    planned = [tuple(planner._gb(m.total) for m in planner.plan(n, seq_len=512, batch_size=1).modes)
               for n in ("7B", "13B", "70B")]
    assert written == planned


def test_the_planner_refuses_what_training_would_refuse(shell, capsys):
    """%ft_plan planned 1e30 parameters, a rank of 100,000 on a 7B model and a 99,999,999,999-token sequence without
    a word (training refuses the last two), read -7B as an unknown flag, and its note spoke of Adam states under SGD."""
    from IPython.core.error import UsageError

    for line, complaint in [
        ("1e30", r"'1e30' is 1e\+30 parameters, past any model"),
        ("7B --r 100000", r"--r 100,000 is above the rank any adapted layer of 7B can hold: the widest is 4,096"),
        ("7B --seq-len 99999999999", r"--seq-len must be at most 1048576 \(got 99,999,999,999\)"),
        ("-7B", r"'-7B': a model size must be positive"),
    ]:
        with pytest.raises(UsageError, match=complaint):
            shell.run_line_magic("ft_plan", line)
    assert capsys.readouterr().out == ""
    shell.run_line_magic("ft_plan", "7B --r 4096 --optimizer sgd")
    out = capsys.readouterr().out
    assert "fp32 master weights and the optimizer's states (SGD: no state)" in out and "Adam" not in out
    assert planner.plan("2T").dims.params == 2e12  # the largest models still plan


def test_the_70b_comparison_gives_16_bytes_a_parameter_as_16_bytes_a_parameter():
    """It said "1135 GB (16 B/param)" for 70B: the plan's whole total, activations and overhead included."""
    from ft_magics.core import planner as P

    p = P.plan("meta-llama/Llama-2-70b-hf", seq_len=512, batch_size=1)
    text = P.seed_comparison(p)
    full = p.mode("full fine-tuning (bf16 + AdamW)").total
    assert f"16 B/param: {16 * p.dims.params / P.GB:.0f} GB, {full / P.GB:.0f} GB with activations and overhead" in text
    assert 16 * p.dims.params < full
