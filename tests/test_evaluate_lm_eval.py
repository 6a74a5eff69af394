"""The lm-eval evaluator, offline, on zoo-format JSONL tasks through the in-memory path:
agreement with lm-eval's own ``simple_evaluate`` and with the native evaluators, caching,
disjoint splits, the benchmark guard and clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import eval_support as S  # sets the offline environment first
import pytest
import yaml

from evomerge.evaluate import EvaluationError, ExactMatchEvaluator, LMEvalEvaluator, write_jsonl_tasks

GEN = [f"zoo_{t}" for t in S.TASK_NAMES]
MC = [f"{t}_mc" for t in GEN]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with S.one_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    model, tok, paths = S.make_setup(root)
    include = write_jsonl_tasks(paths, root / "tasks", stop=["\n"])
    return model, tok, paths, include


@pytest.fixture(scope="module")
def gen_eval(setup):
    _, _, _, include = setup
    return LMEvalEvaluator(GEN, include_path=include, batch_size=32)


def test_write_jsonl_tasks(setup, tmp_path):
    _, _, paths, include = setup
    names = sorted(p.name for p in Path(include).iterdir())
    assert names == sorted([f"{n}.yaml" for n in GEN + MC] + ["_zoo.yaml", "_zoo_mc.yaml"])
    cfg = yaml.safe_load((Path(include) / "zoo_add.yaml").read_text())
    files = cfg["dataset_kwargs"]["data_files"]
    assert files == {"validation": str(paths["add"]["validation"].resolve()), "test": str(paths["add"]["test"].resolve())}
    assert all(Path(f).is_absolute() for f in files.values())
    assert cfg["generation_kwargs"]["until"] == ["\n"] and cfg["metric_list"][0]["metric"] == "exact_match"
    mc = yaml.safe_load((Path(include) / "zoo_add_mc.yaml").read_text())
    assert mc["output_type"] == "multiple_choice" and mc["target_delimiter"] == ""
    group = yaml.safe_load((Path(include) / "_zoo.yaml").read_text())
    assert group["group"] == "zoo" and group["task"] == GEN
    with pytest.raises(EvaluationError, match=r"'add'.*missing\.jsonl"):
        write_jsonl_tasks({"add": {"validation": tmp_path / "missing.jsonl", "test": paths["add"]["test"]}}, tmp_path)


def test_generate_until_equals_native_generate_and_is_cached(setup, gen_eval):
    model, tok, paths, _ = setup
    native = ExactMatchEvaluator(paths, mode="generate")
    for split in ("search", "test"):
        got = gen_eval(model, tok, split)
        assert all(type(v) is float for v in got.values())
        want = native(model, tok, split)
        for task in S.TASK_NAMES:
            assert got[f"zoo_{task}/exact_match"] == pytest.approx(want[f"{task}/acc"], abs=1e-12)
        assert got["score"] == pytest.approx(want["score"], abs=1e-12)
        assert 0.2 < got["score"] < 0.8
        assert gen_eval(model, tok, split) == got
    assert gen_eval._lm is not None
    lm = gen_eval._lm
    gen_eval(model, tok)
    assert gen_eval._lm is lm  # one HFLM per model object


def test_multiple_choice_equals_native_choice(setup):
    model, tok, paths, include = setup
    ev = LMEvalEvaluator(MC, include_path=include, batch_size=64)
    got = ev(model, tok, "test")
    want = ExactMatchEvaluator(paths, mode="choice")(model, tok, "test")
    for task in S.TASK_NAMES:
        assert got[f"zoo_{task}_mc/acc"] == pytest.approx(want[f"{task}/acc"], abs=1e-12)
    assert "zoo_add_mc/acc_stderr" not in got


def test_test_split_equals_lm_eval_simple_evaluate(setup, gen_eval):
    import lm_eval

    from lm_eval.tasks import TaskManager

    model, tok, _, include = setup
    ours = gen_eval(model, tok, "test")
    tm = TaskManager(include_path=str(include), include_defaults=False)
    res = lm_eval.simple_evaluate(model=gen_eval._lm, tasks=GEN, task_manager=tm, bootstrap_iters=0,
                                  log_samples=False)
    for name in GEN:
        assert ours[f"{name}/exact_match"] == pytest.approx(float(res["results"][name]["exact_match,none"]))


def test_weights_changed_in_place_give_new_scores(setup):
    model, tok, _, include = setup
    model = copy.deepcopy(model)
    ev = LMEvalEvaluator(MC, include_path=include, limit=20)
    first = ev(model, tok)
    S.perturb_(model, scale=0.2)
    second = ev(model, tok)
    assert second != first
    fresh = LMEvalEvaluator(MC, include_path=include, limit=20)
    assert fresh(model, tok) == second


def test_search_subsample_seeded_and_disjoint(setup):
    _, _, _, include = setup
    a = LMEvalEvaluator(GEN, include_path=include, limit=7, seed=5)
    b = LMEvalEvaluator(GEN, include_path=include, limit=7, seed=5)
    for name in GEN:
        search, test = a._docs[name]["search"], a._docs[name]["test"]
        assert len(search) == 7 and search == b._docs[name]["search"]
        assert len(test) == S.EVAL_SIZE
        assert not {d["prompt"] for _, d in search} & {d["prompt"] for _, d in test}


def _only_test_task(root: Path, name: str, data: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_choice": "choices",
           "doc_to_target": "label", "target_delimiter": "", "num_fewshot": 0,
           "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_task_with_only_a_test_split_is_partitioned(setup, tmp_path):
    model, tok, paths, _ = setup
    include = _only_test_task(tmp_path / "t", "local_only_test", paths["add"]["test"])
    ev = LMEvalEvaluator(["local_only_test"], include_path=include, limit=10, seed=2)
    search, test = ev._docs["local_only_test"]["search"], ev._docs["local_only_test"]["test"]
    assert len(search) == 10 and len(test) == S.EVAL_SIZE - 10
    assert sorted(i for i, _ in search + test) == list(range(S.EVAL_SIZE))
    assert ev(model, tok)["score"] >= 0.0


def test_guard_refuses_search_on_benchmark_test_splits(setup, tmp_path):
    _, _, paths, _ = setup
    for name in ("arc_easy", "gsm8k", "mmlu_anatomy"):
        with pytest.raises(EvaluationError, match=f"{name}.*allow_test_split"):
            LMEvalEvaluator([name], search_split="test")
    # A benchmark-named task whose only split is the test split: the automatic search split
    # would be part of it, which is refused too, unless allowed.
    include = _only_test_task(tmp_path / "g", "gsm8k_local", paths["add"]["test"])
    with pytest.raises(EvaluationError, match="gsm8k_local.*allow_test_split"):
        LMEvalEvaluator(["gsm8k_local"], include_path=include, limit=10)
    ev = LMEvalEvaluator(["gsm8k_local"], include_path=include, limit=10, allow_test_split=True)
    assert len(ev._docs["gsm8k_local"]["test"]) == S.EVAL_SIZE - 10


def test_overlapping_search_and_test_refused(setup, tmp_path):
    _, _, paths, _ = setup
    same = {"add": {"validation": paths["add"]["test"], "test": paths["add"]["test"]}}
    include = write_jsonl_tasks(same, tmp_path / "same", prefix="dup_", stop=["\n"])
    with pytest.raises(EvaluationError, match="dup_add.*overlap"):
        LMEvalEvaluator(["dup_add"], include_path=include)


def test_unknown_task_named(setup):
    _, _, _, include = setup
    with pytest.raises(EvaluationError, match="unknown lm-eval task 'zoo_ad'.*zoo_add"):
        LMEvalEvaluator(["zoo_ad"], include_path=include, include_defaults=False)
    with pytest.raises(EvaluationError, match="does not exist"):
        LMEvalEvaluator(["zoo_add"], include_path="/nonexistent/tasks")


def test_tokenizer_without_pad_scores_the_same(setup):
    model, tok, _, include = setup
    nopad = S.zoo_like_tokenizer()
    nopad.pad_token = None
    assert LMEvalEvaluator(MC, include_path=include, limit=5)(model, nopad) == \
        LMEvalEvaluator(MC, include_path=include, limit=5)(model, tok)
    bare = S.zoo_like_tokenizer()
    bare.pad_token = bare.eos_token = bare.unk_token = None
    bare.name_or_path = "char-tokenizer-without-pad"
    with pytest.raises(EvaluationError, match="char-tokenizer-without-pad.*pad"):
        LMEvalEvaluator(MC, include_path=include, limit=5)(model, bare)
