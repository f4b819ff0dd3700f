"""The sharpness measures on problems whose answer is known: a quadratic, and a tiny network
whose Hessian is built densely."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conadv.models.multi_bn import convert_to_multi_bn
from conadv.train.sharpness import (
    measured_parameters,
    model_sharpness,
    top_eigenvalue,
    worst_case_increase,
)


def test_the_top_eigenvalue_of_a_quadratic_is_its_largest():
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    eigenvalues = torch.tensor([9.0, 4.0, 2.5, 1.0, 0.5, 0.1], dtype=torch.float64)
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    w = torch.randn(6, generator=generator, dtype=torch.float64, requires_grad=True)
    found = top_eigenvalue(lambda: 0.5 * w @ matrix @ w, [w], iterations=200, tolerance=1e-10)
    assert abs(found - 9.0) < 1e-6


def test_the_top_eigenvalue_of_a_tiny_network_matches_its_dense_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 3, (32,))
    parameters = list(net.parameters())
    shapes = [p.shape for p in parameters]
    sizes = [p.numel() for p in parameters]

    def loss_of_flat(flat):
        pieces = torch.split(flat, sizes)
        weights = [piece.view(shape) for piece, shape in zip(pieces, shapes)]
        hidden = torch.tanh(F.linear(x, weights[0], weights[1]))
        return F.cross_entropy(F.linear(hidden, weights[2], weights[3]), y)

    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    dense = torch.autograd.functional.hessian(loss_of_flat, flat)
    spectrum = torch.linalg.eigvalsh(dense)
    largest = spectrum.max().item()
    found = top_eigenvalue(lambda: F.cross_entropy(net(x), y), parameters, iterations=500,
                           tolerance=1e-10)
    assert abs(found - largest) < 1e-5 * max(1.0, abs(largest)), (found, spectrum)


def test_at_a_saddle_the_top_eigenvalue_is_the_largest_not_the_largest_in_magnitude():
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.tensor([-9.0, 4.0, 1.0, -0.5, 0.2],
                                             dtype=torch.float64)) @ basis.T
    w = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    found = top_eigenvalue(lambda: 0.5 * w @ matrix @ w, [w], iterations=500, tolerance=1e-12)
    assert abs(found - 4.0) < 1e-6


def test_the_box_increase_splits_into_its_first_order_term_and_the_curvature_rest():
    """L = a/2 (w - c)^2 with the box's half-width h = rho (|w| + 1): the increase at the far
    end is a |w - c| h (first order) + a/2 h^2 (the rest)."""
    a, c, rho, w0 = 3.0, -1.0, 0.05, 0.7
    w = torch.tensor([w0], dtype=torch.float64, requires_grad=True)
    found = worst_case_increase(lambda: (a / 2 * (w - c) ** 2).sum(), [w], rho, steps=5)
    h = rho * (w0 + 1)
    assert found["first_order"] == pytest.approx(a * abs(w0 - c) * h, rel=1e-12)
    assert found["second_order"] == pytest.approx(a / 2 * h ** 2, rel=1e-9)


def test_the_ascent_leaves_an_exact_stationary_point():
    a, c, rho = 2.0, 0.5, 0.1
    w = torch.tensor([c], dtype=torch.float64, requires_grad=True)  # the minimum: g = 0
    found = worst_case_increase(lambda: (a / 2 * (w - c) ** 2).sum(), [w], rho, steps=3)
    h = rho * (c + 1)
    assert found["first_order"] == 0.0
    assert found["increase"] == pytest.approx(a / 2 * h ** 2, rel=1e-12)
    with pytest.raises(ValueError, match="at least one ascent step"):
        worst_case_increase(lambda: (w ** 2).sum(), [w], rho, steps=0)


def test_the_worst_case_in_the_box_is_found_on_a_quadratic():
    """L = a/2 (w - c)^2: within |delta| <= rho (|w| + 1) the worst point is the box's far end
    from c, L = a/2 (|w - c| + rho (|w| + 1))^2."""
    a, c, rho = 3.0, -1.0, 0.05
    w = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    found = worst_case_increase(lambda: (a / 2 * (w - c) ** 2).sum(), [w], rho, steps=5)
    exact = a / 2 * (abs(0.7 - c) + rho * (0.7 + 1)) ** 2
    assert abs(found["worst_loss"] - exact) < 1e-12
    assert abs(found["loss"] - a / 2 * 1.7 ** 2) < 1e-12
    assert w.item() == 0.7  # the weights are left as they were


def test_the_worst_case_beats_random_corners_and_ignores_the_auxiliary_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10))
    model(torch.randn(4, 3, 8, 8))
    convert_to_multi_bn(model, ["adv"])
    batches = [(torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = model_sharpness(model, batches, rho=1e-3, iterations=30)
    assert result["images"] == 32 and result["hessian_top_eigenvalue"] > 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(p is aux for p in measured_parameters(model)
                   for aux in model[1].aux.parameters())
    parameters = measured_parameters(model)
    model.eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        random_best = 0.0
        for _ in range(20):  # random corners of the same box
            signs = [torch.randint(0, 2, p.shape, generator=generator) * 2 - 1
                     for p in parameters]
            deltas = [s * 1e-3 * (p.abs() + 1) for s, p in zip(signs, parameters)]
            for p, d in zip(parameters, deltas):
                p.add_(d)
            loss = sum(F.cross_entropy(model(x), y, reduction="sum")
                       for x, y in batches) / 32
            for p, d in zip(parameters, deltas):
                p.sub_(d)
            random_best = max(random_best, float(loss) - result["loss"])
    assert result["increase"] > random_best > 0


def test_a_transformer_without_batchnorm_gets_its_sharpness_measured():
    """timm's attention runs a fused kernel with no second derivative; the Hessian's power
    iteration needs one (this raised 'derivative ... not implemented')."""
    import timm

    from conadv.train.sharpness import model_sharpness

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, num_classes=3,
                              depth=1)
    batch = [(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))]
    measured = model_sharpness(model, batch, iterations=3, steps=2)
    assert measured["hessian_top_eigenvalue"] != 0 and measured["increase"] > 0


def test_power_iteration_does_not_stop_on_its_first_product_and_warns_when_unconverged(caplog):
    """A start vector almost orthogonal to the top eigenvector has a Rayleigh quotient near 0,
    which a comparison with a starting value of 0 took for convergence."""
    matrix = torch.diag(torch.tensor([5.0, 1e-12], dtype=torch.float64))
    w = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(2, generator=generator, dtype=torch.float64)
    # choose the loss's coordinates so that the seeded start vector is the weak direction
    basis = torch.stack([torch.tensor([-start[1], start[0]]), start]) / start.norm()
    rotated = basis.T @ matrix @ basis
    found = top_eigenvalue(lambda: 0.5 * w @ rotated @ w, [w], iterations=200,
                           tolerance=1e-10)
    assert abs(found - 5.0) < 1e-6
    close = torch.diag(torch.tensor([5.0, 4.999], dtype=torch.float64))
    with caplog.at_level("WARNING", logger="conadv.train.sharpness"):
        top_eigenvalue(lambda: 0.5 * w @ close @ w, [w], iterations=3, tolerance=1e-12)
    assert "did not converge" in caplog.text


def test_a_loss_without_curvature_has_top_eigenvalue_zero():
    w = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    assert top_eigenvalue(lambda: 0.0 * (w ** 2).sum(), [w]) == 0.0  # H v = 0 at once


def test_weights_with_a_non_finite_loss_are_refused_in_one_sentence():
    from conadv.errors import TrainingDiverged

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    batches = [(torch.rand(4, 3, 2, 2), torch.randint(0, 3, (4,)))]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TrainingDiverged, match="loss at these weights is nan"):
        model_sharpness(model, batches)
    for name, p in model.named_parameters():  # left as they were, the nan included
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True)
