"""Writes docs/CONFIG.md, the page of every config option, from the code.

  ./py tools/config_doc.py --write      # rewrites docs/CONFIG.md
  ./py tools/config_doc.py              # prints the page

One source: the field lines of `moe_jax/config.py`'s `default_config()`. A field's help is its
line's trailing comment, or the comment block right above a run of fields without their own
(the run ends at a blank line, a field with its own comment, or any other statement). A section's
text is the comment on the line that creates its ConfigDict. The router settings
(model.moe.<router>.<setting>) come from each router class's `settings()`, their help from the
"Settings:" section of the docstring of the class that declares them. tests/test_docs.py fails
when the page differs from what this prints, or when a field has no help.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import os
import re
import sys
import tokenize
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_SOURCE = os.path.join(ROOT, "moe_jax", "config.py")
PAGE = os.path.join(ROOT, "docs", "CONFIG.md")

# The same option in the production stacks (Megatron-Core, maxtext, torchtitan's MoEArgs), for
# translating a recipe, from the README's flag table; docs/ROUTING.md ("Production stacks") gives
# the formulas and what each mapped flag still decides otherwise.
EQUIVALENTS = {
    "model.moe.num_experts": "Megatron `--num-experts`; maxtext `num_experts`; torchtitan "
                             "`num_experts`",
    "model.moe.k": "Megatron `--moe-router-topk`; maxtext `num_experts_per_tok`; torchtitan "
                   "`top_k`",
    "score_function": "Megatron `--moe-router-score-function`; maxtext `routed_score_func`; "
                      "torchtitan `score_func`",
    "renormalize": "maxtext `norm_topk_prob`; torchtitan `route_norm`; Megatron's "
                   "`--moe-router-pre-softmax` is the opposite (softmax over all experts, not "
                   "renormalized); its sigmoid top-k > 1 is always renormalized, top-1 never",
    "scaling_factor": "Megatron `--moe-router-topk-scaling-factor`; maxtext "
                      "`routed_scaling_factor`; torchtitan `route_scale`",
    "num_expert_groups": "Megatron `--moe-router-num-groups`, `--moe-router-group-topk`; maxtext "
                         "`n_routing_groups`, `topk_routing_group`; torchtitan "
                         "`num_expert_groups`, `num_limited_groups`",
    "drop_policy": "Megatron `--moe-token-drop-policy` (default `probs`)",
    "drop_rank": "Megatron: `gate`",
    "priority": "Megatron: `token_major` (over a micro-batch of several sequences it orders "
                "tokens position-major, [s, b])",
    "group_score_experts": "Megatron: 0; maxtext: 2 (always sums a group's top 2)",
    "group_score_input": "Megatron: `logits` with the softmax after the top-k (its default), "
                         "`scores` with `--moe-router-pre-softmax` or sigmoid scores",
    "renormalize_sigmoid": "Megatron: `True` for k > 1, `False` for k = 1; maxtext "
                           "`norm_topk_prob`; torchtitan `route_norm`",
    "balance_per_k": "always on in Megatron",
    "bias_update_rate": "Megatron `--moe-router-enable-expert-bias` (sigmoid and sqrtsoftplus "
                        "scores only), "
                        "`--moe-router-bias-update-rate`; maxtext `routed_bias`; torchtitan "
                        "`load_balance_coeff`",
    "train.aux_loss_weight": "Megatron `--moe-aux-loss-coeff` with "
                             "`--moe-router-load-balancing-type aux_loss`; maxtext "
                             "`load_balance_loss_weight`",
    "train.seq_aux_loss_weight": "Megatron `seq_aux_loss` in `--moe-router-load-balancing-type`, "
                                 "its coefficient in `--moe-aux-loss-coeff`",
    "train.global_aux_loss_weight": "Megatron `global_aux_loss` in "
                                    "`--moe-router-load-balancing-type`",
    "train.microbatches": "Megatron `--global-batch-size` / (`--micro-batch-size` x data-parallel "
                          "size); maxtext `gradient_accumulation_steps`; the per-group loss is "
                          "per micro-batch, as Megatron's",
    "train.trace_steps": "Megatron's `RouterReplay` records the top-k indices in memory, no file",
    "train.replay_from": "Megatron `--moe-enable-routing-replay`",
    "train.z_loss_weight": "Megatron `--moe-z-loss-coeff`",
    "model.moe.router_dtype": "Megatron `--moe-router-dtype fp32|fp64`; `float64` needs "
                              "`JAX_ENABLE_X64=1`",
    "model.moe.capacity_factor": "Megatron `--moe-expert-capacity-factor` with "
                                 "`--moe-pad-expert-input-to-capacity` (the index and einsum "
                                 "paths always pad to C), as `min_capacity=1` and "
                                 "`eval_capacity_factor` the same; maxtext `capacity_factor`",
    "model.moe.dispatch_path": "`dropless`: Megatron's and torchtitan's default, maxtext "
                               "`sparse_matmul=True`; its GPU form `MoeLayer(dropless_form="
                               "'tokamax')` is Megatron `--moe-grouped-gemm`, maxtext "
                               "`megablox=True`, torchtitan `use_grouped_mm`",
    "model.moe.num_shared_experts": "Megatron `--moe-shared-expert-intermediate-size` (their "
                                    "total width); maxtext `shared_experts`; torchtitan "
                                    "`num_shared_experts`",
    "model.moe.shared_expert_gate": "Megatron `--moe-shared-expert-gate`",
    "model.moe.every": "Megatron `--moe-layer-freq`; maxtext `interleave_moe_layer_step`",
    "model.moe.first_dense_layers": "maxtext `first_num_dense_layers`; torchtitan "
                                    "`n_dense_layers`",
    "model.moe.first_hash_layers": "maxtext `first_num_hash_layers`",
    "model.moe.granularity": "Megatron `--moe-ffn-hidden-size` with `--num-experts` and "
                             "`--moe-router-topk`; maxtext `base_moe_mlp_dim` with `num_experts`; "
                             "torchtitan `moe_inter_dim`",
}


@dataclasses.dataclass
class Entry:
  """One row of the page: fields that share a help text (one, or a commented run)."""
  names: List[str]  # dotted names, without "config."
  help: str


@dataclasses.dataclass
class Section:
  name: str  # dotted path of the ConfigDict ("" for the top level)
  text: str
  entries: List[Entry]


def _comments(source: str) -> Dict[int, Tuple[str, bool]]:
  """Line number -> (comment text, whether the line holds nothing else)."""
  comments = {}
  lines = source.splitlines()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      line = token.start[0]
      alone = not lines[line - 1][:token.start[1]].strip()
      comments[line] = (token.string.lstrip("#").strip(), alone)
  return comments


def _dotted(node: ast.AST, aliases: Dict[str, str]) -> Optional[str]:
  """The config path an assignment target names (c.model.moe.k -> model.moe.k), else None."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Subscript):
    return None
  if not isinstance(node, ast.Name) or node.id not in aliases:
    return None
  prefix = aliases[node.id]
  path = ".".join(reversed(parts))
  return ".".join(p for p in (prefix, path) if p)


