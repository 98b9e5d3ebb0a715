"""What every stage's run shares: distributed start-up, the mesh and rules, the workdir, and
placing process-local batches as global arrays sharded by the rules table's `batch` axes."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.train import cluster as cluster_lib
from rlhf_jax.train.logging import write_json_atomic


def initialize_distributed(cfg) -> None:
    """`jax.distributed.initialize` when the config asks for several processes: explicitly
    (`distributed.num_processes=N` > 1 with `process_id` and `coordinator_address`), or with
    `num_processes=0` when a launcher (srun, mpirun, a TPU pod slice) started this process among
    others, JAX then reading the coordinator, the count and this process's index from the
    launcher's environment. Once per process: the pipeline's stages share it."""
    dist = cfg.get("distributed")
    if dist is None or jax.distributed.is_initialized():
        return
    n = cluster_lib.requested_processes(dist)
    if n == cluster_lib.AUTO:
        info = cluster_lib.current_cluster()
        if info is None or info.num_processes <= 1:
            return
        if info.method == "mpi4py" and importlib.util.find_spec("mpi4py") is None:
            raise ValueError(f"Open MPI started {info.num_processes} processes without OMPI_MCA_orte_hnp_uri (Open "
                             f"MPI 5): JAX finds the coordinator through mpi4py; pip install mpi4py, or give "
                             f"distributed.num_processes, process_id and coordinator_address")
        kwargs = dict(cluster_detection_method=info.method)
    elif n == 1:
        _warn_if_launched_as_several()
        return
    else:
        kwargs = dict(coordinator_address=dist.coordinator_address, num_processes=n, process_id=int(dist.process_id))
    # Cross-process collectives on the CPU backend (tests, CPU clusters); GPU/TPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def _warn_if_launched_as_several() -> None:
    """srun/mpirun started several copies of a single-process run: each would run alone in the
    same workdir. Only a warning, since `num_processes=1` is what the user asked for."""
    try:
        info = cluster_lib.detect_cluster(os.environ)
    except ValueError:
        return
    if info is not None and info.num_processes > 1:
        warnings.warn(f"{info.launcher} started {info.num_processes} processes but distributed.num_processes=1 runs "
                      f"each alone; --config.distributed.num_processes=0 joins them into one run", stacklevel=2)


class Runtime:
    """The mesh, the sharding rules and the workdir of a running stage."""

    def __init__(self, cfg, workdir: str | Path):
        initialize_distributed(cfg)
        self.cfg, self.workdir = cfg, Path(workdir)
        self.mesh = sharding_lib.mesh_from_config(cfg.mesh)
        self.rules = sharding_lib.rules_from_config(cfg.get("sharding_rules"))
        self.batch_spec = sharding_lib.logical_to_spec(("batch",), self.rules)
        self.is_main = jax.process_index() == 0
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.workdir / "config.json", cfg.to_dict())

    def batch_sharding(self, ndim: int, stacked: bool = False) -> NamedSharding:
        """[B, ...] with B over the batch axes; `stacked`: [A, B, ...] with A replicated."""
        lead = (None,) if stacked else ()
        return NamedSharding(self.mesh, P(*lead, *self.batch_spec, *([None] * (ndim - len(lead) - 1))))

    def packed_rows_multiple(self, multiple: int) -> int:
        """The row count packed preference batches are rounded up to a multiple of: `multiple`'s
        least common multiple with the batch shards and the processes, so rows split evenly."""
        return int(np.lcm.reduce([int(multiple), sharding_lib.batch_shards(self.mesh, self.rules),
                                  jax.process_count()]))

    def to_global(self, arrays, stacked: bool = False) -> list[jax.Array]:
        """Process-local numpy slices -> global jax arrays sharded over the batch axes."""
        out = []
        for a in arrays:
            a = np.asarray(a)
            axis = 1 if stacked else 0
            global_shape = list(a.shape)
            global_shape[axis] *= jax.process_count()
            out.append(jax.make_array_from_process_local_data(self.batch_sharding(a.ndim, stacked), a,
                                                              tuple(global_shape)))
        return out

    def batch_shardings(self, batch: dict, stacked: bool = True) -> dict:
        """The sharding of every array of a batch dict, as `to_global` places them."""
        return {k: self.batch_sharding(np.ndim(v), stacked) for k, v in batch.items()}
