"""The lecture's worked backpropagation example as a golden test of the gradient utility."""

import pytest
import torch

from bitmoji.core import modelfile
from bitmoji.core.gradients import DOT_ROW, SMALL_GRADIENT, STATS_CHUNK, ProbeError, gradient_probe, gradient_stats
from bitmoji.trainer.models import ToyNetwork

# The lecture's hand-computed gradients for x = 1, y = 3, MSE loss.
EXPECTED = {
    "hidden.weight": [[-0.3480], [-1.3032]],
    "hidden.bias": [-0.3480, -1.3032],
    "output.weight": [[-2.9191, -2.4229]],
    "output.bias": [-3.3142],
}


def _check(result):
    grads = {p.name: p.gradient for p in result.parameters}
    assert set(grads) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        torch.testing.assert_close(grads[name], torch.tensor(expected), atol=1e-4, rtol=0)
    # forward: -1 + sigmoid(2) + 2 sigmoid(1) = 1.3429; loss (1.3429 - 3)^2
    assert result.outputs.item() == pytest.approx(1.3429, abs=1e-4)
    assert result.loss == pytest.approx((1.3429 - 3) ** 2, abs=1e-3)


def test_lecture_example_eager():
    _check(gradient_probe(ToyNetwork.lecture(), torch.tensor([[1.0]]), torch.tensor([3.0]), loss="mse"))


def test_lecture_example_through_torchscript(tmp_path):
    path = modelfile.export_torchscript(ToyNetwork.lecture(), tmp_path / "toy.pt", {}, torch.tensor([[1.0], [2.0]]))
    loaded = modelfile.load_model(path)
    _check(gradient_probe(loaded.module, torch.tensor([[1.0]]), torch.tensor([3.0]), loss="mse"))


def test_probe_leaves_no_grad_behind_and_matches_backward():
    net = ToyNetwork.lecture()
    x, y = torch.tensor([[1.0], [-0.5]]), torch.tensor([3.0, 1.0])
    result = gradient_probe(net, x, y, loss="mse")
    assert all(p.grad is None for p in net.parameters())
    # the same gradients by the ordinary route
    loss = torch.nn.functional.mse_loss(net(x).reshape(-1), y)
    loss.backward()
    for probe, (_, p) in zip(result.parameters, net.named_parameters(), strict=True):
        torch.testing.assert_close(probe.gradient, p.grad)
    assert probe.norm == pytest.approx(float(p.grad.norm()))


def test_input_gradient_is_the_saliency():
    net = ToyNetwork.lecture()
    result = gradient_probe(net, torch.tensor([[1.0]]), torch.tensor([3.0]), loss="mse")
    # dL/dx = dL/dy * sum_j w_out_j * s_j (1 - s_j) * w_hid_j
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    dy = 2 * (1.3429 - 3)
    expected = dy * (1 * s[0] * (1 - s[0]) * 1 + 2 * s[1] * (1 - s[1]) * -1)
    assert result.input_gradient.item() == pytest.approx(float(expected), abs=1e-3)


@pytest.mark.parametrize(
    "targets, loss, message",
    [
        (torch.tensor([1.0, 0.0]), "bce", "2 targets for 1 outputs"),
        (torch.tensor([2.0]), "bce", "[0, 1]"),
        (torch.tensor([float("nan")]), "mse", "finite"),
        (torch.tensor([1.0]), "hinge", "unknown loss"),
    ],
)
def test_bad_probe_requests(targets, loss, message):
    with pytest.raises(ProbeError, match=message.replace("[", r"\[")):
        gradient_probe(ToyNetwork.lecture(), torch.tensor([[1.0]]), targets, loss=loss)


@pytest.mark.parametrize(
    "numel", [1, 7, SMALL_GRADIENT, SMALL_GRADIENT + 1, STATS_CHUNK, 2 * STATS_CHUNK + DOT_ROW + 13]
)
def test_gradient_stats_equal_the_plain_formulas_across_chunk_boundaries(numel):
    torch.manual_seed(numel)
    g = torch.randn(numel) * 3
    g[numel // 2] = -50.0  # the largest magnitude is negative: max |g| must not be max g
    norm, max_abs, mean_abs = gradient_stats(g.reshape(-1, 1) if numel % 2 else g)
    exact = g.double()
    assert norm == pytest.approx(float(exact.norm()), rel=1e-7)
    assert max_abs == 50.0
    assert mean_abs == pytest.approx(float(exact.abs().mean()), rel=1e-7)


def test_gradient_stats_of_a_big_gradient_match_float64():
    # Shaped like the MLP's first weight gradient for one image: (d loss / d z) outer (pixels in [0, 1]).
    # Its rows share a sign, so a float32 sum of squares over 1 M values drifts (4e-6 relative,
    # as did the 256 K-value dots used before); short dots summed in float64 stay near 1e-8.
    torch.manual_seed(0)
    g = torch.outer(torch.randn(128) * 1e-3, torch.rand(3 * 128 * 128))
    norm, max_abs, mean_abs = gradient_stats(g)
    exact = g.double()
    assert norm == pytest.approx(float(exact.norm()), rel=1e-7)
    assert max_abs == float(exact.abs().max())
    assert mean_abs == pytest.approx(float(exact.abs().mean()), rel=1e-7)


def test_gradient_stats_of_an_empty_gradient_are_zero():
    assert gradient_stats(torch.empty(0, 3)) == (0.0, 0.0, 0.0)
