"""FrequencySketch: counts, saturation, aging, and collisions only ever overcount."""

from __future__ import annotations

from cache_server.admission import MAX_COUNT, FrequencySketch


def test_counts_accesses_up_to_saturation() -> None:
    sketch = FrequencySketch(width=1024)
    for count in range(1, MAX_COUNT + 1):
        sketch.increment("hot")
        assert sketch.estimate("hot") == count
    sketch.increment("hot")
    assert sketch.estimate("hot") == MAX_COUNT
    assert sketch.estimate("never seen") == 0


def test_aging_halves_every_counter() -> None:
    sketch = FrequencySketch(width=64, sample_size=20)
    for _ in range(8):
        sketch.increment("a")
    for _ in range(4):
        sketch.increment("b")
    assert (sketch.estimate("a"), sketch.estimate("b")) == (8, 4)
    for _ in range(8):  # the 20th increment triggers the reset
        sketch.increment("c")
    assert (sketch.estimate("a"), sketch.estimate("b"), sketch.estimate("c")) == (4, 2, 4)


def test_estimates_never_undercount_under_collisions() -> None:
    sketch = FrequencySketch(width=64, sample_size=10**9)  # tiny: many collisions
    truth = {f"k{i}": i % 7 for i in range(500)}
    for key, count in truth.items():
        for _ in range(count):
            sketch.increment(key)
    assert all(sketch.estimate(key) >= min(count, MAX_COUNT) for key, count in truth.items())
    assert sketch.width == 64
