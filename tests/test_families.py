"""MetaTuner on decoder families other than Llama, from tiny random models built from their configs (no
downloads): Qwen2, Mistral, Gemma 2 and Phi-3 (whose attention has one fused ``qkv_proj``), and G and M of
different families. Each trains two steps (M's warm-up, then a joint step with rollouts), answers through
the trained predictor, exports one query's adapter that stock PEFT loads and that gives M's logits, and
resumes from a stop after its first step to the same weights as the run without a stop.
A model with no ``.layers.N.`` list of decoder blocks is refused with one clear error.
"""

from __future__ import annotations

import pytest
import torch

from metatuner.config import load_config
from metatuner.errors import MetatunerError
from metatuner.models.export import export_peft_adapter
from metatuner.models.metatuner import MetaTuner
from metatuner.tasks import Example, get_task
from metatuner.training.predictor import MetaTunerPredictor
from metatuner.training.trainer import Trainer

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


def tiny(family: str, tok, seed: int = 0):
    """A tiny random model of ``family`` for the character tokenizer, and the targets its attention has."""
    import transformers as tf

    classes = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM")}
    config_cls, model_cls = (getattr(tf, name) for name in classes[family])
    extra = {"head_dim": 8} if family == "gemma2" else {}
    config = config_cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        bos_token_id=None, tie_word_embeddings=True, **COMMON, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).eval().requires_grad_(False)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model, ["qkv_proj"] if family == "phi3" else ["q_proj", "v_proj"]


def build(tok, actor_family: str, generator_family: str | None = None):
    model, targets = tiny(actor_family, tok)
    cfg = load_config(None, [
        "train.steps=2", "train.actor_warmup_steps=1", "train.generator_warmup_queries=0", "train.batch_size=2",
        "train.rollouts=2", "train.rollout_every=1", "generator.max_prompt_tokens=4", "train.max_length=256",
        "train.prompt_branch=always", "train.lr_static=0.05", "train.lr_hypernet=0.05", "data.val_size=0",
        f"hypernet.targets=[{','.join(targets)}]",
    ])
    generator = gen_targets = None
    if generator_family is not None:
        generator, gen_targets = tiny(generator_family, tok, seed=1)
        cfg.generator.targets = gen_targets
    else:
        cfg.generator.targets = targets
    mt = MetaTuner(model, tok, cfg.generator, cfg.hypernet, generator=generator, gen_tokenizer=tok)
    return cfg, mt


@pytest.mark.parametrize("actor,generator", [("qwen2", None), ("mistral", None), ("gemma2", None), ("phi3", None),
                                             ("qwen2", "mistral")])
def test_a_family_trains_answers_and_exports_a_peft_adapter(tiny_tokenizer, tmp_path, actor, generator):
    from peft import PeftModel

    cfg, mt = build(tiny_tokenizer, actor, generator)
    task = get_task("arithmetic")
    before = {k: v.clone() for k, v in mt.trainable_state().items()}
    Trainer(cfg, mt, task, task.load("train")[:6], [], tmp_path / "run", progress=False).run()
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"phase": "joint"' in log and '"reg_loss"' in log  # the joint step ran with G's regularizer
    after = mt.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("hypernet."))

    [prediction] = MetaTunerPredictor(mt).predict(task, task.load("test")[:1], 4)
    assert prediction.new_tokens > 0

    query = "Mia has 3 apples and buys 4. How many apples does she have?"
    export_peft_adapter(mt, task, query, tmp_path / "adapter")
    ids = torch.tensor([tiny_tokenizer("2+2=4", add_special_tokens=False)["input_ids"]])
    example = Example("query", query, "", "")
    with torch.no_grad(), mt.as_actor(mt.factors(mt.encode(task, [example]))):  # M for this query
        ours = mt.actor(ids).logits
    base, _ = tiny(actor, tiny_tokenizer)  # the same seed: the same base weights
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("actor,generator", [("qwen2", None), ("gemma2", None), ("phi3", None), ("qwen2", "mistral")])
def test_a_family_resumes_bit_for_bit(tiny_tokenizer, tmp_path, monkeypatch, actor, generator):
    import signal

    from metatuner import interrupts

    task = get_task("arithmetic")
    train = task.load("train")[:6]
    cfg, mt = build(tiny_tokenizer, actor, generator)
    Trainer(cfg, mt, task, train, [], tmp_path / "straight", progress=False).run()
    straight = mt.trainable_state()

    cfg, mt = build(tiny_tokenizer, actor, generator)
    trainer = Trainer(cfg, mt, task, train, [], tmp_path / "stopped", progress=False)
    with monkeypatch.context() as m:
        m.setattr(interrupts, "requested", lambda: signal.SIGTERM if trainer.step >= 1 else None)
        with pytest.raises(interrupts.Stopped, match="at step 1"):
            trainer.run()
    cfg, mt = build(tiny_tokenizer, actor, generator)
    Trainer(cfg, mt, task, train, [], tmp_path / "stopped", progress=False).run(resume=True)
    resumed = mt.trainable_state()
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_a_model_without_a_list_of_decoder_blocks_is_refused(tiny_tokenizer):
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(MetatunerError, match="unsupported model Flat: no linear layers inside a '.layers.N.' list"):
        from metatuner.models.lora import LoRAModel

        LoRAModel(Flat())
