"""Connecting to Ray: a running cluster when one is named, else the embedded local default."""

from __future__ import annotations

import os

from pipeline.config import RunSection


def init_ray(cfg: RunSection, *, object_store_gib: float = 1.0) -> dict:
    """Connect to ``run.ray_address`` or ``RAY_ADDRESS`` (set by `ray job submit`), else start a local Ray.

    Returns the cluster's resources. The local Ray keeps its dashboard on: `ray job submit` and Ray Train's
    controller both need it.
    """
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.ray_num_cpus or os.cpu_count(),
            object_store_memory=int(object_store_gib * 2**30),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
        )
    return ray.cluster_resources()


def dashboard_url() -> str | None:
    import ray

    ctx = ray.get_runtime_context()
    url = getattr(ctx, "dashboard_url", None) or ray.worker.get_dashboard_url()
    return f"http://{url}" if url and not url.startswith("http") else url
