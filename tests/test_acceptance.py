"""The simulated drafter: tree shapes, ground truth, calibration against Figure 12, replay."""

import json

import numpy as np
import pytest

from adaserve.core.request import Request
from adaserve.scheduling.plan import SpecShape
from adaserve.scheduling.trees import CandidateForest, is_connected
from adaserve.sim.acceptance import (FIG12_CHAIN, LLAMA_ACCEPTANCE, QWEN_ACCEPTANCE, PAD_PROB, AcceptanceParams,
                                     AcceptanceRecordError, RecordedAcceptance, SyntheticAcceptance,
                                     accepted_lengths, acceptance_for, load_records, load_tree_confidences,
                                     load_tree_sizes, mean_committed, pad_trees, with_confidences)
from adaserve.sim.profiles import get_profile


def reqs(n, category="chat"):
    return [Request(i, 0.0, 10, 100, 1.2, 30.0, category) for i in range(n)]


@pytest.mark.parametrize("shape", [SpecShape(depth=5, width=3), SpecShape(depth=4, width=1),
                                   SpecShape.chain(6), SpecShape.static((1, 1, 3, 1, 1))])
def test_forest_shape_and_invariants(shape):
    f = LLAMA_ACCEPTANCE.draft(reqs(7), shape, np.random.default_rng(1))
    f.check()
    assert f.n_requests == 7
    assert np.all(np.diff(f.offsets) == shape.nodes_per_request())
    # path probabilities never grow along a path, and at most one node per depth is correct
    nonroot = f.parent >= 0
    assert np.all(f.prob[nonroot] <= f.prob[f.parent[nonroot]] + 1e-12)
    ok = f.extra["correct"]
    assert np.all(ok[f.parent[nonroot & ok]])  # a correct node's parent is correct
    for i in range(7):
        lo, hi = f.offsets[i], f.offsets[i + 1]
        depths = f.depth[lo:hi][ok[lo:hi]]
        assert len(depths) == len(set(depths.tolist()))


def test_accepted_lengths_by_hand():
    # request 0: root -> a(0.9) -> b(0.8) ; root -> c(0.1). request 1: root -> d(0.5)
    f = CandidateForest.from_lists([[(0, 1, 0.9), (1, 2, 0.8), (0, 3, 0.1)], [(0, 4, 0.5)]])
    f.extra["correct"] = np.array([True, True, True, False, True, False])
    everything = np.ones(6, bool)
    assert accepted_lengths(f, everything).tolist() == [2, 0]
    only_a = np.array([True, True, False, True, True, True])
    assert accepted_lengths(f, only_a).tolist() == [1, 0]
    # a correct node whose parent is not selected does not count
    hole = np.array([True, False, True, False, True, False])
    assert not is_connected(f, hole)
    assert accepted_lengths(f, hole).tolist() == [0, 0]


def test_path_probability_is_informative():
    """Calibrated draft: among depth-1 nodes, the share that is correct tracks the confidence."""
    f = LLAMA_ACCEPTANCE.draft(reqs(20000), SpecShape(depth=1, width=3), np.random.default_rng(0))
    d1 = f.depth == 1
    p, ok = f.prob[d1], f.extra["correct"][d1]
    for lo, hi in [(0.0, 0.2), (0.4, 0.6), (0.8, 1.0)]:
        band = (p >= lo) & (p < hi)
        assert band.sum() > 200
        assert lo - 0.05 <= ok[band].mean() <= hi + 0.05


@pytest.mark.parametrize("family,model", [("llama", LLAMA_ACCEPTANCE), ("qwen2", QWEN_ACCEPTANCE)])
def test_chain_calibration_near_figure12(family, model):
    """Figure 12's chain values are not concave in k (tokens 5-8 gain more than 1-4), which no
    prefix-acceptance model can match exactly; the fit stays within 15% at every k and is exact
    in ordering."""
    got = {k: mean_committed(model, SpecShape.chain(k), samples=8000) for k in (4, 6, 8)}
    for k, paper in FIG12_CHAIN[family].items():
        assert abs(got[k] - paper) / paper < 0.15, (k, got[k], paper)
    assert got[4] < got[6] < got[8]


