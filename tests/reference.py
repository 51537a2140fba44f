"""Naive loop implementations of routing, written from docs/ROUTING.md independently of moe_jax."""
import numpy as np


def tokens_choose(probs, k, capacity, batch_prioritized=False, renormalize=False, mask=None):
  """probs [G,S,E] -> (dispatch [G,S,E,C] bool, combine [G,S,E,C]) by explicit queues."""
  num_groups, group_size, num_experts = probs.shape
  dispatch = np.zeros((num_groups, group_size, num_experts, capacity), bool)
  combine = np.zeros(dispatch.shape, np.float64)
  for g in range(num_groups):
    choices = [sorted(range(num_experts), key=lambda e: (-probs[g, s, e], e))[:k]
               for s in range(group_size)]
    order = list(range(group_size))
    if batch_prioritized:
      order.sort(key=lambda s: -probs[g, s].max())
    used = [0] * num_experts
    for rank in range(k):
      for s in order:
        if mask is not None and not mask[g, s]:
          continue
        e = choices[s][rank]
        if used[e] < capacity:
          gate = probs[g, s, e]
          if renormalize:
            gate /= sum(probs[g, s, c] for c in choices[s])
          dispatch[g, s, e, used[e]] = True
          combine[g, s, e, used[e]] = gate
          used[e] += 1
  return dispatch, combine


def moe_forward(x, probs_fn, experts, k, capacity, renormalize=False):
  """Token-by-token MoE output: y_s = sum over kept choices of gate * expert_e(x_s).

  x [G,S,M]; probs_fn(x) -> [G,S,E]; experts: list of callables [M] -> [M].
  """
  probs = probs_fn(x)
  _, combine = tokens_choose(probs, k, capacity, renormalize=renormalize)
  y = np.zeros_like(x)
  for g, s, e, c in zip(*np.nonzero(combine)):
    y[g, s] += combine[g, s, e, c] * experts[e](x[g, s])
  return y
