"""``bench``: how fast the search runs, against the encoder alone and a naive loop.

One run makes its own rasters (a multi-scale texture, tiled GeoTIFF, some nodata) and prints:

* end-to-end cells/s of :func:`run_search` (outputs written) and the model-only bound (the
  encoder alone on a tensor already in memory, same batch size), and their ratio; with the
  process CPU time a cell costs in each (on a shared machine, the steadier figure); and the
  same search in cells 1.5 times larger, which are resampled (the usual case: cells seldom
  fall on whole pixels of the encoder's size);
* the same search written the naive way (open, read, encode one cell at a time) and the
  speed-up over it;
* peak RSS at three area sizes, each measured in a fresh subprocess (``VmHWM``);
* the time of a second search of the largest area with another reference, from cached
  embeddings;
* embed once, query many: ``embed-area`` then a search from the embedding raster, against the
  plain search; a query of an embedding raster of 1,000,000 cells on disk (distances only, and
  with the dissimilarity GeoTIFF written); the embedding raster's bytes a cell.

Its last line is one JSON object with those figures. It is a measurement, not a test: the
figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["make_bench_raster", "make_bench_model", "peak_rss_mb", "run_benchmark"]

PIXEL_M = 30.0
RESAMPLED_FACTOR = 1.5  # cells of the resampled run, in encoder patches
BENCH_CRS = "EPSG:32646"  # UTM 46N: the Qaidam Basin's zone


# -- inputs -----------------------------------------------------------------------------
def _texture(n: int = 1024, seed: int = 0) -> np.ndarray:
    """A multi-scale (1/f) random texture in [0, 1], like natural ground."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n)
    k = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    k[0, 0] = 1.0
    spec = (rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))) / k ** 1.2
    img = np.fft.ifft2(spec).real
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def make_bench_raster(path: str | os.PathLike, cells_side: int, cell_px: int, bands: int = 3,
                      seed: int = 0) -> str:
    """Write a square ``cells_side * cell_px`` px uint8 GeoTIFF (30 m pixels, UTM, nodata 0).

    The texture is a 1024 px tile, turned and flipped at random across the raster; a corner
    strip (~3 % of the area) is nodata, so some cells are skipped as in real imagery.
    """
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    side = cells_side * cell_px
    tex = _texture(1024, seed)
    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=side, height=side, count=bands, dtype="uint8", crs=BENCH_CRS,
                   transform=from_origin(300000.0, 4200000.0, PIXEL_M, PIXEL_M), nodata=0, tiled=True,
                   blockxsize=256, blockysize=256)
    hole_w, hole_h = max(1, side // 6), max(1, side // 6)
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, side, 1024):
            for c0 in range(0, side, 1024):
                h, w = min(1024, side - r0), min(1024, side - c0)
                t = np.rot90(tex, int(rng.integers(4)))
                if rng.integers(2):
                    t = t[::-1]
                g = (1 + 254 * t[:h, :w]).astype(np.uint8)
                if r0 < hole_h and c0 < hole_w:
                    g[: hole_h - r0, : hole_w - c0] = 0
                data = np.stack([g, np.maximum(g * 0.9, 1).astype(np.uint8) * (g > 0),
                                 np.maximum(g * 0.8, 1).astype(np.uint8) * (g > 0)][:bands])
                dst.write(data, window=Window(c0, r0, w, h))
    return str(path)


def make_reference_png(path: str | os.PathLike, size: int, seed: int) -> str:
    """A grey PNG texture to search for (not georeferenced)."""
    from PIL import Image

    t = _texture(256, seed)
    if size > 256:
        t = np.kron(t, np.ones((math.ceil(size / 256),) * 2))
    t = t[:size, :size]
    Image.fromarray((t * 255).astype(np.uint8)).save(path)
    return str(path)