def _is_configdict(node: ast.AST) -> bool:
  return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "ConfigDict")


def parse_config_source(source: str) -> List[Section]:
  """The sections and fields of default_config(), with their comments, in source order."""
  tree = ast.parse(source)
  function = next(node for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name == "default_config")
  comments = _comments(source)
  lines = source.splitlines()
  aliases: Dict[str, str] = {}
  sections = [Section("", "", [])]
  by_name = {"": sections[0]}
  block: Optional[Entry] = None  # the commented run being filled
  previous_end = function.body[0].end_lineno
  for statement in function.body:
    # the full-line comments right above the statement
    above, line = [], statement.lineno - 1
    while line in comments and comments[line][1]:
      above.insert(0, comments[line][0])
      line -= 1
    blank_before = any(not lines[i - 1].strip() for i in range(previous_end + 1, line + 1))
    previous_end = statement.end_lineno
    if above or blank_before:
      block = None
    if not isinstance(statement, ast.Assign):
      block = None
      continue
    trailing = " ".join(comments[i][0] for i in range(statement.lineno, statement.end_lineno + 1)
                        if i in comments and not comments[i][1])
    targets = statement.targets
    if _is_configdict(statement.value):
      path = None
      for target in targets:
        if isinstance(target, ast.Name) and target.id not in aliases:
          aliases[target.id] = path if path is not None else ""
        else:
          path = _dotted(target, aliases)
      path = path or ""
      for target in targets:
        if isinstance(target, ast.Name):
          aliases[target.id] = path
      if path:
        section = Section(path, trailing or " ".join(above), [])
        sections.append(section)
        by_name[path] = section
      block = None
      continue
    path = _dotted(targets[0], aliases)
    if path is None:
      block = None
      continue
    parent = by_name[path.rsplit(".", 1)[0] if "." in path else ""]
    if trailing:
      help_text = " ".join(above + [trailing]) if above else trailing
      parent.entries.append(Entry([path], help_text))
      block = None
    elif above:
      block = Entry([path], " ".join(above))
      parent.entries.append(block)
    elif block is not None:
      block.names.append(path)
    else:
      parent.entries.append(Entry([path], ""))
  return sections


