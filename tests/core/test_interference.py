"""core/interference.py against brute force from activations: the cross energies are the inner
products of the experts' output changes on each task's inputs, computed here from the outputs
themselves; special cases (a cancelling pair, a scaled copy, disjoint inputs) exact; warnings."""

import math

import pytest
import torch

from mergekit_qp.core.interference import Interference, cross_energies, residual_energies

F64 = torch.float64


def setting(seed=0, count=3, m=5, d=7, n=40):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(m, d, generator=g, dtype=F64) for _ in range(count)]
    inputs = [torch.randn(n, d, generator=g, dtype=F64) + k for k in range(count)]  # task k's activations
    grams = [x.T @ x / x.shape[0] for x in inputs]
    return deltas, inputs, grams


def test_cross_energies_are_inner_products_of_output_changes():
    deltas, inputs, grams = setting()
    found = cross_energies(deltas, grams)
    for k, x in enumerate(inputs):
        outputs = [x @ delta.T for delta in deltas]  # each expert's output change on task k's tokens
        for i in range(3):
            for j in range(3):
                brute = float((outputs[i] * outputs[j]).sum()) / x.shape[0]
                assert float(found[k, i, j]) == pytest.approx(brute, rel=1e-12, abs=1e-12)


def test_residual_energies_are_squared_output_errors():
    deltas, inputs, grams = setting(seed=1)
    update = 0.3 * deltas[0] + 0.5 * deltas[2]
    for k, j in enumerate(residual_energies(update, deltas, grams)):
        error = inputs[k] @ (update - deltas[k]).T
        assert j == pytest.approx(float((error ** 2).sum()) / inputs[k].shape[0], rel=1e-12)


def interference(deltas, grams, weights=None, tasks=None):
    count = len(deltas)
    return Interference(cross_energies(deltas, grams), tuple(tasks or [f"t{k}" for k in range(count)]),
                        tuple(weights or [1.0] * count))


def test_matrix_and_cosines_special_cases():
    deltas, _, grams = setting(seed=2, count=2)
    # expert 1 = −2 × expert 0: on every task it moves the outputs 4× as much, the opposite way
    found = interference([deltas[0], -2 * deltas[0]], grams)
    matrix = found.matrix()
    assert matrix[0][0] == 1.0 and matrix[1][1] == 1.0
    assert matrix[1][0] == pytest.approx(4.0, rel=1e-12) and matrix[0][1] == pytest.approx(0.25, rel=1e-12)
    for k in range(2):
        assert found.cosine(k)[0][1] == pytest.approx(-1.0, abs=1e-12)
    warnings = found.warnings()
    assert sum("opposite directions" in w for w in warnings) == 2  # flagged on both tasks
    assert any("t1 dominates the objective" in w for w in warnings)  # 4 × the other's energy


def test_disjoint_inputs_do_not_interfere_and_equal_experts_raise_nothing():
    g = torch.Generator().manual_seed(3)
    a, b = torch.zeros(4, 6, dtype=F64), torch.zeros(4, 6, dtype=F64)
    a[:, :3] = torch.randn(4, 3, generator=g, dtype=F64)  # expert a reads features 0-2 only
    b[:, 3:] = torch.randn(4, 3, generator=g, dtype=F64)
    xa, xb = torch.zeros(10, 6, dtype=F64), torch.zeros(10, 6, dtype=F64)
    xa[:, :3] = torch.randn(10, 3, generator=g, dtype=F64)  # task a's inputs live on features 0-2
    xb[:, 3:] = torch.randn(10, 3, generator=g, dtype=F64)
    found = interference([a, b], [xa.T @ xa / 10, xb.T @ xb / 10])
    assert found.matrix() == [[1.0, 0.0], [0.0, 1.0]]
    assert found.cosine(0)[0][1] is None  # b changes nothing on task a's inputs: no angle
    same_size = interference([a, b * (found.energy[0] / found.energy[1]) ** 0.5], [xa.T @ xa / 10, xb.T @ xb / 10])
    assert same_size.warnings() == []


def test_zero_energy_gives_none_not_nan_and_low_rho_is_flagged():
    deltas, _, grams = setting(seed=4, count=2)
    found = interference([deltas[0], torch.zeros_like(deltas[1])], grams, tasks=["a", "b"])
    matrix = found.matrix()
    assert matrix[0][1] is None and matrix[1][0] == 0.0
    assert found.cosine(0)[0][1] is None
    for row in matrix:
        assert all(v is None or math.isfinite(v) for v in row)
    warnings = found.warnings({"a": (0.42, "ties"), "b": (0.9, "output_qp full")})
    assert any(w.startswith("a: no planned method keeps half") and "0.420" in w and "ties" in w for w in warnings)
    assert not any(w.startswith("b:") for w in warnings)


def test_mismatched_inputs_are_refused():
    deltas, _, grams = setting(count=2)
    with pytest.raises(ValueError, match="2 task vectors but 1 Grams"):
        cross_energies(deltas, grams[:1])
