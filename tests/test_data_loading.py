import numpy as np
import pytest

from covnet.image.io import Geometry
from covnet.preprocessing.case import CaseProperties, sample_class_locations
from covnet.preprocessing.storage import save_case, segmentation_file
from covnet.runtime.errors import CovnetError
from covnet.training import data as data_module
from covnet.training.data import PatchSampler, number_of_random_samples, rank_composition, start_range
from covnet.training.distributed import DistributedContext

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def coordinate_image(shape, channels=1):
    """Channel c holds c*1e6 + 10000 z + 100 y + x + 1: every voxel says where it came from, and is > 0."""
    z, y, x = np.indices(shape)
    code = (10000 * z + 100 * y + x + 1).astype(np.float32)
    return np.stack([code + channel * 1_000_000 for channel in range(channels)]).astype(np.float32)


def decode_start(patch):
    """(z, y, x) in the case of a patch's first voxel, from any voxel inside the case."""
    inside = np.argwhere(patch[0] > 0)[0]
    value = int(patch[(0, *inside)]) - 1
    position = np.array([value // 10000, value // 100 % 100, value % 100])
    return position - inside


def write_case(folder, case, segmentation, channels=1, locations=None):
    image = coordinate_image(segmentation.shape, channels)
    if locations is None:
        labels = sorted(int(v) for v in np.unique(segmentation) if v != 0)
        locations = sample_class_locations(segmentation, labels, np.random.default_rng(0))
    properties = CaseProperties(case=case, original_geometry=Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY,
                                                                      segmentation.shape),
                                bounding_box=[[0, s] for s in segmentation.shape],
                                shape_after_crop=list(segmentation.shape),
                                target_spacing=[1.0, 1.0, 1.0], shape_after_resampling=list(segmentation.shape),
                                class_locations=locations)
    save_case(folder, image, segmentation.astype(np.uint8), properties, plan_key={}, source=[])
    return image


def one_voxel_case(shape=(30, 50, 50), voxel=(15, 25, 25), label=3):
    segmentation = np.zeros(shape, np.uint8)
    segmentation[voxel] = label
    return segmentation


def check_patch_matches_case(image, segmentation, data, target):
    """The patch is the case's window at its decoded start: case values inside, 0 / -1 outside."""
    start = decode_start(data)
    positions = [start[axis] + np.arange(data.shape[axis + 1]) for axis in range(3)]
    inside_axes = [(p >= 0) & (p < size) for p, size in zip(positions, segmentation.shape)]
    inside = inside_axes[0][:, None, None] & inside_axes[1][None, :, None] & inside_axes[2][None, None, :]
    window = np.ix_(*[p[ok] for p, ok in zip(positions, inside_axes)])
    np.testing.assert_array_equal(data[0][inside], image[0][window].ravel())
    np.testing.assert_array_equal(target[0][inside], segmentation[window].ravel())
    assert np.all(data[:, ~inside] == 0) and np.all(target[0][~inside] == -1)
    return start


def test_batches_have_the_documented_layout_and_copy_the_case(tmp_path):
    segmentation = one_voxel_case((12, 14, 16), (6, 7, 8))
    segmentation[2:5, 3:6, 4:9] = 1
    image = write_case(tmp_path, "a", segmentation, channels=2)
    sampler = PatchSampler(tmp_path, ["a"], (6, 8, 8), batch_size=3, seed=0)
    for _ in range(5):
        batch = next(sampler)
        assert batch["data"].shape == (3, 2, 6, 8, 8) and batch["data"].dtype == np.float32
        assert batch["target"].shape == (3, 1, 6, 8, 8) and batch["target"].dtype == np.int16
        assert batch["cases"] == ["a"] * 3
        for sample in range(3):
            data, target = batch["data"][sample], batch["target"][sample]
            start = check_patch_matches_case(image, segmentation, data, target)
            np.testing.assert_array_equal(data[1] - data[0], np.where(data[0] > 0, 1_000_000, 0))
            assert np.all(start >= 0) and np.all(start + (6, 8, 8) <= segmentation.shape)  # no padding needed


@pytest.mark.parametrize("batch_size, random_count", [(1, 1), (2, 1), (3, 2), (4, 3), (5, 3), (12, 8)])
def test_number_of_random_samples_follows_nnunet(batch_size, random_count):
    assert number_of_random_samples(batch_size, 0.33) == random_count


def test_last_samples_are_centred_on_foreground_and_the_others_are_random(tmp_path):
    segmentation = one_voxel_case()
    write_case(tmp_path, "a", segmentation)
    sampler = PatchSampler(tmp_path, ["a"], (8, 12, 12), batch_size=3, seed=1)
    hits_random = 0
    for _ in range(40):
        batch = next(sampler)
        assert batch["target"][2, 0, 4, 6, 6] == 3          # forced sample: the voxel at the patch centre
        hits_random += int(np.any(batch["target"][:2] == 3))
    # a random 8x12x12 patch of a 30x50x50 case contains the voxel rarely (~ 3% of patches)
    assert hits_random <= 10


def test_foreground_patch_near_the_border_is_shifted_inside_but_keeps_the_voxel(tmp_path):
    segmentation = one_voxel_case((20, 30, 30), (0, 29, 1), label=2)
    image = write_case(tmp_path, "a", segmentation)
    sampler = PatchSampler(tmp_path, ["a"], (8, 8, 8), batch_size=1, oversample_foreground=1.0, seed=2)
    batch = next(sampler)
    start = check_patch_matches_case(image, segmentation, batch["data"][0], batch["target"][0])
    np.testing.assert_array_equal(start, [0, 22, 0])
    assert np.sum(batch["target"] == 2) == 1


def test_case_smaller_than_the_patch_is_centred_and_padded(tmp_path):
    segmentation = np.ones((3, 5, 20), np.uint8)
    image = write_case(tmp_path, "small", segmentation)
    sampler = PatchSampler(tmp_path, ["small"], (8, 8, 8), batch_size=2, seed=3)
    for _ in range(5):
        batch = next(sampler)
        for sample in range(2):
            start = check_patch_matches_case(image, segmentation, batch["data"][sample], batch["target"][sample])
            assert start[0] == -2 and start[1] == -1            # (8-3)//2, (8-5)//2 voxels of padding before
            assert 0 <= start[2] <= 12
    assert (batch["target"] == -1).sum() > 0


@pytest.mark.parametrize("case_size, read, patch",
                         [(50, 20, 10), (50, 21, 10), (15, 30, 10), (10, 10, 10), (7, 10, 10)])
def test_start_range_lets_the_final_patch_reach_every_border(case_size, read, patch):
    low, high = start_range(case_size, read, patch)
    assert low <= high
    offset = (read - patch) // 2                            # where the final patch is cut from the read window
    if case_size >= patch:
        assert low + offset == 0 and high + offset + patch == case_size
    else:
        assert low == high and low == -((patch - case_size) // 2) - offset


def test_pre_augmentation_windows_overhang_only_as_far_as_the_final_patch_needs(tmp_path):
    segmentation = one_voxel_case((16, 24, 24), (15, 1, 12), label=1)
    image = write_case(tmp_path, "a", segmentation)
    patch, read = (4, 8, 8), (8, 14, 16)
    sampler = PatchSampler(tmp_path, ["a"], patch, batch_size=2, pre_augmentation_patch_size=read, seed=4)
    final_starts = []
    for _ in range(300):
        batch = next(sampler)
        assert batch["data"].shape == (2, 1, *read)
        for sample in range(2):
            start = check_patch_matches_case(image, segmentation, batch["data"][sample], batch["target"][sample])
            final_start = start + (np.array(read) - patch) // 2
            assert np.all(final_start >= 0) and np.all(final_start + patch <= segmentation.shape)
            final_starts.append(final_start)
            if sample == 1:                                   # forced foreground: the voxel is in the final patch
                voxel = np.array([15, 1, 12]) - final_start
                assert np.all(voxel >= 0) and np.all(voxel < patch)
    final_starts = np.array(final_starts)
    np.testing.assert_array_equal(final_starts.min(0), [0, 0, 0])
    np.testing.assert_array_equal(final_starts.max(0), np.array(segmentation.shape) - patch)


class RecordingArray:
    """Stands in for a memory map and records how many voxels each read takes."""

    def __init__(self, array, reads):
        self.array, self.reads = array, reads
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        result = self.array[key]
        self.reads.append(result.size)
        return result


def test_only_the_patch_is_read_from_the_memory_map(tmp_path, monkeypatch):
    segmentation = one_voxel_case((40, 60, 60), (20, 30, 30))
    write_case(tmp_path, "big", segmentation, channels=2)
    reads = []
    real_load_case = data_module.load_case

    def recording_load_case(folder, case, mmap=True):
        image, seg, properties = real_load_case(folder, case, mmap=mmap)
        assert isinstance(image, np.memmap) and isinstance(seg, np.memmap)
        return RecordingArray(image, reads), RecordingArray(seg, reads), properties

    monkeypatch.setattr(data_module, "load_case", recording_load_case)
    sampler = PatchSampler(tmp_path, ["big"], (4, 6, 6), batch_size=2, pre_augmentation_patch_size=(6, 8, 8), seed=5)
    for _ in range(10):
        next(sampler)
    assert len(reads) == 40                                  # image and segmentation, per sample
    assert max(reads) <= 2 * 6 * 8 * 8                       # never more than the read window (2 channels)


def test_anchor_cases_fill_their_count_of_every_batch(tmp_path):
    for case in ("expert_a", "expert_b", "pseudo_a", "pseudo_b", "pseudo_c"):
        write_case(tmp_path, case, one_voxel_case((6, 8, 8), (3, 4, 4)))
    cases = ["expert_a", "expert_b", "pseudo_a", "pseudo_b", "pseudo_c"]
    for batch_size, anchored in ((2, 1), (4, 2), (3, 3), (1, 0), (1, 1)):
        sampler = PatchSampler(tmp_path, cases, (4, 4, 4), batch_size=batch_size, seed=6,
                               anchor_cases=["expert_a", "expert_b"], anchor_count=anchored)
        batches = [sampler.draw_cases() for _ in range(200)]
        assert all(sum(case.startswith("expert") for case in batch) == anchored for batch in batches)
        if 0 < anchored < batch_size:                                      # the expert slot moves
            positions = {batch.index(next(c for c in batch if c.startswith("expert"))) for batch in batches}
            assert positions == set(range(batch_size - anchored + 1))
        drawn = [case for batch in batches for case in batch]
        assert not anchored or {"expert_a", "expert_b"} <= set(drawn)
        assert anchored == batch_size or {"pseudo_a", "pseudo_c"} <= set(drawn)
    uniform = PatchSampler(tmp_path, cases, (4, 4, 4), batch_size=4, seed=6)
    drawn = [case for _ in range(200) for case in uniform.draw_cases()]
    assert all(0.13 < drawn.count(case) / len(drawn) < 0.27 for case in cases)
    with pytest.raises(ValueError, match="not sampled"):
        PatchSampler(tmp_path, ["expert_a"], (4, 4, 4), batch_size=1, anchor_cases=["nobody"], anchor_count=1)


def test_the_batch_composition_holds_for_the_global_batch_however_it_is_split():
    """Foreground centring and the expert share are rules of the whole batch: split over ranks, the ranks'
    shares add up to the single process's."""
    for batch, world, oversample, share in ((2, 1, 0.33, 0.5), (2, 2, 0.33, 0.5), (4, 2, 0.33, 0.5),
                                            (5, 3, 1.0, 0.5), (4, 4, 0.0, 0.1), (3, 2, 0.66, None)):
        whole = rank_composition(batch, range(batch), oversample, share)
        parts = [rank_composition(batch, DistributedContext(rank=rank, local_rank=rank, world_size=world)
                                  .batch_slots(batch), oversample, share) for rank in range(world)]
        slots = [len(DistributedContext(rank=rank, local_rank=rank, world_size=world).batch_slots(batch))
                 for rank in range(world)]
        assert sum(slots) == batch
        assert sum(fraction * count for (fraction, _), count in zip(parts, slots)) == \
            pytest.approx(whole[0] * batch)
        assert sum(experts for _, experts in parts) == whole[1]
        assert share is None or whole[1] >= 1
    assert rank_composition(2, range(1), 0.33, 0.5) == (0.0, 1)      # rank 0 of 2: an expert, placed at random
    assert rank_composition(2, range(1, 2), 0.33, 0.5) == (1.0, 0)   # rank 1: a pseudo case, on foreground


def test_seeded_samplers_repeat_and_workers_differ(tmp_path):
    write_case(tmp_path, "a", one_voxel_case((20, 20, 20), (10, 10, 10)))
    write_case(tmp_path, "b", one_voxel_case((20, 20, 20), (5, 5, 5)))

    def batches(sampler, count=3):
        return [next(sampler)["data"] for _ in range(count)]

    first = batches(PatchSampler(tmp_path, ["a", "b"], (4, 4, 4), batch_size=2, seed=7))
    again = batches(PatchSampler(tmp_path, ["a", "b"], (4, 4, 4), batch_size=2, seed=7))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    workers = []
    for thread_id in range(2):
        sampler = PatchSampler(tmp_path, ["a", "b"], (4, 4, 4), batch_size=2, seed=7)
        sampler.set_thread_id(thread_id)
        workers.append(batches(sampler))
    assert not all(np.array_equal(x, y) for x, y in zip(*workers))


def test_ignore_label_is_not_a_foreground_class_to_centre_on(tmp_path):
    segmentation = np.zeros((20, 20, 20), np.uint8)
    segmentation[:, :, :10] = 4                              # half the case unannotated (ignore label 4)
    segmentation[15, 15, 15] = 1
    write_case(tmp_path, "a", segmentation)
    sampler = PatchSampler(tmp_path, ["a"], (4, 4, 4), batch_size=1, oversample_foreground=1, seed=8, ignore_label=4)
    for _ in range(10):
        assert next(sampler)["target"][0, 0, 2, 2, 2] == 1


def test_case_without_foreground_still_gives_random_patches(tmp_path):
    write_case(tmp_path, "empty", np.zeros((10, 10, 10), np.uint8))
    batch = next(PatchSampler(tmp_path, ["empty"], (4, 4, 4), batch_size=2, oversample_foreground=1, seed=9))
    assert np.all(batch["target"] == 0)


def test_missing_files_and_bad_arguments_are_reported(tmp_path):
    write_case(tmp_path, "a", one_voxel_case((6, 8, 8), (3, 4, 4)))
    segmentation_file(tmp_path, "a").unlink()
    with pytest.raises(CovnetError) as raised:
        PatchSampler(tmp_path, ["a"], (4, 4, 4), batch_size=1)
    assert raised.value.path == str(segmentation_file(tmp_path, "a"))
    with pytest.raises(ValueError, match="at least the patch"):
        PatchSampler(tmp_path, ["b"], (4, 4, 4), batch_size=1, pre_augmentation_patch_size=(4, 2, 4))
