"""Sweeps: many training runs from one definition, run as separate processes, results as a table.

  python -m experiments.sweep --sweep configs/sweeps/routers.py --workdir runs/routers

A sweep file defines `get_sweep()`, returning a dict (or ConfigDict) with
  base     the config file every member trains, relative to the repository root
           ("configs/vit.py"); a file whose `get_config(arg)` takes an argument lets members
           choose it with the key `config_arg` (trained as `--config=configs/vit.py:gshard`)
  fixed    overrides for every member: {"train.num_steps": 150, ...} (dotted config paths
           without the "config." prefix)
  grid     {key: [values]}: one member per combination (cartesian product, keys in order)
  members  [{key: value}]: one member each; with `grid` too, every grid point x every entry
  seeds    [0, 1, 2]: every member above at each seed, seed-major (all members of seed 0 first,
           so an interrupted sweep still has whole pairs); replaces any `seed` the grid or the
           members set. `experiments.sweep --seeds N` sets it to 0..N-1.
  baseline the group the others are compared with (default: the first); a group is the
           members that differ only by seed, labelled by their other overrides ("gshard",
           "topk, capacity_factor=2.0"), as in summary.csv
The member's own overrides (grid and members, not `fixed`) name its workdir, `<workdir>/<name>`:
`key=value` pairs joined by commas, each key shortened to its last dotted part when no other
key of the sweep ends the same way, and `config_arg` shown by its value alone ("gshard,seed=1").
Names depend only on the definition, so running the sweep again finds every member's run.

Each member is `python -m experiments.train` in its own process (its output in `train.log`,
the outcome of its last attempt in `status.json`). Members whose `final_metrics.json` says
finished are skipped; any other member runs again with the same command, so an interrupted run
resumes from its checkpoint. Changing `fixed` therefore does not re-run finished members: give
a changed sweep a new workdir. `<workdir>/sweep.json` lists the members and their commands;
`collect_results` turns them into one table row each (`results.csv`; a member that had much less
or much more of the CPU than the others is flagged `contended`, `flag_contended`), and
`summarize` compares every group with the baseline, pairing members by seed (`summary.csv`,
moe_jax/compare.py), leaving out the times of contended members.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime
import itertools
import json
import math
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Sequence

import ml_collections
import pandas as pd

from moe_jax import compare, runlock
from moe_jax.validation import call_in_file, error_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where experiments/ lives
CONFIG_ARG = "config_arg"  # the member key that picks the argument of the base config file
SEED = "seed"  # the member key that sets config.seed: members that differ only by it pair up
SWEEP_KEYS = ("base", "fixed", "grid", "members", "seeds", "baseline")
# Averaged over MoE layers; max_logit is the largest router logit (ST-MoE's z-loss bounds it);
# experts_per_token is what the dynamic routers (top_p, remoe, dselect_k, moepp) realize.
MOE_STATS = ("dropped_fraction", "experts_per_token", "load_cv", "max_violation", "max_logit")
# A member whose CPU share is below CONTENDED x the sweep's median ran beside other work; above
# it / CONTENDED, with fewer members beside it than the others had (the last of --parallel 2).
CONTENDED = 0.8
TIMES = ("tokens_per_s", "wall_seconds")  # what other work on the machine distorts


# ----------------------------------------------------------------------------------------------
# The definition and its members.


def load_sweep(path: str) -> Dict[str, Any]:
  """Calls `get_sweep()` of the sweep file and checks the definition.

  Returns {"base", "fixed", "grid", "members", "seeds", "baseline"} as plain Python values
  (seeds and baseline None when not given); raises ValueError naming what is wrong.
  """
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  sweep = call_in_file(path, "get_sweep", fmt="see moe_jax/sweep.py for the format")
  if not isinstance(sweep, (dict, ml_collections.ConfigDict)):
    raise ValueError(f"{path}: get_sweep() must return a dict, got {type(sweep).__name__}")
  if isinstance(sweep, ml_collections.ConfigDict):
    sweep = sweep.to_dict()
  unknown = set(sweep) - set(SWEEP_KEYS)
  if unknown:
    raise ValueError(f"{path}: unknown sweep keys {sorted(unknown)}; allowed: {SWEEP_KEYS}")
  if not isinstance(sweep.get("base"), str):
    raise ValueError(f"{path}: 'base' must name a config file")
  if "grid" not in sweep and "members" not in sweep:
    raise ValueError(f"{path}: a sweep needs 'grid', 'members' or both")
  for key, kind in (("fixed", "a dict of overrides, {'train.num_steps': 150}"),
                    ("grid", "a dict of value lists, {'model.moe.k': [1, 2]}")):
    if not isinstance(sweep.get(key, {}), dict):
      raise ValueError(f"{path}: {key!r} must be {kind}, got {sweep[key]!r}")
  for key, values in sweep.get("grid", {}).items():
    if not isinstance(values, (list, tuple)):
      raise ValueError(f"{path}: grid key {key!r} must list its values, [{values!r}], got "
                       f"{values!r}")
  members = sweep.get("members", [{}])
  if not isinstance(members, (list, tuple)) or not all(isinstance(m, dict) for m in members):
    raise ValueError(f"{path}: 'members' must be a list of dicts of overrides, "
                     f"[{{'model.moe.k': 1}}, ...], got {members!r}")
  definition = {"base": sweep["base"], "fixed": dict(sweep.get("fixed", {})),
                "grid": {key: list(values) for key, values in sweep.get("grid", {}).items()},
                "members": [dict(member) for member in sweep.get("members", [{}])],
                "seeds": sweep.get("seeds"), "baseline": sweep.get("baseline")}
  if definition["seeds"] is not None:
    definition["seeds"] = check_seeds(definition["seeds"], f"{path}: 'seeds'")
  for key, values in definition["grid"].items():
    if not values:
      raise ValueError(f"{path}: grid key {key!r} has no values")
  keys = [*definition["fixed"], *definition["grid"],
          *(key for member in definition["members"] for key in member)]
  for key in keys:
    if key.startswith("config."):
      raise ValueError(f"{path}: override {key!r}: leave out the 'config.' prefix")
  if ":" in definition["base"] and CONFIG_ARG in keys:
    raise ValueError(f"{path}: 'base' already gives the config argument; drop it or "
                     f"'{CONFIG_ARG}'")
  groups = list(dict.fromkeys(map(group_label, member_overrides(definition))))
  if definition["baseline"] is not None and definition["baseline"] not in groups:
    raise ValueError(f"{path}: baseline {definition['baseline']!r} is not a group of the sweep; "
                     f"groups: {', '.join(map(repr, groups))}")
  return definition


def check_seeds(seeds: Any, what: str) -> List[int]:
  """The seeds as a list of distinct ints; ValueError naming `what` otherwise."""
  if (not isinstance(seeds, (list, tuple)) or not seeds
      or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
      or len(set(seeds)) < len(seeds)):
    raise ValueError(f"{what} must be a non-empty list of distinct integers, got {seeds!r}")
  return list(seeds)


def member_overrides(definition: Dict[str, Any]) -> List[Dict[str, Any]]:
  """Every member's own overrides: each grid point combined with each `members` entry, at each
  of `seeds` when given (seed-major, the seed last)."""
  grid = definition["grid"]
  points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  members = [{**point, **member} for point in points for member in definition["members"]]
  if definition.get("seeds") is None:
    return members
  groups = list({group_label(m): {k: v for k, v in m.items() if k != SEED}
                 for m in members}.values())
  return [{**group, SEED: seed} for seed in definition["seeds"] for group in groups]


def group_label(overrides: Dict[str, Any]) -> str:
  """The label of a member's group: its overrides other than seed, 'gshard, capacity_factor=2.0'
  (config_arg by its value alone, other keys by their last dotted part); 'all' without any."""
  return ", ".join(label_part(key, value) for key, value in overrides.items()
                   if key != SEED) or "all"


def label_part(key: str, value: Any) -> str:
  return f"{value}" if key == CONFIG_ARG else f"{key.rsplit('.', 1)[-1]}={value}"


def _name_value(value: Any) -> str:
  """A value as it appears in a member name: floats short (1, 1e+08), no spaces or slashes."""
  if isinstance(value, (list, tuple)):
    return "-".join(map(_name_value, value))
  text = str(value)
  if isinstance(value, float) and float(f"{value:g}") == value:
    text = f"{value:g}"
  return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def member_names(overrides: Sequence[Dict[str, Any]]) -> List[str]:
  """The workdir names of members with these overrides (see the module docstring)."""
  keys = list(dict.fromkeys(key for member in overrides for key in member))
  last_parts = collections.Counter(key.rsplit(".", 1)[-1] for key in keys)
  short = {key: key if last_parts[key.rsplit(".", 1)[-1]] > 1 else key.rsplit(".", 1)[-1]
           for key in keys}
  names = [",".join(_name_value(value) if key == CONFIG_ARG
                    else f"{short[key]}={_name_value(value)}" for key, value in member.items())
           or "base" for member in overrides]
  repeated = [name for name, count in collections.Counter(names).items() if count > 1]
  if repeated:
    raise ValueError(f"several sweep members are named {repeated}: their overrides coincide")
  return names


def _flag_value(value: Any) -> str:
  """A value as ml_collections' config flags parse it (bool, tuple, number, string)."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def train_command(definition: Dict[str, Any], overrides: Dict[str, Any],
                  workdir: str) -> List[str]:
  """The `experiments.train` command of one member (run in ROOT), `fixed` then its overrides."""
  merged = {**definition["fixed"], **overrides}
  config = definition["base"]
  if CONFIG_ARG in merged:
    config = f"{config}:{merged.pop(CONFIG_ARG)}"
  return [sys.executable, "-m", "experiments.train", f"--config={config}",
          f"--workdir={os.path.abspath(workdir)}",
          *(f"--config.{key}={_flag_value(value)}" for key, value in merged.items())]


