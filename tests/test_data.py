"""Tests of moe_jax.data against the real data: Debian's Fashion-MNIST idx files,
this interpreter's stdlib sources, and files written here.

fashion_mnist and python_stdlib_bytes are prepared in the default data dir
($MOE_JAX_DATA_DIR or <repo>/.data/tfds), so only the first run pays for it.
"""
import collections
import gzip
import hashlib
import importlib.util
import pathlib
import sys

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax.data import dataset_info, fashion_mnist, make_loader, sources, text_bytes
from moe_jax.data import loader as loader_lib

FMNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _config(**kwargs) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"name": "fashion_mnist", "data_dir": None, "files": None,
                                    "seq_len": 128, "train_split": None, "eval_split": None,
                                    **kwargs})


def _idx(name: str) -> np.ndarray:
  """Independent idx parser: 16-byte header for images, 8 for labels."""
  data = gzip.decompress((FMNIST_DIR / name).read_bytes())
  if "images" in name:
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
  return np.frombuffer(data, np.uint8, offset=8)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _eval_batches(config, split, batch_size, **kwargs):
  return list(make_loader(config, split, batch_size=batch_size, seed=0, shuffle=False,
                          num_epochs=1, drop_remainder=False, **kwargs))


def _stream(batches) -> bytes:
  """Rebuilds the byte stream from in-order seq_len=2048 windows (one per record)."""
  rows = [row for b in batches for row, m in zip(b["inputs"], b["mask"]) if m]
  last = [b["targets"][b["mask"]][-1, -1] for b in batches if b["mask"].any()][-1]
  return np.concatenate(rows + [[last]]).astype(np.uint8).tobytes()


def _corpus(root: pathlib.Path, files) -> bytes:
  """Expected stream: each file followed by the separator byte."""
  return b"".join((root / f).read_bytes() + bytes([text_bytes.SEPARATOR]) for f in files)


# ---------------------------------------------------------------- fashion_mnist


def test_fashion_mnist_info():
  info = dataset_info(_config())
  assert info["kind"] == "image"
  assert (info["num_train"], info["num_eval"]) == (60000, 10000)
  assert (info["train_split"], info["eval_split"]) == ("train", "test")
  assert info["image_shape"] == (28, 28, 1) and info["num_classes"] == 10
  assert info["class_names"][9] == "Ankle boot"


def test_fashion_mnist_test_split_equals_idx_files():
  batches = _eval_batches(_config(), "test", 2500)
  assert len(batches) == 4 and all(b["mask"].all() for b in batches)
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert images.dtype == np.float32 and images.shape == (10000, 28, 28, 1)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, _idx("t10k-labels-idx1-ubyte.gz"))
  np.testing.assert_array_equal(images[..., 0], _idx("t10k-images-idx3-ubyte.gz") / np.float32(255))
  assert np.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_train_split_counts_and_checksum():
  images, labels = _idx("train-images-idx3-ubyte.gz"), _idx("train-labels-idx1-ubyte.gz")
  assert labels[:3].tolist() == [9, 0, 0]  # first examples: ankle boot, T-shirt, T-shirt
  batches = _eval_batches(_config(), "train", 10000)
  got = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(got, labels)
  assert np.bincount(got).tolist() == [6000] * 10
  pixel_sum = sum(np.rint(b["image"] * 255).astype(np.int64).sum() for b in batches)
  assert pixel_sum == images.astype(np.int64).sum()


def test_fashion_mnist_missing_source_error(tmp_path, monkeypatch):
  missing = tmp_path / "fashion-mnist"
  monkeypatch.setattr(fashion_mnist, "SOURCE_DIR", missing)
  with pytest.raises(FileNotFoundError) as e:
    dataset_info(_config(data_dir=str(tmp_path / "tfds")))
  assert str(e.value) == (f"fashion_mnist: {missing} not found; install it with "
                          "`apt-get install dataset-fashion-mnist`")


def test_no_tensorflow():
  dataset_info(_config())
  dataset_info(_config(name="python_stdlib_bytes"))
  next(make_loader(_config(), "train", batch_size=2, seed=0, shuffle=True))
  assert importlib.util.find_spec("tensorflow") is None
  assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------- byte LM: stdlib


