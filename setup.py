"""moe-jax: Mixture-of-Experts routing research in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="moe-jax",
    version="0.1.0",
    description="Mixture-of-Experts routing experiments in JAX/Flax",
    packages=find_packages(include=["moe_jax", "moe_jax.*"]),
    python_requires=">=3.11",
    install_requires=["jax", "flax", "optax", "orbax-checkpoint", "ml_collections",
                      "tensorflow-datasets", "grain", "array_record", "importlib_resources",
                      "tensorboardX", "tqdm", "pandas", "matplotlib", "papermill", "nbconvert",
                      "nbformat"],
)
