"""The local Ray cluster each cluster test module starts once: 2 CPUs and 2 logical GPUs (Ray only counts GPUs, so
GPU scheduling is exercised on a CPU machine), a small object store, no dashboard, quiet."""

from __future__ import annotations

import ray


def start_test_cluster() -> None:
    ray.init(num_cpus=2, num_gpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
