"""Every test process sees 8 CPU devices, so sharding tests run on a laptop and in CI.

The flags must be set before jax is first imported; tests that want one device build their
mesh on `jax.devices()[:1]`. The suite's time is mostly XLA compiling hundreds of tiny
programs: at LLVM's optimisation level 0 a compile-bound part of the suite takes half the
time (187 s -> 89 s, experiments/results/cpu/test_compile_level.txt), and at these shapes the
programs run in milliseconds either way (tests compare within tolerances, or runs of the same
process with each other; the CLI tests run their subprocesses with the default flags).
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
