from dataclasses import replace

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

from covnet.image.io import Geometry
from covnet.preprocessing.case import CaseProperties, sample_class_locations
from covnet.preprocessing.storage import save_case
from covnet.training.augmentation import (
    AugmentationSettings,
    LateralMirrorTransform,
    downsample_nearest,
    get_pre_augmentation_patch_size,
    is_dummy_2d,
    training_read_size,
    training_transforms,
    validation_transforms,
)
from covnet.training.data import PatchSampler

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Deep-supervision scales of a 3-stage network with strides 1, 2, 2 (covnet.network.topology computes them).
SCALES = [[1, 1, 1], [0.5, 0.5, 0.5]]
COVID_LATERAL_PAIRS = [(1, 2)]
NO_SPATIAL = AugmentationSettings(p_rotation=0, p_scaling=0)


def lateral_batch(batch_size=8, shape=(8, 12, 16)):
    """Image = x coordinate (plus 10 so it stays positive); target 1 on the left half (low x), 2 on the right."""
    x = np.broadcast_to(np.arange(shape[2], dtype=np.float32), shape)
    data = np.broadcast_to(x + 10, (batch_size, 1, *shape)).copy()
    target = np.where(np.arange(shape[2]) < shape[2] // 2, 1, 2).astype(np.int16)
    target = np.broadcast_to(target, (batch_size, 1, *shape)).copy()
    return {"data": data, "target": target}


def write_case(folder, case, segmentation):
    image = np.random.default_rng(0).normal(size=(1, *segmentation.shape)).astype(np.float32)
    labels = sorted(int(v) for v in np.unique(segmentation) if v)
    properties = CaseProperties(case, Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY, segmentation.shape),
                                [[0, s] for s in segmentation.shape], list(segmentation.shape), [1.0, 1.0, 1.0],
                                list(segmentation.shape),
                                sample_class_locations(segmentation, labels, np.random.default_rng(0)))
    save_case(folder, image, segmentation, properties, plan_key={}, source=[])


