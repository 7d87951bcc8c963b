"""The same flow on other model families than Llama: every speed lever (fused LoRA, lean activations, the own
causal attention, the chunked loss, packing, checkpointing) either applies or steps aside, and training still
learns. Tiny random models of each family, built here, in 4-bit NF4 on the CPU."""
from __future__ import annotations

import pytest

from conftest import build_tiny_tokenizer
from test_foundation import ROWS

SHAPES = {  # config class, model class, the family's own names for the sizes
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),  # Conv1D layers
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=64, intermediate_size=128,
                                                             num_hidden_layers=2, num_attention_heads=4)),
}


def saved_model(tmp_path, name: str, model_cls: str, config, tok):
    """A random ``transformers.<model_cls>`` of ``config`` (seed 0) saved with ``tok`` in ``tmp_path / name``."""
    import torch
    import transformers

    torch.manual_seed(0)
    folder = tmp_path / name
    getattr(transformers, model_cls)(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_a_family_loads_in_4bit_trains_generates_and_serves(family, tmp_path):
    import transformers

    from ft_magics import Session

    config_cls, model_cls, shape = SHAPES[family]
    tok = build_tiny_tokenizer()
    kw = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, **shape)
    if "n_positions" not in shape:
        kw["max_position_embeddings"] = 512
    folder = saved_model(tmp_path, family, model_cls, getattr(transformers, config_cls)(**kw), tok)

    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(folder), bits=4)
    assert s.handle.bits == 4 and any(type(m).__name__ == "Linear4bit" for m in s.model.modules())
    s.generate("hello", max_new_tokens=2)  # the natural first cell: try the base (repacks on the CPU)
    run = s.train("a", ROWS, {"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "warmup": 0,
                              "eval_fraction": 0.1}, listeners=[])
    assert run.final_loss < run.first_loss - 0.3, (run.first_loss, run.final_loss)
    assert run.eval_loss is not None
    other = s.train("b", ROWS, {"max_steps": 2, "batch_size": 4, "gradient_checkpointing": True, "packing": True},
                    listeners=[])
    assert other.steps == 2
    assert s.generate("hello", adapter="a", max_new_tokens=3).new_tokens >= 1
    served = s.serve([{"prompt": "hi", "adapter": "a"}, {"prompt": "yo", "adapter": "b"}], max_new_tokens=2)
    assert [x.adapter for x in served] == ["a", "b"]


def test_a_moe_whose_loss_includes_the_router_balancing_term_trains_on_the_model_s_own_loss(tmp_path):
    """With output_router_logits (the usual advice for fine-tuning Mixtral or Qwen-MoE), the model's loss adds
    router_aux_loss_coef x the experts' load-balancing loss; the chunked loss ran the decoder alone and left it
    out: the same curve as without it, and no gradient balancing the experts."""
    import transformers

    from ft_magics import Session
    from ft_magics.core.speed import chunked_loss_blocker

    tok = build_tiny_tokenizer()
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, output_router_logits=True,
        router_aux_loss_coef=0.5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    folder = saved_model(tmp_path, "moe", "Qwen2MoeForCausalLM", cfg, tok)
    s = Session(adapters_dir=tmp_path / "adapters")
    s.load(str(folder), bits=32)
    assert "router_aux_loss_coef=0.5" in chunked_loss_blocker(s.model)
    runs = [s.train(name, ROWS, {"max_steps": 2, "batch_size": 4, "seed": 1, "chunked_loss": chunked}, listeners=[])
            for name, chunked in (("default", True), ("full", False))]
    curves = [[loss for _, loss in r.record["loss_history"]] for r in runs]
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)
    s.model.config.output_router_logits = False  # the same model without the term: another, lower loss
    plain = s.train("plain", ROWS, {"max_steps": 1, "batch_size": 4, "seed": 1}, listeners=[])
    assert plain.record["loss_history"][0][1] < runs[0].record["loss_history"][0][1] - 0.1