def expand(definition: Dict[str, Any], workdir: str) -> List[Dict[str, Any]]:
  """The members of a sweep in `workdir`: [{"name", "overrides", "command"}]."""
  overrides = member_overrides(definition)
  return [{"name": name, "overrides": member,
           "command": train_command(definition, member, os.path.join(workdir, name))}
          for name, member in zip(member_names(overrides), overrides)]


def check_members(members: Sequence[Dict[str, Any]]) -> Dict[str, str]:
  """{name: "Config error: ..."} for the members that would not start: each member's command
  parsed as experiments.train parses it and checked as a real start checks before anything
  compiles (config.load_config, train.check_config); creates nothing."""
  from moe_jax import config as config_lib, train  # jax: imported for this check only
  errors = {}
  with contextlib.chdir(ROOT):  # where the commands run: the config paths are relative to it
    for member in members:
      args = member["command"][3:]
      workdir = next(arg.split("=", 1)[1] for arg in args if arg.startswith("--workdir="))
      try:
        train.check_config(config_lib.load_config(args), workdir)
      except config_lib.ConfigError as error:
        errors[member["name"]] = f"Config error: {error}"
  return errors


class BadMember(ValueError):
  """A member that would stop with a config error: the sweep starts none (one line)."""


def refuse_bad_members(members: Sequence[Dict[str, Any]]) -> None:
  """BadMember naming the first member that would not start and its field (check_members),
  before any member starts: a sweep whose members fail one by one after seconds each, or after
  the valid ones trained, costs its user that time. The check runs in a child process that
  exits before the members start: the mesh check initializes JAX's backend, which on a GPU
  would hold the device (and most of its memory) in the runner for the whole sweep."""
  spawn = multiprocessing.get_context("spawn")  # no fork of a threaded process
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as checker:
    errors = checker.submit(check_members, members).result()
  if errors:
    name, error = next(iter(errors.items()))
    more = (f"; {len(errors)} of {len(members)} members would stop: --dry-run lists each"
            if len(errors) > 1 else "")
    raise BadMember(f"member {name}: {error.removeprefix('Config error: ')} (no member "
                    f"started{more})")


