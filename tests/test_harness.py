"""The evaluation harness end to end on a tiny random model, plus its statistics."""

import json

import pytest
import torch

from metatuner.errors import MetatunerError
from metatuner.evaluation import LMPredictor, Prediction, Predictor, evaluate, select
from metatuner.evaluation.generation import continuation_logprobs, cut_at_stop, generate
from metatuner.evaluation.harness import confidence_interval
from metatuner.tasks import get_task


class Scripted(Predictor):
    """Answers from a dict id -> output (a fake LM for exact metric checks)."""

    def __init__(self, outputs):
        self.outputs = outputs

    def predict(self, task, examples, max_new_tokens):
        return [Prediction("p", ex.query, self.outputs[ex.id], 1) for ex in examples]


def test_harness_scores_scripted_outputs_in_original_order(tmp_path):
    task = get_task("arithmetic")
    items = task.load("test")[:6]
    outputs = {ex.id: (f"The answer is {ex.answer}" if k % 2 == 0 else "no idea") for k, ex in enumerate(items)}
    result = evaluate(Scripted(outputs), task, items, batch_size=4, out_dir=tmp_path / "r", progress=False)
    assert [r["id"] for r in result.records] == [ex.id for ex in items]
    assert result.metrics["exact_match_strict"]["mean"] == pytest.approx(0.5)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["n"] == 6 and summary["metrics"]["exact_match_strict"]["mean"] == pytest.approx(0.5)
    assert summary["environment"]["packages"]["torch"]
    lines = (tmp_path / "r" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) >= {"id", "input", "output", "extracted", "gold", "scores"}


def test_tiny_model_records_are_deterministic(tmp_path, tiny_model, tiny_tokenizer):
    task = get_task("arithmetic")
    items = task.load("test")[:5]
    pred = LMPredictor(tiny_model, tiny_tokenizer)
    a = evaluate(pred, task, items, batch_size=2, max_new_tokens=8, out_dir=tmp_path / "a", progress=False)
    b = evaluate(pred, task, items, batch_size=3, max_new_tokens=8, out_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "records.jsonl").read_text() == (tmp_path / "b" / "records.jsonl").read_text()
    assert a.metrics == b.metrics
    assert all(r["input"].startswith("<|im_start|>system\n" + task.instruction) for r in a.records)


def test_batched_generation_matches_one_by_one(tiny_model, tiny_tokenizer):
    texts = ["<|im_start|>user\nshort<|im_end|>\n", "<|im_start|>user\na much longer input text<|im_end|>\n"]
    batched = generate(tiny_model, tiny_tokenizer, texts, 12)
    single = [generate(tiny_model, tiny_tokenizer, [t], 12)[0] for t in texts]
    assert [g.text for g in batched] == [g.text for g in single]


def test_samples_sharing_one_prefill_continue_exactly_as_separate_copies(tiny_tokenizer):
    from conftest import make_model

    model = make_model(tiny_tokenizer, init_range=0.3)  # a peaked random model: varied greedy outputs
    texts = ["<|im_start|>user\nshort<|im_end|>\n", "<|im_start|>user\na much longer input text<|im_end|>\n",
             "<|im_start|>user\nmid size one<|im_end|>\n"]
    shared = generate(model, tiny_tokenizer, texts, 10, num_samples=3)
    copies = generate(model, tiny_tokenizer, [t for t in texts for _ in range(3)], 10)
    assert [g.text for g in shared] == [g.text for g in copies]
    assert len({g.text for g in copies}) == 3  # the three texts continue differently: the check has teeth
    torch.manual_seed(0)
    sampled = generate(model, tiny_tokenizer, texts, 10, do_sample=True, num_samples=4)
    assert len(sampled) == 12 and len({g.text for g in sampled}) > 3


def test_stop_strings_cut_the_output():
    assert cut_at_stop("The answer is 4.\nQuestion: next", ("\nQuestion:",)) == "The answer is 4."
    assert cut_at_stop("abc", ("x",)) == "abc"


def test_continuation_logprobs_match_manual_computation(tiny_model, tiny_tokenizer):
    import torch

    ctx, cont = "hello ", "world"
    lp = continuation_logprobs(tiny_model, tiny_tokenizer, [ctx, "x"], [cont, "yz"])[0]
    ids = tiny_tokenizer(ctx + cont, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n = len(tiny_tokenizer(ctx, add_special_tokens=False)["input_ids"])
    logp = torch.log_softmax(tiny_model(ids).logits[0, :-1], -1)
    manual = torch.stack([logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1])]).mean()
    assert lp == pytest.approx(manual.item(), abs=1e-5)


def test_likelihood_metric_for_multiple_choice(shared_data, tiny_model, tiny_tokenizer):
    task = get_task("cosmosqa", shared_data)
    items = task.load("test")[:3]
    result = evaluate(LMPredictor(tiny_model, tiny_tokenizer), task, items, max_new_tokens=4, progress=False)
    assert "accuracy_likelihood" in result.metrics
    assert all(len(r["choice_logprobs"]) == 4 for r in result.records)


def test_existing_results_folder_is_not_overwritten(tmp_path):
    task = get_task("arithmetic")
    items = task.load("test")[:2]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mine.txt").write_text("keep")
    with pytest.raises(MetatunerError, match="already exists"):
        evaluate(Scripted({ex.id: "" for ex in items}), task, items, out_dir=tmp_path / "r", progress=False)
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["mine.txt"]
    (tmp_path / "empty").mkdir()  # an empty folder is taken
    evaluate(Scripted({ex.id: "" for ex in items}), task, items, out_dir=tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "summary.json").is_file()


