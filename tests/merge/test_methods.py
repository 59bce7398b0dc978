"""Each merge kernel against expectations computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mergesearch_trial_runner.merge.engine import chunk_seed, merge_tensors
from mergesearch_trial_runner.merge.methods import KERNELS
from mergesearch_trial_runner.merge.methods.selection import (
    PARTITION_BELOW,
    RankedMagnitudes,
    kth_largest_magnitudes,
)
from mergesearch_trial_runner.plan.methods import METHODS


def merge(method, sources, *, base=None, shared=None, per_source=None, seed=0, chunk_elements=1 << 20):
    """Run one method through the engine's streaming path, with the method's defaults filled in."""
    spec = METHODS[method]
    resolved_shared = {p.name: p.default for p in spec.shared_params} | (shared or {})
    resolved_sources = [
        {p.name: p.default for p in spec.source_params} | s for s in (per_source or [{}] * len(sources))
    ]
    return merge_tensors(
        method,
        base=None if base is None else torch.tensor(base, dtype=torch.float32),
        sources=[torch.tensor(s, dtype=torch.float32) for s in sources],
        shared=resolved_shared,
        per_source=resolved_sources,
        seed=seed,
        chunk_elements=chunk_elements,
    )


def test_every_declared_method_has_exactly_one_kernel():
    assert set(KERNELS) == set(METHODS)
    assert all(kernel.spec is METHODS[name] for name, kernel in KERNELS.items())


def test_linear_normalised_and_not():
    sources = [[1.0, 2.0], [3.0, 4.0]]
    weights = [{"weight": 1.0}, {"weight": 3.0}]
    assert merge("linear", sources, per_source=weights).tolist() == [2.5, 3.5]
    assert merge("linear", sources, per_source=weights, shared={"normalize": False}).tolist() == [10.0, 14.0]


def test_task_arithmetic():
    # deltas (1, -1) and (0, 2); 1*(1,-1) + 0.5*(0,2) = (1, 0); lambda 2 -> (2, 0); plus base (1, 1)
    result = merge(
        "task_arithmetic",
        [[2.0, 0.0], [1.0, 3.0]],
        base=[1.0, 1.0],
        per_source=[{"weight": 1.0}, {"weight": 0.5}],
        shared={"lambda": 2.0},
    )
    assert result.tolist() == [3.0, 1.0]


def test_task_arithmetic_normalize_divides_by_weight_sum():
    result = merge(
        "task_arithmetic",
        [[3.0], [5.0]],
        base=[1.0],
        per_source=[{"weight": 1.0}, {"weight": 3.0}],
        shared={"normalize": True},
    )
    assert result.tolist() == [1.0 + (2.0 + 12.0) / 4.0]


def test_ties_trims_elects_sign_and_takes_disjoint_mean():
    # base 0. a keeps its 2 largest |entries| (4 and -3), b its 2 largest (-2 and 2).
    # Weighted sum (2, 2, 0, -3) elects (+, +, +, -); agreeing entries: a0, b1, a3; entry 2 has none.
    a, b = [4.0, -1.0, 0.5, -3.0], [-2.0, 2.0, 1.0, -1.0]
    result = merge(
        "ties",
        [a, b],
        base=[0.0] * 4,
        per_source=[{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}],
    )
    assert result.tolist() == [4.0, 2.0, 0.0, -3.0]
    halved = merge(
        "ties",
        [a, b],
        base=[0.0] * 4,
        per_source=[{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}],
        shared={"lambda": 0.5},
    )
    assert halved.tolist() == [2.0, 1.0, 0.0, -1.5]


def test_ties_divides_by_the_weight_that_agreed():
    # Weighted (a x2): (8, 0, 0, -6) and (-2, 2, 0, 0); mean over agreeing weight: 8/2, 2/1, 0, -6/2.
    result = merge(
        "ties",
        [[4.0, -1.0, 0.5, -3.0], [-2.0, 2.0, 1.0, -1.0]],
        base=[0.0] * 4,
        per_source=[{"weight": 2.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}],
    )
    assert result.tolist() == [4.0, 2.0, 0.0, -3.0]


def test_ties_keeps_at_least_one_entry_and_density_one_keeps_all():
    tiny = merge("ties", [[1.0, 5.0, -2.0]], base=[0.0] * 3, per_source=[{"weight": 1.0, "density": 0.01}])
    assert tiny.tolist() == [0.0, 5.0, 0.0]
    full = merge("ties", [[1.0, 5.0, -2.0]], base=[0.0] * 3, per_source=[{"weight": 1.0, "density": 1.0}])
    assert full.tolist() == [1.0, 5.0, -2.0]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded_and_rescales_by_keep_probability(method):
    base = [0.0] * 20000
    source = [1.0] * 20000
    per_source = [{"weight": 1.0, "density": 0.25}]
    first = merge(method, [source], base=base, per_source=per_source, seed=7)
    again = merge(method, [source], base=base, per_source=per_source, seed=7)
    other = merge(method, [source], base=base, per_source=per_source, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert set(first.unique().tolist()) == {0.0, 4.0}  # kept entries become 1 / 0.25
    assert abs(float((first != 0).float().mean()) - 0.25) < 0.02
    assert abs(float(first.mean()) - 1.0) < 0.08  # unbiased in expectation


def test_dare_without_rescale_keeps_values():
    result = merge(
        "dare_linear",
        [[1.0] * 1000],
        base=[0.0] * 1000,
        per_source=[{"weight": 1.0, "density": 0.5}],
        shared={"rescale": False},
    )
    assert set(result.unique().tolist()) == {0.0, 1.0}


def test_slerp_orthogonal_vectors():
    result = merge("slerp", [[0.0, 2.0]], base=[2.0, 0.0], shared={"t": 0.5})
    assert torch.allclose(result, torch.tensor([math.sqrt(2), math.sqrt(2)]))
    assert merge("slerp", [[0.0, 2.0]], base=[2.0, 0.0], shared={"t": 0.0}).tolist() == [2.0, 0.0]


def test_slerp_falls_back_to_lerp_for_parallel_vectors():
    result = merge("slerp", [[2.0, 2.0]], base=[1.0, 1.0], shared={"t": 0.25})
    assert torch.allclose(result, torch.tensor([1.25, 1.25]))


def test_passthrough_scales():
    assert merge("passthrough", [[2.0, -4.0]], per_source=[{"scale": 0.5}]).tolist() == [1.0, -2.0]
    assert merge("passthrough", [[2.0, -4.0]]).tolist() == [2.0, -4.0]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp"])
def test_chunking_does_not_change_the_result(method):
    """Whole-tensor statistics (TIES's threshold, SLERP's angle) are computed over every chunk."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(10007, generator=generator)
    sources = [base + 0.1 * torch.randn(10007, generator=generator) for _ in range(1 if method == "slerp" else 3)]
    per_source = [{"weight": 0.5, "density": 0.3}] * len(sources) if method != "slerp" else [{}]
    shared = {"t": 0.3} if method == "slerp" else {}
    kwargs = {"base": base.tolist(), "shared": shared, "per_source": per_source}
    whole = merge(method, [s.tolist() for s in sources], **kwargs)
    chunked = merge(method, [s.tolist() for s in sources], chunk_elements=1000, **kwargs)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


