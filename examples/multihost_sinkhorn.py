"""Sinkhorn with the source points split over the devices of several processes.

Run one copy per host (here: per process on one machine), e.g. two processes with
four CPU devices each::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python examples/multihost_sinkhorn.py --process-id 0 --num-processes 2 &
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python examples/multihost_sinkhorn.py --process-id 1 --num-processes 2

On a cluster with a scheduler that `jax.distributed.initialize()` understands (SLURM,
Cloud TPU, ...) the arguments can be dropped. Every process runs the same program
(SPMD): it builds the same problem, `otlab.sharding.shard` places each process's rows
of ``x`` on its own devices, and the solver's reductions combine partial results across
all devices of all processes. Process 0 prints the entropic cost and compares it with
a single-device solve of the same problem.
"""

from __future__ import annotations

import argparse

import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--coordinator", default="localhost:12355")
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args()

    if args.num_processes is not None:
        # CPU devices of several processes talk through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    jax.config.update("jax_enable_x64", True)

    import jax.numpy as jnp

    import otlab

    # The same data on every process (same seed): each keeps its own rows.
    x = jax.random.normal(jax.random.key(0), (args.n, 3))
    y = jax.random.normal(jax.random.key(1), (args.n // 2, 3)) + 1.0
    mesh = otlab.sharding.default_mesh()  # every device of every process
    geom = otlab.sharding.shard(otlab.PointCloud(x, y), mesh)
    sol = jax.jit(lambda g: otlab.sinkhorn(g, epsilon=0.1, tol=1e-9).reg_cost)(geom)
    cost = float(sol)  # replicated: readable on every process

    if jax.process_index() == 0:
        ref = otlab.sinkhorn(otlab.PointCloud(x, y), epsilon=0.1, tol=1e-9).reg_cost
        print(
            f"processes={jax.process_count()} devices={jax.device_count()} "
            f"reg_cost={cost:.12f} single_device={float(ref):.12f} "
            f"diff={abs(cost - float(ref)):.2e}",
            flush=True,
        )
    jnp.zeros(()).block_until_ready()


if __name__ == "__main__":
    main()
