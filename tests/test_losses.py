import pytest
import torch
import torch.nn.functional as F

from covnet.training.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    MaskedCrossEntropyLoss,
    SoftDiceLoss,
    deep_supervision_weights,
)

NUM_CLASSES = 4


def make_target(seed: int = 0, shape=(2, 1, 6, 8, 8)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    target = torch.zeros(shape, dtype=torch.int16)
    target[:, :, 1:5, 1:7, 1:4] = 1
    target[:, :, 1:5, 1:7, 4:7] = 2
    noise = torch.randint(0, 10, shape, generator=generator)
    target[noise == 0] = 3
    return target


def confident_logits(target: torch.Tensor, confidence: float = 30.0) -> torch.Tensor:
    one_hot = F.one_hot(target[:, 0].long(), NUM_CLASSES).movedim(-1, 1).float()
    return one_hot * confidence


@pytest.mark.parametrize("batch_dice", [False, True])
def test_perfect_prediction_reaches_the_minimum_and_a_wrong_one_does_not(batch_dice):
    target = make_target()
    loss = DiceCELoss(batch_dice=batch_dice)
    perfect = loss(confident_logits(target), target)
    assert 0 <= perfect.item() < 1e-5
    shifted = torch.roll(target, shifts=3, dims=-1)
    assert loss(confident_logits(shifted), target).item() > 1.0
    random_logits = torch.randn(target.shape[0], NUM_CLASSES, *target.shape[2:],
                                generator=torch.Generator().manual_seed(1))
    assert loss(random_logits, target).item() > 0.5


def test_dice_and_cross_entropy_match_hand_computation():
    target = make_target(2)
    logits = torch.randn(2, NUM_CLASSES, 6, 8, 8, generator=torch.Generator().manual_seed(3))
    probabilities = torch.softmax(logits, 1)
    one_hot = F.one_hot(target[:, 0].long(), NUM_CLASSES).movedim(-1, 1).float()
    per_sample = []
    for sample in range(2):
        for label in range(1, NUM_CLASSES):
            p, g = probabilities[sample, label], one_hot[sample, label]
            per_sample.append((2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5))
    expected_dice = 1 - torch.stack(per_sample).mean()
    assert SoftDiceLoss(batch_dice=False)(logits, target).item() == pytest.approx(expected_dice.item(), rel=1e-5)
    expected_ce = F.cross_entropy(logits, target[:, 0].long())
    assert MaskedCrossEntropyLoss()(logits, target).item() == pytest.approx(expected_ce.item(), rel=1e-5)
    # a (B, z, y, x) target without the channel axis means the same
    assert DiceCELoss()(logits, target[:, 0]).item() == pytest.approx(DiceCELoss()(logits, target).item())


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [4, 255])
def test_ignored_voxels_change_neither_value_nor_gradient(batch_dice, ignore_label):
    target = make_target(4)
    ignored = torch.zeros_like(target, dtype=torch.bool)
    ignored[:, :, :3] = True                      # the upper half of every sample is unannotated
    target = torch.where(ignored, torch.full_like(target, ignore_label), target)
    loss = DiceCELoss(batch_dice=batch_dice, ignore_label=ignore_label)
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, NUM_CLASSES, 6, 8, 8, generator=generator, requires_grad=True)
    value = loss(logits, target)
    value.backward()
    ignored_voxels = ignored.expand(-1, NUM_CLASSES, -1, -1, -1)
    assert torch.all(logits.grad[ignored_voxels] == 0)
    assert logits.grad[~ignored_voxels].abs().sum() > 0

    perturbed = logits.detach().clone()
    perturbed[ignored_voxels] += 10 * torch.randn(int(ignored_voxels.sum()), generator=generator)
    perturbed.requires_grad_(True)
    perturbed_value = loss(perturbed, target)
    perturbed_value.backward()
    assert perturbed_value.item() == pytest.approx(value.item(), abs=1e-6)
    assert torch.allclose(perturbed.grad, logits.grad, atol=1e-7)

    # without ignore_label the same voxels would matter (and label 255 would not even be a class)
    if ignore_label == NUM_CLASSES:
        relabelled = torch.where(ignored, torch.zeros_like(target), target)
        assert DiceCELoss(batch_dice=batch_dice)(logits, relabelled).item() != pytest.approx(value.item(), abs=1e-3)


