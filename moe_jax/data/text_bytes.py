"""Byte-level language-modelling corpora as local TFDS builders.

A corpus is a sorted list of files under a root directory. Each file goes to
`train` or `validation` as a whole, by a hash of its path relative to the root
(~5%, see `split_files`), so adding files never moves the others; a corpus of
one file is split by bytes instead (its last 5% validate). Within a
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
import codecs
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


def name_hash(name: str) -> int:
  """A stable 64-bit hash of a file's or document's name: which split it goes to."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def split_files(files: Sequence[str]) -> dict[str, list[str]]:
  """Assigns each relative path to "train" or "validation" (both sorted).

  A file is in validation iff its path hash falls in the lowest
  VALIDATION_PERCENT buckets; if that leaves validation empty and there are at
  least two files, the file with the smallest hash goes there, so that small
  user corpora still get an eval split. A single file is in both: its bytes are
  split (`document`).
  """
  if len(files) == 1:
    return {"train": list(files), "validation": list(files)}
  val = {f for f in files if name_hash(f) % 100 < VALIDATION_PERCENT}
  if not val and len(files) > 1:
    val = {min(files, key=name_hash)}
  return {"train": sorted(set(files) - val), "validation": sorted(val)}


def document(path: pathlib.Path, split: str, single: bool) -> bytes:
  """A file's bytes in `split`: all of them, or, in a corpus of one file (`single`), the first
  100 - VALIDATION_PERCENT % for train and the rest for validation."""
  data = path.read_bytes()
  if not single:
    return data
  cut = len(data) * (100 - VALIDATION_PERCENT) // 100
  return data[:cut] if split == "train" else data[cut:]


def blocks(documents: Iterator[bytes]) -> Iterator[np.ndarray]:
  """Yields the uint8 [BLOCK_LEN + 1] records of the concatenated documents."""
  buf = bytearray()
  for data in documents:
    buf += data
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
    single = len(self.builder_config.files) == 1
    return {split: self._generate_examples(root, files, split, single)
            for split, files in split_files(self.builder_config.files).items() if files}

  def _generate_examples(self, root: pathlib.Path, files: list[str], split: str, single: bool):
    documents = (document(root / f, split, single) for f in files)
    for key, block in enumerate(blocks(documents)):
      yield key, {"block": block}


class PythonStdlibBytes(ByteCorpus):
  """Bytes of this interpreter's standard-library `.py` files."""


class TextFilesBytes(ByteCorpus):
  """Bytes of user files selected by a glob."""


def digest(items) -> str:
  """The hex SHA-256 of `items` repr: a corpus config name that changes with its sources."""
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
      name=f"py{major}{minor}_{digest(sizes)[:8]}",
      description=f"Python {platform.python_version()} stdlib: {len(files)} .py files under {root}",
      root=str(root), files=tuple(files))


def _not_text(path: pathlib.Path) -> str:
  """Why the file's first 4 KiB are not UTF-8 text ("" when they are; read on every start)."""
  with open(path, "rb") as f:
    head = f.read(4096)
  if b"\0" in head:
    return "it holds byte 0"
  try:
    codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is fine
  except UnicodeDecodeError as error:
    return f"not UTF-8 at byte {error.start}"
  return ""


def files_config(pattern: str) -> ByteCorpusConfig:
  """Config for the files matching `pattern` (recursive `**` allowed).

  Paths are taken relative to the pattern's directory prefix before the first
  wildcard, e.g. `data/**/*.txt` -> root `data`.
  """
  given, pattern = pattern, os.path.abspath(os.path.expanduser(pattern))
  parts = pathlib.Path(pattern).parts
  fixed = next(i for i, part in enumerate(parts + ("*",)) if set(part) & set("*?["))
  root = pathlib.Path(*parts[:max(fixed, 1)])
  if fixed == len(parts):  # no wildcard: a single file
    root = root.parent
  paths = sorted(p for p in map(pathlib.Path, glob.glob(pattern, recursive=True)) if p.is_file())
  if not paths:
    raise FileNotFoundError(f"files: no file matches {pattern!r}")
  binary = [(p, why) for p in paths if (why := _not_text(p))]
  if binary:
    raise ValueError(f"data.files={given!r} matches {len(binary)} of {len(paths)} files that are "
                     f"not text, e.g. {binary[0][0]} ({binary[0][1]}); the byte-level LM reads "
                     "UTF-8 text (byte 0 separates its documents)")
  stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
  return ByteCorpusConfig(  # one file: "file_", split by bytes (never an old build without)
      name=f"{'file' if len(paths) == 1 else 'files'}_{digest(stats)[:16]}",
      description=f"{len(paths)} files matching {pattern}",
      root=str(root), files=tuple(p.relative_to(root).as_posix() for p in paths))