def test_ties_trim_keeps_exactly_k_entries_found_by_streaming_selection():
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(50_000, generator=generator)
    result = merge(
        "ties", [delta.tolist()], base=[0.0] * 50_000, per_source=[{"weight": 1.0, "density": 0.1}], chunk_elements=4096
    )
    kept = result != 0
    assert int(kept.sum()) == 5000
    assert float(delta.abs()[kept].min()) >= float(delta.abs()[~kept].max())


@pytest.mark.parametrize(
    ("numel", "chunk_elements"),
    [(300, 300), (PARTITION_BELOW * 4, PARTITION_BELOW * 4), (PARTITION_BELOW * 4, 5000)],
    ids=["one small chunk (partition)", "one large chunk (radix)", "many chunks (radix)"],
)
def test_kth_largest_magnitude_equals_a_full_sort(numel, chunk_elements):
    """Every selection path gives the exact k-th largest, with repeated values and zeros in the data."""
    generator = torch.Generator().manual_seed(numel + chunk_elements)
    values = [
        torch.randn(numel, generator=generator).abs(),
        torch.randint(0, 7, (numel,), generator=generator).float() / 4,  # many ties, a seventh zeros
    ]
    ranks = [1, numel // 3, numel]

    def passes():
        for start in range(0, numel, chunk_elements):
            yield [v[start : start + chunk_elements] for v in values for _ in ranks]

    found = kth_largest_magnitudes(passes, ranks * len(values))
    expected = [float(v.sort(descending=True).values[rank - 1]) for v in values for rank in ranks]
    assert found == expected


def test_sorted_magnitudes_give_every_rank_the_selection_gives():
    """A resident worker's lookup (`RankedMagnitudes`) against the streaming selection, at every kind of
    rank, on values with ties, zeros, magnitudes across many exponents, and infinity."""
    generator = torch.Generator().manual_seed(5)
    numel = PARTITION_BELOW * 3
    values = [
        torch.randn(numel, generator=generator).abs() * 10.0 ** torch.randint(-30, 30, (numel,), generator=generator),
        torch.randint(0, 7, (numel,), generator=generator).float() / 4,
        torch.cat([torch.full((10,), math.inf), torch.zeros(numel - 10)]),
    ]
    ranks = [1, 2, 11, numel // 3, numel // 2 + 1, numel - 1, numel]
    for v in values:
        index = RankedMagnitudes(v)
        expected = kth_largest_magnitudes(lambda v=v: iter([[v] * len(ranks)]), ranks)
        assert [index.kth_largest(rank) for rank in ranks] == expected


def reference_ties(base, sources, weights, density):
    """TIES written the plain way, with boolean masks: trim to the top `density` by magnitude, weight,
    elect the sign of the total mass (ties to +), keep agreeing nonzero entries, weighted disjoint mean."""
    deltas = []
    for source, weight in zip(sources, weights, strict=True):
        delta = source - base
        keep = max(1, int(density * delta.numel()))
        threshold = delta.abs().sort(descending=True).values[keep - 1]
        deltas.append(delta * (delta.abs() >= threshold) * weight)
    elected = torch.where(sum(deltas) >= 0, 1.0, -1.0)
    mixed, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = (torch.sign(delta) == elected) & (delta != 0)
        mixed += delta * agrees
        divisor += weight * agrees
    divisor[divisor == 0] = 1
    return base + mixed / divisor


@pytest.mark.parametrize("weights", [(0.7, 0.0, 0.4), (0.5, -0.5, 0.25)], ids=["a-zero-weight", "a-negative-weight"])
@pytest.mark.parametrize("values", ["continuous", "quarters"])
def test_ties_equals_the_plain_boolean_mask_formulation_bit_for_bit(values, weights):
    """The kernel builds its masks arithmetically (for speed); on ties, zeros, cancelling deltas, a zero
    weight and weights that cancel it must give exactly what boolean masks give."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(4000, generator=generator)
    if values == "quarters":  # many equal magnitudes, exact zeros, deltas that cancel to +0.0
        sources = [base + torch.randint(-2, 3, (4000,), generator=generator).float() / 4 for _ in range(3)]
    else:
        sources = [base + 0.1 * torch.randn(4000, generator=generator) for _ in range(3)]
    merged = merge(
        "ties",
        [s.tolist() for s in sources],
        base=base.tolist(),
        per_source=[{"weight": w, "density": 0.4} for w in weights],
    )
    assert torch.equal(merged, reference_ties(base, sources, weights, 0.4))


def test_dare_keeps_exactly_the_entries_whose_seeded_draw_is_below_the_density():
    """The drop mask is arithmetic (for speed); it must keep what `draw < density` keeps, draw for draw."""
    result = merge(
        "dare_linear",
        [[1.0] * 5000],
        base=[0.0] * 5000,
        per_source=[{"weight": 1.0, "density": 0.3}],
        shared={"rescale": False},
        seed=11,
    )
    draws = torch.rand(5000, generator=torch.Generator().manual_seed(chunk_seed(11, 0)))
    assert torch.equal(result != 0, draws < 0.3)