def test_interrupted_evaluation_leaves_no_results_folder(tmp_path):
    class Failing(Scripted):
        def predict(self, task, examples, max_new_tokens):
            raise KeyboardInterrupt

    task = get_task("arithmetic")
    with pytest.raises(KeyboardInterrupt):
        evaluate(Failing({}), task, task.load("test")[:3], out_dir=tmp_path / "r", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_confidence_interval():
    lo, hi = confidence_interval([1.0] * 50 + [0.0] * 50)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
    lo, hi = confidence_interval([0.0] * 10)
    assert lo == 0.0 and 0.2 < hi < 0.35  # Wilson: never a zero-width interval
    lo, hi = confidence_interval([0.5, 0.7, 0.6, 0.4])
    assert lo < 0.55 < hi


def test_select_first_and_seeded_random():
    items = list(range(100))
    assert select(items, 5) == [0, 1, 2, 3, 4]
    assert select(items, 5, "random", seed=3) == select(items, 5, "random", seed=3)
    assert select(items, 5, "random", seed=3) != select(items, 5, "random", seed=4)
    assert select(items, None) == items


def test_label_logprobs_equal_the_full_logits_computation(tiny_model, tiny_tokenizer):
    import torch

    from metatuner.evaluation.generation import encode_pairs, token_logprobs

    batch = encode_pairs(tiny_tokenizer, ["abc ", "a longer context "], ["xyz", "q"], tiny_model.device)
    total, count = token_logprobs(tiny_model, batch)
    logp = torch.log_softmax(tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    full = (logp[:, :-1].gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)
    assert count.tolist() == [3, 1]


def test_rescore_grades_stored_outputs_again(tmp_path, monkeypatch):
    task = get_task("arithmetic")
    items = task.load("test")[:4]
    outputs = {ex.id: f"so it is {ex.answer} in the end" for ex in items}  # no "The answer is": strict misses
    evaluate(Scripted(outputs), task, items, out_dir=tmp_path / "r", progress=False)
    from metatuner.evaluation.harness import rescore

    monkeypatch.setattr(type(task), "extract", lambda self, out: {"strict": out.split()[3], "flexible": None})
    monkeypatch.setattr(type(task), "version", "9")
    result = rescore(tmp_path / "r", task)
    assert result.metrics["exact_match_strict"]["mean"] == 1.0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["task_version"] == "9" and "rescored" in summary
    assert summary["metrics"]["exact_match_strict"]["mean"] == 1.0
    assert json.loads((tmp_path / "r" / "records.jsonl").read_text().splitlines()[0])["extracted"]["flexible"] is None
    with pytest.raises(MetatunerError, match="not 'gsm8k'"):
        rescore(tmp_path / "r", get_task("gsm8k"))


def test_examples_with_a_family_get_metrics_per_family_too(tmp_path):
    task = get_task("mixture")
    items = task.load("test")[:12]  # two items of each of the six families, in turn
    outputs = {ex.id: f"The answer is {ex.answer}." if ex.meta["family"] != "weekdays" else "no idea" for ex in items}
    evaluate(Scripted(outputs), task, items, out_dir=tmp_path / "r", progress=False, split="test")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    metrics = summary["metrics"]
    assert metrics["exact_match_flexible"]["mean"] == pytest.approx(10 / 12) and "n" not in metrics["exact_match_flexible"]
    assert metrics["exact_match_flexible/family=weekdays"] == {"mean": 0.0, "ci_low": 0.0,
                                                               "ci_high": pytest.approx(0.658, abs=1e-3), "n": 2}
    assert metrics["exact_match_strict/family=letters"]["mean"] == 1.0
    assert sum(k.startswith("exact_match_flexible/family=") for k in metrics) == 6
    assert json.loads((tmp_path / "r" / "records.jsonl").read_text().splitlines()[4])["family"] == "weekdays"
    arithmetic = evaluate(Scripted({ex.id: "" for ex in get_task("arithmetic").load("test")[:2]}),
                          get_task("arithmetic"), get_task("arithmetic").load("test")[:2], progress=False)
    assert not any("/family=" in k for k in arithmetic.metrics)  # a task without families: unchanged


def test_a_shift_split_is_recorded_and_rescored_from_its_own_items(tmp_path):
    from metatuner.evaluation.harness import rescore

    task = get_task("arithmetic")
    items = task.load("test_shift")[:3]
    result = evaluate(Scripted({ex.id: f"The answer is {ex.answer}" for ex in items}), task, items,
                      out_dir=tmp_path / "r", progress=False, split="test_shift")
    assert result.split == "test_shift" and "(test_shift)" in result.line()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["split"] == "test_shift"
    assert rescore(tmp_path / "r", task).metrics["exact_match_strict"]["mean"] == 1.0


def test_no_grad_scoring_in_logit_chunks_equals_one_pass(tiny_model, tiny_tokenizer, monkeypatch):
    from metatuner.evaluation import generation

    batch = generation.encode_pairs(tiny_tokenizer, ["a question", "another, longer question here"],
                                    [" the answer is 4", " 12"], "cpu")
    whole, count = generation.token_logprobs(tiny_model, batch)  # grad enabled: one pass over every position
    monkeypatch.setattr(generation, "LOGIT_CHUNK", 3)  # fewer positions than one row's target: chunks cross rows
    with torch.no_grad():
        chunked, count2 = generation.token_logprobs(tiny_model, batch)
    assert count.tolist() == count2.tolist() and count.sum() > 3
    assert torch.allclose(whole.detach(), chunked, atol=1e-5)
