"""make_plan: lowest-BI pruning to a stored-parameter ratio, replacement sources, ShortGPT baseline, errors."""

from __future__ import annotations

import pytest

from flexi_export.compress.choose import distance_matrix
from flexi_export.compress.planner import PlanOptions, compression_ratio, make_plan
from flexi_export.errors import CompressError
from flexi_export.layouts import layout_for
from flexi_export.model import build_flexi
from flexi_export.plan import BlockPlan, SourceInfo
from flexi_export.stats import count_parameters, dense_parameters, plan_parameters
from tests.helpers import tiny_model

SCORES = [0.9, 0.3, 0.05, 0.2, 0.1, 0.6]  # prune order: 2, 4, 3, 1, 5, 0


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def dims(model):
    return layout_for("llama").dims(model.config)


def _plan(model, dims, **kw):
    options = PlanOptions(**{"rank": 4, **kw})

    def distances(pruned, kept):
        return distance_matrix(model, pruned, kept, options.rank, options.targets, progress=False)

    return make_plan(SourceInfo("llama", 6), dims, SCORES, options, distances)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.45])
def test_prunes_the_fewest_lowest_bi_blocks_that_reach_the_ratio(model, dims, ratio):
    result = _plan(model, dims, ratio=ratio, ofn="rms")
    k = len(result.pruned)
    assert list(result.pruned) == sorted([2, 4, 3, 1, 5][:k])
    assert result.ratio >= ratio
    fewer = _plan(model, dims, num_blocks=k - 1, ofn="rms").ratio if k > 1 else 0.0
    assert fewer < ratio  # one block fewer would not reach it


def test_achieved_ratio_is_exact_and_counts_adapters_norms_and_ofn(model, dims):
    result = _plan(model, dims, ratio=0.3, ofn="layernorm")
    stored = plan_parameters(result.plan, dims)
    assert result.ratio == 1 - stored / dense_parameters(dims)
    built = build_flexi(model, result.plan)
    assert count_parameters(built).unique_params == stored  # the prediction is what the model really stores
    prov = result.plan.provenance
    assert prov["achieved_ratio"] == result.ratio and prov["stored_parameters"] == stored
    without_ofn = _plan(model, dims, num_blocks=len(result.pruned), ofn="none")
    assert without_ofn.ratio > result.ratio  # OFN gammas are counted


def test_provenance_has_scores_sources_and_the_distance_matrix(model, dims):
    result = _plan(model, dims, num_blocks=2)
    prov = result.plan.provenance
    assert prov["block_influence"] == SCORES
    assert prov["pruned"] == [2, 4]
    matrix = prov["distance_matrix"]
    assert matrix["pruned"] == [2, 4] and matrix["kept"] == [0, 1, 3, 5]
    for row, i in zip(matrix["values"], matrix["pruned"], strict=True):
        assert row == [result.distances[i][j] for j in matrix["kept"]]
        best = matrix["kept"][row.index(min(row))]
        assert prov["sources"][str(i)] == best == result.sources[i]
    again = BlockPlan.from_json(result.plan.to_json())
    assert again.fingerprint() == result.plan.fingerprint()


def test_shortgpt_removes_the_same_blocks(model, dims):
    flexi = _plan(model, dims, ratio=0.3)
    short = _plan(model, dims, ratio=0.3, method="shortgpt")
    assert short.pruned == flexi.pruned
    assert [e.kind for e in short.plan.entries if e.source in short.pruned] == ["removed"] * len(short.pruned)
    assert short.ratio == compression_ratio(short.plan, dims) > flexi.ratio


def test_choice_and_max_reuse_reach_the_plan(model, dims):
    result = _plan(model, dims, num_blocks=3, choice="previous")
    assert result.sources == {2: 1, 3: 1, 4: 1}  # pruned 2, 3, 4: the nearest kept block before each is 1
    capped = _plan(model, dims, num_blocks=3, max_reuse=1)
    assert len(set(capped.sources.values())) == 3


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ratio": 0.0}, "strictly between 0 and 1"),
        ({"ratio": 1.0}, "strictly between 0 and 1"),
        ({"ratio": -0.2}, "strictly between 0 and 1"),
        ({"ratio": 0.95}, "unreachable"),
        ({"ratio": 0.3, "rank": 65}, "larger than the matrices allow.*at most 32"),
        ({"num_blocks": 6}, "between 1 and 5 can be pruned"),
        ({"num_blocks": 0}, "between 1 and 5 can be pruned"),
        ({"ratio": 0.3, "num_blocks": 2}, "exactly one of --ratio and --num-blocks"),
        ({}, "exactly one of --ratio and --num-blocks"),
        ({"ratio": 0.3, "ofn": "batchnorm"}, "--ofn must be one of"),
        ({"ratio": 0.3, "method": "magic"}, "unknown method"),
    ],
)
def test_bad_options_are_clear_errors(model, dims, kw, message):
    with pytest.raises(CompressError, match=message):
        _plan(model, dims, **kw)


def test_unreachable_because_adapters_are_as_big_as_blocks(model, dims):
    with pytest.raises(CompressError, match=r"unreachable.*lower --ratio or --rank"):
        _plan(model, dims, ratio=0.2, rank=32)


def test_a_model_with_one_block_cannot_be_pruned():
    one = tiny_model("llama", num_hidden_layers=1)
    dims = layout_for("llama").dims(one.config)
    with pytest.raises(CompressError, match="pruning needs at least 2"):
        make_plan(SourceInfo("llama", 1), dims, [0.5], PlanOptions(ratio=0.3), lambda p, k: {})
