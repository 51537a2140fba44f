"""multidomain_bytes, the domain router (DEMix) and per-domain evaluation, against the source files,
numpy references and hand-made cases."""
import collections
import json
import math
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from configs import common
from experiments import specialization
from moe_jax import config as config_lib
from moe_jax import analysis, compare, train
from moe_jax.data import dataset_info, make_loader, multidomain, sources, text_bytes
from moe_jax.layers import MoeLayer
from tests.conftest import shared_dir
from tests.test_notebooks import execute, images
from tests.test_sweep import write_sweep

MUTABLE = ["losses", "routing_stats"]
SMALL = 40_000  # bytes per domain: a corpus built in about a second


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small multidomain_bytes (SMALL bytes a domain) in a data dir the test workers share:
  (data config, builder)."""
  with shared_dir(tmp_path_factory, "multidomain") as root:
    config = common.lm_domains("topk").data
    config.data_dir, config.max_domain_bytes, config.seq_len = str(root), SMALL, 64
    return config, sources.open_dataset(config).builder


# ---------------------------------------------------------------------------------- the data


def test_documents_split_whole_and_records_carry_their_sources_domain(corpus):
  config, builder = corpus
  meta = builder.info.metadata
  assert meta["domains"] == list(multidomain.DOMAINS)
  for d, domain in enumerate(meta["domains"]):
    train_names, val_names = (set(meta["names"][s][d]) for s in ("train", "validation"))
    assert train_names and val_names and not train_names & val_names
    # The stored bytes of each domain are its documents, in order, each ended by byte 0.
    texts = dict(multidomain.documents(domain, multidomain._files(domain)))
    sizes = {}
    for split in ("train", "validation"):
      stream = b"".join(texts[name] + b"\0" for name in meta["names"][split][d])
      assert meta["bytes"][split][d] == len(stream)
      first = sum(meta["records"][split][:d])
      records = builder.as_data_source(split).__getitems__(
          list(range(first, first + meta["records"][split][d])))
      assert {int(r["domain"]) for r in records} == {d}
      stored = b"".join(bytes(r["block"][:-1]) for r in records)
      assert stored[:len(stream)] == stream and not stored[len(stream):].strip(b"\0")
      sizes[split] = [len(texts[name]) for name in meta["names"][split][d]]
    # Validation takes documents until it holds VALIDATION_PERCENT % of the domain's bytes.
    total = sum(sizes["train"]) + sum(sizes["validation"])
    held = sum(sizes["validation"])
    assert held * 100 >= total * 5 > (held - max(sizes["validation"])) * 100


def test_sources_are_the_packages_files_and_text():
  assert all(p.startswith("/usr/share/games/fortunes") and not p.endswith((".dat", ".u8"))
             for p in multidomain._files("german"))
  assert all(p.endswith(".h") for p in multidomain._files("c"))
  assert all(p.endswith(".html") for p in multidomain._files("html"))
  docs = dict(multidomain.documents("chinese", multidomain._files("chinese")))
  text = b"".join(docs.values()).decode("utf-8")
  assert "\x1b" not in text and "杜甫" in text  # colour codes gone, Han script kept
  russian = b"".join(dict(multidomain.documents("russian", multidomain._files("russian")))
                     .values()).decode("utf-8")
  assert sum("\u0400" <= ch <= "\u04ff" for ch in russian) > len(russian) / 3  # Cyrillic


def test_a_fortune_is_one_document_and_latin1_becomes_utf8(tmp_path, monkeypatch):
  path = tmp_path / "quotes"
  path.write_bytes("Größe\n%\nzwei\r\nZeilen\n%\n\n%\ndrei".encode("latin-1"))
  docs = multidomain.documents("german", [str(path)])
  assert docs == [(f"{path}#0", "Größe\n".encode()), (f"{path}#1", b"zwei\nZeilen\n"),
                  (f"{path}#3", b"drei\n")]
  split = multidomain.split_documents(docs * 1, max_bytes=10 ** 6)
  assert sorted(split["train"] + split["validation"]) == sorted(docs)
  assert len(split["validation"]) == 1  # 5% of the bytes: one document at least


def test_the_corpus_name_follows_domains_cap_and_files():
  a, b = multidomain.corpus_config(), multidomain.corpus_config(("german", "c"))
  assert a.name.startswith("d8_") and b.name.startswith("d2_") and a.name != b.name
  assert multidomain.corpus_config().name == a.name  # deterministic
  assert multidomain.corpus_config(max_domain_bytes=SMALL).name != a.name
  assert b.domains == ("german", "c")


def test_batches_are_balanced_by_default_and_natural_by_option(corpus):
  config, builder = corpus
  batches = make_loader(config, "train", batch_size=16, seed=3, shuffle=True)
  for _ in range(5):
    batch = next(batches)
    assert batch["domain"].tolist() == list(range(8)) * 2
  # Each window's bytes are from its labelled domain's records.
  per_block = text_bytes.BLOCK_LEN // config.seq_len
  ends = np.cumsum(builder.info.metadata["records"]["train"]) * per_block
  natural = config.copy_and_resolve_references()
  natural.domain_mix = "natural"
  counts = np.zeros(8)
  loader = make_loader(natural, "train", batch_size=64, seed=3, shuffle=True)
  for _ in range(40):
    counts += np.bincount(next(loader)["domain"], minlength=8)
  expected = np.diff(np.concatenate([[0], ends])) / ends[-1]
  np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.03)
  # The same seed gives the same batches; another seed others.
  again = make_loader(config, "train", batch_size=16, seed=3, shuffle=True)
  other = make_loader(config, "train", batch_size=16, seed=4, shuffle=True)
  first, second, third = next(again), next(again), next(other)
  assert not np.array_equal(first["inputs"], third["inputs"])
  reread = make_loader(config, "train", batch_size=16, seed=3, shuffle=True)
  np.testing.assert_array_equal(next(reread)["inputs"], first["inputs"])
  np.testing.assert_array_equal(next(reread)["inputs"], second["inputs"])


def test_evaluation_reads_every_domain_equally_once(corpus):
  config, builder = corpus
  info = dataset_info(config)
  # A domain's windows run to its last byte: the windows of padding after it are left out.
  per_domain = min(-(-(size - 1) // config.seq_len)
                   for size in builder.info.metadata["bytes"]["validation"])
  assert info["num_eval"] == 8 * per_domain
  batches = list(make_loader(config, "validation", batch_size=24, seed=0, shuffle=False,
                             num_epochs=1, drop_remainder=False))
  domains = np.concatenate([b["domain"][b["mask"]] for b in batches])
  assert np.bincount(domains).tolist() == [per_domain] * 8
  windows = {bytes(w.astype(np.uint8)) for b in batches for w in b["inputs"][b["mask"]]}
  assert len(windows) == len(domains)  # every window once, none of padding alone


def test_bad_domain_options_give_one_line():
  with pytest.raises(ValueError) as e:
    multidomain.corpus_config(("german", "klingon"))
  assert str(e.value) == ("data.domains='klingon' is unknown; allowed: 'english', 'german', "
                          "'spanish', 'russian', 'chinese', 'python', 'c', 'html'")
  with pytest.raises(ValueError) as e:
    multidomain.corpus_config(("c", "c"))
  assert str(e.value) == "data.domains=('c', 'c') names a domain twice"
  with pytest.raises(ValueError) as e:
    multidomain.corpus_config(max_domain_bytes=100)
  assert str(e.value) == "data.max_domain_bytes must be an int >= 2048, got 100"


# ------------------------------------------------------------------------------ the router


def numpy_domain_layer(x, domains, params, k, num_domains):
  """The DEMix layer in float64: softmax over the token's domain's experts, top-k, gates
  renormalized, gelu experts; -> (y [T,M], chosen [T,E] bool)."""
  x = np.asarray(x, np.float64)
  logits = x @ np.asarray(params["router"]["logits"]["kernel"], np.float64)  # [T,E]
  num_experts = logits.shape[1]
  owner = np.arange(num_experts) // (num_experts // num_domains)
  logits = np.where(owner[None] == np.asarray(domains)[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["experts"])
  y, chosen = np.zeros_like(x), np.zeros(probs.shape, bool)
  for t in range(len(x)):
    top = np.argsort(-probs[t], kind="stable")[:k]
    chosen[t, top] = True
    for e in top:
      hidden = np.asarray(jax.nn.gelu(x[t] @ p["wi"][e]))
      y[t] += probs[t, e] / probs[t, top].sum() * (hidden @ p["wo"][e])
  return y, chosen


@pytest.mark.parametrize("k", [1, 2])
def test_domain_router_equals_numpy_on_every_path(k):
  x = jax.random.normal(jax.random.key(5), (32, 6))
  domains = jax.random.randint(jax.random.key(6), (32,), 0, 4)
  layer = MoeLayer(num_experts=8, expert_hidden_dim=8, router="domain", k=k, num_domains=4,
                   group_size=16, capacity_factor=8.0, eval_capacity_factor=8.0)
  params = nn.meta.unbox(jax.jit(lambda x, d: layer.init(jax.random.key(0), x,
                                                         domain_ids=d))(x, domains))["params"]
  expected, chosen = numpy_domain_layer(x, domains, params, k, 4)
  owner = np.arange(8) // 2
  assert all(set(np.flatnonzero(c)) <= set(np.flatnonzero(owner == d))
             for c, d in zip(chosen, np.asarray(domains)))
  for path in ("index", "einsum", "dropless"):
    y, state = jax.jit(lambda p, x, d, path=path: layer.clone(dispatch_path=path).apply(
        {"params": p}, x, domain_ids=d, deterministic=True, mutable=MUTABLE))(params, x, domains)
    np.testing.assert_allclose(y, expected, atol=1e-5, err_msg=path)
    assert float(state["routing_stats"]["stats"][0]["dropped_fraction"]) == 0
  # The router learns: its kernel gets gradient from the task through the gates (k < 2) or
  # through the choice among the domain's experts.
  grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x, domain_ids=domains,
                                                 deterministic=True, mutable=MUTABLE)[0]))(params)
  assert float(jnp.abs(grads["router"]["logits"]["kernel"]).max()) > 0


def test_the_domain_configs_groups_hold_every_domain_so_no_choice_is_dropped():
  """configs/lm_domains.py:domain routes groups of 8 sequences, one of each domain (balanced
  batches: domain d at rows d, d + 8, ...): each domain's 128 tokens choose its 2 experts, whose
  capacity is 1.25 x 1024 x 2 / 16 = 160 slots. In groups of one sequence the capacity is 20
  slots: 40 of its 256 choices kept, 1 - 40 / 256 dropped."""
  config = common.lm_domains("domain")
  moe = config.model.moe
  assert moe.group_size == 8 * 128
  x = jax.random.normal(jax.random.key(0), (16, 128, 32))
  domains = jnp.broadcast_to(jnp.arange(16)[:, None] % 8, (16, 128))
  for group_size, dropped in ((moe.group_size, 0.0), (128, 1 - 40 / 256)):
    layer = MoeLayer(num_experts=moe.num_experts, expert_hidden_dim=8, router="domain", k=2,
                     num_domains=8, group_size=group_size,
                     capacity_factor=moe.capacity_factor)
    params = layer.init(jax.random.key(1), x, domain_ids=domains)
    _, state = layer.apply(params, x, domain_ids=domains, deterministic=False,
                           rngs={"routing": jax.random.key(2)}, mutable=MUTABLE)
    assert float(state["routing_stats"]["stats"][0]["dropped_fraction"]) == pytest.approx(
        dropped)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=6, num_domains=4, k=1),
     "MoeLayer.num_experts=6 must be a multiple of the 4 domains for router='domain' (each "
     "domain owns num_experts / domains experts)"),
    (dict(num_experts=8, num_domains=4, k=3),
     "MoeLayer.k=3 exceeds the 2 experts each domain owns (num_experts=8 / 4 domains) for "
     "router='domain'"),
])
def test_domain_router_settings_are_checked(kwargs, message):
  with pytest.raises(ValueError) as e:
    MoeLayer(expert_hidden_dim=8, router="domain", **kwargs)
  assert str(e.value) == message


def test_domain_router_without_domain_ids_is_refused():
  layer = MoeLayer(num_experts=8, expert_hidden_dim=8, router="domain", num_domains=4)
  with pytest.raises(ValueError) as e:
    layer.init(jax.random.key(0), jnp.ones((16, 6)))
  assert str(e.value) == ("MoeLayer.router='domain' routes by domain: call it with domain_ids "
                          "and set num_domains (the number of domains)")


def _check(config, tmp_path):
  with pytest.raises(config_lib.ConfigError) as e:
    train.check_config(config, str(tmp_path / "run"))
  return str(e.value)


def test_run_configs_with_bad_domain_settings_fail_in_one_line_before_compiling(corpus, tmp_path):
  data = corpus[0]
  config = common.lm_domains("domain")
  config.data = data.copy_and_resolve_references()
  config.data.domains = ("german", "klingon")
  assert _check(config, tmp_path) == ("config.data.domains='klingon' is unknown; allowed: "
                                      "'english', 'german', 'spanish', 'russian', 'chinese', "
                                      "'python', 'c', 'html'")
  config.data.domains = ()
  config.model.moe.num_experts = 12
  assert _check(config, tmp_path) == (
      "config.model.moe.num_experts=12 must be a multiple of the 8 domains for router='domain' "
      "(each domain owns num_experts / domains experts)")
  stdlib = common.lm("domain")
  assert _check(stdlib, tmp_path) == (
      "config.model.moe.router='domain' routes each sequence to its domain's experts, but data "
      "'python_stdlib_bytes' has no domain labels; use the LM with "
      "data.name='multidomain_bytes'")
  config = common.lm_domains("topk")
  config.data = data.copy_and_resolve_references()
  config.data.domain_mix = "mixed"
  assert _check(config, tmp_path) == ("config.data.domain_mix='mixed' is unknown; allowed: "
                                      "'balanced', 'natural'")
  config.data.domain_mix = "balanced"
  config.data.eval_split = "validation[:50%]"
  assert _check(config, tmp_path) == ("config.data.eval_split='validation[:50%]': "
                                      "multidomain_bytes is read by domain from a whole split; "
                                      "allowed: 'train', 'validation'")


# --------------------------------------------------------------------- per-domain evaluation


def test_per_domain_bits_per_byte_equal_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5, 256)).astype(np.float32)
  batch = {"targets": rng.integers(0, 256, (6, 5)), "domain": np.array([0, 2, 2, 1, 0, 2]),
           "mask": np.array([True, True, True, True, True, False])}
  sums = jax.device_get(train.domain_sums(jnp.asarray(logits), batch, 3))
  sums |= jax.device_get(train.task_loss(jnp.asarray(logits), batch, "text")[1])
  record = train.eval_record(sums, "text", ("a", "b", "c"))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]  # [B,L]
  per = {name: nll[(batch["domain"] == d) & batch["mask"]].mean() / math.log(2)
         for d, name in enumerate("abc")}
  for name, bpb in per.items():
    assert record[f"eval/bits_per_byte/{name}"] == pytest.approx(bpb, rel=1e-5)
  assert record["eval/bits_per_byte_macro"] == pytest.approx(np.mean(list(per.values())),
                                                             rel=1e-5)
  assert record["eval/bits_per_byte"] == pytest.approx(nll[batch["mask"]].mean() / math.log(2),
                                                       rel=1e-5)


def test_a_domain_run_trains_and_reports_every_domain(corpus, tmp_path):
  data = corpus[0]
  overrides = [f"--config.data.data_dir={data.data_dir}",
               f"--config.data.max_domain_bytes={SMALL}", "--config.data.seq_len=64",
               "--config.model.num_layers=2", "--config.model.width=32",
               "--config.model.mlp_dim=64", "--config.model.moe.expert_hidden_dim=32",
               "--config.model.moe.group_size=64", "--config.train.batch_size=16",
               "--config.train.num_steps=4", "--config.train.eval_every=4",
               "--config.train.eval_max_batches=2", "--config.train.log_every=2",
               "--config.train.checkpoint_every=2"]
  # A sweep of one member, so that its report is checked too.
  fixed = dict(override[len("--config."):].split("=", 1) for override in overrides)
  sweep_file = write_sweep(tmp_path, {"base": "configs/lm_domains.py", "fixed": fixed,
                                      "members": [{"config_arg": "domain"}]})
  subprocess.run([sys.executable, "-m", "experiments.sweep", f"--sweep={sweep_file}",
                  f"--workdir={tmp_path / 'sweep'}"],
                 check=True, capture_output=True, cwd=pathlib.Path(__file__).parents[1])
  notebook, _ = execute("analyze_sweep.ipynb", tmp_path, sweep_dir=str(tmp_path / "sweep"))
  assert images(notebook)[5:7] == [0, 1]  # the domain table; the member's domain x expert map
  tmp_path = tmp_path / "sweep" / "domain"
  final = json.loads((tmp_path / "final_metrics.json").read_text())["eval"]
  per_domain = [final[f"eval/bits_per_byte/{d}"] for d in multidomain.DOMAINS]
  assert final["eval/bits_per_byte_macro"] == pytest.approx(np.mean(per_domain))
  assert all(3 < bpb < 9 for bpb in per_domain)  # near the 8 bits of a random byte
  # The analysis sees each token's domain; with its domain's 2 of 16 experts, a token's top-1
  # expert names its domain: normalized mutual information 1 in every layer.
  decisions = analysis.routing_decisions(tmp_path, num_batches=1)
  assert decisions["domain"].tolist() == [
      list(multidomain.DOMAINS)[i % 8] for i in decisions["example"]]
  assert analysis.specialization(decisions, by="domain")["mi_normalized"].tolist() == (
      pytest.approx([1.0, 1.0]))
  saturation = analysis.routing_saturation(tmp_path, num_batches=1)
  assert saturation["step"].tolist() == [2, 4, 2, 4]
  assert saturation[saturation["step"] == 4]["saturation"].tolist() == [1.0, 1.0]
  row = specialization.member_row(str(tmp_path), num_batches=1)
  assert row["nmi"] == pytest.approx(1.0) and row["saturation@4"] == 1.0
  assert row["saturation@2"] == saturation[saturation["step"] == 2]["saturation"].mean()


# ------------------------------------------------------------------------------- analysis


def _decisions(step, experts, domains=("python", "python", "german", "german")):
  """A routing_decisions frame of one layer by hand: token i chose experts[i] (top-2)."""
  return pd.DataFrame({
      "layer": 1, "router": "topk", "num_experts": 4, "token": range(len(experts)),
      "experts": [tuple(e) for e in experts], "top1": [e[0] for e in experts],
      "domain": pd.Categorical(domains, categories=["german", "python"], ordered=True),
      "step": step})


def test_saturation_is_the_share_of_top_k_kept_at_the_final_step_by_hand():
  early = _decisions(100, [(0, 1), (2, 3), (1, 0), (3, 2)])
  middle = _decisions(200, [(1, 0), (2, 1), (1, 2), (3, 2)])
  final = _decisions(300, [(1, 0), (2, 1), (1, 2), (0, 3)])
  table = analysis.saturation_table([early, middle, final])
  # Of each token's final top-2 {1,0}, {2,1}, {1,2}, {0,3}: early keeps 2, 1, 1, 1 of 8, the
  # middle 2, 2, 2, 1; their top-1 agrees for tokens 1, 2 (early) and 0, 1, 2 (middle).
  assert table["step"].tolist() == [100, 200, 300]
  assert table["final_step"].tolist() == [300] * 3
  assert table["saturation"].tolist() == [5 / 8, 7 / 8, 1.0]
  assert table["top1_agreement"].tolist() == [2 / 4, 3 / 4, 1.0]


def test_domain_expert_table_and_specialization_by_hand():
  decisions = _decisions(300, [(0, 1), (0, 2), (3, 2), (3, 1)])
  table = analysis.class_expert_table(decisions, 1, by="domain")
  assert table.index.tolist() == ["german", "python"]
  assert table.to_numpy().tolist() == [[0, 0, 0, 2], [2, 0, 0, 0]]
  spec = analysis.specialization(decisions, by="domain")
  assert spec["mi"].item() == pytest.approx(math.log(2))  # the expert names the domain
  assert spec["mi_normalized"].item() == pytest.approx(1.0)
  mixed = _decisions(300, [(0, 1), (3, 2), (3, 2), (0, 1)])
  assert analysis.specialization(mixed, by="domain")["mi"].item() == pytest.approx(0.0)


# ------------------------------------------------------------------------------ the brackets


def test_fieller_interval_is_where_the_ratio_test_does_not_reject():
  numerator, denominator = [0.30, 0.22, 0.27], [0.18, 0.15, 0.16]
  result = compare.fieller_interval(numerator, denominator)
  assert result["ratio"] == pytest.approx(np.mean(numerator) / np.mean(denominator))
  t = stats.t.ppf(0.975, 2)

  def statistic(r):  # the paired t statistic of numerator - r denominator
    d = np.asarray(numerator) - r * np.asarray(denominator)
    return abs(d.mean()) / (d.std(ddof=1) / math.sqrt(3))

  for bound in (result["low"], result["high"]):
    assert statistic(bound) == pytest.approx(t, rel=1e-9)
  assert statistic(result["ratio"]) == pytest.approx(0.0, abs=1e-12)
  assert result["low"] < result["ratio"] < result["high"]
  unbounded = compare.fieller_interval([0.1, 0.2, 0.3], [0.1, -0.1, 0.05])
  assert (unbounded["low"], unbounded["high"]) == (-math.inf, math.inf)


def test_gap_closed_places_a_group_between_its_brackets_by_hand():
  rows = [("random", 0, 3.2), ("random", 1, 3.3), ("random", 2, 3.25),
          ("domain", 0, 3.0), ("domain", 1, 3.1), ("domain", 2, 3.0),
          ("topk", 0, 3.1), ("topk", 1, 3.15), ("topk", 2, 3.2), ("topk", 3, 2.0)]
  results = pd.DataFrame(rows, columns=["group", "seed", "m"]).assign(status="finished")
  table = compare.gap_closed(results, "m", "random", "domain")
  row = table.iloc[0]
  assert row["group"] == "topk" and row["n"] == 3  # seed 3 has no brackets
  assert row["diff_low"] == pytest.approx(np.mean([-0.1, -0.15, -0.05]))
  assert row["diff_high"] == pytest.approx(np.mean([0.1, 0.05, 0.2]))
  assert row["share"] == pytest.approx(0.3 / 0.65)
  expected = compare.fieller_interval([0.1, 0.15, 0.05], [0.2, 0.2, 0.25])
  assert (row["share_low"], row["share_high"]) == pytest.approx((expected["low"],
                                                                 expected["high"]))
  with pytest.raises(ValueError) as e:
    compare.gap_closed(results, "m", "random", "oracle")
  assert str(e.value) == ("bracket 'oracle' is not a group with m; groups: 'random', 'domain', "
                          "'topk'")


def test_size_table_reads_the_corpus_metadata(corpus):
  builder = corpus[1]
  meta = builder.info.metadata
  sizes = multidomain.corpus_sizes(builder)
  assert sizes["corpus"] == builder.builder_config.name and sizes["domains"] == meta["domains"]
  lines = multidomain.size_table(sizes).splitlines()
  assert multidomain.size_table(meta).splitlines() == lines
  assert len(lines) == 2 + 8
  share = meta["bytes"]["train"][6] / sum(meta["bytes"]["train"])
  assert lines[2 + 6] == (f"| c | programming language | {meta['documents']['train'][6]:,} / "
                          f"{meta['documents']['validation'][6]:,} | "
                          f"{meta['bytes']['train'][6]:,} / {meta['bytes']['validation'][6]:,} "
                          f"| {share:.1%} |")


def test_share_text_gives_fieller_interval_or_says_it_is_unbounded():
  Row = collections.namedtuple("Row", "share share_low share_high")
  assert compare.share_text(Row(0.8412, 0.7567, 0.9413)) == "0.841 [0.757, 0.941]"
  assert compare.share_text(Row(0.5, -math.inf, math.inf)) == (
      "0.500 [unbounded: the brackets are not told apart]")
