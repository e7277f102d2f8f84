"""Image resolution: the community's 0.25x rescale, applied by one function, against scikit-image itself."""

import numpy as np
import pytest
from skimage.transform import rescale

from neureg.models.neural.images import downsample, downsampled_shape


def test_quarter_scale_matches_neuralpredictors_rescale_rounded():
    images = np.random.default_rng(0).integers(0, 256, (3, 144, 256), dtype=np.uint8)
    ours = downsample(images, 0.25)
    assert ours.shape == (3, 36, 64) and ours.dtype == np.uint8 and downsampled_shape((144, 256), 0.25) == (36, 64)
    for image, small in zip(images, ours):  # bilinear, no anti-aliasing, range kept: then rounded to uint8
        reference = rescale(image.astype(float), 0.25, order=1, anti_aliasing=False, preserve_range=True)
        np.testing.assert_array_equal(small, np.clip(np.rint(reference), 0, 255).astype(np.uint8))


def test_full_scale_is_the_images_themselves_and_bad_scales_are_refused():
    images = np.zeros((2, 8, 8), np.uint8)
    assert downsample(images, 1.0) is images
    for scale in (0, 1.5, -0.25):
        with pytest.raises(ValueError, match="image scale"):
            downsample(images, scale)
