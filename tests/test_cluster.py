"""Cluster launch with `distributed.num_processes=0`: which launcher the environment describes
(fake environments), what the workdir and `initialize_distributed` do with it, and two local
processes that JAX itself joins from a fake srun step and a fake mpirun."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from ml_collections import ConfigDict

from rlhf_jax.train import cluster, runtime, workdir
from rlhf_jax.train.cluster import ClusterInfo, detect_cluster

ROOT = Path(__file__).resolve().parents[1]

# What srun gives task 2 of a 4-task step on two nodes.
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_STEP_NODELIST": "node[001-002]",
        "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
# A batch script's own shell in a 4-task allocation: the allocation's variables, no step.
SBATCH_SHELL = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_NTASKS": "4",
                "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
MPIRUN4 = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
GKE_TPU = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "1", "MEGASCALE_NUM_SLICES": "2",
           "MEGASCALE_SLICE_ID": "1"}
_ALL = {*SRUN, *SBATCH_SHELL, *MPIRUN4, *GKE_TPU, "TPU_PROCESS_ADDRESSES", "JAX_COORDINATOR_ADDRESS"}


def _cfg(num_processes=0, process_id=0):
    return ConfigDict(dict(distributed=dict(num_processes=num_processes, process_id=process_id,
                                            coordinator_address="localhost:12355")))


@pytest.fixture
def env(monkeypatch):
    """Sets a fake launcher environment on this process (a clean one first), no TPU."""
    for k in _ALL:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(cluster, "_on_cloud_tpu_vm", lambda: False)

    def set_env(values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)
    return set_env


@pytest.fixture
def calls(monkeypatch):
    """Records `jax.distributed.initialize` instead of starting it (and restores the CPU
    collectives setting that `initialize_distributed` changes)."""
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    before = jax.config.jax_cpu_collectives_implementation
    yield recorded
    jax.config.update("jax_cpu_collectives_implementation", before)


def test_no_launcher_is_no_cluster():
    assert detect_cluster({}) is None
    assert detect_cluster({"HOME": "/home/me", "PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"}) is None
    # ssh into a node of an allocation: the job's id, no tasks to join.
    assert detect_cluster({"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node001"}) is None
    assert detect_cluster(dict(SBATCH_SHELL, SLURM_NTASKS="1")) is None


def test_srun_step():
    assert detect_cluster(SRUN) == ClusterInfo("slurm", 4, 2, "slurm")
    assert detect_cluster(dict(SRUN, SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")) == \
        ClusterInfo("slurm", 1, 0, "slurm")


@pytest.mark.parametrize("change, variable", [
    ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 is not in"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
    ({"SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NUM_TASKS=2"),
])
def test_inconsistent_srun_step_names_the_variable(change, variable):
    with pytest.raises(ValueError, match=variable):
        detect_cluster(dict(SRUN, **change))


def test_a_multi_task_allocation_without_srun_is_an_error_not_a_lone_run():
    with pytest.raises(ValueError, match="SLURM_NTASKS=4 but SLURM_STEP_NODELIST unset.*srun"):
        detect_cluster(SBATCH_SHELL)


def test_mpirun_comes_first_even_inside_a_slurm_job():
    # mpirun started inside an sbatch script: its daemons' step leaves SLURM_* set as well.
    assert detect_cluster(dict(SRUN, **MPIRUN4)) == ClusterInfo("ompi", 4, 3, "ompi")
    # Open MPI 5 (PRRTE) names no launcher address: JAX joins through mpi4py.
    ompi5 = {k: v for k, v in MPIRUN4.items() if k != "OMPI_MCA_orte_hnp_uri"}
    assert detect_cluster(ompi5) == ClusterInfo("ompi", 4, 3, "mpi4py")
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK=4 is not in"):
        detect_cluster(dict(MPIRUN4, OMPI_COMM_WORLD_RANK="4"))
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_SIZE=None"):
        detect_cluster({"OMPI_MCA_orte_hnp_uri": MPIRUN4["OMPI_MCA_orte_hnp_uri"]})


def test_gke_tpu_pod_slices_only_where_jax_found_a_tpu():
    # Worker 1 of slice 1, 4 workers a slice, 2 slices.
    assert detect_cluster(GKE_TPU, tpu_vm=True) == ClusterInfo("tpu", 8, 5, "gketpu")
    assert detect_cluster(GKE_TPU) is None
    addresses = dict(GKE_TPU, TPU_PROCESS_ADDRESSES="a:1,b:1", TPU_WORKER_ID="1", MEGASCALE_NUM_SLICES="",
                     MEGASCALE_SLICE_ID="")  # TPU_PROCESS_ADDRESSES wins, as in JAX; empty = 1 slice
    assert detect_cluster(addresses, tpu_vm=True) == ClusterInfo("tpu", 2, 1, "gketpu")
    with pytest.raises(ValueError, match="TPU_WORKER_ID=4"):
        detect_cluster(dict(GKE_TPU, TPU_WORKER_ID="4"), tpu_vm=True)
    with pytest.raises(ValueError, match="MEGASCALE_SLICE_ID=2"):
        detect_cluster(dict(GKE_TPU, MEGASCALE_SLICE_ID="2"), tpu_vm=True)


def test_gce_tpu_vm_asks_jax_metadata_query(env, monkeypatch):
    from jax._src.clusters import GceTpuCluster
    monkeypatch.setattr(cluster, "_on_cloud_tpu_vm", lambda: True)
    monkeypatch.setattr(GceTpuCluster, "is_env_present", classmethod(lambda cls: True))
    monkeypatch.setattr(GceTpuCluster, "get_process_count", classmethod(lambda cls: 4))
    monkeypatch.setattr(GceTpuCluster, "get_process_id", classmethod(lambda cls: 2))
    cluster._gce_tpu_cluster.cache_clear()
    try:
        assert cluster.current_cluster() == ClusterInfo("tpu", 4, 2, "gcetpu")
        assert not workdir._is_main(_cfg().to_dict())
        env(GKE_TPU)  # the environment, when it names the workers, is read without asking
        assert cluster.current_cluster() == ClusterInfo("tpu", 8, 5, "gketpu")
    finally:
        cluster._gce_tpu_cluster.cache_clear()


def test_is_main_follows_the_launcher_in_auto_mode_only(env):
    auto = _cfg().to_dict()
    assert workdir._is_main(auto)  # no launcher: the one process
    env(SRUN)
    assert not workdir._is_main(auto)  # SLURM_PROCID=2
    assert workdir._is_main(_cfg(num_processes=1).to_dict())  # the default ignores the launcher
    assert workdir._is_main(_cfg(num_processes=2, process_id=0).to_dict())  # explicit wins
    assert not workdir._is_main(_cfg(num_processes=2, process_id=1).to_dict())
    env({"SLURM_PROCID": "0"})
    assert workdir._is_main(auto)
    env(MPIRUN4)
    assert not workdir._is_main(auto)  # OMPI_COMM_WORLD_RANK=3
    env({"OMPI_COMM_WORLD_RANK": "0"})
    assert workdir._is_main(auto)


def test_initialize_lets_jax_read_the_detected_launcher(env, calls):
    runtime.initialize_distributed(_cfg())
    assert calls == []  # a laptop: nothing to join
    env(dict(SRUN, SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0"))
    runtime.initialize_distributed(_cfg())
    assert calls == []  # a 1-task allocation: nothing to join either
    env(SRUN)
    runtime.initialize_distributed(_cfg())
    assert calls == [{"cluster_detection_method": "slurm"}]
    env(MPIRUN4)
    runtime.initialize_distributed(_cfg())
    assert calls[-1] == {"cluster_detection_method": "ompi"}


def test_explicit_processes_take_precedence_over_the_launcher(env, calls):
    env(SRUN)
    runtime.initialize_distributed(_cfg(num_processes=2, process_id=1))
    assert calls == [{"coordinator_address": "localhost:12355", "num_processes": 2, "process_id": 1}]
    with pytest.warns(UserWarning, match="SLURM .srun. started 4 processes but distributed.num_processes=1"):
        runtime.initialize_distributed(_cfg(num_processes=1))
    assert len(calls) == 1


def test_user_errors_name_the_field_or_variable(env, calls, monkeypatch):
    with pytest.raises(ValueError, match="distributed.num_processes=-1"):
        runtime.initialize_distributed(_cfg(num_processes=-1))
    with pytest.raises(ValueError, match="distributed.process_id=3 with distributed.num_processes=0"):
        workdir._is_main(_cfg(process_id=3).to_dict())
    env(SBATCH_SHELL)
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
        workdir._is_main(_cfg().to_dict())
    env({k: v for k, v in MPIRUN4.items() if k != "OMPI_MCA_orte_hnp_uri"})
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install mpi4py"):
        runtime.initialize_distributed(_cfg())
    assert calls == []


_PROBE = """
import jax
from ml_collections import ConfigDict
from rlhf_jax.train import runtime, workdir
cfg = ConfigDict(dict(distributed=dict(num_processes=0, process_id=0, coordinator_address="unused")))
main = workdir._is_main(cfg.to_dict())
runtime.initialize_distributed(cfg)
print(jax.process_index(), jax.process_count(), main)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["slurm", "ompi"])
def test_two_local_processes_joined_by_jax_from_a_fake_launcher(launcher):
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in _ALL}
    base.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_PORT=str(port), PYTHONPATH=str(ROOT))

    def env(i):
        if launcher == "slurm":
            return dict(base, SLURM_JOB_ID="7", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                        SLURM_STEP_NUM_TASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
        return dict(base, OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://127.0.0.1:34911", OMPI_COMM_WORLD_SIZE="2",
                    OMPI_COMM_WORLD_RANK=str(i), OMPI_COMM_WORLD_LOCAL_RANK=str(i))

    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], cwd=ROOT, env=env(i), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert [out.split() for out, _ in outs] == [["0", "2", "True"], ["1", "2", "False"]]
