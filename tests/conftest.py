"""Test setup, before jax is imported: 8 host CPU devices (for the sharding tests), compilation
made cheap (FAST_COMPILE, and a compilation cache that the session's processes share); and the
directory that pytest-xdist workers share for what is expensive to build."""
import contextlib
import fcntl
import os
import shutil
import tempfile

# The tests compile far more than they run (tiny models): LLVM at -O0 cut the time of the mesh
# train-step tests by 26% (81 s -> 60 s, measured), and the tests that train ran no slower.
# Subprocesses that set their own XLA_FLAGS (one CPU device, say) start from this.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILE,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session: the pytest-xdist workers and the runs that
# tests launch as subprocesses (the same tiny models, often) compile each program once; a killed
# run's resume compiled nothing new (the resume test 39 s -> 26 s). Created by the first process
# to load this file (the xdist controller), whose environment the workers inherit. No size limit:
# with one, every write scans the whole directory (the suite slowed to half speed, measured). An
# entry read while another process writes it fails to decompress: JAX warns and compiles.
CACHE_OWNER = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if CACHE_OWNER:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_jax_tests_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
  del config
  if CACHE_OWNER:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
  messages name. Their modules are forgotten too, so that importing them registers them again,
  and so is the last --config file (ml_collections' 'config_config', which may be a router's
  file: routers.import_module would take it for that router's module)."""
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
    sys.modules.pop("config_config", None)
