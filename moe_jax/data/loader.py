"""Grain input pipelines over the TFDS random-access sources.

The grain pipeline works on example indices only, and each batch of indices is
read in one `__getitems__` call at the end (5x faster than record-by-record
reads, which grain's `batch` would do):

    range(num_examples) -> [shuffle] -> repeat -> [eval: pad with -1]
        -> batch(batch_size * shard_count) -> this shard's rows -> read records -> batch dict

Sharding (multi-host): all processes walk the same global order (the one a
single process would see) in global batches of batch_size * shard_count
indices; process shard_index takes rows [shard_index * batch_size,
(shard_index + 1) * batch_size) of each and reads only those records. So, step
by step, concatenating the batches of processes 0..shard_count-1 gives exactly
the batch of make_loader(..., batch_size=batch_size * shard_count,
shard_count=1) with the same seed, and the global batch does not depend on
how many processes share it.

A text example is a `seq_len` window of a stored record: index i is window
i % (BLOCK_LEN // seq_len) of record i // (BLOCK_LEN // seq_len).

A corpus with domain labels (multidomain_bytes) is read balanced: each domain's windows in an
order of their own (shuffled by the seed and the domain), interleaved one domain after the other
(grain's mix), so every batch of D * n examples holds n of each of the D domains. Evaluation
(shuffle=False) reads the same way in a fixed order, as many windows of each domain as the
smallest domain has, so any prefix of it (train.eval_max_batches) is balanced and spread over
the documents. `data.domain_mix='natural'` trains on one shuffle of all windows instead, each
domain in proportion to its size.

Batches (dicts of numpy arrays):
  image: {"image": float32 [B, H, W, C] in [0, 1], "label": int32 [B]}
  text:  {"inputs": int32 [B, L], "targets": int32 [B, L]}, targets[:, i] == inputs[:, i + 1],
         and "domain": int32 [B] for a corpus with domain labels
With drop_remainder=False a "mask": bool [B] key is added (True = real
example) and the global index stream is padded with -1 (all-zero examples,
mask False) to whole global batches before it is sliced, so every batch has
the same shape, every process gets the same number of batches (lockstep
during evaluation) and, with num_epochs=1, every example appears exactly once
with mask True across all processes. With drop_remainder=True the last partial
global batch is dropped on every process.

Checkpointing: the iterator is a `grain.DatasetIterator`; `get_state()` /
`set_state()` give a small JSON-able dict. With orbax, next to the train state:

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(loader)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(loader)))  # sets loader's state in place

(the grain handler writes one `process_<i>-of-<n>.json` per JAX process).
Each process saves and restores its own iterator; restore into a loader made
with the same arguments (same shard_index and shard_count).
"""
import dataclasses
import math
from collections.abc import Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from moe_jax.data import sources, text_bytes

# Per-process read threads and read-ahead (in batches): enough to hide
# array_record reads, small enough that 2048-token batches stay cheap in memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


@dataclasses.dataclass(frozen=True)
class _Rows:
  """Global batch of indices [G] -> this shard's rows [start, stop)."""
  start: int
  stop: int

  def __call__(self, indices: np.ndarray) -> np.ndarray:
    return indices[self.start:self.stop]


@dataclasses.dataclass(frozen=True)
class _ReadImages:
  """Example indices int [B] (-1: padding) -> image batch."""
  source: Sequence[dict[str, np.ndarray]]
  with_mask: bool

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    mask = indices >= 0
    records = self.source.__getitems__(np.where(mask, indices, 0).tolist())
    image = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
    label = np.array([r["label"] for r in records], np.int32)
    image[~mask], label[~mask] = 0.0, 0
    return {"image": image, "label": label} | ({"mask": mask} if self.with_mask else {})


@dataclasses.dataclass(frozen=True)
class _ReadWindows:
  """Example indices int [B] (-1: padding) -> text batch of seq_len windows."""
  source: Sequence[dict[str, np.ndarray]]
  seq_len: int
  with_mask: bool
  domains: bool = False  # records carry a domain label

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    mask = indices >= 0
    block, window = np.divmod(np.where(mask, indices, 0), text_bytes.BLOCK_LEN // self.seq_len)
    records = self.source.__getitems__(block.tolist())
    blocks = np.stack([r["block"] for r in records])
    offsets = window[:, None] * self.seq_len + np.arange(self.seq_len + 1)
    tokens = np.take_along_axis(blocks, offsets, axis=1).astype(np.int32)  # [B, L + 1]
    tokens[~mask] = 0
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if self.domains:
      out["domain"] = np.where(mask, [r["domain"] for r in records], 0).astype(np.int32)
    return out | ({"mask": mask} if self.with_mask else {})


def balanced_windows(dataset: sources.Dataset, split: str, seq_len: int, seed: int,
                     num_epochs: int | None) -> grain.MapDataset:
  """Window indices of `split`, one domain after the other (module docstring); each domain's
  own order shuffled by (seed, domain) and repeated num_epochs times (None: forever)."""
  parts = dataset.domain_windows(split, seq_len)
  return grain.MapDataset.mix([
      grain.MapDataset.range(part.start, part.stop).shuffle(seed=seed * len(parts) + d)
      .repeat(num_epochs) for d, part in enumerate(parts)])


def make_loader(
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
    worker_count: int = 0,
) -> grain.DatasetIterator:
  """Returns an iterator of batches of `split` (see the module docstring for their layout).

  Args:
    data_config: the `data` config (fields in `moe_jax.data`'s docstring).
    split: TFDS split, e.g. info["train_split"], "test" or "train[:90%]".
    batch_size: per-process (local) batch size B; a global batch has
      B * shard_count examples.
    seed: shuffle seed; the same seed and arguments give the same batches.
    shuffle: shuffle globally, differently in every epoch.
    num_epochs: passes over the data; None repeats forever.
    shard_index, shard_count: this process takes rows [shard_index * B,
      (shard_index + 1) * B) of every global batch (disjoint across processes);
      e.g. jax.process_index(), jax.process_count().
    drop_remainder: drop the last partial batch; if False pad it and add "mask".
    worker_count: grain worker processes (0: threads in this process only).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  dataset = sources.open_dataset(data_config)
  source = dataset.builder.as_data_source(split)
  if dataset.kind == "text":
    seq_len = sources.check_seq_len(data_config)
    num_examples = len(source) * (text_bytes.BLOCK_LEN // seq_len)
    read = _ReadWindows(source, seq_len, with_mask=not drop_remainder,
                        domains=bool(dataset.domains))
  else:
    num_examples = len(source)
    read = _ReadImages(source, with_mask=not drop_remainder)
  global_batch_size = batch_size * shard_count
  if dataset.domains and not (shuffle and data_config.get("domain_mix") == "natural"):
    ds = balanced_windows(dataset, split, seq_len, seed, num_epochs)
  else:
    ds = grain.MapDataset.range(num_examples)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
  if not drop_remainder and num_epochs is not None:
    # Pad the global stream to whole global batches (same count on every shard).
    length = math.ceil(len(ds) / global_batch_size) * global_batch_size
    if length > len(ds):
      ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([-1] * (length - len(ds)))])
  ds = ds.batch(global_batch_size, drop_remainder=drop_remainder)
  if shard_count > 1:
    ds = ds.map(_Rows(shard_index * batch_size, (shard_index + 1) * batch_size))
  ds = ds.map(read)
  iter_ds = ds.to_iter_dataset(_READ_OPTIONS)
  if worker_count:
    # grain 0.2.18 reads absl flags when starting workers, which raises when
    # they were never parsed (no absl.app); take the defaults then.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_ds)