def _settings_help(cls) -> Dict[str, str]:
  """Setting name -> help, from the "Settings" section of cls's own docstring."""
  doc = cls.__dict__.get("__doc__") or ""
  lines = doc.splitlines()
  helps: Dict[str, str] = {}
  start = next((i for i, line in enumerate(lines) if re.match(r"\s*Settings\b.*:\s*$", line)),
               None)
  if start is None:
    return helps
  indent, names = None, []
  for line in lines[start + 1:]:
    if not line.strip():
      break
    width = len(line) - len(line.lstrip())
    match = re.match(r"\s*([A-Za-z_][\w, ]*):\s*(.*)$", line)
    if match and (indent is None or width <= indent):
      indent = width
      names = [n.strip() for n in match.group(1).split(",")]
      for name in names:
        helps[name] = match.group(2).strip()
    elif indent is not None and width > indent:
      for name in names:
        helps[name] = f"{helps[name]} {line.strip()}"
    else:
      break
  return helps


def router_sections() -> List[Section]:
  """model.moe.<router> settings, one section per router class that declares settings."""
  from moe_jax import routers
  declared: Dict[type, Dict[str, Dict[str, object]]] = {}  # class -> setting -> router -> default
  for name, cls in routers.REGISTRY.items():
    for setting, default in cls.settings().items():
      owner = next(k for k in reversed(cls.__mro__)
                   if setting in k.__dict__.get("__annotations__", {}))
      declared.setdefault(owner, {}).setdefault(setting, {})[name] = default
  sections = []
  for owner, settings in declared.items():
    helps = _settings_help(owner)
    users = sorted({n for defaults in settings.values() for n in defaults},
                   key=list(routers.REGISTRY).index)
    prefix = f"model.moe.{users[0]}" if len(users) == 1 else "model.moe.<router>"
    module = owner.__module__.replace(".", "/") + ".py"
    text = (f"`{owner.__name__}` ([{module}](../{module})): `{prefix}.<setting>` for "
            + ", ".join(f"`{n}`" for n in users) + ".")
    entries: List[Entry] = []
    for setting, defaults in settings.items():
      help_text = helps.get(setting, "")
      if entries and help_text and entries[-1].help == help_text:  # documented together
        entries[-1].names.append(f"{prefix}.{setting}")
        entries[-1].defaults.append(defaults)
        continue
      entries.append(Entry([f"{prefix}.{setting}"], help_text))
      entries[-1].defaults = [defaults]  # per setting, per router: rendered by _default_cell
    sections.append(Section(f"model.moe.{users[0] if len(users) == 1 else '<router>'} "
                            f"({owner.__name__})", text, entries))
  return sections


def _flat(config, prefix="") -> Dict[str, object]:
  import ml_collections
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, path + "."))
    else:
      out[path] = value
  return out


def _markdown(text: str) -> str:
  """Comment text as a table cell: '|' escaped; '<' escaped outside code spans, where
  '<workdir>' would read as an HTML tag."""
  parts = text.replace("|", "\\|").split("`")
  return "`".join(re.sub(r"<(?=[A-Za-z])", "&lt;", part) if i % 2 == 0 else part
                  for i, part in enumerate(parts))


def _value(value) -> str:
  text = repr(value)
  return f"`{text}`".replace("|", "\\|")


