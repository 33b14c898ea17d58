"""Mixup, CutMix and the weight average of the training loop, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.trainer.averaging import WeightAverage
from services.trainer.mixing import BatchMixer, MixedBatch


def _labelled_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value of its label, so any pixel tells whose it is."""
    targets = torch.arange(n) % 4
    inputs = targets.view(n, 1, 1, 1).float().expand(n, 3, 12, 16).clone()
    return inputs, targets


def test_mixup_blends_each_image_with_its_partner_in_the_drawn_share() -> None:
    inputs, targets = _labelled_batch()
    batch = BatchMixer(mixup_alpha=0.4, cutmix_alpha=0.0, seed=3)(inputs, targets)
    assert 0.0 < batch.share < 1.0
    expected = batch.share * targets + (1 - batch.share) * batch.partner_targets
    assert torch.allclose(batch.inputs, expected.float().view(-1, 1, 1, 1).expand_as(inputs))
    assert sorted(batch.partner_targets.tolist()) == sorted(targets.tolist())


def test_cutmix_pastes_one_box_whose_area_sets_the_share() -> None:
    n = 8
    targets = torch.arange(n) % 4
    inputs = (100.0 + torch.arange(n)).view(n, 1, 1, 1).expand(n, 3, 12, 16).clone()
    mixer = BatchMixer(mixup_alpha=0.0, cutmix_alpha=1.0, seed=5)
    checked = 0
    for _ in range(20):
        batch = mixer(inputs, targets)
        boxes = []
        for i in range(n):
            others = set(batch.inputs[i].unique().tolist()) - {100.0 + i}
            if not others:  # its own partner, or an empty box
                continue
            assert len(others) == 1, "pixels of more than one other image"
            j = int(others.pop()) - 100
            assert batch.partner_targets[i] == targets[j]
            box = batch.inputs[i] == 100.0 + j
            assert float(box.float().mean()) == pytest.approx(1 - batch.share, abs=1e-6)
            boxes.append(box)
            checked += 1
        # One rectangle, the same in every image and channel.
        assert all(torch.equal(box, boxes[0]) for box in boxes)
    assert checked > 0


def test_a_mixed_loss_weighs_both_label_sets_by_the_share() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    targets, partners = torch.tensor([0, 1]), torch.tensor([2, 0])
    criterion = nn.CrossEntropyLoss()
    batch = MixedBatch(torch.zeros(2), targets, partners, 0.7)
    expected = 0.7 * criterion(logits, targets) + 0.3 * criterion(logits, partners)
    assert float(batch.loss(criterion, logits)) == pytest.approx(float(expected))
    unmixed = MixedBatch(torch.zeros(2), targets, targets, 1.0)
    assert float(unmixed.loss(criterion, logits)) == pytest.approx(
        float(criterion(logits, targets))
    )


def test_a_switched_off_mixer_passes_the_batch_through_and_draws_nothing() -> None:
    inputs, targets = _labelled_batch()
    mixer = BatchMixer(0.0, 0.0, seed=1)
    before = mixer.state_dict()
    batch = mixer(inputs, targets)
    assert batch.inputs is inputs
    assert batch.share == 1.0
    assert mixer.state_dict() == before
    with pytest.raises(ValueError, match="alphas must be >= 0"):
        BatchMixer(-0.1, 0.0, seed=1)


def test_mixer_state_restores_the_same_draws() -> None:
    inputs, targets = _labelled_batch()
    mixer = BatchMixer(0.2, 1.0, seed=7)
    mixer(inputs, targets)
    saved = mixer.state_dict()
    first = mixer(inputs, targets)
    mixer.load_state_dict(saved)
    again = mixer(inputs, targets)
    assert first.share == again.share
    assert torch.equal(first.inputs, again.inputs)


def test_weight_average_follows_the_warmed_up_decay() -> None:
    model = nn.BatchNorm1d(2)  # a weight, a bias and float and integer buffers
    average = WeightAverage(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(3.0)
    model.running_var.fill_(5.0)  # batch-norm statistics are averaged too
    model.num_batches_tracked.fill_(7)
    average.update(model)
    first = min(0.5, 2 / 11)
    assert torch.allclose(average.state["weight"], first * start + (1 - first) * 3.0)
    assert torch.allclose(average.state["running_var"], torch.full((2,), first + (1 - first) * 5))
    average.update(model)  # decay now min(0.5, 3 / 12) = 0.25
    expected = 0.25 * (first * start + (1 - first) * 3.0) + 0.75 * 3.0
    assert torch.allclose(average.state["weight"], expected)
    assert int(average.state["num_batches_tracked"]) == 7
    for _ in range(200):
        average.update(model)
    assert average.current_decay() == 0.5
    assert torch.allclose(average.state["weight"], torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(model, decay=1.0)
