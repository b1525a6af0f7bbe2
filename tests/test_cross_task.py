"""The cross-task mix: train on several tasks, test on another, each item graded by its own task."""

import pytest

from metatuner.errors import MetatunerError
from metatuner.tasks import get_task


def test_splits_come_from_the_right_tasks(shared_data):
    task = get_task("math+hotpotqa+cosmosqa>gsm8k", shared_data)
    train, test = task.load("train"), task.load("test")
    assert {ex.meta["task"] for ex in train} == {"math", "hotpotqa", "cosmosqa"}
    assert len(train) == 7500 + 5000 + 1785
    assert {ex.meta["task"] for ex in test} == {"gsm8k"} and len(test) == 1000
    assert task.primary_metric == "exact_match_flexible" and task.name == "math+hotpotqa+cosmosqa>gsm8k"


def test_each_item_keeps_its_own_instruction_and_grading(shared_data):
    task = get_task("math+cosmosqa>gsm8k", shared_data)
    train = task.load("train")
    m = next(ex for ex in train if ex.meta["task"] == "math")
    c = next(ex for ex in train if ex.meta["task"] == "cosmosqa")
    g = task.load("test")[0]
    assert task.instruction_for(m) == get_task("math").instruction
    assert task.instruction_for(g) == get_task("gsm8k").instruction
    assert task.grade(f"so \\boxed{{{m.answer}}}", m)[1]["accuracy_flexible"] == 1.0
    assert task.grade(f"The answer is {c.answer}", c)[1]["accuracy_strict"] == 1.0
    assert task.grade(f"The answer is {g.answer}", g)[1]["exact_match_strict"] == 1.0
    assert task.choices(c) is not None and task.choices(g) is None


@pytest.mark.parametrize("name", ["math+>", ">gsm8k", "math>gsm8k>math"])
def test_bad_cross_names(name):
    with pytest.raises(MetatunerError, match="bad cross-task name"):
        get_task(name)


def test_unknown_task_in_a_mix_lists_the_available_ones():
    with pytest.raises(MetatunerError, match="unknown task 'gsm9k'; available"):
        get_task("math>gsm9k")


def test_metatuner_trains_on_a_mix(shared_data, tiny_tokenizer, tmp_path):
    from conftest import make_model
    from metatuner.config import load_config
    from metatuner.training.build import build_metatuner
    from metatuner.training.trainer import Trainer

    cfg = load_config(None, ["train.steps=1", "train.batch_size=2", "train.rollouts=1",
                             "generator.max_prompt_tokens=2", "train.max_length=96"])
    mt = build_metatuner(cfg, make_model(tiny_tokenizer), tiny_tokenizer)
    task = get_task("hotpotqa+cosmosqa>gsm8k", shared_data)
    train = [ex for ex in task.load("train")[:3]] + [ex for ex in task.load("train")[-3:]]
    texts = mt.rewrite_texts(task, [train[0], train[-1]])
    assert get_task("hotpotqa").instruction in texts[0] and get_task("cosmosqa").instruction in texts[1]
    Trainer(cfg, mt, task, train, [], tmp_path, progress=False).run()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000001"


def test_a_cross_task_cell_folder_is_a_portable_path(tmp_path):
    from metatuner.bench.cells import cell_dir

    folder = cell_dir(tmp_path, "math+hotpotqa+cosmosqa>gsm8k", "sft", 0)
    assert folder.name == "math+hotpotqa+cosmosqa-to-gsm8k--sft--seed0"
    assert not set(folder.name) & set('<>:"|?*\\\\')  # characters Windows forbids in file names


def test_a_validation_set_carved_from_the_mix_is_scored_on_one_metric(shared_data, tiny_model, tiny_tokenizer):
    # BetterTogether and OPRO score programs on validation items drawn from the training mix
    from metatuner.evaluation import LMPredictor, evaluate

    task = get_task("math+hotpotqa+cosmosqa>gsm8k", shared_data)
    train = task.load("train")
    val = [next(ex for ex in train if ex.meta["task"] == t) for t in ("math", "hotpotqa", "cosmosqa")]
    hotpot = val[1]
    assert task.grade(f"The answer is {hotpot.answer}.", hotpot)[1]["exact_match_flexible"] == 1.0  # its F1
    result = evaluate(LMPredictor(tiny_model, tiny_tokenizer), task, val, batch_size=3, max_new_tokens=2,
                      likelihood=False, progress=False)
    assert result.primary_metric == "exact_match_flexible" and 0.0 <= result.score <= 1.0
    assert result.metrics["f1_flexible"]["n"] == 1 and "n" not in result.metrics["exact_match_flexible"]
