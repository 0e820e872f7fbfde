"""Four host CPU devices for the data-parallel tests (must be set before JAX initialises)."""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]).strip()
