"""Native evaluators: accuracy (teacher-forced, generated, multiple choice), perplexity and
prediction entropy, each checked against a plain per-example computation, for caching
(same numbers twice, new numbers after an in-place weight change), for seeded disjoint
splits and for clear errors on bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import eval_support as S  # sets the offline environment first
import pytest
import torch

from evomerge.evaluate import (
    EVALUATORS, EntropyEvaluator, EvaluationError, Evaluator, ExactMatchEvaluator, PerplexityEvaluator,
    build_evaluator, prediction_entropy,
)
from evomerge.evaluate.entropy import encode_prompts
from evomerge.evaluate.perplexity import sliding_windows


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with S.one_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return S.make_setup(tmp_path_factory.mktemp("evaldata"))


def _floats(result: dict) -> None:
    assert "score" in result
    assert all(type(v) is float for v in result.values()), {k: type(v) for k, v in result.items()}


# --------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generate_reference(setup):
    """Per-example ``model.generate`` accuracy of every task and file split."""
    model, tok, paths = setup
    return {(t, s): S.reference_generate_acc(model, tok, S.read_rows(p)) for t, sp in paths.items()
            for s, p in sp.items()}


@pytest.mark.parametrize("mode", ["teacher_forced", "generate"])
def test_exact_match_agrees_with_per_example_generate(setup, generate_reference, mode):
    model, tok, paths = setup
    ev = ExactMatchEvaluator(paths, mode=mode, batch_size=16)
    for split, file_split in (("search", "validation"), ("test", "test")):
        got = ev(model, tok, split)
        _floats(got)
        for task in S.TASK_NAMES:
            want = generate_reference[task, file_split]
            assert got[f"{task}/acc"] == pytest.approx(want, abs=1e-12), (split, task)
        assert got["score"] == pytest.approx(sum(got[f"{t}/acc"] for t in S.TASK_NAMES) / 2)
        assert 0.2 < got["score"] < 0.8  # the set-up makes about half the answers right


def test_choice_agrees_with_per_example_loglikelihood(setup):
    model, tok, paths = setup
    ev = ExactMatchEvaluator(paths, mode="choice", batch_size=32)
    got = ev(model, tok, "test")
    _floats(got)
    for task in S.TASK_NAMES:
        want = S.reference_choice_acc(model, tok, S.read_rows(paths[task]["test"]))
        assert got[f"{task}/acc"] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("mode", ["teacher_forced", "generate", "choice"])
def test_accuracy_cached_and_follows_in_place_weight_changes(setup, mode):
    model, tok, paths = setup
    model = copy.deepcopy(model)
    ev = ExactMatchEvaluator(paths, mode=mode)
    first = ev(model, tok)
    assert ev(model, tok) == first
    S.perturb_(model, scale=0.2)
    second = ev(model, tok)
    assert second != first
    assert ExactMatchEvaluator(paths, mode=mode)(model, tok) == second  # a fresh evaluator agrees


def test_search_subsample_is_seeded_and_test_split_is_whole(setup):
    model, tok, paths = setup
    a = ExactMatchEvaluator(paths, limit=10, seed=3)
    b = ExactMatchEvaluator(paths, limit=10, seed=3)
    c = ExactMatchEvaluator(paths, limit=10, seed=4)
    for task in S.TASK_NAMES:
        val = S.read_rows(paths[task]["validation"])
        rows = a.rows[task]["search"]
        assert len(rows) == 10 and rows == b.rows[task]["search"]
        assert all(r in val for r in rows)
        assert rows != c.rows[task]["search"]
        assert a.rows[task]["test"] == S.read_rows(paths[task]["test"])
        assert not {r["prompt"] for r in rows} & {r["prompt"] for r in a.rows[task]["test"]}


def test_data_dir_and_one_task_forms(setup):
    model, tok, paths = setup
    root = paths["add"]["validation"].parent.parent  # <root>/data
    by_dir = ExactMatchEvaluator(data_dir=root.parent, tasks=["add"])
    one = ExactMatchEvaluator({"search": paths["add"]["validation"], "test": paths["add"]["test"]})
    assert by_dir.tasks == ["add"] and one.tasks == ["task"]
    assert by_dir(model, tok)["add/acc"] == one(model, tok)["task/acc"]


def test_search_overlapping_test_is_refused(setup):
    _, _, paths = setup
    same = {"add": {"validation": paths["add"]["test"], "test": paths["add"]["test"]}}
    with pytest.raises(EvaluationError, match="overlap"):
        ExactMatchEvaluator(same)


def test_bad_inputs_give_clear_errors(setup, tmp_path):
    model, tok, paths = setup
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(EvaluationError, match=r"'add'.*nope\.jsonl"):
        ExactMatchEvaluator({"add": {"validation": missing, "test": paths["add"]["test"]}})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EvaluationError, match=r"'add'.*empty"):
        ExactMatchEvaluator({"add": {"validation": empty, "test": paths["add"]["test"]}})
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(EvaluationError, match="answer"):
        ExactMatchEvaluator({"add": {"validation": no_answer}})
    with pytest.raises(EvaluationError, match="mode"):
        ExactMatchEvaluator(paths, mode="sampled")
    with pytest.raises(EvaluationError, match="unknown evaluator 'bleu'"):
        build_evaluator("bleu")

    ev = ExactMatchEvaluator({"add": {"validation": paths["add"]["validation"]}})
    with pytest.raises(EvaluationError, match="split 'validation'"):
        ev(model, tok, "validation")
    with pytest.raises(EvaluationError, match=r"'add'.*no test data"):
        ev(model, tok, "test")

    # no pad token: batches are padded with EOS (masked out), as lm-eval pads them, and the
    # scores do not change; with no pad, EOS or unknown token to pad with, the error names it
    nopad = S.zoo_like_tokenizer()
    nopad.pad_token = None
    bare = S.zoo_like_tokenizer()
    bare.pad_token = bare.eos_token = bare.unk_token = None
    bare.name_or_path = "char-tokenizer-without-pad"
    for mode in ("teacher_forced", "generate", "choice"):
        assert ExactMatchEvaluator(paths, mode=mode)(model, nopad) == ExactMatchEvaluator(paths, mode=mode)(model, tok)
        with pytest.raises(EvaluationError, match="char-tokenizer-without-pad.*pad"):
            ExactMatchEvaluator(paths, mode=mode)(model, bare)


def test_generate_refuses_a_tokenizer_that_cannot_decode_answers(setup):
    from evomerge.zoo import zoo_tokenizer

    tok = zoo_tokenizer()
    tok.backend_tokenizer.decoder = None  # "ab" now decodes as "a b"
    model, _, paths = setup
    with pytest.raises(EvaluationError, match="decoder"):
        ExactMatchEvaluator(paths, mode="generate")(model, tok)


# --------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------


def test_sliding_windows_predict_every_token_once_with_context():
    for n, length, stride in [(1, 4, 2), (2, 4, 2), (4, 4, 3), (10, 4, 2), (11, 4, 3), (37, 8, 5), (9, 8, 7)]:
        windows = sliding_windows(n, length, stride)
        targets = [t for b, e, f in windows for t in range(f, e)]
        assert targets == list(range(1, n)), (n, length, stride, windows)
        for b, e, f in windows:
            assert 0 <= b < f <= e <= n and e - b <= length
            if b > 0:
                assert f - b >= length - stride
    with pytest.raises(EvaluationError, match="stride"):
        sliding_windows(10, 4, 4)


def _reference_nll(model, tok, docs, length, stride):
    """Summed NLL and token count, one forward pass per predicted token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = tok(doc)["input_ids"]
            for b, e, f in sliding_windows(len(ids), length, stride):
                for t in range(f, e):
                    logits = model(input_ids=torch.tensor([ids[b:t]])).logits[0, -1]
                    total -= float(logits.log_softmax(-1)[ids[t]])
                    count += 1
    return total, count


