"""``cbam.functional`` against the plain float64 formulas in ``naive.py``, on random shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cbam import functional

import naive

POOL_SETS = [("avg", "max"), ("avg",), ("max",), ("lp",), ("lse",), ("avg", "max", "lp", "lse")]


@st.composite
def cases(draw):
    dims = draw(st.integers(1, 3))
    spatial = draw(st.lists(st.integers(1, 6 if dims < 3 else 4), min_size=dims, max_size=dims))
    return {
        "dims": dims,
        "shape": (draw(st.integers(1, 3)), draw(st.integers(1, 12)), *spatial),
        "hidden": draw(st.integers(1, 5)),
        "kernel": draw(st.sampled_from([1, 3, 5, 7])),
        "pools": draw(st.sampled_from(POOL_SETS)),
        "gate": draw(st.sampled_from(["sigmoid", "hard-sigmoid"])),
        "bias": draw(st.booleans()),
        "norm": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def random_weights(case):
    """Random float64 weights for one case, and the BN-in-eval-mode normaliser if the case has one."""
    g = torch.Generator().manual_seed(case["seed"])
    C, h, k, d = case["shape"][1], case["hidden"], case["kernel"], case["dims"]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w = {
        "fc1_weight": rand(h, C), "fc2_weight": rand(C, h), "conv_weight": rand(1, 2, *[k] * d) / k,
        "fc1_bias": rand(h) if case["bias"] else None, "fc2_bias": rand(C) if case["bias"] else None,
    }
    norm = None
    if case["norm"]:
        stats = rand(1), rand(1).exp(), rand(1), rand(1)
        norm = lambda z: naive.batch_norm_eval(z, *stats)  # noqa: E731
    x = rand(*case["shape"]) * 2
    return x, w, norm


@settings(max_examples=60, deadline=None)
@given(cases())
def test_cbam_matches_naive_formulas(case):
    x, w, norm = random_weights(case)
    options = {"pool_types": case["pools"], "norm": norm, "gate_kind": case["gate"]}
    torch.testing.assert_close(functional.cbam(x, **w, **options), naive.cbam(x, **w, **options),
                               rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(cases())
def test_gates_alone_match_naive_formulas(case):
    x, w, norm = random_weights(case)
    channel = functional.channel_attention_map(x, w["fc1_weight"], w["fc2_weight"], w["fc1_bias"], w["fc2_bias"],
                                               pool_types=case["pools"], gate_kind=case["gate"])
    spatial = functional.spatial_attention_map(x, w["conv_weight"], norm=norm, gate_kind=case["gate"])
    assert channel.shape == (*x.shape[:2], *[1] * case["dims"])
    assert spatial.shape == (x.shape[0], 1, *x.shape[2:])
    torch.testing.assert_close(channel, naive.channel_map(x, w["fc1_weight"], w["fc2_weight"], w["fc1_bias"],
                                                          w["fc2_bias"], case["pools"], case["gate"]))
    torch.testing.assert_close(spatial, naive.spatial_map(x, w["conv_weight"], norm, case["gate"]))


@settings(max_examples=25, deadline=None)
@given(cases())
def test_input_gradients_match_naive_formulas(case):
    x, w, norm = random_weights(case)
    options = {"pool_types": case["pools"], "norm": norm, "gate_kind": case["gate"]}
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case["seed"] + 1))
    grads = []
    for implementation in (functional.cbam, naive.cbam):
        leaf = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(implementation(leaf, **w, **options), leaf, upstream)[0])
    torch.testing.assert_close(*grads, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["avg", "max", "lp", "lse"])
def test_each_pool_is_its_formula(kind):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(functional.pool(x, kind), naive.POOLS[kind](x.reshape(2, 3, -1)))


def test_spatial_pool_puts_mean_before_max():
    x = torch.randn(2, 5, 3, 3)
    pooled = functional.spatial_pool(x)
    torch.testing.assert_close(pooled[:, 0], x.mean(1))
    torch.testing.assert_close(pooled[:, 1], x.max(1).values)