def lung_case(shape=(20, 30, 30)):
    segmentation = np.zeros(shape, np.uint8)
    segmentation[2:-2, 4:-4, shape[2] // 2 + 1:-2] = 1      # left lung: high x (patient's left in LPS)
    segmentation[2:-2, 4:-4, 2:shape[2] // 2 - 1] = 2       # right lung
    segmentation[8:12, 10:14, 20:24] = 3
    return segmentation


@pytest.mark.parametrize("patch, dummy", [((48, 128, 128), False), ((32, 64, 64), False), ((12, 160, 160), True)])
def test_dummy_2d_rule(patch, dummy):
    assert is_dummy_2d(patch) is dummy


def test_pre_augmentation_patch_size_is_exact_for_scaling_and_bounded_by_the_diagonal():
    assert get_pre_augmentation_patch_size((10, 20, 30), 0, (0.7, 1.0)) == (10, 20, 30)
    assert get_pre_augmentation_patch_size((10, 20, 30), 0, (0.7, 1.4)) == (14, 28, 42)   # (n-1)*1.4+1 rounded up
    diagonal = np.sqrt(9 ** 2 + 19 ** 2 + 29 ** 2)
    size = get_pre_augmentation_patch_size((10, 20, 30), 180, (1, 1))
    assert all(s <= np.ceil(diagonal + 1) for s in size) and max(size) >= diagonal
    dummy = get_pre_augmentation_patch_size((4, 20, 30), 180, (1, 1.2))
    assert dummy[0] == 4 and dummy[1] == dummy[2] == int(np.ceil(np.hypot(19, 29) * 1.2 + 1))


@pytest.mark.parametrize("patch", [(12, 16, 20), (4, 16, 24)])
def test_rotated_and_scaled_patches_have_no_empty_corners(patch):
    np.random.seed(0)
    torch.manual_seed(0)
    settings = AugmentationSettings(p_rotation=1, p_scaling=1)
    read = training_read_size(patch, settings)
    batch = {"data": np.ones((6, 1, *read), np.float32), "target": np.ones((6, 1, *read), np.int16)}
    pipeline = training_transforms(patch, settings=replace(settings, p_noise=0, p_blur=0, p_brightness=0,
                                   p_contrast=0, p_low_resolution=0, p_gamma=0, p_inverted_gamma=0), mirror_axes=())
    for _ in range(5):
        out = pipeline(**{key: value.copy() for key, value in batch.items()})
        assert out["data"].shape == (6, 1, *patch)
        assert torch.all(out["target"] == 1)       # never the border (-1, then background)
        assert out["data"].min() > 0.5


def test_zooming_out_past_the_read_patch_gives_an_outside_border():
    np.random.seed(7)
    torch.manual_seed(7)
    patch = (12, 16, 20)
    settings = AugmentationSettings(p_rotation=0, p_scaling=1, scale_range=(1.4, 1.4), p_noise=0, p_blur=0,
                                    p_brightness=0, p_contrast=0, p_low_resolution=0, p_gamma=0, p_inverted_gamma=0)
    batch = {"data": np.ones((2, 1, *patch), np.float32), "target": np.ones((2, 1, *patch), np.int16)}
    out = training_transforms(patch, mirror_axes=(), ignore_label=4, settings=settings)(**batch)
    target, data = out["target"], out["data"]
    assert torch.all(target[:, :, 6, 8, 10] == 1) and torch.all(data[:, :, 6, 8, 10] == 1)
    assert torch.all(target[:, :, 0, 0, 0] == 4) and torch.all(data[:, :, 0, 0, 0] == 0)
    assert set(torch.unique(target).tolist()) == {1, 4}


def test_training_pipeline_shapes_types_and_label_values(tmp_path):
    np.random.seed(1)
    torch.manual_seed(1)
    write_case(tmp_path, "a", lung_case((10, 14, 14)))       # smaller than the read window: padded with -1
    patch = (8, 16, 16)
    settings = AugmentationSettings(p_rotation=0.5, p_scaling=0.5)
    sampler = PatchSampler(tmp_path, ["a"], patch, batch_size=4,
                           pre_augmentation_patch_size=training_read_size(patch, settings), seed=2)
    scales = SCALES
    for ignore_label, allowed in ((None, {0, 1, 2, 3}), (4, {0, 1, 2, 3, 4})):
        pipeline = training_transforms(patch, scales, lateral_pairs=[(1, 2)], ignore_label=ignore_label,
                                       settings=settings)
        seen = set()
        for _ in range(3):
            batch = pipeline(**next(sampler))
            assert isinstance(batch["data"], torch.Tensor) and batch["data"].dtype == torch.float32
            assert tuple(batch["data"].shape) == (4, 1, *patch)
            assert [tuple(t.shape) for t in batch["target"]] == [(4, 1, 8, 16, 16), (4, 1, 4, 8, 8)]
            assert all(t.dtype == torch.int16 for t in batch["target"])
            for target in batch["target"]:
                seen |= set(torch.unique(target).tolist())
        assert seen <= allowed
        assert ignore_label is None or ignore_label in seen     # the padding became the ignore label


def test_dummy_2d_pipeline_keeps_depth_and_rotates_in_plane():
    np.random.seed(3)
    torch.manual_seed(3)
    patch = (4, 16, 16)
    settings = AugmentationSettings(p_rotation=1, p_scaling=0)
    read = training_read_size(patch, settings)
    assert read[0] == 4 and read[1] > 16
    z = np.arange(4, dtype=np.float32)[:, None, None]
    data = np.broadcast_to(z + 100 * np.arange(2)[:, None, None, None], (2, 2, 4, *read[1:])).copy()
    batch = training_transforms(patch, None, settings=replace(settings, p_noise=0, p_blur=0, p_brightness=0,
                                p_contrast=0, p_low_resolution=0, p_gamma=0, p_inverted_gamma=0),
                                mirror_axes=())(data=data, target=np.zeros((2, 1, *read), np.int16))
    assert tuple(batch["data"].shape) == (2, 2, *patch)
    # each slice is rotated on its own: slice k keeps its value k, channel c keeps 100 c
    expected = torch.from_numpy(z + 100 * np.arange(2)[:, None, None, None]).expand(2, 2, 4, 16, 16)
    torch.testing.assert_close(batch["data"], expected.float(), atol=1e-3, rtol=0)


def mirror(transform, batch, sample=0):
    item = {"image": torch.from_numpy(batch["data"][sample]), "segmentation": torch.from_numpy(batch["target"][sample])}
    item = transform(**item)
    return item["image"].numpy(), item["segmentation"].numpy()


def test_mirroring_along_x_swaps_lateral_labels_and_other_axes_do_not():
    image, target = mirror(LateralMirrorTransform(axes=(2,), lateral_pairs=[(1, 2)], p_per_axis=1), lateral_batch(1))
    assert np.all(image[0, :, :, 0] == 25)                            # reversed along x
    assert np.all(target[..., :8] == 1) and np.all(target[..., 8:] == 2)
    _, plain = mirror(LateralMirrorTransform(axes=(2,), lateral_pairs=[], p_per_axis=1), lateral_batch(1))
    assert np.all(plain[..., :8] == 2)                                # without the swap the labels would move
    source = lateral_batch(1)
    source["target"][:, :, 0, 0, 0] = 3                               # a marker to see the z/y flip
    image, target = mirror(LateralMirrorTransform(axes=(0, 1), lateral_pairs=[(1, 2)], p_per_axis=1), source)
    assert target[0, -1, -1, 0] == 3 and target[0, 0, 0, 0] == 1
    assert np.all(target[..., 8:] == 2) and np.all(image[0, :, :, 0] == 10)


def test_full_augmentation_keeps_left_labels_on_the_left_exactly_when_flipped():
    np.random.seed(4)
    torch.manual_seed(4)
    pipeline = training_transforms((8, 12, 16), None, lateral_pairs=[(1, 2)], settings=NO_SPATIAL)
    flipped_x = kept_x = 0
    for _ in range(6):
        batch = pipeline(**lateral_batch(8))
        data, target = batch["data"].numpy(), batch["target"].numpy()
        for sample in range(8):
            left_brighter = data[sample, 0, :, :, :8].mean() > data[sample, 0, :, :, 8:].mean()
            flipped_x += left_brighter
            kept_x += not left_brighter
            assert np.all(target[sample, 0, :, :, :8] == 1) and np.all(target[sample, 0, :, :, 8:] == 2)
    assert flipped_x > 10 and kept_x > 10


def test_mirroring_real_lungs_swaps_exactly_the_lung_labels(tmp_path):
    segmentation = lung_case()
    write_case(tmp_path, "a", segmentation)
    batch = next(PatchSampler(tmp_path, ["a"], (20, 30, 30), batch_size=1, seed=6))
    transform = LateralMirrorTransform(axes=(2,), lateral_pairs=COVID_LATERAL_PAIRS, p_per_axis=1)
    _, target = mirror(transform, batch)
    swapped = {1: 2, 2: 1, 0: 0, 3: 3}
    np.testing.assert_array_equal(target, np.vectorize(swapped.get)(batch["target"][0, :, :, :, ::-1]))


def test_downsample_nearest():
    array = torch.arange(4 * 6 * 8).reshape(1, 1, 4, 6, 8)
    half = downsample_nearest(array, (0.5, 0.5, 0.5))
    assert torch.equal(half[0, 0], array[0, 0, 1::2, 1::2, 1::2])
    assert downsample_nearest(array, (1, 1, 1)) is array
    assert tuple(downsample_nearest(array, (1, 1 / 3, 0.25)).shape) == (1, 1, 4, 2, 2)
    assert torch.equal(downsample_nearest(array, (1, 1 / 3, 0.25))[0, 0, :, :, 0], array[0, 0, :, 1::3, 2])


def test_validation_pipeline_changes_nothing_but_the_targets():
    data = np.random.rand(2, 1, 8, 8, 8).astype(np.float32)
    target = np.ones((2, 1, 8, 8, 8), np.int16)
    target[:, :, :2] = -1
    batch = validation_transforms(SCALES)(data=data.copy(), target=target)
    np.testing.assert_array_equal(batch["data"].numpy(), data)
    full, half = batch["target"]
    assert tuple(half.shape) == (2, 1, 4, 4, 4)
    assert torch.all(full[:, :, :2] == 0) and torch.all(full[:, :, 2:] == 1)
    ignored = validation_transforms(None, ignore_label=4)(data=data.copy(), target=np.where(target == 1, 1, -1))
    assert set(torch.unique(ignored["target"]).tolist()) == {1, 4}


def test_a_worker_process_reseeds_torch_from_numpy_and_uses_one_thread():
    pipeline = validation_transforms()
    threads, torch_state = torch.get_num_threads(), torch.get_rng_state()
    try:
        np.random.seed(11)
        expected = np.random.randint(0, 2 ** 31 - 1)
        np.random.seed(11)
        pipeline._prepared_process = -1                  # as if forked into another process
        pipeline(data=np.zeros((1, 1, 2, 2, 2), np.float32), target=np.zeros((1, 1, 2, 2, 2), np.int16))
        assert torch.initial_seed() == expected and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_state)


# Shutting the augmenter down can catch its results thread unpickling a tensor whose worker already exited
# (batchgenerators' shutdown race, a FileNotFoundError in that thread); the batches themselves are complete.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_sampler_and_augmentation_run_in_worker_processes(tmp_path):
    write_case(tmp_path, "a", lung_case((40, 60, 60)))
    patch = (8, 12, 12)
    sampler = PatchSampler(tmp_path, ["a"], patch, batch_size=2, seed=7,
                           pre_augmentation_patch_size=training_read_size(patch), num_threads_in_multithreaded=2)
    augmenter = MultiThreadedAugmenter(sampler, training_transforms(patch, SCALES,
                                                                    lateral_pairs=[(1, 2)]),
                                       num_processes=2, num_cached_per_queue=1, seeds=[5, 5])
    try:
        batches = [next(augmenter) for _ in range(4)]
    finally:
        augmenter._finish()
    assert all(tuple(b["data"].shape) == (2, 1, *patch) for b in batches)
    # same augmentation seed in both workers: only the sampler's per-worker stream can tell them apart
    assert not torch.equal(batches[0]["data"], batches[1]["data"])