# ----------------------------------------------------------------------------------------------
# Running the members.


def _read_json(path: str) -> Dict[str, Any]:
  """The JSON object in `path`, {} if there is none."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Dict[str, Any]) -> None:
  """Writes through a temporary file, so a reader (a notebook, mid-sweep) never sees half."""
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def _mean(values: Sequence[float]) -> float:
  return sum(values) / len(values) if values else math.nan


def is_finished(member_dir: str) -> bool:
  return _read_json(os.path.join(member_dir, "final_metrics.json")).get("status") == "finished"


def member_status(member_dir: str) -> str:
  """finished, failed (its last attempt did) or pending (not run, running or interrupted)."""
  if is_finished(member_dir):
    return "finished"
  status = _read_json(os.path.join(member_dir, "status.json")).get("status")
  return "failed" if status == "failed" else "pending"


class _Attempt:
  """One running member: its process, and where in its log this attempt's output starts."""

  def __init__(self, member: Dict[str, Any], member_dir: str):
    self.member, self.member_dir = member, member_dir
    os.makedirs(member_dir, exist_ok=True)
    self.log_path = os.path.join(member_dir, "train.log")
    self.log = open(self.log_path, "a")
    self.log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} "
                   f"(cd {shlex.quote(ROOT)} && {shlex.join(member['command'])})\n")
    self.log.flush()
    self.offset = self.log.tell()
    self.start = time.time()
    _write_json(os.path.join(member_dir, "status.json"),
                {"status": "running", "command": member["command"]})
    # Its own session: a Ctrl-C in the terminal reaches only the runner, which then interrupts
    # each member once (a second interrupt could cut short its last checkpoint save). The member
    # stops when the runner dies, even by SIGKILL (runlock.stop_with_parent).
    self.process = subprocess.Popen(
        member["command"], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, runlock.PARENT_ENV: str(os.getpid())})

  def finish(self) -> Dict[str, Any]:
    """Records the outcome in status.json and returns it."""
    self.log.close()
    returncode = self.process.returncode
    status = {"status": "finished" if returncode == 0 and is_finished(self.member_dir)
              else "failed", "returncode": returncode,
              "seconds": round(time.time() - self.start, 1), "command": self.member["command"]}
    if status["status"] == "failed":
      with open(self.log_path) as f:
        f.seek(self.offset)
        status["error"] = error_line(f.read(), returncode)
    _write_json(os.path.join(self.member_dir, "status.json"), status)
    return status

  def stop(self) -> None:
    """Interrupts the run (it finishes a pending checkpoint save); its status stays pending."""
    self.process.send_signal(signal.SIGINT)
    try:
      self.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
    self.log.close()


