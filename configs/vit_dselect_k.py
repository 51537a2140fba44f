"""ViT on fashion_mnist with router 'dselect_k' (DSelect-k, Hazimeh et al. 2021: k = 2 selectors,
each log2(E) smooth steps (gamma 1) over the binary codes of the experts, mixed by a softmax;
entropy regularizer at aux_loss_weight 1e-2), its experts sized for 2 per token (common.py); a
token uses every expert its gates do not zero, up to E before the selectors saturate and at most
k after: the routing statistic experts_per_token.

  python -m experiments.train --config configs/vit_dselect_k.py --workdir runs/vit_dselect_k

Not yet measured; a member of configs/sweeps/zoo.py.
"""
from configs import common


def get_config():
  return common.vit("dselect_k")