def test_trees_beat_chains_and_models_are_chosen_by_family():
    chain = mean_committed(LLAMA_ACCEPTANCE, SpecShape.chain(8), samples=4000)
    tree = mean_committed(LLAMA_ACCEPTANCE, SpecShape(depth=8, width=3), samples=4000)
    assert tree > chain
    assert acceptance_for("qwen2") is QWEN_ACCEPTANCE
    assert acceptance_for("llama") is acceptance_for(None) is LLAMA_ACCEPTANCE
    # by the model's family, never by a name that happens to start with "qwen"
    assert acceptance_for("qwen2.5-32b") is LLAMA_ACCEPTANCE
    for name in ("qwen2.5-32b", "qwen2.5-32b-a100-40g", "llama-3.1-70b-a100-40g"):
        family = get_profile(name).family
        assert acceptance_for(family) is (QWEN_ACCEPTANCE if name.startswith("qwen") else LLAMA_ACCEPTANCE)


def test_deterministic_for_a_seed():
    a = LLAMA_ACCEPTANCE.draft(reqs(5), SpecShape(depth=6, width=2), np.random.default_rng(3))
    b = LLAMA_ACCEPTANCE.draft(reqs(5), SpecShape(depth=6, width=2), np.random.default_rng(3))
    assert np.array_equal(a.prob, b.prob) and np.array_equal(a.extra["correct"], b.extra["correct"])


def test_per_category_parameters():
    easy = AcceptanceParams(mu=6.0, tau=0.1, sigma=0.1, rho=0.5)
    hard = AcceptanceParams(mu=-6.0, tau=0.1, sigma=0.1, rho=0.5)
    model = SyntheticAcceptance(hard, {"coding": easy})
    assert mean_committed(model, SpecShape.chain(4), 2000, category="coding") > 4.9
    assert mean_committed(model, SpecShape.chain(4), 2000, category="chat") < 1.1
    with pytest.raises(ValueError):
        AcceptanceParams(mu=0.0, tau=-1.0, sigma=0.0, rho=0.5)