def make_bench_model(kind: str, folder: str | os.PathLike) -> tuple[str, str]:
    """A model file for the bench and how it is described.

    ``kind``: ``shipped`` (the shipped model; an untrained compact network of the same
    default architecture when it does not exist yet), ``untrained`` (that network),
    ``tiny`` (a compact network with 4 and 8 filters on 32 px patches: fast, for memory
    runs), or a model file path.
    """
    from .encoder import ModelMetadata, build_network, default_model_path, save_model

    folder = Path(folder)
    if kind not in ("shipped", "untrained", "tiny"):
        return str(kind), f"model file {kind}"
    if kind == "shipped" and default_model_path().exists():
        return str(default_model_path()), f"shipped model {default_model_path().name}"
    import torch

    torch.manual_seed(0)
    if kind == "tiny":
        path = folder / "bench_tiny.pt"
        save_model(path, build_network("compact", 32, embedding_dim=8, widths=(4, 8)),
                   ModelMetadata("compact", 32, 8, {"widths": [4, 8]}, description="bench: tiny, untrained"))
        return str(path), "tiny untrained compact network (4, 8 filters; 32 px input)"
    path = folder / "bench_untrained_compact.pt"
    save_model(path, build_network("compact", 100, embedding_dim=32),
               ModelMetadata("compact", 100, 32, {"widths": [16, 32, 64, 128]},
                             description="bench: untrained, default compact architecture"))
    why = " (the shipped model does not exist yet)" if kind == "shipped" else ""
    return str(path), f"untrained compact network, default architecture{why}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


# -- measurements ------------------------------------------------------------------------
def _model_only(encoder, x, cells: int) -> tuple[float, str, float]:
    if encoder.runtime != "torch":
        return _model_only_onnx(encoder, x, cells)
    return _model_only_torch(encoder, x, cells)


def _model_only_onnx(encoder, x, cells: int) -> tuple[float, str, float]:
    """:func:`_model_only` on ONNX Runtime: one call at a time on one session of a thread per
    core, and several at once on the search's shared session (:class:`~.runtime.OnnxThreads`)."""
    from concurrent.futures import ThreadPoolExecutor

    cores = os.cpu_count() or 1
    plan = encoder.thread_plan(None)
    plan.restore()
    options = [(1, cores)] if encoder.device.type != "cpu" else [(1, cores), (plan.workers, plan.per_worker)]
    best = (0.0, "", float("nan"))
    for workers, threads in dict.fromkeys(options):
        plan = encoder.thread_plan(cores, workers=workers)
        reps = max(workers, math.ceil(cells / len(options) / len(x)))
        try:
            with ThreadPoolExecutor(workers, initializer=plan.enter_worker) as pool:
                list(pool.map(lambda _: encoder.embed_tensor(x), range(workers)))  # warm-up
                t, cpu = time.perf_counter(), time.process_time()
                list(pool.map(lambda _: encoder.embed_tensor(x), range(reps)))
                rate = reps * len(x) / (time.perf_counter() - t)
                used = time.process_time() - cpu
        finally:
            plan.restore()
        how = (f"onnxruntime on {encoder.device}" if encoder.device.type != "cpu" else
               f"onnxruntime, {threads} thread(s)" if workers == 1 else
               f"onnxruntime, {workers} batches at once, {threads} thread(s) each")
        best = max(best, (rate, how, 1e3 * used / (reps * len(x))))
    return best


