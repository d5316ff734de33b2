"""The serving workload: pool loading, determinism, Zipf popularity, request bodies."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.workload import (
    Passage,
    RagRequest,
    load_pool,
    make_workload,
    reuse_fraction,
    zipf_weights,
)
from kvfuse.errors import ConfigError
from kvfuse.segments import DEFAULT_SEPARATOR

MUSIQUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "musique_s.json"


def _pool(num: int) -> tuple[list[Passage], list[str]]:
    passages = [Passage(f"Title {i}", f"Passage number {i}.") for i in range(num)]
    return passages, [f"Question {i}?" for i in range(5)]


def test_load_pool_deduplicates_and_keeps_first_seen_order(tmp_path: Path) -> None:
    ctx = [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}]
    entries = [
        {"ctxs": ctx, "question": "Q1?", "answers": ["a"]},
        {"ctxs": [ctx[1], {"title": "A", "text": "other"}, {"title": "", "text": "x"}],
         "question": " Q2? ", "answers": ["b"]},
    ]  # fmt: skip
    path = tmp_path / "m.json"
    path.write_text(json.dumps(entries))
    passages, questions = load_pool(path)
    assert passages == [Passage("A", "alpha"), Passage("B", "beta"), Passage("A", "other"),
                        Passage("", "x")]  # fmt: skip
    assert passages[0].document == "Title: A\nalpha" and passages[3].document == "x"
    assert [q.split("?")[0] for q in questions] == ["Q1", "Q2"]


@pytest.mark.parametrize("content", ["not json", "{}", "[]"])
def test_load_pool_rejects_bad_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(ConfigError):
        load_pool(path)
    with pytest.raises(ConfigError):
        load_pool(tmp_path / "missing.json")


def test_real_musique_pool_has_all_passages() -> None:
    path = MUSIQUE
    if not path.is_file():
        pytest.skip("shared Musique data not present")
    passages, questions = load_pool(path)
    assert len(questions) == 150
    assert 1000 < len(passages) <= 1500  # 150 × 10 passages, some shared between questions
    assert len({(p.title, p.text) for p in passages}) == len(passages)


def test_workload_is_deterministic_and_prefix_stable() -> None:
    passages, questions = _pool(40)
    a = make_workload(passages, questions, 30, num_docs=6, seed=3)
    assert a == make_workload(passages, questions, 30, num_docs=6, seed=3)
    assert a[:10] == make_workload(passages, questions, 10, num_docs=6, seed=3)
    assert a != make_workload(passages, questions, 30, num_docs=6, seed=4)
    for i, request in enumerate(a):
        assert request.index == i
        assert len(set(request.passage_ids)) == len(request.passage_ids) == 6
        assert request.documents == tuple(passages[p].document for p in request.passage_ids)
        assert request.question in questions


def test_zipf_weights() -> None:
    weights = zipf_weights(100, 1.1)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(2**1.1)
    assert weights == sorted(weights, reverse=True)
    assert zipf_weights(4, 0.0) == [0.25] * 4
    with pytest.raises(ConfigError):
        zipf_weights(0, 1.1)


def test_popularity_is_skewed_and_orders_vary() -> None:
    passages, questions = _pool(200)
    requests = make_workload(passages, questions, 400, num_docs=6, zipf_s=1.1, seed=0)
    counts = Counter(p for r in requests for p in r.passage_ids)
    ranked = [n for _, n in counts.most_common()]
    # the head recurs in most requests, the tail rarely: a Zipf-like rank/frequency curve
    assert ranked[0] > 0.3 * len(requests)
    assert ranked[0] > 4 * ranked[9] > 0
    assert len(counts) > 100  # the long tail is drawn too
    top = counts.most_common(1)[0][0]
    positions = {r.passage_ids.index(top) for r in requests if top in r.passage_ids}
    assert positions == set(range(6))  # the popular chunk lands at every position
    assert reuse_fraction(requests[200:], requests[:200]) > reuse_fraction(requests[:20])


def test_workload_rejects_impossible_draws() -> None:
    passages, questions = _pool(4)
    with pytest.raises(ConfigError):
        make_workload(passages, questions, 3, num_docs=5)
    with pytest.raises(ConfigError):
        make_workload(passages, questions, -1)


def test_reuse_fraction() -> None:
    def req(*ids: int) -> RagRequest:
        return RagRequest(0, "s", ids, tuple(str(i) for i in ids), "q")

    assert reuse_fraction([req(1, 2), req(2, 3)]) == 0.25
    assert reuse_fraction([req(1, 2)], [req(1, 5)]) == 0.5
    assert reuse_fraction([]) == 0.0


def test_bodies_carry_the_same_text() -> None:
    passages, questions = _pool(10)
    request = make_workload(passages, questions, 1, num_docs=3)[0]
    kv = request.kvfuse_body("m", "blend", 0.15, 16)
    plain = request.plain_body("m", 16)
    assert kv["kvfuse"] == {"segments": request.segments, "mode": "blend", "recompute_ratio": 0.15}
    assert request.segments == [request.system, *request.documents, request.question]
    kv_user, plain_user = kv["messages"][1]["content"], plain["messages"][1]["content"]
    assert kv_user.count(DEFAULT_SEPARATOR) == 3
    assert kv_user.replace(DEFAULT_SEPARATOR, "") == plain_user
    assert plain_user.endswith("\n\n" + request.question)
    for body in (kv, plain):
        assert body["stream"] is True and body["temperature"] == 0.0
        assert body["max_tokens"] == 16 and body["stream_options"] == {"include_usage": True}
        assert body["messages"][0] == {"role": "system", "content": request.system}
    assert "recompute_ratio" not in request.kvfuse_body("m", "full_prefill", None, 16)["kvfuse"]