@pytest.fixture(scope="module")
def stdlib():
  """(config, root, {"train": [relpath...], "validation": [...]}) of python_stdlib_bytes."""
  config = _config(name="python_stdlib_bytes", seq_len=2048)
  builder = sources.open_dataset(config).builder
  return config, pathlib.Path(builder.builder_config.root), builder.info.metadata["files"]


def test_stdlib_split_by_file(stdlib):
  _, root, files = stdlib
  train, val = set(files["train"]), set(files["validation"])
  assert not train & val
  on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.py")
             if "site-packages" not in p.parts}
  assert train | val == on_disk and len(on_disk) > 500
  assert 0.02 < len(val) / len(on_disk) < 0.10
  assert sources.open_dataset(stdlib[0]).builder.builder_config.name.startswith(
      f"py{sys.version_info.major}{sys.version_info.minor}_")


def test_stdlib_validation_stream_is_the_source_text(stdlib):
  config, root, files = stdlib
  batches = _eval_batches(config, "validation", 64)
  stream = _stream(batches)
  expected = _corpus(root, files["validation"])
  assert stream[:len(expected)] == expected
  assert set(stream[len(expected):]) <= {text_bytes.SEPARATOR}  # padding of the last record
  assert len(stream) - 1 == text_bytes.BLOCK_LEN * sum(int(b["mask"].sum()) for b in batches)
  # The first window decodes to the first validation file's source text.
  first = (root / files["validation"][0]).read_text(encoding="utf-8")
  assert stream.decode("utf-8", errors="replace").startswith(first[:1000])


