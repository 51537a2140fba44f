"""Test setup: 8 host CPU devices (for the sharding tests), set before jax is imported; and the
directory that pytest-xdist workers share for what is expensive to build."""
import contextlib
import fcntl
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@contextlib.contextmanager
def shared_dir(tmp_path_factory, name):
  """`name` in a directory all pytest-xdist workers of this session share (make test runs two),
  held under a lock: the first worker builds what the tests need there, the others find it."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # this session's, common to its workers
  with open(base / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield base / name


@contextlib.contextmanager
def registered_routers():
  """Leaves the router registry as it found it: routers that a test registers (importing
  examples/temperature_router.py, say) would otherwise join the router lists that other tests'
  messages name. Their modules are forgotten too, so that importing them registers them again."""
  from moe_jax import routers
  import sys
  before, modules = dict(routers.REGISTRY), set(sys.modules)
  try:
    yield
  finally:
    routers.REGISTRY.clear()
    routers.REGISTRY.update(before)
    for name in set(sys.modules) - modules:
      if name.startswith("examples"):
        del sys.modules[name]