def run_members(members: Sequence[Dict[str, Any]], workdir: str, parallel: int = 1,
                log: Callable[[str], None] = print) -> None:
  """Runs the members that have not finished, `parallel` processes at a time.

  A failing member is recorded and the others go on. A member that another live process trains
  (its run.lock is held: a sweep run twice at once, or a member left by a runner that could not
  take it along) is waited for, never run twice; it counts against `parallel` meanwhile. On
  KeyboardInterrupt the running members are interrupted (they stay pending and resume next time)
  and the interrupt is raised again.
  """
  member_dir = lambda member: os.path.join(workdir, member["name"])
  todo = collections.deque(m for m in members if not is_finished(member_dir(m)))
  log(f"{len(members) - len(todo)} of {len(members)} members finished before; "
      f"running {len(todo)}, {parallel} at a time")
  running: List[_Attempt] = []
  waiting: List[Dict[str, Any]] = []  # members trained by another process
  try:
    while todo or running or waiting:
      for member in [m for m in waiting if runlock.holder(member_dir(m)) is None]:
        waiting.remove(member)
        if is_finished(member_dir(member)):
          log(f"{member['name']}: finished by the run it waited for")
        else:  # that run stopped short: resume it here
          todo.appendleft(member)
      while todo and len(running) + len(waiting) < parallel:
        member = todo.popleft()
        holder = runlock.holder(member_dir(member))
        if holder is not None:
          waiting.append(member)
          log(f"{member['name']}: already running ({holder}); waiting for it")
          continue
        running.append(_Attempt(member, member_dir(member)))
        log(f"started  {member['name']}")
      time.sleep(0.2)
      for attempt in [a for a in running if a.process.poll() is not None]:
        running.remove(attempt)
        status = attempt.finish()
        outcome = (f"finished in {status['seconds']:.0f} s" if status["status"] == "finished"
                   else f"FAILED after {status['seconds']:.0f} s: {status['error']}")
        log(f"{attempt.member['name']}: {outcome}")
  except KeyboardInterrupt:
    for attempt in running:
      attempt.stop()
      log(f"{attempt.member['name']}: interrupted")
    raise


def run_sweep(definition: Dict[str, Any], workdir: str, parallel: int = 1,
              log: Callable[[str], None] = print) -> pd.DataFrame:
  """Runs (or resumes) a sweep (from `load_sweep`); writes sweep.json, results.csv and
  summary.csv. Every member's config is checked first (refuse_bad_members: BadMember, nothing
  written).

  Returns the results (`collect_results`).
  """
  members = expand(definition, workdir)
  refuse_bad_members(members)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "sweep.json"), {"definition": definition, "members": members})
  try:
    run_members(members, workdir, parallel, log)
  finally:  # an interrupted sweep still tables what it has
    results = collect_results(workdir)
    results.to_csv(os.path.join(workdir, "results.csv"), index=False)
    summarize(results, definition).to_csv(os.path.join(workdir, "summary.csv"), index=False)
  return results


def summarize(results: pd.DataFrame, definition: Dict[str, Any]) -> pd.DataFrame:
  """compare.summarize of the results (from collect_results) against the sweep's baseline group;
  the times of contended members left out (`uncontended`)."""
  return compare.summarize(uncontended(results), definition.get("baseline"))


