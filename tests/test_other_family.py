"""Every evaluator on a model family evomerge did not shape (GPT-2, byte-level BPE with a BOS
token and no pad token, answers ended by EOS, no newline anywhere, its own field names and
file names): each expert scores its own task, native and lm-eval scores of the same model on
the same rows agree, and the native scores equal plain per-row ``model.generate``."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge.evaluate import EvaluationError, ExactMatchEvaluator, LMEvalEvaluator, build_evaluator, write_jsonl_tasks

NATIVE = ("accuracy", "exact_match", "choice")


@pytest.fixture(scope="module")
def models(words):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {"base": words.base, **words.experts}
    tok = AutoTokenizer.from_pretrained(words.base)
    assert tok.pad_token is None and tok("x")["input_ids"][0] == tok.bos_token_id  # the conventions under test
    return tok, {k: AutoModelForCausalLM.from_pretrained(p).eval() for k, p in out.items()}


def _data(words):
    return {t: {"search": d["dev"], "test": d["test"]} for t, d in words.data.items()}


def native(name, words, **kw):
    return build_evaluator(name, data=_data(words), fields=words.fields, batch_size=32, **kw)


@pytest.fixture(scope="module")
def lm_tasks(words, tmp_path_factory):
    files = {t: {"validation": d["dev"], "test": d["test"]} for t, d in words.data.items()}
    return write_jsonl_tasks(files, tmp_path_factory.mktemp("tasks"), prefix="w_", fields=words.fields)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def reference_generate(model, tok, rows) -> float:
    """Exact match by one ``model.generate`` per row, the tokenizer's own way (BOS added),
    stopping where the model's generation config says."""
    hits = 0
    with torch.no_grad():
        for r in rows:
            enc = tok(r["question"], return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
            hits += tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == r["target"]
    return hits / len(rows)


@pytest.mark.parametrize("name", NATIVE)
def test_every_native_evaluator_scores_each_expert_on_its_own_task(words, models, name):
    tok, ms = models
    ev = native(name, words)
    for task in words.tasks:
        for split in ("search", "test"):
            got = ev(ms[task], tok, split)
            assert got[f"{task}/acc"] >= 0.99, (name, task, split, got)
        other = next(t for t in words.tasks if t != task)
        if name != "choice":  # four near-miss options: the other expert may still rank them
            assert ev(ms[task], tok, "test")[f"{other}/acc"] <= 0.2


def test_native_generate_equals_per_row_model_generate(words, models):
    tok, ms = models
    ev = native("exact_match", words)
    for name in ("base", *words.tasks):
        for task in words.tasks:
            want = reference_generate(ms[name], tok, _rows(words.data[task]["test"]))
            assert ev(ms[name], tok, "test")[f"{task}/acc"] == pytest.approx(want, abs=1e-12), (name, task)


def _half_merge(ms, tasks):
    """A model between the two experts (their mean): scores that are neither 0 nor 1."""
    import copy

    m = copy.deepcopy(ms[tasks[0]])
    with torch.no_grad():
        for (_, p), (_, q) in zip(m.named_parameters(), ms[tasks[1]].named_parameters()):
            p.mul_(0.5).add_(q, alpha=0.5)
    return m


def test_lm_eval_scores_each_expert_and_agrees_with_native(words, models, lm_tasks):
    tok, ms = models
    gen = LMEvalEvaluator([f"w_{t}" for t in words.tasks], include_path=lm_tasks, include_defaults=False)
    mc = LMEvalEvaluator([f"w_{t}_mc" for t in words.tasks], include_path=lm_tasks, include_defaults=False)
    natives = {n: native(n, words) for n in NATIVE}
    candidates = {**ms, "half": _half_merge(ms, words.tasks)}
    for name, model in candidates.items():
        for split in ("search", "test"):
            g, c = gen(model, tok, split), mc(model, tok, split)
            nat = {n: ev(model, tok, split) for n, ev in natives.items()}
            for task in words.tasks:
                if name == task:
                    assert g[f"w_{task}/exact_match"] >= 0.99 and c[f"w_{task}_mc/acc"] >= 0.99
                # the same rows, the same model: within one point
                assert abs(g[f"w_{task}/exact_match"] - nat["exact_match"][f"{task}/acc"]) <= 0.01, (name, task)
                assert abs(g[f"w_{task}/exact_match"] - nat["accuracy"][f"{task}/acc"]) <= 0.01, (name, task)
                assert abs(c[f"w_{task}_mc/acc"] - nat["choice"][f"{task}/acc"]) <= 0.01, (name, task)


def test_a_stop_string_the_tokenizer_cannot_write_is_named(words, models):
    """Demanding a newline after each answer would score a perfect expert 0%: with a
    tokenizer that cannot encode it the evaluator refuses; with one that can, the scores
    follow the data (the experts never write it)."""
    from evomerge.testing import tiny_config, tiny_model, tiny_tokenizer

    char = tiny_tokenizer()  # its vocabulary has no newline: "\n" becomes <unk>
    model = tiny_model(tiny_config(vocab=len(char)))
    rows = words.data[words.tasks[0]]
    for mode in ("teacher_forced", "generate"):
        ev = ExactMatchEvaluator({"t": {"search": rows["dev"]}}, fields=words.fields, mode=mode, stop=["\n"])
        with pytest.raises(EvaluationError, match=r"stop string '\\n'.*cannot encode"):
            ev(model, char, "search")
    tok, ms = models
    task = words.tasks[0]
    forced = native("accuracy", words, stop=["\n"])(ms[task], tok, "test")[f"{task}/acc"]
    assert forced == 0.0  # the expert ends its answers with EOS, never a newline
    assert native("accuracy", words)(ms[task], tok, "test")[f"{task}/acc"] >= 0.99


def test_perplexity_and_entropy_run_on_the_family(words, models):
    tok, ms = models
    ppl = build_evaluator("perplexity", data=_data(words), fields=words.fields)
    for task in words.tasks:
        other = next(t for t in words.tasks if t != task)
        own, theirs = ppl(ms[task], tok, "test"), ppl(ms[other], tok, "test")
        assert own[f"{task}/ppl"] < theirs[f"{task}/ppl"]  # each expert knows its own task's text best
    ent = build_evaluator("entropy", data=_data(words), field="question")
    out = ent(ms[words.tasks[0]], tok, "search")
    assert all(v >= 0 for v in out.values())


def test_continuations_are_encoded_as_lm_eval_encodes_them(words, models):
    """Prompts ending in spaces (``"A: "`` + ``"Paris"``), BPE merges across the boundary and
    the BOS token: the context and continuation ids are lm-eval's own ``_encode_pair``."""
    from lm_eval.models.huggingface import HFLM

    from evomerge.evaluate._batch import encode_continuations

    tok, ms = models
    lm = HFLM(pretrained=ms["base"], tokenizer=tok, batch_size=1)
    pairs = [("reverse: red cat sun =", "sun cat red"), ("reverse: red cat sun = ", "sun cat red"),
             ("Q: capital? A:  ", "Paris"), ("rotate: fish", " bird"), ("x\t", "y")]
    ctx, cont = encode_continuations(tok, [p for p, _ in pairs], [a for _, a in pairs])
    for (p, a), c, t in zip(pairs, ctx, cont):
        assert (c, t) == tuple(lm._encode_pair(p, a)), (p, a)
        assert t and tok.decode(c + t, skip_special_tokens=True) == p + a


def test_the_models_generation_config_says_where_answers_end(words, models):
    """Several end-of-generation ids are each accepted; when neither the model nor its
    tokenizer names the token the expert ends with, its answers run on and are wrong."""
    import copy

    from transformers import AutoTokenizer

    tok, ms = models
    task = words.tasks[0]
    m = copy.deepcopy(ms[task])
    other = tok.convert_tokens_to_ids(":")  # a token no answer holds
    colon_eos = AutoTokenizer.from_pretrained(words.base)
    colon_eos.eos_token = ":"
    for mode in ("accuracy", "exact_match"):
        ev = native(mode, words)
        m.generation_config.eos_token_id = [other, tok.eos_token_id]
        assert ev(m, tok, "test")[f"{task}/acc"] >= 0.99
        m.generation_config.eos_token_id = other
        assert ev(m, tok, "test")[f"{task}/acc"] >= 0.99  # the tokenizer's EOS still ends an answer
        assert ev(m, colon_eos, "test")[f"{task}/acc"] < 0.5  # ":" alone: the expert's <|eos|> is no stop


def test_stop_strings_from_a_command_line_name_a_newline():
    from evomerge.evaluate.accuracy import _stop_strings

    assert _stop_strings(["\\n", "###", "a\\tb", "\\\\n"]) == ("\n", "###", "a\tb", "\\n")
    with pytest.raises(EvaluationError, match="non-empty"):
        _stop_strings([""])


@pytest.mark.parametrize("method,search,granularity", [("ties", ["weight", "density"], "per_layer_filtered"),
                                                        ("dare_ties", ["weight", "density"], "per_layer"),
                                                        ("slerp", ["t"], "per_layer")])
def test_the_compiled_map_equals_the_recipe_on_gpt2(words, method, search, granularity):
    """The compiled coefficient map on GPT-2's tensors (transformer.h.N..., Conv1D, attn
    named ``attn``): a genome's parameters equal those resolved from its exported recipe."""
    import numpy as np
    import yaml

    from evomerge.merge.engine import Merger
    from evomerge.recipe import parse_recipe
    from evomerge.space import Space

    experts = [str(p) for p in words.experts.values()][: 1 if method == "slerp" else 3]
    sp = Space(method, experts, base_model=str(words.base), search=search, granularity=granularity)
    template = Merger(sp.recipe(sp.x0))
    cmap = sp.compile(template.tasks)
    for x in (sp.lower, np.random.default_rng(0).uniform(sp.lower, sp.upper)):
        recipe = parse_recipe(yaml.safe_load(sp.recipe_yaml(x)))
        plan = Merger(recipe, checkpoints=template.models).plan
        cols = cmap.columns(x)
        assert [cols.params(i) for i in range(len(plan.tasks))] == \
            [{} if t.copy else plan.resolve(recipe, t) for t in plan.tasks]


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_resident_candidates_on_gpt2_are_the_one_shot_merge(words, method, kernels):
    """A search's candidates on GPT-2 (Conv1D tensors, a tied head read from the
    embedding): the resident engine's flat path, in the fused kernels and in torch,
    materializes the one-shot merge's weights bit for bit, threads sharing the tensors."""
    import contextlib

    import numpy as np
    from transformers import AutoModelForCausalLM

    from evomerge.merge import native
    from evomerge.merge.engine import Merger
    from evomerge.merge.resident import ResidentMerger
    from evomerge.space import Space

    experts = [str(p) for p in words.experts.values()][:3]
    search = ["weight"] if method == "task_arithmetic" else ["weight", "density"]
    sp = Space(method, experts, base_model=str(words.base), search=search, granularity="per_layer")
    engine = ResidentMerger(sp.recipe(sp.x0), seed=3)
    assert engine._groups, "the flat path holds the family's tensors"
    cmap = sp.compile(engine.tasks)
    model = AutoModelForCausalLM.from_pretrained(words.base).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for x in np.random.default_rng(1).uniform(sp.lower, sp.upper, (1, len(sp))):
            with contextlib.nullcontext() if kernels else native.disabled():
                engine.materialize(cmap.columns(x), into=model)
            one = Merger(sp.recipe(x), seed=3)
            got = dict(model.named_parameters())
            for t in one.tasks:
                if t.name in got:
                    want = one.merge_tensor(t).to(got[t.name].dtype)
                    assert torch.equal(got[t.name].detach().view(torch.int32), want.view(torch.int32)), t.name
    finally:
        torch.set_num_threads(before)


def test_a_worker_on_shared_weights_scores_as_one_that_read_the_checkpoints(words):
    """Ray's workers build their live model from the shared weights and the config alone:
    it took the config's generation defaults instead of the model's generation config, so
    no answer ended at the family's stop token and every source and candidate scored 0,
    silently. Each source and a merge now score as with a model loaded the usual way."""
    import numpy as np

    from evomerge.execute import Worker, shared_inputs
    from evomerge.space import Space
    from evomerge.types import Candidate

    sp = Space("task_arithmetic", [str(p) for p in words.experts.values()], base_model=str(words.base),
               search=["weight"], granularity="per_layer")
    ev = native("exact_match", words, limit=16)
    own, shared = Worker(sp, ev), Worker(sp, ev, shared=shared_inputs(sp))
    assert shared.live_from == "resident inputs" and own.live_from == "checkpoint"
    assert shared.model.generation_config.to_diff_dict() == own.model.generation_config.to_diff_dict()
    x = list(np.full(len(sp), 0.6))
    for i, src in enumerate([*map(str, words.experts.values()), None]):
        a, b = (w.evaluate(Candidate(i, x, split="search", source=src)) for w in (own, shared))
        assert a.status == b.status == "ok" and a.metrics == b.metrics, (src, a.metrics, b.metrics)
        if src is not None:
            assert a.metrics["score"] > 0, "each expert answers its own task"


def test_objectives_read_each_evaluators_task_metric_on_the_family(words, models, lm_tasks):
    """Every evaluator names the metric that stands for each task (``primary``), and an
    objective bound to it reads those values: each expert is best on its own task and,
    under ``worst``, scored by the task it is worst at; perplexity's worst task is its
    highest; lm-eval's generative tasks stand by exact match, its multiple-choice ones by
    accuracy (the first metric of each task's metric_list)."""
    from evomerge.objective import Objective, Scoring

    tok, ms = models
    evs = {n: native(n, words) for n in NATIVE}
    evs["perplexity"] = build_evaluator("perplexity", data=_data(words), fields=words.fields)
    evs["entropy"] = build_evaluator("entropy", data=_data(words), field="question")
    evs["lm_eval"] = LMEvalEvaluator([f"w_{t}" for t in words.tasks], include_path=lm_tasks, include_defaults=False)
    evs["lm_eval_mc"] = LMEvalEvaluator([f"w_{t}_mc" for t in words.tasks], include_path=lm_tasks,
                                        include_defaults=False)
    assert [evs["lm_eval"].primary(t) for t in evs["lm_eval"].tasks] == ["exact_match"] * len(words.tasks)
    assert [evs["lm_eval_mc"].primary(t) for t in evs["lm_eval_mc"].tasks] == ["acc"] * len(words.tasks)
    for name, ev in evs.items():
        worst, mean = Scoring.of(Objective("worst"), ev), Scoring.of(Objective("mean"), ev)
        for task in words.tasks:
            m = ev(ms[task], tok, "test")
            vals = worst.values(m)
            assert set(vals) == set(ev.tasks)
            assert mean(m) == pytest.approx(m["score"] if ev.direction == "maximize" else -m["score"]), name
            pick = min if ev.direction == "maximize" else max
            assert worst.summary(m)["worst"] == pick(vals.values()), name
            assert worst(m) == (1 if ev.direction == "maximize" else -1) * pick(vals.values()), name
            if name in ("accuracy", "exact_match", "choice", "lm_eval", "lm_eval_mc"):
                own = next(t for t in ev.tasks if t in (task, f"w_{task}", f"w_{task}_mc"))
                assert vals[own] >= 0.99 and worst.summary(m)["worst_task"] != own, (name, task)


def test_every_evaluator_scores_a_share_of_the_search_split_as_it_scores_those_rows_alone(words, models, lm_tasks,
                                                                                           tmp_path):
    """``fraction`` (a multi-fidelity search's first look) scores the seeded share of each
    task's search rows that ``part`` picks: the same metrics as the evaluator built on a
    file of those rows alone, for every evaluator; the test split is never scored in part."""
    from evomerge.evaluate._common import part

    tok, ms = models
    model = _half_merge(ms, words.tasks)
    share = {}
    for t, d in words.data.items():
        rows = _rows(d["dev"])
        share[t] = tmp_path / f"{t}.jsonl"
        share[t].write_text("".join(json.dumps(r) + "\n" for r in part(rows, 0.4, 0)))
        assert len(part(rows, 0.4, 0)) == -(-len(rows) * 4 // 10) < len(rows)
    alone = {t: {"search": share[t], "test": d["test"]} for t, d in words.data.items()}
    pairs = {n: (native(n, words), build_evaluator(n, data=alone, fields=words.fields, batch_size=32)) for n in NATIVE}
    pairs["perplexity"] = (build_evaluator("perplexity", data=_data(words), fields=words.fields),
                           build_evaluator("perplexity", data=alone, fields=words.fields))
    pairs["entropy"] = (build_evaluator("entropy", data=_data(words), field="question"),
                        build_evaluator("entropy", data=alone, field="question"))
    files = {t: {"validation": share[t], "test": d["test"]} for t, d in words.data.items()}
    alone_tasks = write_jsonl_tasks(files, tmp_path / "tasks", prefix="w_", fields=words.fields)
    for suffix in ("", "_mc"):
        names = [f"w_{t}{suffix}" for t in words.tasks]
        pairs[f"lm_eval{suffix}"] = (LMEvalEvaluator(names, include_path=lm_tasks, include_defaults=False),
                                     LMEvalEvaluator(names, include_path=alone_tasks, include_defaults=False))
    for name, (ev, ref) in pairs.items():
        got, want = ev(model, tok, "search", fraction=0.4), ref(model, tok, "search")
        assert got.keys() == want.keys(), name
        for k in got:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (name, k)
        assert got != ev(model, tok, "search"), name  # (the whole split scores otherwise)
        with pytest.raises(EvaluationError, match="test split is\\s+always scored whole"):
            ev(model, tok, "test", fraction=0.5)
        with pytest.raises(EvaluationError, match="fraction must be in"):
            ev(model, tok, "search", fraction=0)


def test_a_share_of_a_few_shot_lm_eval_task_keeps_the_whole_splits_prompts(words, tmp_path):
    """lm-eval draws few-shot examples from a sampler with state: whichever is built first,
    a share's requests are the whole split's own, and the whole split's prompts do not
    depend on whether a share was scored before it (a promoted candidate is scored on the
    same prompts whichever worker scores it)."""
    import yaml

    from evomerge.evaluate._common import part

    files = {t: {"validation": d["dev"], "test": d["test"]} for t, d in words.data.items()}
    folder = write_jsonl_tasks(files, tmp_path / "tasks", prefix="f_", fields=words.fields)
    for path in folder.glob("f_*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        if "task" in cfg:
            cfg.update(num_fewshot=2, fewshot_split="validation")
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    names = [f"f_{t}" for t in words.tasks]

    def prompts(ev, fraction):
        return [[i.args[0] for g in p.groups for i in g] for p in ev._requests("search", fraction)]

    share_first = LMEvalEvaluator(names, include_path=folder, include_defaults=False, search_split="validation")
    whole_first = LMEvalEvaluator(names, include_path=folder, include_defaults=False, search_split="validation")
    a_share = prompts(share_first, 0.5)
    b_whole = prompts(whole_first, 1.0)
    assert prompts(share_first, 1.0) == b_whole and prompts(whole_first, 0.5) == a_share
    assert all(p.count("=") >= 3 for task in b_whole for p in task)  # two examples before each prompt
    for task, whole in zip(a_share, b_whole):
        assert task == part(whole, 0.5, 0)
