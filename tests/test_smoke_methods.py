"""Smoke tests on the real default model (SmolLM2-135M): each baseline of issue 10 fits at a tiny budget on
the built-in task and its predictor answers. The scripted-fake tests of each method check the algorithm; these
check that it runs on a real chat model, its tokenizer and its chat template."""

import pytest

from metatuner.config import load_config
from metatuner.evaluation.harness import evaluate
from metatuner.recipes import fit_method

COMMON = ["data.task=arithmetic", "data.train_limit=8", "data.val_size=2", "train.batch_size=2",
          "eval.max_new_tokens=16"]

TINY = {
    "rlprompt": ["rlprompt.steps=1", "rlprompt.prompts_per_step=2", "rlprompt.queries_per_step=2",
                 "rlprompt.candidates=2", "rlprompt.val_size=2"],
    "bpo-selfpairs": ["bpo.queries=2", "bpo.samples=2", "bpo.max_new_tokens=16", "bpo.steps=1",
                      "bpo.batch_size=2"],
    "ppo": ["ppo.steps=1", "ppo.batch_size=2", "ppo.epochs=1", "ppo.max_new_tokens=8"],
    "grpo": ["grpo.steps=1", "grpo.batch_size=1", "grpo.group_size=2", "grpo.max_new_tokens=8"],
    "bettertogether": ["bettertogether.strategy=p -> w", "bettertogether.candidates=1",
                       "bettertogether.max_bootstrapped_demos=1", "bettertogether.max_labeled_demos=1",
                       "bettertogether.traces=4", "bettertogether.val_size=2", "train.steps=1"],
}


@pytest.mark.smoke
@pytest.mark.parametrize("method", sorted(TINY))
def test_each_baseline_fits_and_answers_on_the_default_model(method, tmp_path):
    cfg = load_config(None, [f"method={method}", *COMMON, *TINY[method]])
    assert cfg.model.name == "smollm2-135m"
    predictor, task = fit_method(cfg, tmp_path / "train")
    items = task.load("test")[:2]
    result = evaluate(predictor, task, items, batch_size=2, max_new_tokens=16, likelihood=False, progress=False)
    assert len(result.records) == 2 and all(r["output"].strip() for r in result.records)
    assert predictor.describe()  # what it returned is recorded (training record, gate, chosen program)