def _model_only_torch(encoder, x, cells: int) -> tuple[float, str, float]:
    """Cells/s of the encoder alone on a tensor already in memory, how it ran, and the process
    CPU time per cell (ms) of that run.

    On CPU it is timed in each way it can use the cores: one batch at a time on torch's
    threads (one per core) or one fewer, and several batches at once as the search runs them
    (:class:`~.search._EncoderThreads`); the fastest counts: the bound is the best the encoder
    can do on its own.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from .search import _embed_batch, _EncoderThreads

    before = torch.get_num_threads()
    options = [(1, before)]
    if encoder.device.type == "cpu" and before > 1:
        plan = _EncoderThreads(encoder.device, None)
        plan.restore()
        options += [(1, before - 1), (plan.workers, plan.per_worker)]
    best = (0.0, "", float("nan"))
    try:
        for workers, threads in dict.fromkeys(options):
            torch.set_num_threads(threads)
            reps = max(workers, math.ceil(cells / len(options) / len(x)))
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
                list(pool.map(lambda _: _embed_batch(encoder, x, None), range(workers)))  # warm-up
                t, cpu = time.perf_counter(), time.process_time()
                list(pool.map(lambda _: _embed_batch(encoder, x, None), range(reps)))
                if encoder.device.type == "cuda":
                    torch.cuda.synchronize()
                rate = reps * len(x) / (time.perf_counter() - t)
                used = time.process_time() - cpu
            how = (f"on {encoder.device}" if encoder.device.type != "cpu" else f"{threads} CPU thread(s)"
                   if workers == 1 else f"{workers} batches at once, {threads} thread(s) each")
            best = max(best, (rate, how, 1e3 * used / (reps * len(x))))
    finally:
        torch.set_num_threads(before)
    return best


def _naive(raster: str, grid, encoder, ref_emb: np.ndarray, min_valid: float, seconds: float,
           max_cells: int) -> tuple[float, int]:
    """The search written the naive way: for each cell, open the raster, read, encode alone."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import from_bounds

    from .encoder import normalise_patches

    size = encoder.input_size
    lum = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    t = time.perf_counter()
    done = 0
    for b in grid.bounds_array(np.arange(min(max_cells, len(grid)))):
        with rasterio.open(raster) as ds:
            win = from_bounds(*b, transform=ds.transform)
            data = ds.read([1, 2, 3], window=win, out_shape=(3, size, size), resampling=Resampling.average)
            mask = ds.read_masks(1, window=win, out_shape=(size, size))
        grey = np.tensordot(lum, data.astype(np.float32), axes=1) / 255.0
        if (mask > 0).mean() >= min_valid:
            emb = encoder.embed_normalised(normalise_patches(grey[None], encoder.metadata.normalisation))
            float(np.linalg.norm(emb - ref_emb[:1], axis=1).min())
        done += 1
        if time.perf_counter() - t > seconds:
            break
    return done / (time.perf_counter() - t), done


def _search(raster: str, reference: str, cell_size_m: float, encoder, batch_size: int, out_dir: Path,
            cache_dir: str | None = None, write: bool = True):
    from .search import SearchParams, run_search

    params = SearchParams(raster, reference, cell_size_m=cell_size_m, batch_size=batch_size, force=True,
                          cache_dir=cache_dir)
    tif, gpkg = (str(out_dir / "dissimilarity.tif"), str(out_dir / "cells.gpkg")) if write else (None, None)
    t, cpu = time.perf_counter(), time.process_time()
    result = run_search(params, tif, gpkg, encoder=encoder)
    result.extra["process_cpu_s"] = time.process_time() - cpu
    return result, time.perf_counter() - t


