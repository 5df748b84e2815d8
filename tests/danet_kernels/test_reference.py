"""The oracle itself, checked against the published formulas written element by element."""

from __future__ import annotations

import math

import torch

from danet_kernels import reference


def test_position_attention_reference_matches_the_formula():
    """out[b, c, i] = sum_j v[b, c, j] softmax_j(sum_d q[b, d, i] k[b, d, j]), no 1/sqrt(d)."""
    q, k, v = (torch.randn(2, channels, 5, dtype=torch.float64) for channels in (3, 3, 4))
    out = reference.position_attention_reference(q, k, v)
    for b in range(2):
        for i in range(5):
            energies = [sum(q[b, d, i] * k[b, d, j] for d in range(3)).item() for j in range(5)]
            weights = [math.exp(e) for e in energies]
            total = sum(weights)
            for c in range(4):
                expected = sum(v[b, c, j].item() * weights[j] / total for j in range(5))
                assert math.isclose(out[b, c, i].item(), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_channel_attention_reference_keeps_the_inverted_ranking():
    """softmax(rowmax(E) - E): the least similar channel gets the largest weight."""
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    out = reference.channel_attention_reference(x)
    energy = [[sum(x[0, a, n] * x[0, c, n] for n in range(6)).item() for c in range(4)] for a in range(4)]
    for a in range(4):
        row_max = max(energy[a])
        weights = [math.exp(row_max - e) for e in energy[a]]
        total = sum(weights)
        for n in range(6):
            expected = sum(weights[c] / total * x[0, c, n].item() for c in range(4))
            assert math.isclose(out[0, a, n].item(), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_reference_modules_add_gamma_scaled_attention_to_the_input():
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    pam, cam = reference.PAM_Module(16).double(), reference.CAM_Module(16).double()
    assert torch.equal(pam(x), x) and torch.equal(cam(x), x)  # gamma starts at zero
    with torch.no_grad():
        pam.gamma.fill_(0.5)
        cam.gamma.fill_(-2.0)
    q = pam.query_conv(x).flatten(2)
    k = pam.key_conv(x).flatten(2)
    v = pam.value_conv(x).flatten(2)
    assert q.shape == (2, 2, 12) and v.shape == (2, 16, 12)  # query/key dim is C // 8
    expected_pam = 0.5 * reference.position_attention_reference(q, k, v).view(x.shape) + x
    expected_cam = -2.0 * reference.channel_attention_reference(x.flatten(2)).view(x.shape) + x
    torch.testing.assert_close(pam(x), expected_pam)
    torch.testing.assert_close(cam(x), expected_cam)
