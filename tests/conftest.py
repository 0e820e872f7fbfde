"""Four host CPU devices for the data-parallel tests; for the default tier (``-m "not slow"``) XLA's
CPU backend at optimisation level 0 as well, so that the tests' many small programs compile about
a third faster (every test compares numbers with tolerances, or within one setting). The slow
experiment runs (``-m slow``) and the benchmarks run at XLA's default level. Set before JAX
initialises."""
import os


def pytest_configure(config):
    flags = [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]
    marks = config.getoption("markexpr") or ""
    if "slow" not in marks or "not slow" in marks:
        flags.append("--xla_backend_optimization_level=0")
    os.environ["XLA_FLAGS"] = " ".join(flags).strip()
