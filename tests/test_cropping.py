import numpy as np

from covnet.image.cropping import body_bounding_box


def test_body_box_ignores_a_separate_table_and_keeps_every_labelled_voxel():
    image = np.full((20, 40, 40), -1000.0)
    image[4:16, 8:30, 6:34] = 40.0           # body
    image[:, 36:38, 2:38] = 200.0            # scanner table: brighter, but not connected to the body
    z, y, x = body_bounding_box(image)
    assert 2 <= z[0] <= 4 and 16 <= z[1] <= 18        # body box with at most 2 voxels of slack
    assert 6 <= y[0] <= 8 and 30 <= y[1] <= 32         # the table (y 36-37) is left out
    assert 4 <= x[0] <= 6 and 34 <= x[1] <= 36
    label = np.zeros(image.shape, np.uint8)
    label[0, 39, 39] = 1
    assert body_bounding_box(image, label) == ((0, z[1]), (y[0], 40), (x[0], 40))


def test_image_without_body_keeps_its_full_extent():
    assert body_bounding_box(np.full((6, 8, 10), -1024.0)) == ((0, 6), (0, 8), (0, 10))