def test_perplexity_agrees_with_per_token_reference(setup, tmp_path):
    model, tok, paths = setup
    docs = ["the quick brown fox jumps over the lazy dog, " * 2, "add:12+34=46\n", "rev:abcde=edcba\n" * 3]
    search = tmp_path / "search.jsonl"
    search.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    text = tmp_path / "test.txt"
    text.write_text(docs[0])
    for length, stride in [(64, 32), (16, 5)]:
        ev = PerplexityEvaluator({"search": search, "test": text}, max_length=length, stride=stride, batch_size=3)
        got = ev(model, tok)
        _floats(got)
        total, count = _reference_nll(model, tok, docs, length, stride)
        assert got["text/nll"] == pytest.approx(total / count, rel=1e-5)
        assert got["text/ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
        assert got["score"] == got["text/ppl"]
        total, count = _reference_nll(model, tok, docs[:1], length, stride)
        assert ev(model, tok, "test")["text/nll"] == pytest.approx(total / count, rel=1e-5)


def test_perplexity_on_zoo_rows_cached_and_follows_weights(setup):
    model, tok, paths = setup
    model = copy.deepcopy(model)
    ev = PerplexityEvaluator(paths, limit=15, max_length=32)
    assert ev.tasks == list(S.TASK_NAMES) and ev.direction == "minimize"
    first = ev(model, tok)
    assert ev(model, tok) == first
    S.perturb_(model)
    assert ev(model, tok)["score"] != first["score"]


def test_perplexity_from_a_datasets_spec(setup, tmp_path):
    model, tok, _ = setup
    docs = ["add:12+34=46\n", "rev:abcde=edcba\n", "srt:31=13\n"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    spec = {"path": "json", "data_files": {"validation": str(rows)}, "field": "body"}
    got = PerplexityEvaluator({"search": spec}, max_length=32)(model, tok)  # split defaults to "validation"
    total, count = _reference_nll(model, tok, docs, 32, 16)
    assert got["text/nll"] == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(EvaluationError, match="no field 'text'"):
        PerplexityEvaluator({"search": {**spec, "field": "text"}})


def test_perplexity_errors(setup, tmp_path):
    model, tok, _ = setup
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(EvaluationError, match="'text'"):
        PerplexityEvaluator({"search": bad})
    with pytest.raises(EvaluationError, match=r"'text'.*search.*missing\.txt"):
        PerplexityEvaluator({"search": tmp_path / "missing.txt"})


# --------------------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------------------


def _reference_entropy(model, tok, prompts):
    hs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
            logp = model(input_ids=ids).logits[0, -1].log_softmax(-1)
            hs.append(float(-(logp.exp() * logp).sum()))
    return sum(hs) / len(hs)


def test_entropy_agrees_with_per_example_reference(setup):
    model, tok, paths = setup
    model = copy.deepcopy(model)
    ev = EntropyEvaluator(paths, limit=12, seed=1, batch_size=5)
    assert ev.direction == "minimize"
    got = ev(model, tok)
    _floats(got)
    for task in S.TASK_NAMES:
        want = _reference_entropy(model, tok, ev.prompts[task]["search"])
        assert got[f"{task}/entropy"] == pytest.approx(want, rel=1e-5)
    assert ev(model, tok) == got
    test = ev(model, tok, "test")
    assert test["add/entropy"] == pytest.approx(
        _reference_entropy(model, tok, [r["prompt"] for r in S.read_rows(paths["add"]["test"])]), rel=1e-5)
    S.perturb_(model)
    assert ev(model, tok)["score"] != got["score"]


def test_prediction_entropy_is_differentiable_through_functional_call(setup):
    model, tok, _ = setup
    batch = encode_prompts(tok, ["add:12+34=", "rev:abcde=", "srt:5"])
    plain = prediction_entropy(model, batch)
    assert plain.shape == (3,) and plain.grad_fn is None

    params = {k: v.detach() for k, v in model.named_parameters()}
    scale = torch.tensor(1.0, requires_grad=True)

    def call(**kw):
        scaled = {k: v * scale if k.endswith("lm_head.weight") else v for k, v in params.items()}
        return torch.func.functional_call(model, scaled, args=(), kwargs=kw)

    h = prediction_entropy(call, batch, differentiable=True)
    assert torch.allclose(h.detach(), plain, atol=1e-5)
    h.mean().backward()
    assert scale.grad is not None and float(scale.grad) != 0.0


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------


def test_registry_builds_every_evaluator(setup):
    _, _, paths = setup
    assert set(EVALUATORS) >= {"exact_match", "accuracy", "lm_eval", "perplexity", "entropy"}
    built = {
        "accuracy": build_evaluator("accuracy", data=paths),
        "exact_match": build_evaluator("exact_match", data=paths),
        "choice": build_evaluator("choice", data=paths),
        "perplexity": build_evaluator("perplexity", data=paths),
        "entropy": build_evaluator("entropy", data=paths),
    }
    assert built["accuracy"].mode == "teacher_forced" and built["exact_match"].mode == "generate"
    for name, ev in built.items():
        assert isinstance(ev, Evaluator), name
        assert ev.direction == ("minimize" if name in ("perplexity", "entropy") else "maximize")
        assert list(ev.tasks) == list(S.TASK_NAMES)


def test_package_import_does_not_import_lm_eval():
    import subprocess
    import sys

    code = "import sys, evomerge.evaluate; print('lm_eval' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["False", "False"]


def test_shares_of_a_split_are_seeded_nested_and_in_order():
    """``part``: ceil(fraction * n) items (at least one), in their order, the same for a
    seed, and a smaller share's items among a larger one's (a promoted candidate is scored
    again on a superset of its first look)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from evomerge.evaluate._common import part

    @settings(max_examples=200, deadline=None)
    @given(st.integers(1, 300), st.floats(0.001, 1.0), st.floats(0.001, 1.0), st.integers(0, 2**32 - 1))
    def check(n, a, b, seed):
        lo, hi = sorted((a, b))
        items = list(range(n))
        small, large = part(items, lo, seed), part(items, hi, seed)
        assert len(small) == max(1, math.ceil(lo * n - 1e-9)) and small == sorted(small)
        assert set(small) <= set(large) and part(items, lo, seed) == small
        assert part(items, 1.0, seed) == items

    check()
    assert part(list(range(100)), 0.5, 0) != part(list(range(100)), 0.5, 1)
