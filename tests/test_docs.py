"""The docs: every relative link resolves (file and anchor), the README stays short, and
docs/CONFIG.md is what tools/config_doc.py generates, with every config field and its help."""
import glob
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import config_doc  # noqa: E402  (tools/ is not a package)
import results_tables  # noqa: E402
import time_commands  # noqa: E402

README_MAX_BYTES = 10_000
PAGES = ["README.md", "RESULTS.md", "BENCHMARKS.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^(#{1,6}) +(.+?) *$", re.M)


def read(path):
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    return f.read()


def anchor(heading):
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*_]", "", heading).strip().lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown):
  return {anchor(h) for _, h in HEADING.findall(FENCE.sub("", markdown))}


def links(markdown):
  return LINK.findall(FENCE.sub("", markdown))


def test_helpers_on_a_small_page():
  page = ("# Top\n\n## The `ratio` method, part 2\n\n[a](x.md#top) ![b](docs/p.png) "
          "[c](https://example.com)\n\n```\n[not](a-link.md)\n# not a heading\n```\n"
          "### Gone\nbody\n```\n# in a fence\n```\n## Kept\n")
  assert anchors(page) == {"top", "the-ratio-method-part-2", "gone", "kept"}
  assert links(page) == ["x.md#top", "docs/p.png", "https://example.com"]


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
  text, broken = read(page), []
  for target in links(text):
    if re.match(r"[a-z]+:", target):
      continue  # http(s), mailto
    path, _, fragment = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if not os.path.exists(os.path.join(ROOT, resolved)):
      broken.append(f"{target}: no {resolved}")
    elif fragment and resolved.endswith(".md") and fragment not in anchors(read(resolved)):
      broken.append(f"{target}: no heading #{fragment} in {resolved}")
  assert not broken, f"{page}: " + "; ".join(broken)


def test_docs_pages_are_linked_from_the_readme():
  linked = {os.path.normpath(t.partition("#")[0]) for t in links(read("README.md"))}
  assert set(PAGES) - {"README.md"} <= linked


def test_readme_is_short():
  assert len(read("README.md").encode("utf-8")) <= README_MAX_BYTES


def test_config_page_is_generated():
  assert read("docs/CONFIG.md") == config_doc.render(), (
      "docs/CONFIG.md is stale: run ./py tools/config_doc.py --write")


def test_every_config_field_is_on_the_page_with_help():
  fields, documented = config_doc.config_fields(), config_doc.documented_fields()
  assert set(documented) == set(fields)
  assert not [name for name, help_text in documented.items() if not help_text.strip()]
  page = read("docs/CONFIG.md")
  # every field by name, router settings under their router's name or model.moe.<router>
  for name in fields:
    parts = name.split(".")
    generic = ".".join(parts[:2] + ["<router>"] + parts[3:])
    assert f"`{name}`" in page or (len(parts) == 4 and f"`{generic}`" in page), name
  assert "| `model.moe.k` | `None` | None: the router class's default_k" in page
  assert "`model.moe.gshard.second_expert_policy` | `'random'` |" in page
  assert "`False` (gshard: `True`, topk: `True`, domain: `True`)" in page  # renormalize
  assert "Megatron `--moe-router-topk`" in page


SOURCE = '''
def default_config():
  c = ml_collections.ConfigDict()
  c.seed = 0  # the seed

  c.data = ml_collections.ConfigDict()  # the data
  # two fields
  # documented together
  c.data.a = 1
  c.data.b = 2
  c.data.c = 3  # its own
  c.data.d = 4
  t = c.train = ml_collections.ConfigDict()
  t.steps = (1,
             2)  # a tuple
  # a run of one
  t.lr = 1e-3

  t.plain = 0
  return c
'''


def test_parse_config_source():
  sections = config_doc.parse_config_source(SOURCE)
  rows = [(s.name, s.text, [(e.names, e.help) for e in s.entries]) for s in sections]
  assert rows == [
      ("", "", [(["seed"], "the seed")]),
      ("data", "the data", [(["data.a", "data.b"], "two fields documented together"),
                            (["data.c"], "its own"), (["data.d"], "")]),
      ("train", "", [(["train.steps"], "a tuple"), (["train.lr"], "a run of one"),
                     (["train.plain"], "")])]