def test_a_4bit_load_that_quantises_nothing_says_so_instead_of_claiming_nf4(tmp_path):
    """transformers' bitsandbytes replacement skips Falcon's FalconLinear layers: '%qlora_load --bits 4' kept every
    weight in full precision while the card said '4-bit NF4 + double quantisation'."""
    import transformers

    from ft_magics import Session

    tok = build_tiny_tokenizer()
    cfg = transformers.FalconConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
    folder = saved_model(tmp_path, "falcon", "FalconForCausalLM", cfg, tok)
    s = Session(adapters_dir=tmp_path / "adapters")
    handle = s.load(str(folder), bits=4)
    assert not any(type(m).__name__ == "Linear4bit" for m in s.model.modules())
    assert handle.bits == 16 and "4-bit" not in handle.quantization
    assert any("quantised none of this model's layers" in n and "FalconLinear" in n for n in handle.notes)
    run = s.train("f", ROWS, {"max_steps": 2, "batch_size": 4}, listeners=[])
    assert run.status == "completed"


def test_the_padding_free_probe_does_not_warn_about_the_user_s_padding():
    """Every GPT-2 run printed transformers' "We strongly recommend passing in an attention_mask since your
    input_ids may be padded": the probe that checks packed rows stay apart (pad = bos on GPT-2), not the data."""
    import logging

    import torch
    import transformers

    from ft_magics.core.data import check_packing_isolation

    tok = build_tiny_tokenizer()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers shows that warning once per process
    try:
        with torch.no_grad():
            check_packing_isolation(model, tok)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [m for m in seen if "attention_mask" in m], seen
    assert logging.getLogger("transformers.modeling_utils").level != logging.ERROR  # put back


def test_a_model_with_few_learned_positions_trains_at_its_context_and_refuses_more(tmp_path, capsys):
    """GPT-2 with 64 positions: the default max_seq_len 512 crashed the first step with an IndexError (and packing's
    padding positions went past 64 even where every example fit); a llama with 64 rotary positions keeps a larger
    max_seq_len given (a long-context fine-tune may mean it; the data report warns)."""
    import transformers

    from ft_magics import Session
    from ft_magics.errors import FtUsageError

    tok = build_tiny_tokenizer()
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    folder = saved_model(tmp_path, "gpt2-64", "GPT2LMHeadModel", cfg, tok)
    long_rows = [{"prompt": " ".join(["word"] * 60) + f" {i}?", "completion": "yes"} for i in range(8)] + ROWS[:8]
    sess = Session(adapters_dir=tmp_path / "adapters", namespace={"rows": long_rows})
    sess.load(str(folder), bits=32)
    import warnings

    for body in ({"max_steps": 2, "batch_size": 4}, {"max_steps": 2, "batch_size": 4, "packing": True}):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = sess.train("short", "rows", body)
        assert result.status == "completed" and result.steps == 2
        assert not [w for w in seen if "fan_in_fan_out" in str(w.message)]  # PEFT's Conv1D notice, every run
    assert "max_seq_len 512 (the default) is beyond the model's context (64 tokens" in capsys.readouterr().out
    with pytest.raises(FtUsageError, match=r"max_seq_len 128 is beyond the model's 64 learned positions.*max_seq_len: 64"):
        sess.train("long", "rows", {"max_steps": 2, "max_seq_len": 128})
    assert not (tmp_path / "adapters" / "long").exists()
    sess.unload()
    llama = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    sess.load(str(saved_model(tmp_path, "llama-64", "LlamaForCausalLM", llama, tok)), bits=32)
    report = sess.train("rope", "rows", {"max_steps": 1, "max_seq_len": 256}, dry_run=True)
    assert report.max_seq_len == 256 and any("longer than the model's context window" in w for w in report.warnings)


def _tiny_model_folder(tmp_path, name, tok):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=512)
    return saved_model(tmp_path, name, "LlamaForCausalLM", cfg, tok)


