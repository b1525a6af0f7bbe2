"""Export one query's generated LoRA as a standard PEFT adapter folder.

M for a query is ``W0 + λ_s B_s A_s + λ_g B_q A_q`` (static warm-up LoRA, if any, plus the generated
one). Both terms fit in one LoRA of rank ``r_s + r_g`` by stacking: ``A = [A_s; A_q]``,
``B = [λ_s B_s, λ_g B_q]`` with the scales folded into ``B`` and ``lora_alpha = r`` (scale 1). The
folder loads with ``PeftModel.from_pretrained(base_model, folder)`` and gives M's logits for that
query; ``prompt.txt`` holds the prompt G generated for it, which is the other half of the answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save as save_bytes

from metatuner import files
from metatuner.errors import MetatunerError
from metatuner.models.lora import peft_state_dict
from metatuner.models.metatuner import MetaTuner
from metatuner.tasks.base import Example, Task


@torch.no_grad()
def query_lora(mt: MetaTuner, task: Task, example: Example) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site, the query's full LoRA ``(A [r, in], B [out, r])`` with scales folded into B."""
    factors = mt.factors(mt.encode(task, [example]))
    out = {}
    for site in mt.sites:
        module = mt.m_lora.module(site)
        parts_a, parts_b = [], []
        if mt.has_static:
            parts_a.append(module.lora_A["static"])
            parts_b.append(module.scaling["static"] * module.lora_B["static"])
        if factors is not None:
            a, b = factors[site.key]
            parts_a.append(a[0].to(module.base.weight.dtype))
            parts_b.append(mt.rows_scale * b[0].to(module.base.weight.dtype))
        if not parts_a:
            raise MetatunerError("this run has neither a static nor a generated LoRA; there is nothing to export")
        out[site.key] = (torch.cat(parts_a, 0), torch.cat(parts_b, 1))
    return out


def peft_config_json(config: LoraConfig) -> str:
    """``adapter_config.json`` as ``config.save_pretrained`` writes it (keys sorted, indent 2; sets as sorted
    lists, where PEFT lists them in hash order), so that it goes through the crash-safe write path like every
    other file of the folder."""
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    return json.dumps(data, indent=2, sort_keys=True)


def export_peft_adapter(mt: MetaTuner, task: Task, query: str, out_dir: Path) -> str:
    """Writes the PEFT adapter for ``query`` into ``out_dir`` (which appears complete, or not at all);
    returns the generated prompt."""
    if files.is_nonempty_dir(out_dir):
        raise MetatunerError(f"export folder {out_dir} is not empty")
    example = Example(id="query", query=query, answer="", target="")
    factors = query_lora(mt, task, example)
    rank = next(iter(factors.values()))[0].shape[0]
    # the validation gate's verdict decides between the generated prompt and p~, as in serving
    prompt = mt.generate_prompts(task, [example])[0] if mt.serve_generated else task.instruction_for(example)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scale 1: the scales are folded into B
        target_modules=sorted({s.kind for s in mt.sites}),
        layers_to_transform=sorted({s.layer for s in mt.sites}),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=getattr(mt.actor.config, "_name_or_path", None),
    )
    with files.new_folder(out_dir) as tmp:
        files.write_new(tmp / "adapter_config.json", peft_config_json(config))
        files.write_new(tmp / "adapter_model.safetensors", save_bytes(peft_state_dict(mt.m_lora, factors)))
        files.write_new(tmp / "prompt.txt", prompt + "\n")
        files.write_new(tmp / "query.json", json.dumps({"task": task.name, "query": query, "prompt": prompt}, indent=2))
    return prompt
