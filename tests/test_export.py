"""eval.py export: the folder it writes, loaded by plain transformers (+ peft for the adapter) with only
a user message, generates greedily exactly what fst generates with the adapter on and the run's best
prompt as system message; the same for --merge, also of a 4-bit (QLoRA) run; the chat template's
default system message survives any prompt text and yields to the caller's own."""
import json
from pathlib import Path

import pytest
import torch

import eval as ev
import fst
import rewards
import rollout
from plumbing import checkpoints, models
from pool import PromptPool, best_context
from test_fst import _run

# Quotes, Jinja delimiters, a backslash, unicode and newlines: the prompt must reach the model verbatim.
TRICKY = 'Say "hi" {{ x }} {% if %} %} \\n é 😀\n\nThen answer.'
NEW_TOKENS = 12


def fst_greedy(run, question):
    """fst's own greedy generation: the checkpoint's adapter on, the pool's best context (its instruction as
    system message, its worked examples as turns) before the question."""
    cfg = fst.load_config(str(run / "config.yaml"))
    ckpt = checkpoints.latest_checkpoint(run)
    model, tok = models.load_model(cfg.model, torch.device("cpu"), adapter_path=str(ckpt))
    best = best_context(ckpt)
    prompt = rollout.encode_chat(tok, best.messages(rewards.Task(), {"question": question}))
    ro = rollout.sample(model, tok, [prompt], [1], max_new_tokens=NEW_TOKENS, temperature=0)
    with model.disable_adapter():  # the base alone: shows that the adapter changes the answer
        base = rollout.sample(model, tok, [prompt], [1], max_new_tokens=NEW_TOKENS, temperature=0)
    return prompt, ro.completion_ids[0], base.completion_ids[0]


def plain_greedy(model, folder, question):
    """Plain transformers, as a user of the folder would call it: only a user message."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
    width = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, width:].tolist()


def test_default_system_prompt_template(tokenizer):
    """User-only conversations get the prompt as system message, verbatim; the caller's own wins.
    Checked on SmolLM2's template and on one shaped like Qwen2.5's (default in an else branch)."""
    qwen_like = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] "
                 "+ '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}"
                 "{%- for m in messages %}{%- if m.role != 'system' %}{{- '<|im_start|>' + m.role + '\\n' + "
                 "m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
                 "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    user = [{"role": "user", "content": "2 + 3?"}]
    own = [{"role": "system", "content": "Mine."}] + user
    for original in (tokenizer.chat_template, qwen_like):
        def render(messages, template):
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        for prompt in (TRICKY, "plain", "\nleading newline, trailing spaces  ", "{% endraw %} '\\u0041'"):
            wrapped = ev.with_default_system_prompt(original, prompt)
            assert render(user, wrapped) == render([{"role": "system", "content": prompt}] + user, original)
            assert prompt in render(user, wrapped)
            assert render(own, wrapped) == render(own, original)
        assert "You are" in render(user, original)  # the model's own default, which the wrapper replaces


def test_export_adapter_and_merged_generate_like_fst(tmp_path, tiny_model_dir, parity_rewards, capsys):
    """An fst run with a fast round (its best prompt may be an evolved one) and validation rows."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    extra = ["--set", "mode=fst", "--set", "fast.every=2", "--set", "fast.budget=2", "--set", "fast.operators=[demo]",
             "--set", "eval.every=2", "--set", "eval.n=2", "--set", "eval.k=2", "--set", "train.lr=0.05",
             "--set", f"task.system_prompt={json.dumps(TRICKY, ensure_ascii=False)}"]
    _run(tmp_path, "run", tiny_model_dir, 2, extra)
    run = tmp_path / "run"
    pool_file = checkpoints.latest_checkpoint(run) / "pool.json"   # a best context with worked examples, for sure
    pool = PromptPool.load(pool_file)
    pool.best().demos = [["What is 1 + 1?", "1 + 1 = 2.\nAnswer: 2"], ["Say {{ x }} \"é\"", "Said.\nAnswer: 0"]]
    pool.save(pool_file)
    question = rewards.get_task("arithmetic").load("test")[0]["question"]
    fst_prompt, want, base_answer = fst_greedy(run, question)
    assert want != base_answer  # the adapter matters, so losing it would fail this test

    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    ev.main(["export", str(run), "--out", str(adapter_dir)])
    assert "LoRA adapter" in capsys.readouterr().out
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    best = pool.best().text                         # the instruction: the default system message
    assert (adapter_dir / "system_prompt.txt").read_text() == best
    assert json.loads((adapter_dir / "context.json").read_text())["demos"] == pool.best().demos
    card = (adapter_dir / "README.md").read_text()
    assert "| mode | fst |" in card and "| steps | 2 " in card and "| add | best |" in card
    assert best in card and str(Path(tiny_model_dir).resolve()) in card
    last = [r for r in ev.read_metrics(run) if r["kind"] == "eval" and r["step"] == 2]
    assert len(last) == 2 and all(f"| {r['prompt']} | {r['mean_at_k']:.3f} | {r['pass_at_k']:.3f} |" in card
                                  for r in last)

    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    prompt, got = plain_greedy(model, adapter_dir, question)
    assert prompt == fst_prompt and got == want
    # The 5-line README snippet: transformers alone finds the adapter's base (peft installed).
    prompt, got = plain_greedy(AutoModelForCausalLM.from_pretrained(adapter_dir).eval(), adapter_dir, question)
    assert prompt == fst_prompt and got == want

    ev.export(run, merged_dir, merge=True)
    assert not (merged_dir / "adapter_config.json").exists()
    prompt, got = plain_greedy(AutoModelForCausalLM.from_pretrained(merged_dir).eval(), merged_dir, question)
    assert prompt == fst_prompt and got == want

    with pytest.raises(SystemExit, match="not empty"):
        ev.export(run, merged_dir)
    no_system = tmp_path / "no_system"  # a base whose template refuses system messages (Gemma does)
    tok = models.load_tokenizer(tiny_model_dir)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                         "not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    tok.save_pretrained(no_system)
    with pytest.raises(SystemExit, match="System role not supported"):
        ev.export(run, tmp_path / "refused", overrides=[f"model.name={no_system}"])
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.tmp").exists()
    with pytest.raises(SystemExit, match="step_000007 not found"):
        ev.export(run, tmp_path / "other", step=7)