def _default_cell(entry: Entry, values: Dict[str, object]) -> str:
  per_router = getattr(entry, "defaults", None)
  if per_router is None:
    return ", ".join(_value(values[name]) for name in entry.names)
  cells = []
  for defaults in per_router:
    listed = list(defaults.values())
    common = max(listed, key=listed.count)
    others = [f"{name}: {_value(v)}" for name, v in defaults.items() if v != common]
    cells.append(_value(common) + (f" ({', '.join(others)})" if others else ""))
  return ", ".join(cells)


def _equivalent(entry: Entry) -> str:
  """The production stacks' name for the entry's first field that has one."""
  for name in entry.names:
    setting = name.rsplit(".", 1)[-1] if getattr(entry, "defaults", None) else None
    for key in (name, setting):
      if key in EQUIVALENTS:
        return EQUIVALENTS[key].replace("|", "\\|")
  return ""


def router_loss_section() -> List[Section]:
  """train.<loss>_weight of the registered routers' own losses (routers.loss_weights, where the
  router API has them), one row each, or no section."""
  from moe_jax import routers
  weights = getattr(routers, "loss_weights", dict)()
  if not weights:
    return []
  owners = {loss.name: name for name, cls in routers.REGISTRY.items()
            for loss in getattr(cls, "losses", ())}
  entries = [Entry([f"train.{field}"], f"weight of router {owners.get(loss, '?')}'s {loss}, "
                   "summed over the MoE layers") for loss, (field, _) in weights.items()]
  return [Section("train (router losses)", "", entries)]


def sections() -> List[Section]:
  """The page's sections: default_config()'s, with the router settings after model.moe and
  the router losses' weights last."""
  with open(CONFIG_SOURCE) as f:
    parsed = parse_config_source(f.read())
  at = next(i for i, section in enumerate(parsed) if section.name == "model.moe") + 1
  return parsed[:at] + router_sections() + parsed[at:] + router_loss_section()


def documented_fields() -> Dict[str, str]:
  """Every dotted field of default_config() the page lists -> its help."""
  out = {}
  for section in sections():
    for entry in section.entries:
      per_router = getattr(entry, "defaults", None)
      for i, name in enumerate(entry.names):
        if per_router is None:
          out[name] = entry.help
          continue
        setting = name.rsplit(".", 1)[1]
        for router in per_router[i]:
          out[f"model.moe.{router}.{setting}"] = entry.help
  return out


def config_fields() -> Dict[str, object]:
  """Every dotted field of default_config() -> its default."""
  from moe_jax import config
  return _flat(config.default_config())


def render() -> str:
  values = config_fields()
  out = ["# Config options", "",
         "<!-- Generated by `./py tools/config_doc.py --write` from moe_jax/config.py and the "
         "router classes' docstrings; edit those, not this page. -->", "",
         "Every field of `moe_jax.config.default_config()` with its default. Config files in "
         "`configs/` start from it; any field can be overridden on the command line "
         "(`--config.model.moe.k=4`), and a bad value stops the run with one line naming the "
         "field before anything compiles. \"Elsewhere\" names the same option in Megatron-Core, "
         "maxtext and torchtitan (`MoEArgs`); [ROUTING.md](ROUTING.md#production-stacks) gives the "
         "formulas and what those flags still decide otherwise.", ""]
  for section in sections():
    heading = section.name or "top level"
    level = "###" if section.name.startswith("model.moe.") else "##"
    out += [f"{level} {heading}", ""]
    if section.text:
      out += [_markdown(section.text[0].upper() + section.text[1:]), ""]
    out += ["| field | default | help | elsewhere |", "|---|---|---|---|"]
    for entry in section.entries:
      names = ", ".join(f"`{name}`" for name in entry.names)
      help_text = _markdown(entry.help)
      out.append(f"| {names} | {_default_cell(entry, values)} | {help_text} | "
                 f"{_equivalent(entry)} |")
    out.append("")
  return "\n".join(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--write", action="store_true", help=f"write {os.path.relpath(PAGE, ROOT)}")
  args = parser.parse_args(argv)
  page = render()
  if args.write:
    with open(PAGE, "w") as f:
      f.write(page)
    print(f"wrote {os.path.relpath(PAGE, ROOT)}")
  else:
    sys.stdout.write(page)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