def test_stdlib_windows_shift_and_come_from_train_files(stdlib):
  config, root, files = stdlib
  config = ml_collections.ConfigDict({**config.to_dict(), "seq_len": 100})
  info = dataset_info(config)
  assert info["kind"] == "text" and info["vocab_size"] == 256 and info["seq_len"] == 100
  assert (info["train_split"], info["eval_split"]) == ("train", "validation")
  num_blocks = sources.open_dataset(config).split_size("train")
  assert info["num_train"] == num_blocks * (2048 // 100)
  batch = next(make_loader(config, "train", batch_size=16, seed=3, shuffle=True))
  assert batch.keys() == {"inputs", "targets"}
  assert batch["inputs"].shape == batch["targets"].shape == (16, 100)
  assert batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  train_text = _corpus(root, files["train"])
  for row, target in zip(batch["inputs"], batch["targets"]):
    assert np.append(row, target[-1]).astype(np.uint8).tobytes() in train_text


def test_seq_len_checked():
  with pytest.raises(ValueError, match=r"data.seq_len must be an int in \[1, 2048\], got 4096"):
    dataset_info(_config(name="python_stdlib_bytes", seq_len=4096))


# ---------------------------------------------------------------- byte LM: user files


def test_user_files_glob(tmp_path):
  corpus = tmp_path / "corpus"
  texts = {f"d{i % 2}/doc{i}.txt": f"document {i}\n" + "lorem ipsum " * (40 * i) for i in range(8)}
  for rel, text in texts.items():
    (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
    (corpus / rel).write_text(text)
  (corpus / "d0" / "skip.md").write_text("not matched")
  config = _config(name="ignored", files=str(corpus / "**" / "*.txt"), seq_len=2048,
                   data_dir=str(tmp_path / "tfds"))

  files = sources.open_dataset(config).builder.info.metadata["files"]
  assert sorted(files["train"] + files["validation"]) == sorted(texts)
  assert files["validation"] and not set(files["train"]) & set(files["validation"])
  for split, names in files.items():
    expected = _corpus(corpus, names)
    assert _stream(_eval_batches(config, split, 4))[:len(expected)] == expected

  # Editing a file gives a new build, not stale data.
  edited = files["train"][0]
  (corpus / edited).write_text("edited text")
  expected = _corpus(corpus, files["train"])
  assert _stream(_eval_batches(config, "train", 4))[:len(expected)] == expected


def test_a_single_file_is_split_by_bytes(tmp_path):
  text = "".join(f"line {i}: lorem ipsum\n" for i in range(400)).encode()  # 9290 bytes
  (tmp_path / "notes.txt").write_bytes(text)
  config = _config(files=str(tmp_path / "notes.txt"), seq_len=2048,
                   data_dir=str(tmp_path / "tfds"))
  info = sources.dataset_info(config)
  assert (info["train_split"], info["eval_split"]) == ("train", "validation")
  cut = len(text) * 95 // 100
  for split, part in (("train", text[:cut]), ("validation", text[cut:])):
    expected = part + bytes([text_bytes.SEPARATOR])
    assert _stream(_eval_batches(config, split, 4))[:len(expected)] == expected


@pytest.mark.parametrize("content,why", [
    (b"text\0\x01\x02", "it holds byte 0"),
    ("caf\u00e9 au lait".encode("latin-1"), "not UTF-8 at byte 3")])
def test_files_that_are_not_text_are_refused(tmp_path, content, why):
  (tmp_path / "a.txt").write_text("plain text")
  (tmp_path / "b.bin").write_bytes(content)
  config = _config(files=str(tmp_path / "*"), data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ValueError) as error:
    sources.dataset_info(config)
  assert str(error.value) == (
      f"data.files='{tmp_path}/*' matches 1 of 2 files that are not text, e.g. {tmp_path}/b.bin "
      f"({why}); the byte-level LM reads UTF-8 text (byte 0 separates its documents)")


# ---------------------------------------------------------------- errors


def test_unknown_dataset_error():
  with pytest.raises(ValueError) as e:
    dataset_info(_config(name="no_such_dataset"))
  assert str(e.value) == (
      "unknown dataset 'no_such_dataset': not a local dataset (fashion_mnist, "
      "python_stdlib_bytes, multidomain_bytes) nor in the TFDS catalog; for your own text files set "
      "data.files to a glob")


def test_unprepared_tfds_dataset_error(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    dataset_info(_config(name="mnist", data_dir=str(tmp_path)))
  assert str(e.value) == (
      f"mnist: not prepared in {tmp_path}; prepare it on a machine with network access with "
      f"tfds.builder('mnist', data_dir='{tmp_path}', file_format='array_record')"
      ".download_and_prepare()")


# ---------------------------------------------------------------- loader


def _train_loader(**kwargs):
  return make_loader(_config(), "train", shuffle=True, **{"batch_size": 32, "seed": 7, **kwargs})


def test_loader_deterministic_and_shuffled():
  first = _take(_train_loader(), 3)
  _assert_same_batches(first, _take(_train_loader(), 3))
  assert first[0].keys() == {"image", "label"}
  assert first[0]["image"].shape == (32, 28, 28, 1)
  assert 0.0 <= first[0]["image"].min() and first[0]["image"].max() <= 1.0
  other = next(_train_loader(seed=8))
  assert not np.array_equal(other["image"], first[0]["image"])
  in_order = _idx("train-labels-idx1-ubyte.gz")[:32]
  assert not np.array_equal(first[0]["label"], in_order)


# A process of a 3-process job: its own state, restored into its own loader.
_SHARDINGS = [{}, {"shard_index": 1, "shard_count": 3}]


@pytest.mark.parametrize("shard", _SHARDINGS, ids=["single", "shard1of3"])
def test_loader_state_restore(shard):
  it = _train_loader(**shard)
  _take(it, 5)
  state = it.get_state()
  after = _take(it, 3)
  fresh = _train_loader(**shard)
  fresh.set_state(state)
  _assert_same_batches(after, _take(fresh, 3))
  # Steps 5..7 of this process are its rows of the global batches 5..7.
  rows = slice(32 * shard.get("shard_index", 0), 32 * (shard.get("shard_index", 0) + 1))
  full = _take(_train_loader(batch_size=32 * shard.get("shard_count", 1)), 8)[5:]
  _assert_same_batches(after, [{k: v[rows] for k, v in b.items()} for b in full])


@pytest.mark.parametrize("shard", _SHARDINGS, ids=["single", "shard1of3"])
def test_loader_orbax_checkpoint(tmp_path, shard):
  it = _train_loader(**shard)
  _take(it, 5)
  params = {"w": jnp.arange(4.0)}
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                         data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    after = _take(it, 3)
    fresh = _train_loader(**shard)
    restored = mngr.restore(5, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(restored["params"]["w"], params["w"])
  _assert_same_batches(after, _take(fresh, 3))


def test_loader_worker_processes_match_threads():
  it = _train_loader(worker_count=2)
  try:
    got = _take(it, 4)
    state = it.get_state()
    after = _take(it, 2)
  finally:
    it.close()
  _assert_same_batches(got, _take(_train_loader(), 4))
  fresh = _train_loader(worker_count=2)
  try:
    fresh.set_state(state)
    _assert_same_batches(after, _take(fresh, 2))
  finally:
    fresh.close()


def test_eval_padding_and_sharding_cover_each_example_once():
  def key(image):
    return hashlib.sha1(np.rint(image * 255).astype(np.uint8).tobytes()).hexdigest()

  shards = [_eval_batches(_config(), "test", 512, shard_index=i, shard_count=3) for i in range(3)]
  # 10000 examples -> ceil(10000 / 1536) = 7 global batches of 3 * 512 on every shard,
  # the last one with 10000 - 6 * 1536 = 784 real examples: 512 + 272 + 0.
  assert [len(s) for s in shards] == [7, 7, 7]
  assert [[int(b["mask"].sum()) for b in s] for s in shards] == [[512] * 7, [512] * 6 + [272],
                                                                  [512] * 6 + [0]]
  seen = collections.Counter()
  for batches in shards:
    for b in batches:
      assert b["image"].shape == (512, 28, 28, 1) and b["mask"].dtype == np.bool_
      assert not b["image"][~b["mask"]].any()  # padding is zeros
      seen.update(key(image) for image in b["image"][b["mask"]])
  assert sum(seen.values()) == 10000
  expected = collections.Counter(key(image / 255) for image in _idx("t10k-images-idx3-ubyte.gz"))
  assert seen == expected


@pytest.fixture
def read_sizes(monkeypatch):
  """Records the number of example indices of every batch read (any dataset kind).

  Spies on subclasses swapped into the loader module, so loaders of earlier tests, whose
  prefetch threads may still be reading, are not counted.
  """
  sizes = []
  for name in ("_ReadImages", "_ReadWindows"):
    base = getattr(loader_lib, name)

    class Spy(base):
      def __call__(self, indices):
        sizes.append(len(indices))
        return super().__call__(indices)

    monkeypatch.setattr(loader_lib, name, Spy)
  return sizes


@pytest.mark.parametrize("kind", ["image", "text"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shards_concatenate_to_the_single_process_batch(kind, mode, read_sizes):
  if kind == "image":
    config, split = _config(), {"train": "train", "eval": "test"}[mode]
    batch_size, shard_count = {"train": 16, "eval": 512}[mode], 3
  else:  # 2644 validation windows of 512 tokens
    config = _config(name="python_stdlib_bytes", seq_len=512)
    split, batch_size, shard_count = {"train": "train", "eval": "validation"}[mode], 100, 3
  if mode == "train":
    kwargs, steps = {"seed": 11, "shuffle": True}, 4
  else:
    kwargs, steps = {"seed": 0, "shuffle": False, "num_epochs": 1, "drop_remainder": False}, None

  def batches(**shard):
    it = make_loader(config, split, **kwargs, **shard)
    return list(it) if steps is None else _take(it, steps)

  shards = [batches(batch_size=batch_size, shard_index=i, shard_count=shard_count)
            for i in range(shard_count)]
  # Each process reads only its own batch_size records per step (copied before the
  # single-process loader below starts reading global batches).
  sizes = list(read_sizes)
  assert sizes and set(sizes) == {batch_size}
  single = batches(batch_size=batch_size * shard_count)
  assert all(len(s) == len(single) for s in shards)
  if mode == "eval":
    assert len(single) == {"image": 7, "text": 9}[kind]  # ceil(10000 / 1536), ceil(2644 / 300)
    assert int(sum(b["mask"].sum() for b in single)) == {"image": 10000, "text": 2644}[kind]
  expected_keys = ({"image", "label"} if kind == "image" else {"inputs", "targets"}) | (
      {"mask"} if mode == "eval" else set())
  for step, full in enumerate(single):
    assert full.keys() == expected_keys
    parts = [s[step] for s in shards]
    assert all(p.keys() == expected_keys for p in parts)
    for k in full:
      assert all(len(p[k]) == batch_size for p in parts)
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
  if mode == "train":  # real, shuffled data: not the first examples in order
    first = single[0]["label" if kind == "image" else "inputs"]
    assert len(np.unique(first, axis=0)) > 1
