"""Datasets (local TFDS builders, read with random access) and grain loaders.

Datasets (`data.name`):
  fashion_mnist        60k/10k 28x28x1 images, 10 classes, from Debian's
                       `dataset-fashion-mnist` (TFDS builder `fashion_mnist_local`).
  python_stdlib_bytes  byte-level LM corpus of this interpreter's stdlib `.py` files.
  any other name       a TFDS dataset already prepared in `data_dir` in the
                       array_record format, with 'image' and 'label' features.
  `data.files` set     byte-level LM corpus of the files matching that glob.
Local datasets are prepared automatically on first use (fashion_mnist: ~6 s).
Byte corpora are split into train/validation by file (see `text_bytes`).

Config fields (`ml_collections.ConfigDict`, usually `config.data`):
  name         dataset name (above); ignored when `files` is set.
  data_dir     TFDS data dir; unset/None: $MOE_JAX_DATA_DIR, else <repo>/.data/tfds.
  files        glob such as "corpus/**/*.txt" (`**` recursive); None/"" for `name`.
  seq_len      text only: tokens per example, 1..2048 (any value, no rebuild).
  train_split  split to train on; None: "train".
  eval_split   split to evaluate on; None: "test" if the dataset has one, else "validation".
Fields other than `name` may be absent.

Typical use:
  info = dataset_info(config.data)
  # batch_size is per process; process i gets rows [i*B, (i+1)*B) of each global batch.
  train = make_loader(config.data, info["train_split"], batch_size=..., seed=...,
                      shuffle=True, shard_index=jax.process_index(),
                      shard_count=jax.process_count())
  evals = make_loader(config.data, info["eval_split"], batch_size=..., seed=0,
                      shuffle=False, num_epochs=1, drop_remainder=False, ...)
"""
from moe_jax.data.loader import make_loader
from moe_jax.data.sources import dataset_info

__all__ = ["dataset_info", "make_loader"]