def relative_speed(results: pd.DataFrame, definition: Dict[str, Any]) -> pd.DataFrame:
  """compare.ratios of tokens_per_s against the sweep's baseline group, contended members left
  out: each group's speed as a multiple of the baseline's, paired by seed."""
  return compare.ratios(uncontended(results), "tokens_per_s", definition.get("baseline"))


# ----------------------------------------------------------------------------------------------
# Results.


def _train_records(member_dir: str) -> List[Dict[str, Any]]:
  path = os.path.join(member_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [record for record in map(json.loads, f) if "train/loss" in record]


def _median(records: Sequence[Dict[str, Any]], key: str) -> float:
  """The median of `key` over the records (NaN when one lacks it: a run from before the key)."""
  return pd.Series([record.get(key, math.nan) for record in records], dtype=float).median(
      skipna=False)


def member_results(member_dir: str) -> Dict[str, Any]:
  """One member's numbers, from its final_metrics.json and metrics.jsonl (empty if unfinished).

  tokens_per_s, cpu_share and load_avg are medians over the steady-state train records: after
  the first (whose interval includes compilation); evaluation and logging are outside every
  interval (moe_jax/train.py Interval). wall_seconds is the training time: the sum of every train
  record's interval, so the time in train steps, compilation included (once per attempt of a
  resumed run), evaluation, checkpoints and logging not. train_flops counts the model FLOPs of
  training as the benchmarks do: 3 x (active_flops_per_token + head_flops_per_token) x tokens
  trained (forward + backward = 3 forwards; head: the matmuls outside the blocks), tokens trained
  = steps x tokens per step (a record's tokens_per_s / steps_per_s, one interval's two rates).
  The routing statistics come from the last train record, averaged over the MoE layers (NaN for
  a dense model), then the router's own (final_metrics.json's router_statistics: those its
  router declares, routers.Statistic).
  """
  final = _read_json(os.path.join(member_dir, "final_metrics.json"))
  if final.get("status") != "finished":
    return {}
  records = _train_records(member_dir)
  steady = records[1:] or records
  last, model = records[-1], final["model"]
  tokens_per_step = round(last["tokens_per_s"] / last["steps_per_s"])
  row = {key: value for key, value in final["eval"].items() if key != "step"}
  # The task loss: the total adds the auxiliary losses, which differ by router and layer count.
  row["train/task_loss"] = final["train"]["train/task_loss"]
  row["tokens_per_s"] = _median(steady, "tokens_per_s")
  row["cpu_share"] = _median(steady, "cpu_share")
  row["load_avg"] = _median(steady, "load_avg")
  row["wall_seconds"] = sum(record.get("seconds", math.nan) for record in records)
  row["train_flops"] = (3 * (model["active_flops_per_token"] + model["head_flops_per_token"])
                        * final["step"] * tokens_per_step)
  for key in ("active_params", "total_params", "active_flops_per_token"):
    row[key] = model[key]
  for stat in (*MOE_STATS, *final.get("router_statistics", ())):
    row[stat] = _mean([value for key, value in final["train"].items()
                       if key.startswith("train/routing/") and key.endswith("/" + stat)])
  return row


def flag_contended(results: pd.DataFrame) -> pd.Series:
  """True for the finished members whose cpu_share is below CONTENDED x the median cpu_share of
  the sweep's finished members, or above the median / CONTENDED: their times (tokens_per_s,
  wall_seconds) measure the machine more than their router. Below: other work shared the
  machine. Above: the member had more of the machine than the others, as the last member of a
  --parallel 2 sweep running alone (measured: 0.88 against the others' 0.50, and 1.8x their
  tokens/s). Relative to the sweep, since members run --parallel N at a time each get about 1/N
  of the cores."""
  finished = results["status"] == "finished"
  typical = results.loc[finished, "cpu_share"].median()
  share = results["cpu_share"]
  return finished & ((share < CONTENDED * typical) | (share > typical / CONTENDED))


def uncontended(results: pd.DataFrame) -> pd.DataFrame:
  """The results with the times (TIMES) of contended members set to NaN, so they are left out
  of every comparison of speed; their quality stays."""
  return results.assign(**{key: results[key].mask(results["contended"]) for key in TIMES
                           if key in results})


def contention_warnings(results: pd.DataFrame) -> List[str]:
  """A sentence per contended member: its CPU share against the sweep's, and the load."""
  typical = results.loc[results["status"] == "finished", "cpu_share"].median()
  why = {True: "other work on the machine slowed it",
         False: "it had more of the machine than the other members (fewer ran beside it)"}
  return [f"{row.name} had a CPU share of {row.cpu_share:.0%} (the sweep's median: "
          f"{typical:.0%}; load average {row.load_avg:.1f}): {why[row.cpu_share < typical]}, so "
          f"its tokens/s and wall-clock time are left out of the comparisons."
          for row in results[results["contended"]].itertuples(index=False)]


def collect_results(sweep_workdir: str) -> pd.DataFrame:
  """One row per member of the sweep in `sweep_workdir` (from its sweep.json).

  Columns: name, the member's overrides, group (`group_label`), seed (the member's, else the
  sweep's fixed one, else 0), status (finished / failed / pending), the final eval metrics,
  train/task_loss, tokens_per_s, cpu_share, contended (`flag_contended`), load_avg, wall_seconds,
  train_flops, active_params, total_params, active_flops_per_token, the MOE_STATS and the
  routers' own statistics (`member_results`), and error (of a failed member).
  """
  with open(os.path.join(sweep_workdir, "sweep.json")) as f:
    sweep = json.load(f)
  members = sweep["members"]
  fixed_seed = sweep["definition"]["fixed"].get(SEED, 0)
  rows = []
  for member in members:
    member_dir = os.path.join(sweep_workdir, member["name"])
    status = member_status(member_dir)
    error = (_read_json(os.path.join(member_dir, "status.json")).get("error", "")
             if status == "failed" else "")
    rows.append({"name": member["name"], **member["overrides"],
                 "group": group_label(member["overrides"]),
                 SEED: member["overrides"].get(SEED, fixed_seed), "status": status,
                 **member_results(member_dir), "error": error})
  override_keys = dict.fromkeys(key for member in members for key in member["overrides"]
                                if key != SEED)
  leading = ["name", *override_keys, "group", SEED, "status"]
  metric_keys = dict.fromkeys(key for row in rows for key in row
                              if key not in leading and key != "error")
  results = pd.DataFrame(rows, columns=[*leading, *metric_keys, "error"])
  if "cpu_share" not in results:  # no member finished
    results["cpu_share"] = math.nan
  results.insert(results.columns.get_loc("cpu_share") + 1, "contended",
                 flag_contended(results))
  return results


def _count(value: float) -> str:
  """Parameter and FLOP counts in thousands or millions: 1.23M."""
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.2f}{suffix}"
  return f"{value:.0f}"


