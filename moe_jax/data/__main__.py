"""python -m moe_jax.data: the sizes of multidomain_bytes's default corpus (built if needed), as
docs/DATA.md quotes them."""
import ml_collections

from moe_jax.data import multidomain, sources

corpus = sources.open_dataset(ml_collections.ConfigDict({"name": "multidomain_bytes"}))
print(f"{corpus.builder.builder_config.name}: {corpus.builder.builder_config.description}\n")
print(multidomain.size_table(corpus.builder))
