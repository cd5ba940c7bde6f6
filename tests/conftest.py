"""Every test process sees 8 CPU devices, so sharding tests run on a laptop and in CI.

The flag must be set before jax is first imported; tests that want one device build their
mesh on `jax.devices()[:1]`.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