# The printed table's columns (where present): header and format.
_TABLE_COLUMNS = {
    "eval/accuracy": ("eval_acc", "{:.4f}".format), "eval/loss": ("eval_loss", "{:.4f}".format),
    "eval/bits_per_byte": ("eval_bpb", "{:.4f}".format),
    "train/task_loss": ("train_loss", "{:.4f}".format),
    "tokens_per_s": ("tokens/s", "{:.0f}".format),
    "cpu_share": ("cpu", "{:.2f}".format),
    "active_params": ("active", _count), "total_params": ("params", _count),
    "active_flops_per_token": ("flops/token", _count),
    "dropped_fraction": ("dropped", "{:.4f}".format),
    "experts_per_token": ("experts/token", "{:.2f}".format),
    "load_cv": ("load_cv", "{:.3f}".format), "max_violation": ("maxvio", "{:.3f}".format)}


def format_results(results: pd.DataFrame) -> str:
  """The results as a terminal table (the names stand for the overrides), errors and contended
  members below it."""
  columns = [c for c in _TABLE_COLUMNS if c in results.columns]
  if MOE_STATS[-1] in results.columns:  # the routers' own statistics follow the MoE layers'
    columns += list(results.columns[results.columns.get_loc(MOE_STATS[-1]) + 1:-1])
  width = max(map(len, results["name"]), default=0)
  table = pd.DataFrame({"name".ljust(width): [name.ljust(width) for name in results["name"]],
                        "status": results["status"]})
  for column in columns:
    header, fmt = _TABLE_COLUMNS.get(column, (column, "{:.3f}".format))
    table[header] = [fmt(v) if pd.notna(v) else "" for v in results[column]]
  errors = [f"{name}: {error}" for name, status, error
            in zip(results["name"], results["status"], results["error"]) if status == "failed"]
  warnings = [f"Warning: {warning}" for warning in contention_warnings(results)]
  return "\n".join([table.to_string(index=False), *errors, *warnings])