def _compare_runtimes(encoders: dict, raster: str, reference: str, cell_m: float, batch_size: int, out: Path,
                      patches: np.ndarray, cells: int, log, rounds: int = 2) -> dict:
    """End-to-end and model-only cells/s of each runtime, measured in turns (``rounds`` times
    each, the best kept: on a shared machine the load drifts between runs)."""
    size = patches.shape[-1]
    found: dict = {name: {"e2e": [], "model": [], "e2e_cpu": [], "model_cpu": []} for name in encoders}
    for _ in range(rounds):
        for name, enc in encoders.items():
            x = enc.to_tensor(np.resize(patches, (batch_size, size, size)))
            rate, _, cpu = _model_only(enc, x, cells // 2)
            result, seconds = _search(raster, reference, cell_m, enc, batch_size, out)
            found[name]["model"].append(rate)
            found[name]["model_cpu"].append(cpu)
            found[name]["e2e"].append(len(result.grid) / seconds)
            found[name]["e2e_cpu"].append(1e3 * result.extra["process_cpu_s"] / len(result.grid))
    figures = {}
    log(f"Runtimes (best of {rounds}, in turns; {cells:,} cells):")
    for name, f in found.items():
        figures[name] = {"e2e_cells_per_s": round(max(f["e2e"]), 1), "model_cells_per_s": round(max(f["model"]), 1),
                         "e2e_cpu_ms_per_cell": round(min(f["e2e_cpu"]), 3),
                         "model_cpu_ms_per_cell": round(min(f["model_cpu"]), 3)}
        g = figures[name]
        log(f"  {name:<6}: end to end {g['e2e_cells_per_s']:9,.1f} cells/s ({g['e2e_cpu_ms_per_cell']:.3f} ms CPU a "
            f"cell), model only {g['model_cells_per_s']:9,.1f} cells/s ({g['model_cpu_ms_per_cell']:.3f} ms CPU a "
            f"cell) on {encoders[name].device}")
    return figures


def rss_child(argv: list[str]) -> int:
    """Subprocess: one search (outputs written, cache filled), then a cached re-query; prints JSON."""
    p = argparse.ArgumentParser()
    for name in ("raster", "reference", "requery_reference", "model", "out", "cache", "device", "runtime"):
        p.add_argument("--" + name.replace("_", "-"), required=True)
    p.add_argument("--cell-size", type=float, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    a = p.parse_args(argv)
    from .runtime import load_runtime

    encoder = load_runtime(a.model, a.runtime, a.device)
    base = peak_rss_mb()
    out = Path(a.out)
    result, seconds = _search(a.raster, a.reference, a.cell_size, encoder, a.batch_size, out, a.cache)
    peak = peak_rss_mb()
    again, requery = _search(a.raster, a.requery_reference, a.cell_size, encoder, a.batch_size, out, a.cache,
                             write=False)
    print(json.dumps({"cells": len(result.grid), "peak_rss_mb": round(peak, 1), "base_rss_mb": round(base, 1),
                      "seconds": round(seconds, 3), "cells_per_s": round(len(result.grid) / seconds, 1),
                      "requery_s": round(requery, 3), "requery_cache": again.extra.get("cache"),
                      "read_mode": result.extra.get("read_mode")}))
    return 0


def _rss_run(cells: int, cell_px: int, model: str, device: str, batch_size: int, work: Path,
             refs: tuple[str, str], log, runtime: str = "torch") -> dict:
    side = max(2, math.ceil(math.sqrt(cells)))
    folder = work / f"rss_{cells}"
    folder.mkdir(exist_ok=True)
    raster = make_bench_raster(folder / "area.tif", side, cell_px, bands=1, seed=cells)
    cmd = [sys.executable, "-m", "siamese_analog_plugin.engine.benchmark", "rss-child", "--raster", raster,
           "--reference", refs[0], "--requery-reference", refs[1], "--model", model, "--out", str(folder),
           "--cache", str(folder / "cache"), "--device", device, "--cell-size", str(cell_px * PIXEL_M),
           "--batch-size", str(batch_size), "--runtime", runtime]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of {cells} cells failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"  {figures['cells']:>7,} cells: peak RSS {figures['peak_rss_mb']:7.1f} MB (after model load "
        f"{figures['base_rss_mb']:.1f} MB), {figures['cells_per_s']:,.0f} cells/s, cached re-query "
        f"{figures['requery_s']:.3f} s ({figures['requery_cache']})")
    for f in folder.glob("*.tif"):  # the rasters are large; the figures are what matter
        f.unlink()
    return figures


def _embeddings_bench(work: Path, encoder, raster: str, refs: tuple[str, str], cell_m: float, batch_size: int,
                      plain_s: float, requery_cells: int, log) -> dict:
    """Embed once, query many: figures of the embedding raster (see the module docstring)."""
    from .embed import EmbedParams, run_embed_area
    from .embeddings import EmbeddingRasterWriter, embedding_facts
    from .search import SearchParams, plan_grid, run_search

    emb_path = work / "embeddings.tif"
    t = time.perf_counter()
    run_embed_area(EmbedParams(raster, cell_size_m=cell_m, batch_size=batch_size, force=True), str(emb_path),
                   encoder=encoder)
    embed_s = time.perf_counter() - t
    out = work / "from_embeddings"
    out.mkdir(exist_ok=True)
    t = time.perf_counter()
    result = run_search(SearchParams(None, refs[0], embeddings=str(emb_path), force=True),
                        str(out / "dissimilarity.tif"), str(out / "cells.gpkg"), encoder=encoder)
    query_s = time.perf_counter() - t
    n = len(result.grid)
    log(f"Embed once : embed-area {embed_s:.1f} s + search from the embedding raster {query_s:.2f} s "
        f"(outputs written) = {embed_s + query_s:.1f} s for {n:,} cells, against {plain_s:.1f} s for the plain "
        f"search: {plain_s / (embed_s + query_s):.2f} x its speed")

    # A large area's embeddings on disk: one cell a pixel of a small raster, unit vectors.
    side = max(2, math.ceil(math.sqrt(requery_cells)))
    big = make_bench_raster(work / "requery_area.tif", side, 1, bands=1, seed=5)
    _, grid = plan_grid(SearchParams(big, None, cell_size_m=PIXEL_M, force=True, max_cells=side * side))
    facts = embedding_facts(encoder, big, grid, None, 0.5, 0.5)
    path = work / "requery_embeddings.tif"
    rng = np.random.default_rng(0)
    writer = EmbeddingRasterWriter(path, grid, facts)
    t = time.perf_counter()
    for start in range(0, len(grid), 65536):
        idx = np.arange(start, min(start + 65536, len(grid)))
        e = rng.normal(size=(idx.size, encoder.embedding_dim)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        writer.store(idx, np.ones(idx.size, np.float32), np.ones(idx.size, bool), e)
    writer.close()
    write_s = time.perf_counter() - t
    size_b = path.stat().st_size
    per_cell = size_b / len(grid)
    (work / "requery_area.tif").unlink()
    times = []
    for write in (False, True):
        t = time.perf_counter()
        run_search(SearchParams(None, refs[1], embeddings=str(path), force=True),
                   str(work / "requery.tif") if write else None, None, encoder=encoder)
        times.append(time.perf_counter() - t)
    log(f"Re-query   : {len(grid):,} cells from an embedding raster on disk in {times[0]:.2f} s (distances, best "
        f"sites), {times[1]:.2f} s with the dissimilarity GeoTIFF written; the raster holds "
        f"{per_cell:.1f} bytes a cell ({encoder.embedding_dim}-d: 2 x D = {2 * encoder.embedding_dim}), written "
        f"at {len(grid) / write_s:,.0f} cells/s")
    return {"embed_area_s": round(embed_s, 2), "query_from_embeddings_s": round(query_s, 3),
            "embed_then_query_vs_search": round(plain_s / (embed_s + query_s), 3),
            "requery_1m_cells": len(grid), "requery_1m_s": round(times[0], 3),
            "requery_1m_with_raster_s": round(times[1], 3), "embedding_bytes_per_cell": round(per_cell, 2),
            "embedding_write_cells_per_s": round(len(grid) / write_s, 1)}


def run_benchmark(cells: int = 16384, rss_cells: tuple[int, ...] = (1000, 10000, 100000), model: str = "shipped",
                  rss_model: str = "auto", device: str = "auto", batch_size: int = 128, naive_seconds: float = 20.0,
                  workdir: str | None = None, log=print, requery_cells: int = 1_000_000, runtime: str = "auto",
                  export=None) -> dict:
    """Run every measurement and return the figures (see the module docstring).

    ``runtime``: ``auto``, ``onnx`` or ``torch`` (the search's choice), or ``both``: the figures
    of the runtime ``auto`` picks, and a row of end-to-end and model-only speeds for each.
    ``export(pt_path)``: writes ``.onnx`` beside a ``.pt`` the bench made (the onnx runtime
    needs it; the export lives on the learning side).
    """
    from .imagery import load_references
    from .runtime import choose_runtime, load_runtime
    from .search import SearchParams, describe_device, plan_grid

    both = runtime == "both"
    runtime = choose_runtime(None, "auto" if both else runtime, device)[0]

    def load(path: str, on: str, dev: str):
        if on == "onnx" and not path.endswith(".onnx") and not Path(path).with_suffix(".onnx").exists() and export:
            export(path)
        return load_runtime(path, on, dev)

    tmp = tempfile.TemporaryDirectory(prefix="analog-bench-") if workdir is None else None
    work = Path(workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_path, model_desc = make_bench_model(model, work)
        encoder = load(model_path, runtime, device)
        if encoder.path and Path(encoder.path).name != Path(model_path).name:  # the .onnx beside the .pt
            model_desc = f"{model_desc} as {Path(encoder.path).name}"
        size = encoder.input_size
        side = max(2, math.ceil(math.sqrt(cells)))
        log(f"Model: {model_desc}; runtime {encoder.runtime}; device {describe_device(encoder.device)}; "
            f"batch {batch_size}")
        raster = make_bench_raster(work / "area.tif", side, size, bands=3)
        refs = (make_reference_png(work / "ref_a.png", size, 11), make_reference_png(work / "ref_b.png", size, 12))
        cell_m = size * PIXEL_M
        log(f"Raster: {side * size} x {side * size} px RGB (30 m), {side * side:,} cells of {cell_m:g} m")

        # Model-only bound: a batch of this raster's real patches, already normalised in memory;
        # measured before and after the search and averaged, as the machine's load drifts.
        params = SearchParams(raster, refs[0], cell_size_m=cell_m, force=True)
        _, grid = plan_grid(params)
        from .imagery import GreyReader, describe_raster
        from .search import plan_reads, read_cells

        with GreyReader(raster) as reader:
            patches, _ = read_cells(reader, grid, np.arange(min(batch_size, len(grid))), size,
                                    plan_reads(describe_raster(raster), grid, size))
        x = encoder.to_tensor(np.resize(patches, (batch_size, size, size)))
        model_a, how_a, cpu_a = _model_only(encoder, x, len(grid) // 2)
        out = work / "e2e"
        out.mkdir(exist_ok=True)
        result, e2e_s = _search(raster, refs[0], cell_m, encoder, batch_size, out)
        model_b, how_b, cpu_b = _model_only(encoder, x, len(grid) // 2)
        model_rate = (model_a + model_b) / 2
        e2e_rate = len(grid) / e2e_s
        e2e_cpu = 1e3 * result.extra["process_cpu_s"] / len(grid)
        log(f"End to end : {e2e_rate:10,.1f} cells/s ({len(grid):,} cells in {e2e_s:.1f} s, outputs written; "
            f"{result.extra.get('read_mode')} reads, {result.extra.get('reader_threads')} reader thread(s); "
            f"encoder busy {result.extra.get('encode_seconds', 0):.1f} s, waiting for batches "
            f"{result.extra.get('wait_seconds', 0):.1f} s; {e2e_cpu:.2f} ms CPU a cell)")
        log(f"Model only : {model_rate:10,.1f} cells/s (encoder alone on an in-memory batch of {batch_size}; "
            f"{model_a:,.1f} before ({how_a}), {model_b:,.1f} after ({how_b}); "
            f"{(cpu_a + cpu_b) / 2:.2f} ms CPU a cell)")
        log(f"             the search encoded with {result.extra.get('encoder_threads')} thread(s) of "
            f"{result.extra.get('torch_threads')} {'torch' if encoder.runtime == 'torch' else 'onnxruntime'} "
            "thread(s)")
        log(f"Ratio      : {e2e_rate / model_rate:10.2f}")
        runtimes = {}
        if both:
            runtimes = _compare_runtimes(
                {r: encoder if r == runtime else load(model_path, r, device) for r in ("onnx", "torch")},
                raster, refs[0], cell_m, batch_size, out, patches, len(grid), log)

        # Cells rarely fall on whole pixels of the encoder's size: the same raster in cells of
        # 1.5 x that size, each read and resampled (GDAL's average) on its own.
        resampled, resampled_s = _search(raster, refs[0], cell_m * RESAMPLED_FACTOR, encoder, batch_size, out)
        resampled_rate = len(resampled.grid) / resampled_s
        log(f"Resampled  : {resampled_rate:10,.1f} cells/s ({len(resampled.grid):,} cells of "
            f"{cell_m * RESAMPLED_FACTOR:g} m = {size * RESAMPLED_FACTOR:g} px read at {size} px, "
            f"{resampled.extra.get('read_mode')} reads; encoder waiting for batches "
            f"{resampled.extra.get('wait_seconds', 0):.1f} s; "
            f"{1e3 * resampled.extra['process_cpu_s'] / len(resampled.grid):.2f} ms CPU a cell); "
            f"ratio {resampled_rate / model_rate:.2f}")

        ref_emb = encoder.embed(np.stack([r.patch for r in load_references(refs[0], size)]))
        naive_rate, naive_n = _naive(raster, grid, encoder, ref_emb, 0.5, naive_seconds, len(grid))
        log(f"Naive loop : {naive_rate:10,.1f} cells/s ({naive_n:,} cells: open, read, encode one at a time); "
            f"speed-up {e2e_rate / naive_rate:.1f} x")

        emb_figures = _embeddings_bench(work, encoder, raster, refs, cell_m, batch_size, e2e_s, requery_cells, log)

        if rss_model == "auto":
            # Memory does not depend on the encoder's speed; a slow one would make the largest
            # area take too long here, so it is swapped for the tiny network when needed.
            rss_model = model if e2e_rate * 120 >= max(rss_cells) else "tiny"
        rss_path, rss_desc = make_bench_model(rss_model, work)
        rss_size = load(rss_path, runtime, "cpu").input_size
        rss_refs = (make_reference_png(work / "rss_ref_a.png", rss_size, 21),
                    make_reference_png(work / "rss_ref_b.png", rss_size, 22))
        log(f"Peak RSS (fresh process per size, single-band raster, outputs written, cache on; {rss_desc}):")
        rss = {}
        for n in rss_cells:
            rss[n] = _rss_run(n, rss_size, rss_path, device, batch_size, work, rss_refs, log, runtime)
        sizes = sorted(rss)
        growth = rss[sizes[-1]]["peak_rss_mb"] - rss[sizes[0]]["peak_rss_mb"]
        log(f"RSS growth {rss[sizes[0]]['cells']:,} -> {rss[sizes[-1]]['cells']:,} cells: {growth:.1f} MB")
        figures = {
            "e2e_cells_per_s": round(e2e_rate, 1),
            "model_cells_per_s": round(model_rate, 1),
            "ratio_to_model": round(e2e_rate / model_rate, 3),
            "e2e_cpu_ms_per_cell": round(e2e_cpu, 3),
            "e2e_resampled_cells_per_s": round(resampled_rate, 1),
            "ratio_resampled_to_model": round(resampled_rate / model_rate, 3),
            "resampled_cells": len(resampled.grid),
            "resampled_read_mode": resampled.extra.get("read_mode"),
            "model_cpu_ms_per_cell": round((cpu_a + cpu_b) / 2, 3),
            "encoder_wait_s": result.extra.get("wait_seconds"),
            "naive_cells_per_s": round(naive_rate, 2),
            "speedup_vs_naive": round(e2e_rate / naive_rate, 1),
            "peak_rss_mb": {str(rss[n]["cells"]): rss[n]["peak_rss_mb"] for n in sizes},
            "rss_growth_mb": round(growth, 1),
            "requery_s": rss[sizes[-1]]["requery_s"],
            "requery_cells": rss[sizes[-1]]["cells"],
            **emb_figures,
            "cells": len(grid),
            "batch_size": batch_size,
            "model": model_desc,
            "rss_model": rss_desc,
            "device": describe_device(encoder.device),
            "runtime": encoder.runtime,
            "runtimes": runtimes,
            "reader_threads": result.extra.get("reader_threads"),
            "encoder_threads": result.extra.get("encoder_threads"),
            "torch_threads": result.extra.get("torch_threads"),
            "read_mode": result.extra.get("read_mode"),
            "cpu_count": os.cpu_count(),
            "machine": platform.node() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"),
        }
        return figures
    finally:
        if tmp is not None:
            tmp.cleanup()






if __name__ == "__main__":  # the memory runs' subprocess
    if len(sys.argv) > 1 and sys.argv[1] == "rss-child":
        sys.exit(rss_child(sys.argv[2:]))
    sys.exit(2)