def test_everything_ignored_gives_zero_cross_entropy_not_nan():
    target = torch.full((1, 1, 2, 3, 3), 4)
    logits = torch.randn(1, NUM_CLASSES, 2, 3, 3, requires_grad=True)
    value = DiceCELoss(ignore_label=4)(logits, target)
    assert torch.isfinite(value)
    value.backward()
    assert torch.all(logits.grad == 0)


def test_batch_dice_differs_from_per_sample_dice_on_a_crafted_batch():
    # sample 0: class 1 present and predicted perfectly; sample 1: class 1 absent but predicted in one voxel
    target = torch.zeros(2, 1, 1, 4, 4, dtype=torch.int64)
    target[0, 0, 0, :2, :2] = 1
    prediction = target.clone()
    prediction[1, 0, 0, 3, 3] = 1
    logits = F.one_hot(prediction[:, 0], 2).movedim(-1, 1).float() * 50
    per_sample = SoftDiceLoss(batch_dice=False)(logits, target).item()
    batch = SoftDiceLoss(batch_dice=True)(logits, target).item()
    # per sample: Dice 1 and ~0 -> loss ~0.5; over the batch: 2*4 / (5 + 4) -> loss 1/9
    assert per_sample == pytest.approx(0.5, abs=1e-4)
    assert batch == pytest.approx(1 / 9, abs=1e-4)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 6])
def test_deep_supervision_weights(count):
    weights = deep_supervision_weights(count)
    assert len(weights) == count
    assert sum(weights) == pytest.approx(1.0)
    if count > 1:
        assert weights[-1] == 0
        for finer, coarser in zip(weights[:-2], weights[1:-1]):
            assert coarser == pytest.approx(finer / 2)


def test_deep_supervision_loss_weights_each_scale_and_skips_the_coarsest():
    calls = []

    def recording_loss(output, target):
        calls.append(output.shape[-1])
        return (output - target).abs().mean()

    outputs = [torch.full((1, 1, 8), 1.0), torch.full((1, 1, 4), 2.0), torch.full((1, 1, 2), 3.0)]
    targets = [torch.zeros(1, 1, 8), torch.zeros(1, 1, 4), torch.zeros(1, 1, 2)]
    value = DeepSupervisionLoss(recording_loss)(outputs, targets)
    # weights 2/3, 1/3, 0
    assert value.item() == pytest.approx(2 / 3 * 1 + 1 / 3 * 2)
    assert calls == [8, 4]
    with pytest.raises(ValueError, match="match one to one"):
        DeepSupervisionLoss(recording_loss)(outputs, targets[:2])


def test_deep_supervision_with_dice_ce_on_downsampled_targets():
    target = make_target(6, shape=(2, 1, 8, 8, 8))
    coarse = target[:, :, ::2, ::2, ::2]
    coarsest = target[:, :, ::4, ::4, ::4]
    outputs = [confident_logits(t) for t in (target, coarse, coarsest)]
    loss = DeepSupervisionLoss(DiceCELoss())
    assert loss(outputs, [target, coarse, coarsest]).item() < 1e-5
    # the coarsest output has weight 0: garbage there does not change the loss
    outputs[2] = torch.randn_like(outputs[2])
    assert loss(outputs, [target, coarse, coarsest]).item() < 1e-5
    outputs[1] = torch.randn_like(outputs[1])
    assert loss(outputs, [target, coarse, coarsest]).item() > 0.1
