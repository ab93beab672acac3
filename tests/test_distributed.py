"""Joining a multi-process run: when `memjax.distributed.initialize` joins, and its errors.

The joining itself runs in tests/test_multihost.py, in processes of their own.
"""

import pytest

from memjax import config, config_loading, distributed
from memjax.training import inputs


@pytest.fixture
def no_cluster(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


@pytest.mark.parametrize(
    "env, launcher",
    [
        ({}, None),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # one TPU VM
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "Cloud TPU pod"),
        ({"SLURM_NTASKS": "1"}, None),
        ({"SLURM_NTASKS": "16"}, "Slurm"),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ],
)
def test_the_launcher_is_detected_from_its_variables(no_cluster, env, launcher):
  for name, value in env.items():
    no_cluster.setenv(name, value)
  assert distributed.detected_launcher() == launcher


def test_one_process_without_a_cluster_does_not_join(no_cluster):
  assert distributed.initialize(config.DistributedConfig()) is None
  assert distributed.initialize(config.DistributedConfig(initialize="off")) is None


def test_a_coordinator_without_the_process_count_is_refused(no_cluster):
  no_cluster.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  with pytest.raises(config.ConfigError, match="set distributed.num_processes"):
    distributed.initialize(config.DistributedConfig())


@pytest.mark.parametrize(
    "override, field",
    [
        ("distributed.coordinator=localhost", "distributed.coordinator"),
        ("distributed.process_id=-2", "distributed.process_id"),
        ("distributed.num_processes=-1", "distributed.num_processes"),
        ("distributed.initialize=maybe", "distributed.initialize"),
        ("data.shards=3", "data.shards"),  # does not divide the batch of 16
        ("data.shards=-1", "data.shards"),
    ],
)
def test_bad_settings_name_their_field(override, field):
  with pytest.raises(config.ConfigError) as error:
    config_loading.load("tiny", ["distributed.num_processes=2", "distributed.process_id=1", override])
  assert error.value.field == field


@pytest.mark.parametrize(
    "shards, processes, index, want",
    [(0, 1, 0, (1, [0])), (0, 4, 2, (4, [2])), (8, 2, 1, (8, [4, 5, 6, 7])), (4, 4, 3, (4, [3]))],
)
def test_each_process_reads_a_contiguous_block_of_shards(shards, processes, index, want):
  cfg = config_loading.load("tiny", [f"data.shards={shards}"])
  count, ids = inputs.data_shards(cfg, index, processes)
  assert (count, list(ids)) == want


def test_shards_that_the_processes_cannot_share_evenly_are_refused():
  with pytest.raises(config.ConfigError, match="multiple of the 4 processes"):
    inputs.data_shards(config_loading.load("tiny", ["data.shards=2"]), 0, 4)
  with pytest.raises(config.ConfigError, match="multiple of the 32 data shards"):
    inputs.data_shards(config_loading.load("tiny", ["train.batch_size=16"]), 0, 32)
