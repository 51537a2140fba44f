"""Resolves a data config to a prepared TFDS builder and describes it.

Local datasets are prepared on first use (under a file lock, so concurrent
processes on one machine prepare once); any other name is looked up in TFDS
as is and must already be prepared in `array_record` format.
"""
import contextlib
import dataclasses
import fcntl
import os
import pathlib
from typing import Any

from absl import logging as absl_logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from moe_jax.data import fashion_mnist, multidomain, text_bytes
from moe_jax.validation import allowed, check_choice

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# User-facing name -> (kind, builder class, config factory of the data config, or None).
_LOCAL = {
    "fashion_mnist": ("image", fashion_mnist.FashionMnistLocal, None),
    "python_stdlib_bytes": ("text", text_bytes.PythonStdlibBytes,
                            lambda data_config: text_bytes.stdlib_config()),
    "multidomain_bytes": ("text", multidomain.MultidomainBytes, lambda data_config:
                          multidomain.corpus_config(data_config.get("domains") or (),
                                                    data_config.get("max_domain_bytes")
                                                    or multidomain.MAX_DOMAIN_BYTES)),
}


DOMAIN_MIXES = ("balanced", "natural")  # data.domain_mix: how training batches mix domains


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A prepared dataset. kind: "image" (image + label) or "text" (byte blocks)."""
  name: str
  kind: str
  builder: tfds.core.DatasetBuilder

  @property
  def domains(self) -> tuple[str, ...]:
    """The domain names of a corpus whose records carry a domain label (multidomain_bytes), in
    label order; () for the others."""
    return tuple(self.builder.info.metadata.get("domains", ())) if self.kind == "text" else ()

  def domain_records(self, split: str, field: str = "split") -> list[int]:
    """Records of each domain in `split` (stored domain by domain); a one-line error naming
    `field` for a split that is not stored whole ("train[:10%]" cannot be read by domain)."""
    records = self.builder.info.metadata["records"]
    if split not in records:
      raise ValueError(f"{field}={split!r}: {self.name} is read by domain from a whole split; "
                       f"allowed: {allowed(records)}")
    return list(records[split])

  def domain_windows(self, split: str, seq_len: int, field: str = "split") -> list[range]:
    """The indices of each domain's `seq_len` windows in `split` (as the loader numbers them:
    text_bytes.BLOCK_LEN // seq_len windows a record), without the windows of a domain's last
    record that hold only padding (those starting at or after its last byte); a split not
    stored whole is refused naming `field` (domain_records)."""
    per_block = text_bytes.BLOCK_LEN // seq_len
    counts = self.domain_records(split, field)
    starts = np.cumsum([0] + counts[:-1]) * per_block
    windows = np.arange(max(counts) * per_block)
    offsets = windows // per_block * text_bytes.BLOCK_LEN + windows % per_block * seq_len
    sizes = self.builder.info.metadata["bytes"][split]  # each document and its separator
    return [range(start, start + int(np.sum(offsets[:count * per_block] < size - 1)))
            for start, count, size in zip(starts.tolist(), counts, sizes)]

  def split_size(self, split: str) -> int:
    """Number of records in `split` (TFDS split syntax such as "train[:10%]" allowed)."""
    return self.builder.info.splits[split].num_examples

  @property
  def default_eval_split(self) -> str:
    """The eval split when the config names none: "test" if there is one, else "validation"."""
    return "test" if "test" in self.builder.info.splits else "validation"


def data_dir(data_config: ml_collections.ConfigDict) -> pathlib.Path:
  """`data_config.data_dir`, else $MOE_JAX_DATA_DIR, else <repo root>/.data/tfds."""
  path = data_config.get("data_dir") or os.environ.get("MOE_JAX_DATA_DIR")
  return pathlib.Path(path or _REPO_ROOT / ".data" / "tfds").expanduser()


@contextlib.contextmanager
def _lock(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


@contextlib.contextmanager
def _quiet_absl():
  """absl's warnings off: TFDS warns "Using custom data configuration: <the whole config>" for
  every config made at run time, which all of ours are (once per open, many lines each)."""
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)


def _prepared(builder_cls, config, root: pathlib.Path) -> tfds.core.DatasetBuilder:
  # The builder is created inside the lock: one created before another process
  # finished preparing would not see the written dataset_info.
  with _lock(root / f".{builder_cls.name}.lock"), _quiet_absl():
    builder = builder_cls(data_dir=root, config=config)
    builder.download_and_prepare()
  return builder


def open_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """Returns the prepared dataset that `data_config` names.

  `data_config.files` (a glob), when set, selects the user text corpus and
  `name` is ignored; otherwise `name` is a local dataset or a TFDS name.
  """
  root = data_dir(data_config)
  if files := data_config.get("files"):
    builder = _prepared(text_bytes.TextFilesBytes, text_bytes.files_config(files), root)
    return Dataset(f"text_files:{files}", "text", builder)
  name = data_config.name
  if name in _LOCAL:
    kind, builder_cls, make_config = _LOCAL[name]
    return Dataset(name, kind,
                   _prepared(builder_cls, make_config and make_config(data_config), root))
  try:
    builder = tfds.builder(name, data_dir=root)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"unknown dataset {name!r}: not a local dataset ({', '.join(_LOCAL)}) nor in the "
        "TFDS catalog; for your own text files set data.files to a glob") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"{name}: not prepared in {root}; prepare it on a machine with network access with "
        f"tfds.builder({name!r}, data_dir={str(root)!r}, file_format='array_record')"
        ".download_and_prepare()")
  features = builder.info.features
  if not ("image" in features and isinstance(features.get("label"), tfds.features.ClassLabel)):
    raise ValueError(f"{name}: only TFDS datasets with 'image' and 'label' "
                     f"(ClassLabel) features are supported, got {sorted(features)}")
  return Dataset(name, "image", builder)


def dataset_info(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the model and training loop need to know about the dataset.

  image: {"kind": "image", "image_shape": (H, W, C), "num_classes", "class_names", ...}
  text:  {"kind": "text", "vocab_size": 256, "seq_len", "domains": names (() without domain
         labels), ...}
  Both also have "name", "train_split", "eval_split", "num_train" and
  "num_eval": examples per epoch as make_loader yields them (for text: windows).
  """
  ds = open_dataset(data_config)
  train = data_config.get("train_split") or "train"
  eval_ = data_config.get("eval_split") or ds.default_eval_split
  info = {"name": ds.name, "kind": ds.kind, "train_split": train, "eval_split": eval_}
  if ds.kind == "image":
    label = ds.builder.info.features["label"]
    info |= {"image_shape": tuple(ds.builder.info.features["image"].shape),
             "num_classes": label.num_classes, "class_names": tuple(label.names),
             "num_train": ds.split_size(train), "num_eval": ds.split_size(eval_)}
  else:
    seq_len = check_seq_len(data_config)
    per_block = text_bytes.BLOCK_LEN // seq_len
    info |= {"vocab_size": text_bytes.VOCAB_SIZE, "seq_len": seq_len, "domains": ds.domains,
             "num_train": ds.split_size(train) * per_block,
             "num_eval": ds.split_size(eval_) * per_block}
    if ds.domains:  # evaluation reads each domain as far as the smallest goes (loader.py)
      check_choice("data", "domain_mix", data_config.get("domain_mix", "balanced"),
                   DOMAIN_MIXES)
      ds.domain_records(train, "data.train_split")
      info["num_eval"] = len(ds.domains) * min(
          map(len, ds.domain_windows(eval_, seq_len, "data.eval_split")))
  return info


def check_seq_len(data_config: ml_collections.ConfigDict) -> int:
  """`data_config.seq_len`, checked against the stored block length."""
  seq_len = data_config.get("seq_len")
  if not (isinstance(seq_len, int) and 1 <= seq_len <= text_bytes.BLOCK_LEN):
    raise ValueError(f"data.seq_len must be an int in [1, {text_bytes.BLOCK_LEN}], got {seq_len!r}")
  return seq_len