def write_records(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_recorded_replay(tmp_path):
    # rid 0: the target always takes the draft's top-1 -> chain k commits k + 1;
    # rid 1: the target's token is the draft's second choice at every position.
    rows = [{"rid": 0, "category": "coding", "pos": p, "probs": [0.9, 0.05], "rank": 0} for p in range(20)]
    rows += [{"rid": 1, "category": "chat", "pos": p, "probs": [0.6, 0.3], "rank": 1} for p in range(20)]
    path = tmp_path / "acc.jsonl"
    write_records(path, rows)
    model = RecordedAcceptance.load(path)
    rs = [Request(0, 0.0, 10, 100, 1.2, 30.0, "coding"), Request(1, 0.0, 10, 100, 1.2, 30.0, "chat")]
    f = model.draft(rs, SpecShape.chain(4), np.random.default_rng(0))
    assert accepted_lengths(f, np.ones(f.n_nodes, bool)).tolist() == [4, 0]
    # beam width 2: rid 1's right path has f = 0.3, 0.09, ...; at depth 2 the beam keeps the two
    # children of the 0.6 node (0.36, 0.18) and drops the right one (0.09)
    f = model.draft(rs, SpecShape(depth=3, width=2), np.random.default_rng(0))
    assert accepted_lengths(f, np.ones(f.n_nodes, bool)).tolist() == [3, 1]


@pytest.mark.parametrize("line,needle", [
    ("not json", "line 1: not JSON"),
    ('{"rid": 0, "category": "chat", "pos": 0, "probs": [0.5]}', "needs rid, category, pos, probs, rank"),
    ('{"rid": 0, "category": "chat", "pos": 0, "probs": [1.5], "rank": 0}', "probs must be in [0, 1]"),
    ('{"rid": 0, "category": "chat", "pos": 0, "probs": [0.5], "rank": 3}', "rank in [-1"),
])
def test_bad_records_name_file_and_line(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(AcceptanceRecordError) as e:
        RecordedAcceptance.load(path)
    assert needle in str(e.value) and "bad.jsonl" in str(e.value)


def test_recorded_misses_leave_no_nodes(tmp_path):
    """An n-gram miss is recorded as probs [0.0], rank -1: the drafter proposed nothing there, so
    the simulated tree stops there too (static shapes included) and nothing is verified beyond."""
    rows = [{"rid": 0, "category": "chat", "pos": p, "probs": [0.8, 0.1] if p % 3 == 0 else [0.0],
             "rank": 0 if p % 3 == 0 else -1} for p in range(30)]
    path = tmp_path / "acc.jsonl"
    write_records(path, rows)
    model = RecordedAcceptance.load(path)
    f = model.draft(reqs(1), SpecShape.static((2, 1, 1)), np.random.default_rng(0))
    f.check()
    assert f.n_nodes == 3 and f.depth.tolist() == [0, 1, 1]   # only the first level has proposals
    assert accepted_lengths(f, np.ones(f.n_nodes, bool)).tolist() == [1]
    two = model.draft(reqs(2), SpecShape.chain(3), np.random.default_rng(0))
    two.check()
    assert two.offsets.tolist() == [0, 2, 4]


def test_recorded_tree_sizes_pad_the_replayed_trees(tmp_path):
    """With the engine's tree sizes recorded, a replayed tree grows to as many nodes as the engine
    drafted at that request's latest recorded draft (here up to 3 where the target's path alone
    gives 1; never more than the shape holds), with padding nodes that are never right: what is
    accepted does not change."""
    rows = [{"rid": 0, "category": "chat", "pos": p, "probs": [0.8, 0.1] if p % 3 == 0 else [0.0],
             "rank": 0 if p % 3 == 0 else -1} for p in range(30)]
    rows += [{"rid": 0, "category": "chat", "pos": 0, "tree": 4}, {"rid": 0, "category": "chat", "pos": 9, "tree": 2}]
    path = tmp_path / "acc.jsonl"
    write_records(path, rows)
    assert set(load_records(path)) == {("chat", 0)}  # the tree lines are not acceptance records
    assert [a.tolist() for a in load_tree_sizes(path)[("chat", 0)]] == [[0, 9], [4, 2]]
    model = RecordedAcceptance.load(path)
    plain = RecordedAcceptance(load_records(path, by_position=True))
    for generated, size in ((3, 3), (9, 2), (12, 2)):
        r = reqs(1)[0]
        r.generated = generated
        f = model.draft([r], SpecShape.chain(3), np.random.default_rng(0))
        f.check()
        g = plain.draft([r], SpecShape.chain(3), np.random.default_rng(0))
        assert f.n_nodes - 1 == max(size, g.n_nodes - 1)
        assert accepted_lengths(f, np.ones(f.n_nodes, bool)).tolist() == \
            accepted_lengths(g, np.ones(g.n_nodes, bool)).tolist()
        pads = f.prob == PAD_PROB
        assert not f.extra["correct"][pads].any() and (f.depth[pads] == 1).all()
    other = reqs(2)[1]  # no tree lines for rid 1: not padded
    assert model.tree_size(other) == -1


def test_recorded_confidences_replace_the_replayed_trees_own_in_their_order(tmp_path):
    """With the engine's node confidences recorded, a replayed tree's nodes take them, best first
    in the replay's own order (a child stays at most its parent), padding nodes included: the
    selection sees the engine's confidences; what is right (and so accepted) does not change."""
    rows = [{"rid": 0, "category": "chat", "pos": p, "probs": [0.8, 0.1] if p % 3 == 0 else [0.0],
             "rank": 0 if p % 3 == 0 else -1} for p in range(30)]
    rows += [{"rid": 0, "category": "chat", "pos": 0, "tree": 4, "conf": [0.5, 0.9, 0.7, 0.6]},
             {"rid": 0, "category": "chat", "pos": 9, "tree": 2}]  # an older line: no confidences
    path = tmp_path / "acc.jsonl"
    write_records(path, rows)
    assert {k: {p: c.tolist() for p, c in v.items()} for k, v in load_tree_confidences(path).items()} == \
        {("chat", 0): {0: [0.9, 0.7, 0.6, 0.5]}}
    model = RecordedAcceptance.load(path)
    plain = RecordedAcceptance(load_records(path, by_position=True), trees=load_tree_sizes(path))
    r = reqs(1)[0]
    r.generated = 3
    f = model.draft([r], SpecShape.chain(3), np.random.default_rng(0))
    g = plain.draft([r], SpecShape.chain(3), np.random.default_rng(0))
    f.check()
    assert sorted(f.prob[1:].tolist(), reverse=True) == [0.9, 0.7, 0.6]  # 3 nodes: the chain's shape holds 3
    assert np.array_equal(np.argsort(-f.prob[1:], kind="stable"), np.argsort(-g.prob[1:], kind="stable"))
    assert f.extra["correct"].tolist() == g.extra["correct"].tolist()
    assert np.all(f.prob[1:] <= f.prob[f.parent[1:]])
    r.generated = 9  # its latest draft recorded no confidences: as before
    assert model.draft([r], SpecShape.chain(3), np.random.default_rng(0)).prob.tolist() == \
        plain.draft([r], SpecShape.chain(3), np.random.default_rng(0)).prob.tolist()


def test_with_confidences_caps_the_nodes_beyond_the_recording():
    f = CandidateForest.from_lists([[(0, 5, 0.5), (1, 6, 0.25), (2, 7, 0.2)], [(0, 8, 0.9)]])
    g = with_confidences(f, [np.array([0.8, 0.3]), None])
    g.check()
    assert g.prob.tolist() == [1.0, 0.8, 0.3, 0.2, 1.0, 0.9]  # the third node: its own 0.2 (< 0.3)
    h = with_confidences(f, [np.array([0.8, 0.1]), np.array([])])
    assert h.prob.tolist() == [1.0, 0.8, 0.1, 0.1, 1.0, 0.9]  # capped at the recording's smallest
    assert with_confidences(f, [None, None]) is f


def test_pad_trees_keeps_each_tree_and_appends_root_children():
    f = CandidateForest.from_lists([[(0, 5, 0.5), (1, 6, 0.25)], [], [(0, 7, 0.9)]])
    f.extra["correct"] = np.array([True, True, False, True, True, False])
    g = pad_trees(f, [3, 2, -1])
    g.check()
    assert g.offsets.tolist() == [0, 4, 7, 9]
    assert g.parent.tolist() == [-1, 0, 1, 0, -1, 4, 4, -1, 7]
    assert g.token.tolist() == [0, 5, 6, 0, 0, 0, 0, 0, 7]
    assert g.extra["correct"].tolist() == [True, True, False, False, True, False, False, True, False]
    assert pad_trees(f, [1, 0, 1]) is f  # nothing to add


@pytest.mark.parametrize("line,needle", [
    ('{"rid": 0, "category": "chat", "pos": 0, "tree": "x"}', "needs rid, category, pos, tree"),
    ('{"rid": 0, "category": "chat", "pos": -1, "tree": 2}', "pos and tree must be >= 0"),
    ('[1, 2]', "not a JSON object"),
    ('{"rid": 0, "category": "chat", "pos": 0, "tree": 1, "conf": "x"}', "conf needs rid, category, pos and a list"),
    ('{"rid": 0, "category": "chat", "pos": 0, "tree": 1, "conf": [1.5]}', "conf values must be in [0, 1]"),
])
def test_bad_tree_lines_name_file_and_line(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"rid": 0, "category": "chat", "pos": 1, "probs": [0.5], "rank": 0}\n' + line + "\n")
    with pytest.raises(AcceptanceRecordError) as e:
        RecordedAcceptance.load(path)
    assert needle in str(e.value) and "bad.jsonl' line 2" in str(e.value)


def test_forests_match_pinned_draws():
    """The tree-growing loop is vectorized for speed; a simulation must not change with it. These
    values were produced by the original level-by-level implementation with the same seed."""
    six = reqs(6)
    f = LLAMA_ACCEPTANCE.draft(six, SpecShape(depth=5, width=3), np.random.default_rng(11))
    assert float(f.prob.sum()) == 30.521233247219307
    assert np.flatnonzero(f.extra["correct"]).tolist() == [
        0, 1, 4, 7, 10, 13, 16, 17, 20, 23, 26, 29, 32, 33, 36, 39, 42, 45, 48, 51, 64, 65, 68, 71,
        74, 77, 80, 81, 84, 87, 90, 93]
    assert f.token[:16].tolist() == [0, 0, 1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert f.parent[:16].tolist() == [-1, 0, 0, 0, 1, 1, 2, 4, 5, 6, 7, 8, 9, 10, 10, 11]
    assert accepted_lengths(f, np.ones(f.n_nodes, bool)).tolist() == [5, 5, 5, 1, 5, 5]
    g = QWEN_ACCEPTANCE.draft(six, SpecShape.static((1, 1, 3, 1)), np.random.default_rng(11))
    assert float(g.prob.sum()) == 21.545038342678772
    assert np.flatnonzero(g.extra["correct"]).tolist() == [
        0, 1, 2, 3, 6, 9, 10, 11, 12, 15, 18, 19, 20, 21, 24, 27, 36, 37, 45, 46, 47, 48]
    assert g.parent[:16].tolist() == [-1, 0, 1, 2, 2, 2, 3, 4, 5, -1, 9, 10, 11, 11, 11, 12]
    assert accepted_lengths(g, np.ones(g.n_nodes, bool)).tolist() == [4, 4, 4, 0, 1, 3]


def _accepted_by_walking(forest, selected):
    """Reference: walk every node's root path."""
    good = selected & forest.extra["correct"]
    out = []
    for i in range(forest.n_requests):
        best = 0
        for v in range(forest.offsets[i], forest.offsets[i + 1]):
            u, ok = v, True
            while u >= 0:
                ok &= bool(good[u])
                u = forest.parent[u]
            best = max(best, int(forest.depth[v])) if ok else best
        out.append(best)
    return out


@pytest.mark.parametrize("shape", [SpecShape(depth=6, width=3), SpecShape.chain(5),
                                   SpecShape.static((2, 1, 3))])
def test_accepted_lengths_match_a_walk_of_every_path(shape):
    rng = np.random.default_rng(5)
    for _ in range(20):
        f = LLAMA_ACCEPTANCE.draft(reqs(4), shape, rng)
        selected = rng.random(f.n_nodes) < rng.random()
        assert accepted_lengths(f, selected).tolist() == _accepted_by_walking(f, selected)


# ---- replaying the n-gram drafter over a run's token ids (adaserve.sim.ngram_replay) ----------

from dataclasses import replace  # noqa: E402

from adaserve.core.trace import TraceRecord  # noqa: E402
from adaserve.sim.ngram_replay import NgramReplay, load_tokens, recorded_acceptance, right_nodes  # noqa: E402


def test_right_nodes_spell_the_output_from_the_root():
    # request 0 has generated 2 of [5, 6, 7, 8, 9]: its next tokens are 7, 8, 9;
    # request 1 has generated 1 of [1, 3]: its next token is 3, and nothing is right after it
    f = CandidateForest.from_lists([[(0, 7, .5), (0, 4, .4), (1, 8, .3), (2, 8, .2), (3, 9, .1), (3, 1, .1)],
                                    [(0, 3, .5), (1, 9, .4)]])
    ok = right_nodes(f, [np.array([5, 6, 7, 8, 9]), np.array([1, 3])], [2, 1])
    # a right token under a wrong parent (node 4) is wrong
    assert ok.tolist() == [True, True, False, True, False, True, False, True, True, False]


def _token_rows(drafter="ngram"):
    return [{"rid": 0, "category": "chat", "pos": 1, "probs": [0.5], "rank": 0},
            {"rid": 0, "category": "chat", "drafter": drafter, "prompt": [5, 6, 5], "output": [6, 5, 6]},
            {"rid": 1, "category": "coding", "drafter": drafter, "prompt": [7], "output": [8, 9]}]


def test_a_recording_with_the_ngram_drafters_token_ids_is_replayed_by_the_drafter(tmp_path):
    path = tmp_path / "acc.jsonl"
    write_records(path, _token_rows())
    recs = [TraceRecord(0.0, 3, 3, "", 1.2, "chat"), TraceRecord(0.0, 1, 2, "", 1.2, "coding")]
    model = recorded_acceptance(path, enumerate(recs))
    assert isinstance(model, NgramReplay)
    # after [5, 6, 5 | 6] the drafter's n-grams predict 5 then 6: both are the output's next tokens
    r = Request(0, 0.0, 3, 3, 1.2, 30.0, "chat")
    r.generated = 1
    f = model.draft([r], SpecShape.chain(2), np.random.default_rng(0))
    assert f.token.tolist() == [6, 5, 6] and accepted_lengths(f, np.ones(3, bool)).tolist() == [2]
    model.release(r)
    assert not model._seqs
    # the per-position records otherwise: asked to, a request the recording lacks, an output longer
    # than recorded, or a draft-model recording
    assert isinstance(recorded_acceptance(path, enumerate(recs), replay="records"), RecordedAcceptance)
    assert isinstance(recorded_acceptance(path, enumerate(recs + recs[:1])), RecordedAcceptance)
    assert isinstance(recorded_acceptance(path, enumerate([recs[0], replace(recs[1], output_length=3)])),
                      RecordedAcceptance)
    write_records(path, _token_rows(drafter="model"))
    assert load_tokens(path) == {} and isinstance(recorded_acceptance(path, enumerate(recs)), RecordedAcceptance)


@pytest.mark.parametrize("line,needle", [
    ('{"rid": 0, "category": "chat", "drafter": "ngram", "output": [1]}', "needs rid, category, prompt and output"),
    ('{"rid": 0, "category": "chat", "drafter": "ngram", "prompt": [1], "output": ["x"]}', "needs rid, category"),
    ('{"rid": 0, "category": "chat", "drafter": "ngram", "prompt": [], "output": [1]}', "prompt must be non-empty"),
    ('{"rid": 0, "category": "chat", "drafter": "ngram", "prompt": [1], "output": [-2]}', "token ids >= 0"),
])
def test_bad_token_lines_name_file_and_line(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"rid": 0, "category": "chat", "pos": 1, "probs": [0.5], "rank": 0}\n' + line + "\n")
    with pytest.raises(AcceptanceRecordError) as e:
        load_tokens(path)
    assert needle in str(e.value) and "bad.jsonl' line 2" in str(e.value)
    assert RecordedAcceptance.load(path).by_key  # the per-position records skip token lines