def test_a_model_without_a_chat_template_continues_text_where_that_is_what_it_learned(tmp_path, monkeypatch, capsys):
    """A plain-text adapter on a GPT-2-like model answered 'The quick brown fox' as a user turn ('...fox\\n'), so
    it could not continue text; nothing said how a model without a template sees turns."""
    from ft_magics import Session
    from ft_magics.core import inference
    from ft_magics.errors import FtUsageError

    folder = _tiny_model_folder(tmp_path, "plain", build_tiny_tokenizer(chat_template=False))
    texts = [{"text": "The quick brown fox jumps over the lazy dog."}] * 16
    sess = Session(adapters_dir=tmp_path / "adapters", namespace={"texts": texts, "rows": ROWS})
    handle = sess.load(str(folder), bits=32)
    assert any("no chat template" in n and "--raw" in n for n in handle.notes)
    sess.train("prose", "texts", {"max_steps": 1, "batch_size": 4}, listeners=[])
    sess.train("qa", "rows", {"max_steps": 1, "batch_size": 4}, listeners=[])
    sent = []
    real = inference.without_added_eos
    monkeypatch.setattr(inference, "without_added_eos", lambda tok, enc, t: (sent.append(list(t)), real(tok, enc, t))[1])
    for adapter, raw in (("prose", None), ("base", None), ("qa", None), ("prose", False), ("qa", True)):
        sess.generate("The quick brown fox", adapter=adapter, max_new_tokens=2, raw=raw)
    assert sent == [["The quick brown fox"], ["The quick brown fox"], ["The quick brown fox\n"],
                    ["The quick brown fox\n"], ["The quick brown fox"]]
    sent.clear()
    sess.chat("The quick brown fox", adapter="base", max_new_tokens=2)  # a conversation's first turn is a turn
    assert sent == [["The quick brown fox\n"]]
    with pytest.raises(FtUsageError, match="--raw continues the text as typed, so it takes no system prompt"):
        sess.generate("The quick brown fox", adapter="prose", raw=True, system="Be brief.")


def test_a_tokenizer_that_appends_eos_itself_trains_the_stop_and_is_not_prompted_with_it(tmp_path):
    """add_eos_token-style tokenizers: the EOS their post-processor appends carried no loss (the model never learned
    to stop) and ended every prompt (the model went on after the end)."""
    import torch
    from tokenizers.processors import TemplateProcessing

    from ft_magics.core import data as D
    from ft_magics.core.inference import build_prompt, without_added_eos

    tok = build_tiny_tokenizer(chat_template=False)
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A <|im_end|>", special_tokens=[("<|endoftext|>", tok.bos_token_id),
                                                               ("<|im_end|>", tok.eos_token_id)])
    ex = D.tokenize_record(tok, D.Record(messages=[{"role": "user", "content": "How do I reset my password?"},
                                                   {"role": "assistant", "content": "Click forgot password."}]))
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id  # the stop carries loss
    assert ex.input_ids.count(tok.eos_token_id) == 1
    text = build_prompt(tok, "How do I reset my password?")
    enc = tok(text, return_tensors="pt")
    assert int(enc["input_ids"][0, -1]) == tok.eos_token_id
    trimmed = without_added_eos(tok, dict(enc), [text])
    assert int(trimmed["input_ids"][0, -1]) != tok.eos_token_id and trimmed["attention_mask"].shape[1] == \
        enc["input_ids"].shape[1] - 1
    spelled = tok(text + "<|im_end|>", return_tensors="pt")
    assert torch.equal(without_added_eos(tok, dict(spelled), [text + "<|im_end|>"])["input_ids"], spelled["input_ids"])


def test_a_tokenizer_without_end_or_pad_token_trains_and_says_answers_cannot_stop(tmp_path):
    from ft_magics import Session

    tok = build_tiny_tokenizer(chat_template=False)
    tok.eos_token = tok.pad_token = tok.bos_token = tok.unk_token = None
    sess = Session(adapters_dir=tmp_path / "adapters", namespace={"rows": ROWS})
    handle = sess.load(str(_tiny_model_folder(tmp_path, "bare", tok)), bits=32)
    assert any("no end-of-sequence token" in n for n in handle.notes)
    result = sess.train("bare", "rows", {"max_steps": 1, "batch_size": 4}, listeners=[])  # was "Asking to pad"
    assert result.status == "completed"
