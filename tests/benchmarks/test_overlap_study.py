"""The overlap study's re-run on new seeds: disjoint seeds, and the agreement count over every rendered cell."""

import argparse
import math
import random
import re

from benchmarks.intervals import agree, mean_interval
from benchmarks.overlap_study import (
    APPROXIMATIONS,
    METHODS,
    Settings,
    agreement,
    cell_values,
    pair_seeds,
    render,
    replicate_pairs,
)

LAYERS = ("0", "2", "4")
SETTINGS = Settings(pairs=3, epochs=4, k=2, side_rank=1, checkpoints=(0, 2, 4), decoupling_layers=("2", "4"))
ARGS = argparse.Namespace(quick=False, epochs=4)


def _measured(pair_indices, seed: int) -> dict:
    """Rows shaped like ``overlap_study.measure``'s, with uniform random values in (0.1, 0.9)."""
    rng = random.Random(seed)
    value = lambda: rng.uniform(0.1, 0.9)  # noqa: E731
    keys = [f"{stat}_{tag}" for stat in ("overlap", "G", "A") for tag in ("unaligned", "aligned")]
    pairs = [{"layer": layer, "method": method, "P": 100, **{key: value() for key in keys}}
             for _ in pair_indices for layer in LAYERS for method in METHODS]
    within = [{"layer": layer, "energy_share_mean": value(), "energy_share_first": value(), "a_top_mean_cos2": value(),
               **{f"vs_exact_{m}": value() for m in APPROXIMATIONS}} for _ in range(2 * len(pair_indices))
              for layer in LAYERS]
    rescaled = [{"layer": layer, "overlap": value()} for _ in pair_indices for layer in LAYERS]
    decoupling = [{"epoch": epoch, "layer": layer, **{m: value() for m in APPROXIMATIONS}}
                  for _ in pair_indices for epoch in SETTINGS.checkpoints for layer in SETTINGS.decoupling_layers]
    accuracy = [value() for _ in range(2 * len(pair_indices))]
    return {"pairs": pairs, "rescaled": rescaled, "within": within, "decoupling": decoupling, "accuracy": accuracy,
            "seconds": 1.0}


def test_replicate_seeds_are_disjoint_from_the_first_runs():
    for pairs in (2, 5):
        first = [seed for pair in range(pairs) for seed in pair_seeds(pair)]
        again = [seed for pair in replicate_pairs(pairs) for seed in pair_seeds(pair)]
        assert len(set(first)) == len(first) == len(set(again)) == len(again) == 2 * pairs
        assert not set(first) & set(again)


def test_every_rendered_interval_is_a_compared_cell():
    first = _measured(range(3), seed=0)
    table = render(SETTINGS, **first, args=ARGS)
    # random values: every interval has a nonzero half-width, so each rendered cell shows one "x̄ ± h"
    assert agreement(first, first, SETTINGS)[0].compared == len(re.findall(r"\d ± \d", table))
    assert set(cell_values(**first, decoupling_layers=SETTINGS.decoupling_layers)) == set(
        agreement(first, first, SETTINGS)[1])


def test_agreement_count_is_intervals_agree_on_each_cell():
    first, second = _measured(range(3), seed=0), _measured(replicate_pairs(3), seed=1)
    # shift one cell's replicate values to just past / just inside the combined half-width of the two runs
    name, values = "layer 4: kfac overlap, aligned", lambda run: [r["overlap_aligned"] for r in run["pairs"]
                                                          if r["layer"] == "4" and r["method"] == "kfac"]
    (m1, h1), (m2, h2) = mean_interval(values(first)), mean_interval(values(second))
    for factor, expected in ((1.01, False), (0.99, True)):
        shifted = {**second, "pairs": [dict(r) for r in second["pairs"]]}
        offset = m1 - m2 + factor * math.hypot(h1, h2)
        for row in shifted["pairs"]:
            if row["layer"] == "4" and row["method"] == "kfac":
                row["overlap_aligned"] += offset
        counted, cells = agreement(first, shifted, SETTINGS)
        assert agree(*cells[name]) is expected and (name in counted.disagreeing) is not expected
        expected_disagreeing = [n for n, (a, b) in cells.items() if not agree(a, b)]
        assert counted.disagreeing == expected_disagreeing
        assert counted.agreeing == counted.compared - len(expected_disagreeing)
        text = render(SETTINGS, **first, args=ARGS, replicate=shifted)
        assert f"**{counted.agreeing} of {counted.compared} cells agree**" in text
        assert all(f"| {n} |" in text for n in counted.disagreeing)
