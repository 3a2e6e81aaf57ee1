"""Test set-up: CPU only, 4 simulated devices so sharded code paths run in every test."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
