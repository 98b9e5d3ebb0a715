"""What every stage's run shares: distributed start-up, the mesh and rules, the workdir, and
placing process-local batches as global arrays sharded by the rules table's `batch` axes."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import sharding as sharding_lib
from rlhf_jax.train.logging import write_json_atomic


def initialize_distributed(cfg) -> None:
    """`jax.distributed.initialize` when the config asks for several processes."""
    dist = cfg.get("distributed")
    if dist is None or int(dist.get("num_processes", 1)) <= 1:
        return
    # Cross-process collectives on the CPU backend (tests, CPU clusters); GPU/TPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=dist.coordinator_address, num_processes=int(dist.num_processes),
                               process_id=int(dist.process_id))


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
