"""Every test process sees 8 CPU devices, so sharding tests run on a laptop and in CI.

The flags must be set before jax is first imported; tests that want one device build their
mesh on `jax.devices()[:1]`. The suite's time is mostly XLA compiling hundreds of tiny
programs: at LLVM's optimisation level 0 a compile-bound part of the suite takes half the
time (187 s -> 89 s, experiments/results/cpu/test_compile_level.txt), and at these shapes the
programs run in milliseconds either way (tests compare within tolerances, or runs of the same
process with each other; the CLI tests run their subprocesses with the default flags). For the
same reason the CPU backend emits fusions with its older LLVM IR emitters rather than its MLIR
fusion emitters (the default), which take about twice as long to compile these programs: the
in-process tests of tests/{hf,peft,quant,nn,data,attention,moe,infer}, 914 of them, take 260 s
instead of 411 s in one process, and results move by a few ulps (relative 1e-7 to 1e-6).
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0'
                           ' --xla_cpu_use_fusion_emitters=false').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
