"""Byte-level language-modelling corpora as local TFDS builders.

A corpus is a sorted list of files under a root directory. Each file goes to
`train` or `validation` as a whole, by a hash of its path relative to the root
(~5%, see `split_files`), so adding files never moves the others. Within a
split the files are concatenated in sorted order, each followed by
`SEPARATOR`, and the stream S is cut into records

    block: uint8 [BLOCK_LEN + 1],  record j = S[j * BLOCK_LEN : (j + 1) * BLOCK_LEN + 1]

(consecutive records overlap by one byte, so every byte of S is a next-byte
target exactly once; the last record is padded with `SEPARATOR`). The loader
cuts windows of any `seq_len <= BLOCK_LEN` out of these records, so changing
`seq_len` never needs a rebuild. Vocabulary: the 256 byte values, nothing
reserved; byte 0 (NUL, which does not occur in text) doubles as the
end-of-document separator and as padding.

Two builders share this layout:
  * `python_stdlib_bytes`: the `.py` files of this interpreter's standard
    library (site-packages excluded). The stdlib differs between Python
    versions, so the config name carries the version and a digest of the file
    list (e.g. `py311_1a2b3c4d`) and the description the exact version and file
    count: corpora from different interpreters never mix in one directory.
  * `text_files_bytes`: the files matched by a user glob; the config name is a
    digest of the matched paths with their sizes and mtimes, so editing,
    adding or removing a file gives a fresh build instead of stale data.
"""
import dataclasses
import functools
import glob
import hashlib
import os
import pathlib
import platform
import sysconfig
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

BLOCK_LEN = 2048  # next-byte targets per record; the longest usable seq_len
SEPARATOR = 0  # byte that ends each document and pads the last record
VOCAB_SIZE = 256
VALIDATION_PERCENT = 5


@dataclasses.dataclass(eq=False)
class ByteCorpusConfig(tfds.core.BuilderConfig):
  """A corpus: `files` (sorted, relative to `root`)."""
  root: str = ""
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # long: keep out of logs


def _path_hash(relpath: str) -> int:
  return int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")


def split_files(files: Sequence[str]) -> dict[str, list[str]]:
  """Assigns each relative path to "train" or "validation" (both sorted).

  A file is in validation iff its path hash falls in the lowest
  VALIDATION_PERCENT buckets; if that leaves validation empty and there are at
  least two files, the file with the smallest hash goes there, so that small
  user corpora still get an eval split. A single file has no validation split.
  """
  val = {f for f in files if _path_hash(f) % 100 < VALIDATION_PERCENT}
  if not val and len(files) > 1:
    val = {min(files, key=_path_hash)}
  return {"train": sorted(set(files) - val), "validation": sorted(val)}


def _blocks(paths: Iterator[pathlib.Path]) -> Iterator[np.ndarray]:
  """Yields the uint8 [BLOCK_LEN + 1] records of the concatenated files."""
  buf = bytearray()
  for path in paths:
    buf += path.read_bytes()
    buf.append(SEPARATOR)
    full = (len(buf) - 1) // BLOCK_LEN  # records whose BLOCK_LEN + 1 bytes are all present
    for j in range(full):
      yield np.frombuffer(buf, np.uint8, BLOCK_LEN + 1, j * BLOCK_LEN).copy()
    del buf[:full * BLOCK_LEN]  # keep the 1-byte overlap with the next record
  if len(buf) > 1:  # some targets remain
    yield np.frombuffer(buf.ljust(BLOCK_LEN + 1, bytes([SEPARATOR])), np.uint8).copy()


class ByteCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder; subclasses only name the corpus (configs are made at run time)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")  # random access, no TensorFlow
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "block": tfds.features.Tensor(shape=(BLOCK_LEN + 1,), dtype=np.uint8),
        }),
        disable_shuffling=True,  # records must stay in stream order
        # Which file went to which split, so tests and users can check it.
        metadata=tfds.core.MetadataDict(files=split_files(self.builder_config.files)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    root = pathlib.Path(self.builder_config.root)
    return {split: self._generate_examples(root, files)
            for split, files in split_files(self.builder_config.files).items() if files}

  def _generate_examples(self, root: pathlib.Path, files: list[str]):
    for key, block in enumerate(_blocks(root / f for f in files)):
      yield key, {"block": block}


class PythonStdlibBytes(ByteCorpus):
  """Bytes of this interpreter's standard-library `.py` files."""


class TextFilesBytes(ByteCorpus):
  """Bytes of user files selected by a glob."""


def _digest(items) -> str:
  return hashlib.sha256(repr(items).encode()).hexdigest()


@functools.cache  # the stdlib does not change while we run; listing it takes ~0.3 s
def stdlib_config() -> ByteCorpusConfig:
  """Config for this interpreter's stdlib `.py` files (name: py<major><minor>_<digest>)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(
      p.relative_to(root).as_posix() for p in root.rglob("*.py")
      if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))
  sizes = [(f, (root / f).stat().st_size) for f in files]
  major, minor, _ = platform.python_version_tuple()
  return ByteCorpusConfig(
      name=f"py{major}{minor}_{_digest(sizes)[:8]}",
      description=f"Python {platform.python_version()} stdlib: {len(files)} .py files under {root}",
      root=str(root), files=tuple(files))


def files_config(pattern: str) -> ByteCorpusConfig:
  """Config for the files matching `pattern` (recursive `**` allowed).

  Paths are taken relative to the pattern's directory prefix before the first
  wildcard, e.g. `data/**/*.txt` -> root `data`.
  """
  pattern = os.path.abspath(os.path.expanduser(pattern))
  parts = pathlib.Path(pattern).parts
  fixed = next(i for i, part in enumerate(parts + ("*",)) if set(part) & set("*?["))
  root = pathlib.Path(*parts[:max(fixed, 1)])
  if fixed == len(parts):  # no wildcard: a single file
    root = root.parent
  paths = sorted(p for p in map(pathlib.Path, glob.glob(pattern, recursive=True)) if p.is_file())
  if not paths:
    raise FileNotFoundError(f"files: no file matches {pattern!r}")
  stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
  return ByteCorpusConfig(
      name=f"files_{_digest(stats)[:16]}",
      description=f"{len(paths)} files matching {pattern}",
      root=str(root), files=tuple(p.relative_to(root).as_posix() for p in paths))
