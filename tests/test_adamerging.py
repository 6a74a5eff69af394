"""AdaMerging: the differentiable merge equals the engine's, entropy goes down, ++ trims as
TIES does, and a run resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evomerge.evaluate import prediction_entropy
from evomerge.evaluate.entropy import encode_prompts
from evomerge.execute import Worker
from evomerge.search.adamerging import AdaMerging, _ties_filter
from evomerge.space import Space
from evomerge.trials import TrialLog


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from evomerge.zoo import ZooConfig, build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "zoo", ZooConfig.test_mode(), progress=False,
                     log=lambda *_: None)


def setup(zoo, granularity="per_layer"):
    sp = Space("task_arithmetic", [str(p) for p in zoo.experts.values()], base_model=str(zoo.base),
               search=["weight"], granularity=granularity)
    w = Worker(sp, lambda *a, **k: {"score": 0.0})
    prompts = [json.loads(x)["prompt"] for t in zoo.tasks for x in zoo.data(t, "validation").read_text().splitlines()]
    return sp, w, prompts[::7]


@pytest.mark.parametrize("granularity", ["per_model", "per_layer", "per_layer_filtered", "per_tensor"])
def test_differentiable_merge_equals_the_engines(zoo, granularity):
    sp, w, prompts = setup(zoo, granularity)
    am = AdaMerging(sp, w, prompts)
    x = np.random.default_rng(0).uniform(0, 1, len(sp))
    with torch.no_grad():
        am.x.copy_(torch.tensor(x, dtype=torch.float32))
    ours = am.merged_params()
    ref = w.engine.merged(sp.recipe(x))
    assert set(ours) <= set(ref)
    for name, t in ours.items():
        assert torch.allclose(t, ref[name], atol=1e-5), name


def test_training_lowers_the_entropy_and_stays_in_bounds(zoo, tmp_path):
    sp, w, prompts = setup(zoo, "per_model")
    am = AdaMerging(sp, w, prompts, lr=0.05, steps=30, batch_size=32)
    batch = encode_prompts(w.tokenizer, prompts)

    def full_entropy(x):
        w.engine.materialize(sp.recipe(x), into=w.model)
        return float(prediction_entropy(w.model, batch).mean())

    before = full_entropy(am.genome())
    x, _ = am.run(tmp_path / "run", progress=False)
    assert np.all(x >= 0) and np.all(x <= 1)
    assert full_entropy(x) < before
    recs = TrialLog(tmp_path / "run" / "trials.jsonl").results()
    assert [r.id for r in recs] == list(range(30)) and all(r.metrics["entropy"] >= 0 for r in recs)


def test_resume_continues_exactly(zoo, tmp_path):
    sp, w, prompts = setup(zoo, "per_model")
    full = AdaMerging(sp, w, prompts, lr=0.05, steps=12, batch_size=8).run(tmp_path / "full", progress=False)[0]
    AdaMerging(sp, w, prompts, lr=0.05, steps=5, batch_size=8).run(tmp_path / "cut", progress=False)
    resumed = AdaMerging(sp, w, prompts, lr=0.05, steps=12, batch_size=8).run(tmp_path / "cut", resume=True,
                                                                               progress=False)[0]
    assert np.allclose(resumed, full, atol=1e-7)
    ids = [r.id for r in TrialLog(tmp_path / "cut" / "trials.jsonl")]
    assert ids == list(range(12))


def test_ties_filter_by_hand():
    tau = torch.tensor([[0.5, -0.1, 0.3, -0.9], [-0.4, 0.2, 0.1, 0.05]])
    out = _ties_filter(tau, density=0.5)
    # trims: model 0 keeps -0.9 and 0.5; model 1 keeps -0.4 and 0.2
    # elected signs of the trimmed sum [0.1, 0.2, 0, -0.9]: +, +, + (zero), -
    assert torch.equal(out, torch.tensor([[0.5, 0.0, 0.0, -0.9], [0.0, 0.2, 0.0, 0.0]]))


def test_ties_filter_follows_methods_ties_with_tied_magnitudes():
    """Magnitudes tied at the cut (integer task vectors): the kept entries are the ones
    methods.ties keeps (ties broken by position), so AdaMerging++ merges what a TIES recipe
    would; torch.topk broke such ties its own way."""
    from evomerge.merge.methods import ties

    g = torch.Generator().manual_seed(0)
    for density in (0.1, 0.3, 0.5, 0.77, 1.0):
        tau = torch.randint(-3, 4, (3, 257), generator=g).float()
        want = ties(torch.zeros(257), list(tau), weight=[1.0, 1.0, 1.0], density=[density] * 3, normalize=False)
        assert torch.equal(_ties_filter(tau, density).sum(0), want), density


def test_bad_spaces_are_refused(zoo):
    sp = Space("ties", [str(p) for p in zoo.experts.values()], base_model=str(zoo.base),
               search=["weight", "density"], granularity="per_model")
    w = Worker(sp, lambda *a, **k: {"score": 0.0})
    with pytest.raises(ValueError, match="task_arithmetic"):
        AdaMerging(sp, w, ["rev:ab="])
