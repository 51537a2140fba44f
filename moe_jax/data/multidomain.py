"""`multidomain_bytes`: a byte-level LM corpus of 8 domains, every example labelled with its domain.

Domains (`DOMAINS`), each from a Debian package that `make setup` installs, or this interpreter:

  english  fortunes   quotations and jokes          Debian `fortunes`
  german   fortunes   (Latin script)                `fortunes-de`
  spanish  fortunes   (Latin script)                `fortunes-es`
  russian  fortunes   (Cyrillic script)             `fortunes-ru`
  chinese  fortunes   Tang and Song poems, sayings  `fortunes-zh` (Han script; colour codes removed)
  python   source     the standard library's .py files
  c        source     C headers of `libc6-dev` and `linux-libc-dev`
  html     markup     the Python documentation's HTML pages, `python3-doc`

A document is one fortune (fortune files hold many, split at lines '%') or one file. Each
document goes to train or validation whole, by a hash of its name (validation holds
`text_bytes.VALIDATION_PERCENT` % of each domain's bytes, at least one document), so no document
is in both splits. Each domain keeps its documents in hash order up to `max_domain_bytes` (the
corpus stays small: a build takes seconds; natural proportions still differ, Spanish being the
smallest).

Records: as in text_bytes, {"block": uint8 [BLOCK_LEN + 1], "domain": int}, but each domain's
documents are cut into records of their own, so no record (and no window the loader cuts out of
one) mixes two domains; a window may span two documents of one domain, separated by byte 0,
as packed LM training does. A split's records are stored domain by domain;
`info.metadata["records"][split]` holds each domain's record count, the loader's offsets.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from moe_jax.data import text_bytes
from moe_jax.validation import check_choice

FORTUNES = pathlib.Path("/usr/share/games")
# fortunes-zh's terminal colour codes, some cut short ("\x1b[;" before the next one)
_COLOUR = re.compile(rb"\x1b\[[0-9;]*m?")


def _package_files(packages: Sequence[str], keep: Callable[[pathlib.Path], bool]) -> list[str]:
  """The regular files of Debian `packages` (dpkg's lists) that `keep`, by real path."""
  listed = subprocess.run(["dpkg-query", "-L", *packages], capture_output=True, text=True)
  if listed.returncode:
    missing = " ".join(packages)
    raise FileNotFoundError(f"data.domains needs Debian's {missing} (make setup installs it): "
                            f"{listed.stderr.strip().splitlines()[0]}")
  paths = {p.resolve() for p in map(pathlib.Path, listed.stdout.split())
           if keep(p) and p.is_file()}
  return sorted(map(str, paths))


def _fortune_file(path: pathlib.Path) -> bool:
  return FORTUNES in path.parents and path.suffix not in (".dat", ".u8")


@dataclasses.dataclass(frozen=True)
class Domain:
  """A domain: `files()` lists its source files; `fortunes`: a file holds many documents."""
  kind: str  # natural language | programming language | markup: for the docs
  files: Callable[[], list[str]]
  fortunes: bool = False


def _fortunes(package: str) -> Domain:
  return Domain("natural language",
                lambda: _package_files([package], _fortune_file), fortunes=True)


def _stdlib_files() -> list[str]:
  config = text_bytes.stdlib_config()
  return [str(pathlib.Path(config.root) / f) for f in config.files]


def _html_files() -> list[str]:
  root = pathlib.Path("/usr/share/doc/python3-doc/html")
  if not root.is_dir():
    raise FileNotFoundError(f"data.domains needs Debian's python3-doc (make setup installs it): "
                            f"no {root}")
  return sorted(str(p.resolve()) for p in root.rglob("*.html") if p.is_file())


DOMAINS = {
    "english": _fortunes("fortunes"),
    "german": _fortunes("fortunes-de"),
    "spanish": _fortunes("fortunes-es"),
    "russian": _fortunes("fortunes-ru"),
    "chinese": _fortunes("fortunes-zh"),
    "python": Domain("programming language", _stdlib_files),
    "c": Domain("programming language", lambda: _package_files(
        ["libc6-dev", "linux-libc-dev"], lambda p: p.suffix == ".h")),
    "html": Domain("markup", _html_files),
}
MAX_DOMAIN_BYTES = 3_000_000  # the default data.max_domain_bytes


@dataclasses.dataclass(eq=False)
class MultidomainConfig(tfds.core.BuilderConfig):
  """The corpus: `domains` (names of DOMAINS, in label order) and each one's `files`."""
  domains: tuple[str, ...] = ()
  files: tuple[tuple[str, ...], ...] = dataclasses.field(default=(), repr=False)
  max_domain_bytes: int = MAX_DOMAIN_BYTES


def _text(data: bytes) -> bytes:
  """UTF-8 bytes of a file's text (Latin-1 where it is not UTF-8), without byte 0 (the
  separator) and carriage returns."""
  try:
    data.decode("utf-8")
  except UnicodeDecodeError:
    data = data.decode("latin-1").encode("utf-8")
  return _COLOUR.sub(b"", data).replace(b"\0", b"").replace(b"\r\n", b"\n")


def documents(domain: str, files: Sequence[str]) -> list[tuple[str, bytes]]:
  """(name, text) of every non-empty document of a domain's files: a file, or in a fortune
  file each fortune ('<path>#<i>')."""
  docs = []
  for path in files:
    data = _text(pathlib.Path(path).read_bytes())
    if DOMAINS[domain].fortunes:
      parts = re.split(rb"(?m)^%\n", data)
      docs += [(f"{path}#{i}", part.strip(b"\n") + b"\n") for i, part in enumerate(parts)
               if part.strip()]
    elif data.strip():
      docs.append((path, data))
  return docs


def split_documents(docs: Sequence[tuple[str, bytes]],
                    max_bytes: int) -> dict[str, list[tuple[str, bytes]]]:
  """The documents kept (in hash order, until max_bytes) in "train" and "validation":
  validation takes kept documents in the order of a second hash until it holds
  VALIDATION_PERCENT % of the kept bytes (at least one document), train the others."""
  kept, size = [], 0
  for name, text in sorted(docs, key=lambda doc: text_bytes.name_hash(doc[0])):
    if size >= max_bytes:
      break
    kept.append((name, text))
    size += len(text)
  names, held = set(), 0
  for name, text in sorted(kept, key=lambda doc: text_bytes.name_hash("validation:" + doc[0])):
    if held * 100 >= size * text_bytes.VALIDATION_PERCENT:
      break
    names.add(name)
    held += len(text)
  return {split: [doc for doc in kept if (doc[0] in names) == (split == "validation")]
          for split in ("train", "validation")}


class MultidomainBytes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Bytes of 8 domains with their labels (module docstring)."""

  # The config name digests the sources, not this code: a change to how documents are cut or
  # cleaned needs a new version (a build of its own directory).
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "block": tfds.features.Tensor(shape=(text_bytes.BLOCK_LEN + 1,), dtype=np.uint8),
            "domain": tfds.features.ClassLabel(names=self.builder_config.domains),
        }),
        disable_shuffling=True,  # records stay domain by domain, in stream order
        metadata=tfds.core.MetadataDict(),
    )

  @functools.cached_property
  def _splits(self) -> list[dict[str, list[tuple[str, bytes]]]]:
    """Per domain (label order), its documents in each split."""
    config = self.builder_config
    return [split_documents(documents(domain, files), config.max_domain_bytes)
            for domain, files in zip(config.domains, config.files)]

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    metadata = self.info.metadata
    metadata["domains"] = list(self.builder_config.domains)
    for key in ("records", "documents", "bytes", "names"):
      metadata[key] = {}
    for split in ("train", "validation"):
      per_domain = [splits[split] for splits in self._splits]
      metadata["records"][split] = [_record_count(docs) for docs in per_domain]
      metadata["documents"][split] = [len(docs) for docs in per_domain]
      metadata["bytes"][split] = [sum(len(text) + 1 for _, text in docs) for docs in per_domain]
      metadata["names"][split] = [[name for name, _ in docs] for docs in per_domain]
    return {split: self._generate_examples(split) for split in ("train", "validation")}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    key = 0
    for label, splits in enumerate(self._splits):
      for block in text_bytes.blocks(text for _, text in splits[split]):
        yield key, {"block": block, "domain": label}
        key += 1


def _record_count(docs: Sequence[tuple[str, bytes]]) -> int:
  """Records text_bytes.blocks makes of these documents."""
  targets = sum(len(text) + 1 for _, text in docs)  # each document and its separator
  return -(-targets // text_bytes.BLOCK_LEN)


def check_domains(domains: Sequence[str]) -> tuple[str, ...]:
  """`data.domains` (empty: all of DOMAINS), checked: one line naming an unknown domain."""
  for name in domains:
    check_choice("data", "domains", name, tuple(DOMAINS))
  if len(set(domains)) != len(domains):
    raise ValueError(f"data.domains={tuple(domains)!r} names a domain twice")
  return tuple(domains) or tuple(DOMAINS)


@functools.cache
def _files(domain: str) -> tuple[str, ...]:
  return tuple(DOMAINS[domain].files())


def corpus_config(domains: Sequence[str] = (), max_domain_bytes: int = MAX_DOMAIN_BYTES
                  ) -> MultidomainConfig:
  """The corpus of `domains` (all by default); its name digests the domains, the byte cap and
  every source file's path and size, so a changed package gives a fresh build."""
  domains = check_domains(domains)
  if not (isinstance(max_domain_bytes, int) and max_domain_bytes >= text_bytes.BLOCK_LEN):
    raise ValueError(f"data.max_domain_bytes must be an int >= {text_bytes.BLOCK_LEN}, got "
                     f"{max_domain_bytes!r}")
  files = tuple(_files(domain) for domain in domains)
  sizes = [(domain, [(f, pathlib.Path(f).stat().st_size) for f in fs])
           for domain, fs in zip(domains, files)]
  digest = text_bytes.digest((sizes, max_domain_bytes))[:12]
  return MultidomainConfig(
      name=f"d{len(domains)}_{digest}",
      description=f"{len(domains)} domains ({', '.join(domains)}), at most "
                  f"{max_domain_bytes} bytes each",
      domains=domains, files=files, max_domain_bytes=max_domain_bytes)


def corpus_sizes(builder: tfds.core.DatasetBuilder) -> dict:
  """A prepared corpus's name, description, domains, and documents and bytes per split and domain
  (what size_table shows; python -m moe_jax.data --json writes it)."""
  meta = builder.info.metadata
  return dict(corpus=builder.builder_config.name, description=builder.builder_config.description,
              domains=list(meta["domains"]),
              **{key: {split: list(meta[key][split]) for split in ("train", "validation")}
                 for key in ("documents", "bytes")})


def size_table(meta: dict) -> str:
  """A corpus's domains as a Markdown table: kind, documents and bytes per split, and each
  domain's share of the training bytes (its natural proportion). meta: corpus_sizes(builder), or
  the builder's info.metadata."""
  train_bytes = sum(meta["bytes"]["train"])
  lines = ["| domain | kind | documents train / validation | bytes train / validation | "
           "natural share |", "|---|---|---|---|---|"]
  for d, domain in enumerate(meta["domains"]):
    docs, sizes = (tuple(meta[key][split][d] for split in ("train", "validation"))
                   for key in ("documents", "bytes"))
    lines.append(f"| {domain} | {DOMAINS[domain].kind} | {docs[0]:,} / {docs[1]:,} | "
                 f"{sizes[0]:,} / {sizes[1]:,} | {sizes[0] / train_bytes:.1%} |")
  return "\n".join(lines)

