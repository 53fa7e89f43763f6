"""The build's decode pool: how many threads a worker decodes with, and how many cores a GPU
worker is given on a Ray cluster (its node's share, so every GPU can still take a worker)."""

from __future__ import annotations

import pytest

from featurecache.pipelines.precompute.config import MAX_DECODE_THREADS, BuildConfig, BuildError
from featurecache.pipelines.precompute.precompute import gpu_worker_cpus


def _config(**kw) -> BuildConfig:
    return BuildConfig(frames=["f.tar"], teacher="t", layers=["4"], out="o", **kw)


@pytest.mark.parametrize(
    ("cores", "device", "threads"),
    [(12, "cuda", 12), (1, "cuda", 1), (200, "cuda", MAX_DECODE_THREADS), (2, "cpu", 2),
     (16, "cpu", 4), (400, "cpu", MAX_DECODE_THREADS)],
)  # fmt: skip
def test_decode_threads_follow_the_cores_given(cores, device, threads) -> None:
    assert _config().decode_threads_for(cores, device) == threads


def test_decode_threads_set_by_the_user_win() -> None:
    assert _config(decode_threads=3).decode_threads_for(64, "cuda") == 3
    with pytest.raises(BuildError, match="decode_threads"):
        _config(decode_threads=0)


def _node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    resources = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    return {"Alive": alive, "Resources": resources}


def test_a_gpu_worker_gets_its_nodes_share_of_cores() -> None:
    # a CPU-only head with many cores does not inflate the GPU workers' share
    assert gpu_worker_cpus([_node(64), _node(16, 8)], 1.0) == 2
    # nodes of different shapes: the smallest share, so every GPU can hold a worker
    assert gpu_worker_cpus([_node(96, 8), _node(48, 8)], 1.0) == 6
    assert gpu_worker_cpus([_node(96, 8)], 0.5) == 6  # two workers per GPU
    assert gpu_worker_cpus([_node(96, 8)], 2.0) == 24  # a worker spans two GPUs
    assert gpu_worker_cpus([_node(96, 1)], 2.0) == 96  # one worker, however many GPUs it asks
    assert gpu_worker_cpus([_node(2, 8)], 1.0) == 1  # never less than one core
    assert gpu_worker_cpus([_node(8, 8, alive=False), _node(32, 4)], 1.0) == 8
    assert gpu_worker_cpus([_node(32)], 1.0) == 1  # no GPU node: the minimum