def test_router_settings_help_from_docstrings():
  from moe_jax import routers
  helps = config_doc._settings_help(routers.TokensChooseRouter)
  assert helps["num_expert_groups"] == helps["top_expert_groups"]
  assert helps["num_expert_groups"].startswith("group-limited routing")
  assert helps["num_expert_groups"].endswith("1, 1 is off.")
  assert helps["scaling_factor"] == "multiplies the gates, after renormalizing (DeepSeek-V3: 2.5)."
  assert set(helps) == set(routers.TokensChooseRouter.settings())
  assert config_doc._settings_help(routers.REGISTRY["moepp"])["num_copy"] == (
      "the zero-computation experts of each kind (1, 1, 2).")


def test_config_doc_command(tmp_path, monkeypatch, capsys):
  assert config_doc.main([]) == 0
  printed = capsys.readouterr().out
  assert printed == config_doc.render() and printed.startswith("# Config options\n")
  monkeypatch.setattr(config_doc, "PAGE", str(tmp_path / "CONFIG.md"))
  assert config_doc.main(["--write"]) == 0
  assert (tmp_path / "CONFIG.md").read_text() == printed


def test_help_text_as_markdown():
  assert config_doc._markdown("a|b in <workdir>/x, `<router>` and x < 3") == (
      "a\\|b in &lt;workdir>/x, `<router>` and x < 3")


def test_router_losses_get_a_row(monkeypatch):
  from moe_jax import routers
  assert config_doc.router_loss_section() == []  # no built-in router has a loss of its own
  monkeypatch.setattr(routers, "loss_weights", lambda: {"commitment_loss": (
      "commitment_loss_weight", 1e-2)}, raising=False)
  [section] = config_doc.router_loss_section()
  assert [(e.names, e.help) for e in section.entries] == [
      (["train.commitment_loss_weight"], "weight of router ?'s commitment_loss, summed over the "
       "MoE layers")]


def test_results_blocks_are_generated_from_the_committed_results():
  names = []
  for page in results_tables.PAGES:
    text = page.read_text()
    names += re.findall(r"<!-- generated: (\S+) -->", text)
    assert results_tables.render(text) == text  # every quoted number is what results/ gives
  assert set(names) == set(results_tables.BLOCKS)
  assert results_tables.main(["--check"]) == 0


def test_a_stale_results_block_is_named(tmp_path, monkeypatch, capsys):
  stale = tmp_path / "RESULTS.md"
  stale.write_text(read("RESULTS.md").replace(
      "<!-- generated: headroom -->\n", "<!-- generated: headroom -->\n| typed | by hand |\n"))
  monkeypatch.setattr(results_tables, "PAGES", [stale])
  assert results_tables.main(["--check"]) == 1
  assert capsys.readouterr().err == ("RESULTS.md: generated blocks differ from the committed "
                                     "results: headroom; run ./py tools/results_tables.py\n")


def test_commands_block_from_the_timing_file(tmp_path, monkeypatch):
  entry = dict(date="2026-12-06T19:00:00+00:00", commit="abc1234", processor="AMD EPYC",
               cpu_count=2, load_average_before=[0.12, 0.5, 1.0], peak_gflops_before=521.4,
               peak_gflops_after=498.6)
  (tmp_path / "commands.json").write_text(json.dumps(
      {"run": entry | dict(seconds=369.0),
       "test": entry | dict(seconds=545.4, passed=663, pytest_seconds=530.2)}))
  monkeypatch.setattr(results_tables, "RESULTS_DIR", tmp_path)
  machine = ("at commit abc1234 on 2026-12-06: 2 CPU cores (AMD EPYC), float32 matmul peak 521 "
             "GFLOP/s before and 499 after.")
  assert results_tables.commands_block() == (
      f"- `make run`: 6 min 9 s from a fresh clone, {machine}\n"
      f"- `make test`: 9 min 5 s from a fresh clone, 663 tests passed (8 min 50 s of it in "
      f"pytest), {machine}")
  assert results_tables.commands_block(["train"]) == (
      "- `make train`: not timed yet (`./py tools/time_commands.py train`).")


def test_pytest_summary_reads_the_last_line():
  assert time_commands.pytest_summary(
      "....\n663 passed, 2 warnings in 530.20s (0:08:50)\n") == dict(passed=663,
                                                                    pytest_seconds=530.2)
  assert time_commands.pytest_summary("make: *** [test] Error 1\n") == {}
