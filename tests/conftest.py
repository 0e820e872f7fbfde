"""Four host CPU devices for the data-parallel tests; for the default tier (``-m "not slow"``) XLA's
CPU backend at optimisation level 0 and without its fusion emitters (the older loop emitters) as
well, so that the tests' many small programs compile about a third and then another third faster
(every test compares numbers with tolerances, or within one setting). The slow experiment runs
(``-m slow``) and the benchmarks run with XLA's defaults.

JAX's persistent compilation cache is not used by the tests: with it, a pytest worker died of a
segmentation fault inside JAX's cache write (``compilation_cache.put_executable_and_time``, while
serialising the ViT's init program) in two full runs of the default tier, reproducibly in that
order and never alone; each process compiles its programs itself instead. Set before JAX initialises.
A later full run aborted inside XLA's compiler at the same test instead, so the likelier cause is
a long-lived worker's count of compiled programs (each maps its code; a process has at most
``vm.max_map_count`` mappings): every test module's compiled programs are dropped after it
(``jax.clear_caches``).

Shared fixtures: ``fashion_dir``, a Fashion-MNIST-layout directory of 256 training and 100 test
images for a module's end-to-end runs (modules that need other sizes call
``fashion_files.make_fashion_dir`` in a fixture of their own). Helpers shared by several test
modules live beside them: ``fashion_files``, ``runs`` (end-to-end runs), ``reference_ops`` and
``reference_vit`` (reference computations written independently of the library)."""
import os

import pytest
from fashion_files import make_fashion_dir


def pytest_configure(config):
    flags = [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]
    marks = config.getoption("markexpr") or ""
    if "slow" not in marks or "not slow" in marks:
        flags += ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]
    os.environ["XLA_FLAGS"] = " ".join(flags).strip()


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return make_fashion_dir(tmp_path_factory.mktemp("fashion"), 256, 100)


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drops the module's compiled programs after it, so a worker's count stays bounded."""
    yield
    import jax
    jax.clear_caches()
