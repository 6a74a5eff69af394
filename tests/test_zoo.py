"""The local zoo: tasks, splits, determinism, caching, offline loading, atomic builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge import zoo as Z  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "zoo"
    return Z.build_zoo(root, Z.ZooConfig.test_mode(), progress=False, log=lambda *_: None)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "lm_eval_tasks" not in p.parts}


def test_tasks_solve_by_hand():
    t = Z.TASKS
    assert t["add"].solve("47+85") == "132"
    assert t["reverse"].solve("abcde") == "edcba"
    assert t["sort"].solve("52813") == "12358"
    assert t["increment"].solve("48290") == "59301"
    assert t["alternate"].solve("abcdefgh") == "aceg"
    assert t["shift"].solve("abzqy") == "bcarz"
    assert t["rotate"].solve("abcde") == "bcdea"
    assert t["reverse"].prompt("abcde") == "rev:abcde="
    prefixes = [task.prefix for task in t.values()]
    assert len(set(prefixes)) == len(prefixes)


@pytest.mark.parametrize("name", list(Z.TASKS))
def test_examples_are_distinct_correct_and_seeded(name):
    task = Z.TASKS[name]
    rows = Z.make_examples(task, task.target_n, 300, seed=3)
    assert len({r["input"] for r in rows}) == 300
    for r in rows:
        assert r["prompt"] == task.prompt(r["input"]) and r["answer"] == task.solve(r["input"])
        assert r["choices"][r["label"]] == r["answer"]
        assert len(set(r["choices"])) == 4 and all(len(c) == len(r["answer"]) for c in r["choices"])
    assert rows == Z.make_examples(task, task.target_n, 300, seed=3)
    assert rows != Z.make_examples(task, task.target_n, 300, seed=4)
    excluded = {r["input"] for r in rows[:100]}
    again = Z.make_examples(task, task.target_n, 100, seed=5, exclude=excluded)
    assert not excluded & {r["input"] for r in again}


def test_examples_do_not_depend_on_hash_seed():
    code = ("from evomerge.zoo import TASKS, make_examples; import json; "
            "print(json.dumps(make_examples(TASKS['sort'], 5, 20, 0)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(s)}).stdout for s in (1, 2)}
    assert len(outs) == 1


def test_impossible_request_is_a_clear_error():
    with pytest.raises(ValueError, match="add"):
        Z.make_examples(Z.TASKS["add"], 1, 200, seed=0)  # only 100 one-digit sums exist


def test_layout_splits_and_offline_loading(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = built
    assert set(zoo.tasks) == set(Z.ZooConfig().tasks)
    for t in zoo.tasks:
        val = [json.loads(x) for x in zoo.data(t, "validation").read_text().splitlines()]
        test = [json.loads(x) for x in zoo.data(t, "test").read_text().splitlines()]
        assert len(val) >= 300 and len(test) >= 300
        assert not {r["input"] for r in val} & {r["input"] for r in test}
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer)
    assert tok("rev:ab=")["input_ids"] == tok.convert_tokens_to_ids(list("rev:ab="))
    assert tok.pad_token == "<pad>" and tok.model_max_length == 64
    for path in [zoo.base, *zoo.experts.values()]:
        assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(path)
        tok2 = AutoTokenizer.from_pretrained(path)
        ids = tok2(["rev:abcde="], return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
    yamls = sorted(p.name for p in zoo.lm_eval_tasks.glob("*.yaml"))
    assert "zoo_reverse.yaml" in yamls and "zoo_reverse_mc.yaml" in yamls
    assert str(zoo.data("reverse", "test").resolve()) in (zoo.lm_eval_tasks / "zoo_reverse.yaml").read_text()


def test_accuracies_recorded_at_build_are_reproducible(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = built
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer)
    cfg = Z.ZooConfig.test_mode()
    model = AutoModelForCausalLM.from_pretrained(zoo.experts["sort"])
    rows = Z.eval_splits(Z.TASKS["sort"], cfg)["test"]
    assert Z.accuracy(model, tok, rows) == pytest.approx(zoo.info["accuracy"]["sort"]["sort"]["test"], abs=1e-4)


def test_second_build_is_instant_and_rebuild_is_identical(built, tmp_path):
    import time

    cfg = Z.ZooConfig.test_mode()
    t = time.perf_counter()
    again = Z.build_zoo(built.root, cfg, progress=False, log=lambda *_: None)
    assert time.perf_counter() - t < 1.0
    assert again.info == built.info
    other = Z.build_zoo(tmp_path / "other", cfg, progress=False, log=lambda *_: None)
    a, b = _files(built.root), _files(other.root)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_other_config_in_same_folder_is_refused(built):
    with pytest.raises(Z.ZooError, match="another configuration"):
        Z.build_zoo(built.root, Z.ZooConfig.test_mode(seed=1), progress=False, log=lambda *_: None)


def test_unknown_task_and_foreign_folder_are_refused(tmp_path):
    with pytest.raises(Z.ZooError, match="unknown zoo task"):
        Z.build_zoo(tmp_path / "z", Z.ZooConfig.test_mode(tasks=("reverse", "parity")), progress=False)
    (tmp_path / "notzoo").mkdir()
    (tmp_path / "notzoo" / "x.txt").write_text("mine")
    with pytest.raises(Z.ZooError, match="not a zoo"):
        Z.build_zoo(tmp_path / "notzoo", Z.ZooConfig.test_mode(), progress=False)
    assert (tmp_path / "notzoo" / "x.txt").read_text() == "mine"
    with pytest.raises(Z.ZooError, match="no zoo"):
        Z.load_zoo(tmp_path / "missing")


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Z, "_save_model", boom)
    with pytest.raises(KeyboardInterrupt):
        Z.build_zoo(tmp_path / "z", Z.ZooConfig.test_mode(), progress=False, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_training_lowers_the_answer_loss():
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = Z.ZooConfig.test_mode()
    tok = Z.zoo_tokenizer()
    model = LlamaForCausalLM(Z.zoo_model_config(cfg, len(tok)))
    task = Z.TASKS["increment"]
    losses = Z.train(model, tok, Z._Sampler([(task, (3,))], 0, set()), steps=60, lr=3e-3, batch_size=32,
                     weight_decay=0.0, warmup=5, progress=False)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_cli_build_and_info(tmp_path, capsys):
    out = tmp_path / "z"
    assert Z.main(["build", "--out", str(out), "--test-mode", "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert Z.main(["info", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "base" in table and "increment" in table
    assert Z.main(["info", "--out", str(tmp_path / "nothing")]) == 2
    assert "no zoo" in capsys.readouterr().err


def test_cli_builds_a_zoo_of_the_tasks_asked_for(tmp_path, capsys):
    """``--tasks``: one expert per task named (five, with ``add``, for stronger interference);
    unknown, repeated or single tasks are refused, naming the known ones."""
    out = tmp_path / "z5"
    assert Z.main(["build", "--out", str(out), "--test-mode", "--no-progress",
                   "--tasks", "reverse,sort,increment,alternate,add"]) == 0
    zoo = Z.load_zoo(out)
    assert list(zoo.tasks) == ["reverse", "sort", "increment", "alternate", "add"]
    assert sorted(zoo.experts) == sorted(zoo.tasks)
    capsys.readouterr()
    for bad in ("reverse,parity", "reverse", "sort,sort"):
        assert Z.main(["build", "--out", str(tmp_path / "bad"), "--test-mode", "--tasks", bad]) == 2
        assert "of add, reverse, sort, increment, alternate, shift" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_independent_experts_share_no_base(tmp_path, capsys):
    """``build --independent``: one expert per task from its own initialization: no tensor
    of one is near another's (unlike the zoo's experts, fine-tunes of one base); relabeling
    one onto another raises their similarity; a second build is instant and the same; the
    info table lists them."""
    import time

    import torch
    from safetensors.torch import load_file

    from evomerge.merge import align as A

    out = tmp_path / "z"
    assert Z.main(["build", "--out", str(out), "--test-mode", "--independent", "--independent-steps", "20",
                   "--no-progress"]) == 0
    assert "independent experts (no shared base)" in capsys.readouterr().out
    zoo = Z.load_zoo(out)
    ind = zoo.independent()
    assert sorted(ind) == sorted(zoo.tasks)
    w = {t: load_file(str(p / "model.safetensors")) for t, p in ind.items()}
    a, b = w[zoo.tasks[0]], w[zoo.tasks[1]]
    name = "model.layers.0.mlp.up_proj.weight"
    cos = torch.nn.functional.cosine_similarity(a[name].flatten(), b[name].flatten(), dim=0)
    assert abs(float(cos)) < 0.2  # independent draws, not one base fine-tuned twice
    shared = load_file(str(zoo.experts[zoo.tasks[0]] / "model.safetensors"))
    other = load_file(str(zoo.experts[zoo.tasks[1]] / "model.safetensors"))
    assert float(torch.nn.functional.cosine_similarity(shared[name].flatten(), other[name].flatten(), dim=0)) > 0.9
    cfg = json.loads((ind[zoo.tasks[0]] / "config.json").read_text())
    lay = A.layout_of({k: tuple(v.shape) for k, v in a.items()}, cfg)
    perms = A.weight_matching(lay, a, b)
    assert A.similarity(lay, a, b, perms) > A.similarity(lay, a, b)
    t = time.perf_counter()
    again = Z.build_independent(zoo, 20, progress=False, log=lambda *_: None)
    assert time.perf_counter() - t < 1.0 and again == ind
    assert Z.main(["info", "--out", str(out)]) == 0
    assert "independent experts" in capsys.readouterr().out
