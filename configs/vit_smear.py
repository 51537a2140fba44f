"""ViT on fashion_mnist with router 'smear' (SMEAR, Muqeeth et al. 2023: each image's mean router
probabilities average the 8 experts' parameters into one FFN that all its tokens run through),
the experts at the dense FFN's width: the active FLOPs are dense's plus the router and the merge
(E x one expert's parameters multiply-adds per image, 8/50 of an FFN per token;
models/common.py). Group size 50, one image (49 patches + class token), the paper's routing
unit; dispatch path 'merge' (not expert-parallel). No balancing loss; the routing statistic
merge_entropy is the mean entropy of the images' merge weights (ln 8 = 2.08 when uniform).

  python -m experiments.train --config configs/vit_smear.py --workdir runs/vit_smear

Not yet measured; a member of configs/sweeps/zoo.py.
"""
from configs import common


def get_config():
  return common.vit("smear")
