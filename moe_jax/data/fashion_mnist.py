"""Fashion-MNIST as a local TFDS builder, read from Debian's `dataset-fashion-mnist`.

TFDS ships its own `fashion_mnist` builder, which downloads; this one is
registered as `fashion_mnist_local` so the two never share a name or a
directory. Records keep the order of the idx files (record i == idx example i):
    image: uint8 [28, 28, 1], label: int64 scalar in [0, 10).
"""
import gzip
import pathlib

import numpy as np
import tensorflow_datasets as tfds

SOURCE_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Parses a gzipped idx file (big-endian header, uint8 payload) into [N, ...]."""
  data = gzip.decompress(path.read_bytes())
  ndim = data[3]  # magic is 0x00 0x00 <dtype=0x08 (uint8)> <ndim>
  if data[:3] != b"\x00\x00\x08":
    raise ValueError(f"{path}: not a uint8 idx file")
  shape = tuple(np.frombuffer(data, ">u4", count=ndim, offset=4))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (60k train / 10k test) from /usr/share/datasets/fashion-mnist."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")  # random access, no TensorFlow
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # keep idx order so records can be checked against the source
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    if not SOURCE_DIR.is_dir():
      raise FileNotFoundError(
          f"fashion_mnist: {SOURCE_DIR} not found; install it with "
          "`apt-get install dataset-fashion-mnist`")
    return {split: self._generate_examples(prefix)
            for split, prefix in _SPLIT_PREFIX.items()}

  def _generate_examples(self, prefix: str):
    images = read_idx(SOURCE_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(SOURCE_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {"image": image[:, :, None], "label": int(label)}
