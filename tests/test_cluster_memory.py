"""Cluster-contrast's memory loss: exact values, the momentum update, errors."""

from __future__ import annotations

import math

import pytest
import torch

from strongreid.errors import ConfigError
from strongreid.losses.cluster_memory import ClusterMemory


def test_loss_and_update_by_hand():
    # Two clusters on the axes, temperature 0.5, momentum 0.5.
    mem = ClusterMemory(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), temp=0.5, momentum=0.5)
    assert torch.equal(mem.features, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[3.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = mem(x, torch.tensor([0, 1]))
    # Image 1: cosines (1, 0) -> logits (2, 0); image 2: cosines (.7071, .7071) -> equal logits.
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Centroid 0: (1,0)*.5 + (1,0)*.5 = (1,0); centroid 1: (0,1)*.5 + (.7071,.7071)*.5, normalised.
    c1 = torch.tensor([0.5 * 2**-0.5, 0.5 + 0.5 * 2**-0.5])
    assert torch.allclose(mem.features[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(mem.features[1], c1 / c1.norm())
    loss.backward()  # the update in place did not break the graph
    # d loss / d x_1 is orthogonal to x_1 (a normalised input): (3,0) . grad = 0 on x's first row
    assert torch.dot(x.grad[0], x.detach()[0]).abs() < 1e-6


def test_images_of_one_cluster_update_in_batch_order():
    mem = ClusterMemory(torch.tensor([[1.0, 0.0]]), temp=1.0, momentum=0.5)
    mem(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), torch.tensor([0, 0]))
    first = torch.tensor([0.5, 0.5]) / torch.tensor([0.5, 0.5]).norm()
    second = first * 0.5 + torch.tensor([-0.5, 0.0])
    assert torch.allclose(mem.features[0], second / second.norm())


def test_eval_mode_does_not_move_the_memory():
    mem = ClusterMemory(torch.eye(3)).eval()
    before = mem.features.clone()
    mem(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert torch.equal(mem.features, before)


def test_from_labels_uses_normalised_means_and_skips_outliers():
    feats = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [5.0, 5.0]])
    mem = ClusterMemory.from_labels(feats, torch.tensor([0, 1, 1, -1]))
    assert mem.features.shape == (2, 2)
    assert torch.allclose(mem.features, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="no identity"):
        ClusterMemory(torch.zeros(0, 4))
    with pytest.raises(ConfigError, match="temperature"):
        ClusterMemory(torch.eye(2), temp=0.0)
    with pytest.raises(ConfigError, match="momentum"):
        ClusterMemory(torch.eye(2), momentum=1.0)