def test_merge_of_a_4bit_run_is_the_trained_policy(tmp_path, tiny_model_dir, parity_rewards):
    """QLoRA: --merge dequantises the NF4 base (the weights the run trained on) and says so."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM
    _run(tmp_path, "q", tiny_model_dir, 2, ["--set", "model.quant=4bit", "--set", "train.lr=0.05"])
    question = rewards.get_task("arithmetic").load("test")[1]["question"]
    fst_prompt, want, base_answer = fst_greedy(tmp_path / "q", question)
    assert want != base_answer
    lines = ev.export(tmp_path / "q", tmp_path / "merged", merge=True)
    assert any("dequantised" in line for line in lines)
    assert "dequantised" in (tmp_path / "merged" / "README.md").read_text()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    prompt, got = plain_greedy(merged, tmp_path / "merged", question)
    assert prompt == fst_prompt and got == want


def tiny_qwen2_dir(path: Path, tokenizer, tied: bool) -> str:
    """A 2-layer Qwen2 (hidden 64) with SmolLM2's vocabulary, its output head tied to the embedding or not."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("tied", [True, False])
def test_merge_of_a_float32_head_run_reloads_to_the_trained_logits(tmp_path, tokenizer, parity_rewards, tied):
    """model.fp32_head on a bf16 4-bit run (the GPU recipes): the merged export keeps the head under its own
    key (tied or not), and plain transformers reloads it to the logits of the trained policy."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM
    model_dir = tiny_qwen2_dir(tmp_path / "base", tokenizer, tied)
    _run(tmp_path, "h", model_dir, 2, ["--set", "model.quant=4bit", "--set", "model.dtype=bfloat16",
                                       "--set", "model.fp32_head=true", "--set", "train.lr=0.05"])
    ev.export(tmp_path / "h", tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.config.tie_word_embeddings == tied
    ids = torch.tensor([[5, 17, 300, 41, 9, 1200]])
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    cfg = fst.load_config(str(tmp_path / "h" / "config.yaml"))
    trained, _ = models.load_model(cfg.model, torch.device("cpu"),
                                   adapter_path=str(checkpoints.latest_checkpoint(tmp_path / "h")))
    head = trained.get_output_embeddings()
    assert isinstance(head, models.Float32Head)
    # the head's weights themselves, under the key plain transformers reads (a random head otherwise)
    assert torch.equal(merged.get_output_embeddings().weight, head.weight.float())
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        with trained.disable_adapter():
            without_adapter = trained(input_ids=ids).logits
    # the run computes in bf16, the merged model in float32: close, and far closer than without the adapter
    torch.testing.assert_close(got, want, atol=0.2, rtol=0.05)
    assert (got - want).abs().mean() < 0.1 * (want - without_adapter).abs().mean()
