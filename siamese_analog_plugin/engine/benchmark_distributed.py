"""``bench --distributed``: the search on Dask against the single-process pipeline.

On one raster (the bench's texture; by default 50,176 cells of the model's input size, read
in blocks), it times :func:`~.search.run_search` end to end, outputs written:

* in this process (the threaded pipeline, every core);
* on a ``LocalCluster`` of 1, then 2, ... worker processes of one thread each, started
  beforehand, and their imports (torch, the engine) done (a real cluster is up before a run;
  both are printed apart); the search runs twice and the second is the figure (a cluster
  that stays up has loaded the model once; the first run's figures are printed too). A run's
  time includes connecting and sending the model;

and prints cells/s, the ratio of each Dask run to the single-process one on the same cores,
the per-task overhead (the workers' wall time not spent in a task's own reading and
encoding, per task), the round trip of an empty task, and the CPU time a cell costs in each
(this process's, with a LocalCluster's scheduler, plus the tasks'; on a shared machine the
steadier figure: the CPU ratio is what the cells/s ratio would be on idle cores). The last
line is one JSON object.
A measurement, not a test: on a shared machine the figures move with the load.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["run_distributed_benchmark"]


def _noop(x):
    return x


def _warm() -> float:
    """Import what a task needs (torch, the engine) in a worker: what a worker that is up has done."""
    t = time.perf_counter()
    import torch  # noqa: F401

    from . import distributed, encoder, imagery, search  # noqa: F401
    return time.perf_counter() - t


def run_distributed_benchmark(cells: int = 50_176, workers: tuple[int, ...] = (1, 2), model: str = "shipped",
                              batch_size: int = 128, tile_cells: int | None = None, workdir: str | None = None,
                              log=print) -> dict:
    """Run the measurements (see the module docstring) and return the figures."""
    import distributed

    from . import distributed as dist
    from .benchmark import PIXEL_M, make_bench_model, make_bench_raster, make_reference_png
    from .encoder import load_model
    from .search import SearchParams, run_search

    tmp = tempfile.TemporaryDirectory(prefix="analog-bench-dask-") if workdir is None else None
    work = Path(workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if tile_cells:
        dist.DEFAULT_TILE_CELLS = int(tile_cells)
    try:
        model_path, model_desc = make_bench_model(model, work)
        size = load_model(model_path, "cpu").input_size
        side = max(2, math.ceil(math.sqrt(cells)))
        t = time.perf_counter()
        raster = make_bench_raster(work / "area.tif", side, size, bands=1)
        ref = make_reference_png(work / "ref.png", size, 11)
        log(f"Raster: {side * size} x {side * size} px grey (30 m), {side * side:,} cells; made in "
            f"{time.perf_counter() - t:.0f} s; model: {model_desc}; {os.cpu_count()} cores")

        def search(scheduler, tag):
            out = work / tag
            out.mkdir(exist_ok=True)
            params = SearchParams(raster, ref, cell_size_m=size * PIXEL_M, model=model_path, device="cpu",
                                  batch_size=batch_size, force=True, scheduler=scheduler)
            t0, cpu = time.perf_counter(), time.process_time()
            result = run_search(params, str(out / "d.tif"), str(out / "c.gpkg"))
            # CPU seconds of the run: this process (with a LocalCluster's scheduler) and the tasks'.
            result.extra["cpu_s"] = time.process_time() - cpu + result.extra.get("task_cpu_seconds", 0.0)
            return result, time.perf_counter() - t0

        local, local_s = search(None, "local")
        n = len(local.grid)
        base = n / local_s
        base_cpu = 1e3 * local.extra["cpu_s"] / n
        log(f"Single process : {base:9,.1f} cells/s ({n:,} cells in {local_s:.1f} s; "
            f"{local.extra.get('read_mode')} reads; {base_cpu:.2f} ms CPU a cell)")
        runs = {}
        for w in workers:
            t = time.perf_counter()
            with distributed.LocalCluster(n_workers=w, threads_per_worker=1, processes=True, host="127.0.0.1",
                                          dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                    distributed.Client(cluster) as client:
                start_s = time.perf_counter() - t
                t = time.perf_counter()
                client.gather(client.map(_noop, range(200), pure=False))
                noop_ms = 1e3 * (time.perf_counter() - t) / 200
                warm_s = max(client.run(_warm).values())
                # The first search on fresh workers pays their model load and first passes; a
                # cluster that stays up pays them once: the second search is the figure.
                cold, cold_s = search(cluster.scheduler_address, f"dask{w}")
                result, secs = search(cluster.scheduler_address, f"dask{w}")
            cold_rate, cold_cpu = n / cold_s, 1e3 * cold.extra["cpu_s"] / n
            same = bool(np.allclose(result.dissimilarity, local.dissimilarity, atol=1e-6, equal_nan=True))
            rate = n / secs
            cpu_ms = 1e3 * result.extra["cpu_s"] / n
            runs[w] = {"cells_per_s": round(rate, 1), "seconds": round(secs, 2), "ratio_to_single_process":
                       round(rate / base, 3), "per_worker_cells_per_s": round(rate / w, 1),
                       "tiles": result.extra.get("tiles"),
                       "overhead_per_task_s": result.extra.get("overhead_per_task_s"),
                       "task_seconds": result.extra.get("encode_seconds"), "empty_task_ms": round(noop_ms, 2),
                       "cluster_start_s": round(start_s, 1), "worker_import_s": round(warm_s, 1),
                       "same_as_single_process": same, "first_run_cells_per_s": round(cold_rate, 1),
                       "first_run_cpu_ms_per_cell": round(cold_cpu, 3),
                       "cpu_ms_per_cell": round(cpu_ms, 3), "cpu_ratio_to_single_process": round(base_cpu / cpu_ms, 3)}
            log(f"Dask, {w} worker(s): {rate:9,.1f} cells/s ({secs:.1f} s, {result.extra.get('tiles')} tiles; "
                f"ratio to single process {rate / base:.2f}; {rate / w:,.0f} cells/s a worker; overhead "
                f"{1e3 * (result.extra.get('overhead_per_task_s') or 0):.0f} ms a task, empty task {noop_ms:.1f} ms; "
                f"cluster start {start_s:.1f} s + imports {warm_s:.1f} s; same dissimilarity: {same}; "
                f"{cpu_ms:.2f} ms CPU a cell, CPU ratio {base_cpu / cpu_ms:.2f}; the first search on these "
                f"workers: {cold_rate:,.0f} cells/s, {cold_cpu:.2f} ms CPU a cell)")
        best = max(runs.values(), key=lambda r: r["per_worker_cells_per_s"])["per_worker_cells_per_s"]
        for label, total in (("Qaidam Basin (3.5 M cells)", 3.5e6), ("world drylands (3 billion cells)", 3e9)):
            log(f"Cost model, {label}: " + ", ".join(
                f"{k} workers {total / (best * k) / 3600:,.1f} h" for k in (1, 10, 100, 1000)))
        return {"cells": n, "single_process_cells_per_s": round(base, 1), "single_process_cpu_ms_per_cell":
                round(base_cpu, 3), "dask": {str(k): v for k, v in runs.items()},
                "per_worker_cells_per_s": best, "tile_cells": dist.DEFAULT_TILE_CELLS, "batch_size": batch_size,
                "model": model_desc, "cpu_count": os.cpu_count(), "machine": platform.node() or platform.machine(),
                "date": time.strftime("%Y-%m-%d")}
    finally:
        if tmp is not None:
            tmp.cleanup()
