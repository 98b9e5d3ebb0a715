"""Which cluster launcher started this process, read from the environment before JAX starts.

`distributed.num_processes=0` asks for this: under SLURM's `srun`, Open MPI's `mpirun` or on a
Cloud TPU pod slice every process runs the same command, and `jax.distributed.initialize` learns
the coordinator, the number of processes and this process's index from the launcher.
`detect_cluster` reads the environment variables that JAX's own detection reads
(`jax._src.clusters` in jax 0.10, tried in JAX's order) without starting anything, so that

- the workdir knows which process is process 0 before JAX may touch a backend;
- `initialize_distributed` tells JAX which detection to use (`ClusterInfo.method`), so JAX and
  this module agree on the cluster;
- a launch that would hang or silently run alone (a multi-task allocation without `srun`, a
  rank out of range) is a one-line error naming the variable.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping

AUTO = 0  # distributed.num_processes: detect the cluster from the environment


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """A launcher's processes: `kind` ('slurm', 'ompi', 'tpu'), their number, this process's
    index, and `method`, the `cluster_detection_method` that makes JAX read the same cluster."""
    kind: str
    num_processes: int
    process_id: int
    method: str

    @property
    def launcher(self) -> str:
        return {"slurm": "SLURM (srun)", "ompi": "Open MPI (mpirun)", "tpu": "the TPU pod slice"}[self.kind]


def requested_processes(dist) -> int:
    """`distributed.num_processes` checked: 0 (detect, `AUTO`), 1, or N > 1 given explicitly."""
    dist = dist or {}
    n = int(dist.get("num_processes", 1))
    if n < 0:
        raise ValueError(f"distributed.num_processes={n}: use 0 (detect the cluster from the environment), 1, "
                         f"or N > 1 with distributed.process_id and distributed.coordinator_address")
    if n == AUTO and int(dist.get("process_id", 0) or 0) != 0:
        raise ValueError(f"distributed.process_id={dist.get('process_id')} with distributed.num_processes=0: the "
                         f"launcher gives each process its index; leave process_id at 0, or give num_processes=N")
    return n


def _int(environ: Mapping[str, str], name: str, fix: str) -> int:
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer; {fix}") from None


def _checked(info: ClusterInfo, count_var: str, id_var: str, fix: str) -> ClusterInfo:
    if info.num_processes < 1 or not 0 <= info.process_id < info.num_processes:
        raise ValueError(f"{id_var}={info.process_id} is not in [0, {count_var}={info.num_processes}); {fix}")
    return info


def _ompi(environ: Mapping[str, str]) -> ClusterInfo:
    fix = "start the command with mpirun, or give distributed.num_processes=N explicitly"
    n = _int(environ, "OMPI_COMM_WORLD_SIZE", fix)
    rank = _int(environ, "OMPI_COMM_WORLD_RANK", fix)
    # Open MPI <= 4's mpirun names its own address (JAX's 'ompi' detection). Open MPI 5 (PRRTE)
    # does not; there JAX finds rank 0's host through mpi4py.
    method = "ompi" if "OMPI_MCA_orte_hnp_uri" in environ else "mpi4py"
    return _checked(ClusterInfo("ompi", n, rank, method), "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", fix)


# What JAX's SlurmCluster needs, all of them; srun sets the step's node list, a batch script or
# an `salloc` shell has the allocation's task count without it.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _slurm(environ: Mapping[str, str]) -> ClusterInfo | None:
    fix = "start the command with srun (one task per GPU or host)"
    missing = [v for v in _SLURM_VARS if v not in environ]
    if missing:
        # A shell on an allocated node (ssh, a batch script) is a single process unless the
        # allocation has several tasks: then the user meant srun, and running alone would be wrong.
        if "SLURM_JOB_ID" in environ and "SLURM_NTASKS" in environ and _int(environ, "SLURM_NTASKS", fix) > 1:
            raise ValueError(f"SLURM_NTASKS={environ['SLURM_NTASKS']} but {', '.join(missing)} unset: this process "
                             f"was not started by srun, and would run alone; {fix}, or ask for --ntasks=1")
        return None
    n = _int(environ, "SLURM_NTASKS", fix)
    step = environ.get("SLURM_STEP_NUM_TASKS")
    if step is not None and _int(environ, "SLURM_STEP_NUM_TASKS", fix) != n:
        raise ValueError(f"SLURM_NTASKS={n} but this srun step has SLURM_STEP_NUM_TASKS={step}: JAX would wait for "
                         f"{n} processes; run srun with --ntasks={n}, or unset SLURM_NTASKS before srun")
    _int(environ, "SLURM_LOCALID", fix)  # JAX gives process i of a node its i-th local device
    return _checked(ClusterInfo("slurm", n, _int(environ, "SLURM_PROCID", fix), "slurm"), "SLURM_NTASKS",
                    "SLURM_PROCID", fix)


def _gke_tpu(environ: Mapping[str, str]) -> ClusterInfo | None:
    hosts = environ.get("TPU_PROCESS_ADDRESSES", environ.get("TPU_WORKER_HOSTNAMES"))
    if hosts is None:
        return None
    fix = "these are set by the TPU pod's launcher (GKE / JobSet); check the workload's environment"
    per_slice = len(hosts.split(","))
    slices = _int(environ, "MEGASCALE_NUM_SLICES", fix) if environ.get("MEGASCALE_NUM_SLICES") else 1
    slice_id = _int(environ, "MEGASCALE_SLICE_ID", fix) if environ.get("MEGASCALE_SLICE_ID") else 0
    worker = _int(environ, "TPU_WORKER_ID", fix)
    if not 0 <= worker < per_slice:
        raise ValueError(f"TPU_WORKER_ID={worker} but the slice has {per_slice} workers (TPU_WORKER_HOSTNAMES); {fix}")
    if slices < 1 or not 0 <= slice_id < slices:
        raise ValueError(f"MEGASCALE_SLICE_ID={slice_id} is not in [0, MEGASCALE_NUM_SLICES={slices}); {fix}")
    return ClusterInfo("tpu", per_slice * slices, worker + slice_id * per_slice, "gketpu")


def detect_cluster(environ: Mapping[str, str], tpu_vm: bool = False) -> ClusterInfo | None:
    """The launcher that `environ` describes, or None: Open MPI's mpirun (`OMPI_COMM_WORLD_*`),
    SLURM's srun (`SLURM_NTASKS`, `SLURM_PROCID`, ...), a TPU pod slice under GKE
    (`TPU_WORKER_HOSTNAMES`, `TPU_WORKER_ID`, `MEGASCALE_*`; only when `tpu_vm`, JAX having found
    TPU chips). Pure: reads `environ` only. A 1-process launch is returned too (nothing to join).
    Raises ValueError, naming the variable, when the environment contradicts itself."""
    if "OMPI_COMM_WORLD_SIZE" in environ or "OMPI_MCA_orte_hnp_uri" in environ:
        return _ompi(environ)  # first, as in JAX: mpirun inside a SLURM job also leaves SLURM_* set
    slurm = _slurm(environ)
    if slurm is not None:
        return slurm
    return _gke_tpu(environ) if tpu_vm else None


def _on_cloud_tpu_vm() -> bool:
    """Whether JAX found TPU chips and libtpu (set when `jax` is imported; no backend starts)."""
    import jax  # noqa: F401  (the import runs JAX's Cloud TPU check)
    from jax._src import cloud_tpu_init
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


@functools.cache
def _gce_tpu_cluster() -> ClusterInfo | None:
    """A TPU VM slice created with `gcloud compute tpus tpu-vm create`: its environment names no
    workers, JAX asks the metadata server (the answer does not change while the VM runs)."""
    from jax._src.clusters import GceTpuCluster
    if not GceTpuCluster.is_env_present():
        return None
    info = ClusterInfo("tpu", int(GceTpuCluster.get_process_count()), int(GceTpuCluster.get_process_id()), "gcetpu")
    return _checked(info, "TPU workers", "agent-worker-number", "check the TPU VM's metadata")


def current_cluster() -> ClusterInfo | None:
    """`detect_cluster` on this process's environment, and on a Cloud TPU VM that the environment
    does not describe, JAX's own metadata-server query."""
    tpu_vm = _on_cloud_tpu_vm()
    info = detect_cluster(os.environ, tpu_vm=tpu_vm)
    if info is None and tpu_vm:
        info = _gce_tpu_cluster()
    return info
