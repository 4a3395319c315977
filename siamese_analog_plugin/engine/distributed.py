"""Cells embedded on a Dask cluster: the search scaled out past one machine.

The cell grid is cut into tiles (blocks of grid rows and columns). Each tile is one Dask task
that opens the raster itself (GDAL windowed reads through :class:`~.imagery.GreyReader` and
:func:`~.reads.read_cells`: a local or shared path, or a GDAL virtual path such as
``/vsicurl/https://.../scene.tif`` for a COG over HTTP or ``/vsis3/bucket/scene.tif``), reads
and encodes its cells and returns their valid fractions and embeddings. A task carries only the
tile's cell indices, rows and columns (16 bytes a cell; pixels never travel); the run's settings
and the model file's bytes are scattered to every worker once, and each worker process loads the
model once (cached by the file's sha256).

:func:`iter_embedded_tiles` yields ``(idx, valid, ok, emb)`` tiles as they finish, in any order,
each cell exactly once: the tuple the single-process pipeline produces per batch.
:class:`CellOrder` puts them back in cell order for writers that append (the outputs, the
embedding cache), and :func:`encode_on_cluster` is the search's encoding step on a cluster.

Dask is imported only here, and only when a scheduler is used: the plugin and the
single-process search run without it.

Scheduler specifications (:func:`parse_scheduler`):

- ``local`` or ``local:N``: an embedded ``LocalCluster`` of N worker processes (default: one per
  core), one thread each, closed at the end of the run;
- ``tcp://HOST:PORT`` (or ``tls://``...): an existing scheduler (``dask scheduler``,
  dask-jobqueue, Dask Kubernetes, ``dask ssh``...);
- ``FILE.json`` / ``FILE.yaml``: a Dask scheduler file (``dask scheduler --scheduler-file``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import AnalogFinderError, InputError
from .feedback import Feedback, check_cancelled
from .grid import CellGrid

__all__ = [
    "DEFAULT_TILE_CELLS",
    "Tile",
    "CellOrder",
    "parse_scheduler",
    "connect",
    "plan_tiles",
    "iter_embedded_tiles",
    "encode_on_cluster",
    "encode_patches",
]

DEFAULT_TILE_CELLS = 2048  # cells a task reads and encodes (~1 s on one core): Dask's ~ms per task is noise
MAX_TILE_COLS = 8192  # wider grids are cut into columns too (keeps a band of tiles' embeddings small)
POLL_S = 0.05  # how often the client looks for a cancel while it waits for tiles
RESIZE_S = 2.0  # how often the client asks how many workers the cluster has
MAX_RESUBMITS = 3  # times a tile whose finished result was lost is sent again


# -- scheduler -----------------------------------------------------------------------------
def parse_scheduler(spec: str) -> tuple[str, object]:
    """``("local", n_workers or None) | ("address", "tcp://...") | ("file", path)``.

    Raises:
        InputError: a specification that is none of these.
    """
    text = (spec or "").strip()
    if text == "local" or text.startswith("local:"):
        if text == "local":
            return "local", None
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise InputError(f"The scheduler '{spec}' asks for no worker",
                             "Use local:N with N at least 1, e.g. local:4")
        return "local", n
    if "://" in text:
        return "address", text
    if text.lower().endswith((".json", ".yaml", ".yml")):
        if not Path(text).is_file():
            raise InputError(f"The Dask scheduler file '{text}' does not exist",
                             "Give the file the scheduler wrote (dask scheduler --scheduler-file FILE)")
        return "file", text
    raise InputError(f"Unknown scheduler '{spec}'",
                     "Use local, local:N, tcp://HOST:PORT or a Dask scheduler file (.json/.yaml)")


def _distributed():
    try:
        import distributed
    except ImportError as exc:  # the plugin runs without Dask; only a scheduler needs it
        raise InputError("A scheduler was given but Dask is not installed",
                         "Install it (pip install 'dask[distributed]'), or leave the scheduler empty") from exc
    return distributed


@contextlib.contextmanager
def connect(spec: str, feedback: Feedback | None = None):
    """A ``distributed.Client`` for ``spec``; closed (with its embedded cluster) on leaving."""
    kind, value = parse_scheduler(spec)
    distributed = _distributed()
    feedback = feedback or Feedback()
    cluster = client = None
    try:
        if kind == "local":
            import logging

            n = int(value or os.cpu_count() or 1)
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                               host="127.0.0.1", dashboard_address=None,
                                               silence_logs=logging.ERROR)
            client = distributed.Client(cluster)
        elif kind == "address":
            client = distributed.Client(value, timeout="20s")
        else:
            address = value
            if str(value).lower().endswith((".yaml", ".yml")):
                import yaml

                with open(value, encoding="utf-8") as f:
                    address = (yaml.safe_load(f) or {}).get("address")
                if not address:
                    raise InputError(f"The scheduler file '{value}' names no address",
                                     "Give the file the scheduler wrote (it holds 'address: tcp://...')")
                client = distributed.Client(address, timeout="20s")
            else:
                client = distributed.Client(scheduler_file=value, timeout="20s")
    except AnalogFinderError:
        _close(client, cluster)
        raise
    except (OSError, TimeoutError, ValueError) as exc:
        _close(client, cluster)
        raise InputError(f"Cannot reach the Dask scheduler '{spec}': {exc}",
                         "Check that it runs and that this machine can reach it (address, port, firewall)") from exc
    try:
        yield client
    finally:
        _close(client, cluster)


def _close(client, cluster) -> None:
    for thing in (client, cluster):
        if thing is not None:
            with contextlib.suppress(Exception):
                thing.close()


# -- tiles ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """A block of kept cells: ``idx`` (kept-cell indices, rising), their grid ``rows``, ``cols``."""

    number: int
    idx: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def default_tile_shape(grid: CellGrid, cells: int | None = None) -> tuple[int, int]:
    """Tiles of about ``cells`` grid positions: whole grid rows where the grid is at most
    :data:`MAX_TILE_COLS` wide (a strip of whole rows reads each raster block row once), else
    blocks of columns too (``cells``: default :data:`DEFAULT_TILE_CELLS`)."""
    cells = int(cells or DEFAULT_TILE_CELLS)
    cols = min(grid.n_cols, MAX_TILE_COLS)
    return max(1, cells // max(cols, 1)), max(1, cols)


def plan_tiles(grid: CellGrid, tile_rows: int | None = None, tile_cols: int | None = None) -> Iterator[Tile]:
    """Tiles of the grid in cell order (bands of ``tile_rows`` grid rows, left to right);
    tiles with no kept cell are left out. Every kept cell is in exactly one tile."""
    d_rows, d_cols = default_tile_shape(grid)
    tile_rows, tile_cols = max(1, int(tile_rows or d_rows)), max(1, int(tile_cols or d_cols))
    number = 0
    rows = grid.rows
    for r0 in range(0, grid.n_rows, tile_rows):
        a, b = np.searchsorted(rows, [r0, r0 + tile_rows], side="left")  # the grid is row-major
        if a == b:
            continue
        band_cols = grid.cols[a:b]
        for c0 in range(0, grid.n_cols, tile_cols):
            if tile_cols >= grid.n_cols:
                sel = np.arange(a, b, dtype=np.int64)
            else:
                sel = a + np.flatnonzero((band_cols >= c0) & (band_cols < c0 + tile_cols)).astype(np.int64)
            if sel.size:
                yield Tile(number, sel, rows[sel].astype(np.int32), grid.cols[sel].astype(np.int32))
                number += 1


class CellOrder:
    """Puts tiles that finish in any order back into cell order.

    :meth:`add` takes a tile ``(idx, valid, ok, emb)`` and returns the batches now final in
    cell order: each a contiguous range ``idx = start..stop-1`` with its valid fractions, mask
    and the embeddings of ``idx[ok]``. Cells after the first one still missing wait here, so
    memory is the tiles finished ahead of the slowest one (bounded by how far ahead tiles are
    handed out). A cell that arrives twice is an error.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.next = 0  # every cell before this one has been released
        self._arrived = np.zeros(n, dtype=bool)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []

    @property
    def waiting(self) -> int:
        """Cells held back (arrived, waiting for an earlier one)."""
        return sum(p[0].size for p in self._parts)

    def add(self, idx, valid, ok, emb) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return []
        if self._arrived[idx].any() or np.unique(idx).size != idx.size:
            raise RuntimeError("a cell arrived twice from the cluster (this is a bug: please report it)")
        self._arrived[idx] = True
        self._parts.append((idx, np.asarray(valid), np.asarray(ok, dtype=bool), emb))
        start = self.next
        stop = start
        missing = np.flatnonzero(~self._arrived[start:])
        stop = start + int(missing[0]) if missing.size else self.n
        if stop == start:
            return []
        self.next = stop
        ready, keep = [], []
        for p_idx, p_valid, p_ok, p_emb in self._parts:
            m = p_idx < stop
            if not m.any():
                keep.append((p_idx, p_valid, p_ok, p_emb))
                continue
            if not m.all():
                m_ok = m[p_ok]  # which of the tile's embeddings belong to the released cells
                keep.append((p_idx[~m], p_valid[~m], p_ok[~m], None if p_emb is None else p_emb[~m_ok]))
                p_idx, p_valid, p_ok, p_emb = p_idx[m], p_valid[m], p_ok[m], (
                    None if p_emb is None else p_emb[m_ok])
            ready.append((p_idx, p_valid, p_ok, p_emb))
        self._parts = keep
        idx = np.concatenate([p[0] for p in ready])
        valid = np.concatenate([p[1] for p in ready])
        ok = np.concatenate([p[2] for p in ready])
        embs = [p[3] for p in ready if p[3] is not None and len(p[3])]
        order = np.argsort(idx, kind="stable")
        emb = None
        if embs:
            emb = np.concatenate(embs)
            emb = emb[np.argsort(np.concatenate([p[0][p[2]] for p in ready if p[3] is not None and len(p[3])]),
                                 kind="stable")]
        return [(idx[order], valid[order], ok[order], emb)]


# -- the worker's side ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What every task of a run shares (scattered to the workers once)."""

    raster: str
    band: int | None
    size: int
    stretch: tuple[float, float]
    plan: object  # reads.ReadPlan
    runtime: str  # the client's: torch or onnx
    min_valid: float
    batch_size: int
    device: str
    model_sha: str
    model_suffix: str
    origin_x: float
    origin_y: float
    cell_w: float
    cell_h: float
    step_x: float
    step_y: float
    n_rows: int
    n_cols: int


_ENCODERS: dict = {}
_ENCODERS_LOCK = threading.Lock()
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest
TRIM_THRESHOLD = 256 * 1024 * 1024


def _tune_malloc() -> None:
    """Undo, in this worker process, what Dask's nanny sets for every worker:
    ``MALLOC_TRIM_THRESHOLD_=65536``. Any threshold set by hand stops glibc from raising its
    mmap threshold as it sees large blocks freed, so each forward pass's activations (tens of
    MB) were mapped and unmapped again, page by page: encoding cost 2.4x the CPU it costs in a
    plain process (0.75 against 0.31 ms a cell, shipped model; 0.34 with this). ``mallopt``
    at run time sets both thresholds back to sizes those blocks reuse. Not glibc: nothing done.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _worker_encoder(job: _Job, model_bytes: bytes):
    """The encoder of ``job``'s model in this worker process, loaded once (keyed by sha256)."""
    key = (job.model_sha, job.runtime, job.device)
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            from .runtime import load_runtime

            _tune_malloc()

            try:  # one thread of torch / ONNX Runtime per Dask thread: the worker's cores are its own
                from distributed import get_worker

                threads = max(1, int(get_worker().state.nthreads))
            except Exception:  # noqa: BLE001  (outside a worker, e.g. a test calling the task directly)
                threads = 1
            folder = Path(tempfile.gettempdir()) / "siamese-analog-models"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{job.model_sha}{job.model_suffix}"
            if not path.exists():
                tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}"
                tmp.write_bytes(model_bytes)
                os.replace(tmp, path)
            encoder = load_runtime(path, job.runtime, job.device, threads=threads)
            if encoder.runtime == "torch":
                import torch

                torch.set_num_threads(threads)
                _ = encoder.inference_network  # built once per process, not per task
            _ENCODERS[key] = encoder
    return encoder


def encode_patches(encoder, patches: np.ndarray) -> np.ndarray:
    """Embeddings ``(N, D)`` float32 of grey patches ``(N, S, S)`` in [0, 1] (float32, normalised
    in place): the one step a worker's model runs, on torch or ONNX Runtime (as the local
    pipeline's ``_to_tensor`` and ``embed_tensor``)."""
    from .encoder import normalise_in_place

    patches = np.ascontiguousarray(patches, dtype=np.float32)
    x = normalise_in_place(patches, encoder.metadata.normalisation)[:, None]
    if encoder.runtime == "torch":
        import torch

        x = torch.from_numpy(x)
    return encoder.embed_tensor(x)


def _embed_tile(job: _Job, model_bytes: bytes, number: int, idx: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    """A task: read and encode the cells of one tile. Returns ``(number, idx, valid, ok, emb, seconds,
    cpu_seconds)`` (the task's wall and CPU time: this thread's, where GDAL reads and torch, with
    one thread, encodes).

    The engine's errors leave the task without their cause (GDAL's exception types do not
    survive pickling: Dask would send the client a plain ``Exception``)."""
    from .errors import _restore

    error = None
    try:
        return _embed_tile_cells(job, model_bytes, number, idx, rows, cols)
    except AnalogFinderError as exc:
        error = _restore(type(exc), exc.problem, exc.fix)
    raise error


def _embed_tile_cells(job: _Job, model_bytes: bytes, number: int, idx: np.ndarray, rows: np.ndarray,
                      cols: np.ndarray):
    from .imagery import GreyReader
    from .reads import read_cells

    t, cpu = time.perf_counter(), time.thread_time()
    encoder = _worker_encoder(job, model_bytes)
    empty = np.zeros(idx.size)
    grid = CellGrid("", job.origin_x, job.origin_y, job.cell_w, job.cell_h, job.step_x, job.step_y, job.n_rows,
                    job.n_cols, rows.astype(np.int64), cols.astype(np.int64), empty, empty, empty)
    valid = np.empty(idx.size, dtype=np.float32)
    embs = []
    buffer = np.empty((min(job.batch_size, idx.size), job.size, job.size), dtype=np.float32)
    with GreyReader(job.raster, band=job.band, stretch=job.stretch) as reader:
        for s in range(0, idx.size, job.batch_size):
            local = np.arange(s, min(s + job.batch_size, idx.size))
            patches, valid[local] = read_cells(reader, grid, local, job.size, job.plan, out=buffer)
            ok = valid[local] >= job.min_valid
            if ok.any():
                embs.append(encode_patches(encoder, patches if ok.all() else patches[ok]))
    ok = valid >= job.min_valid
    emb = np.concatenate(embs) if embs else np.zeros((0, encoder.embedding_dim), dtype=np.float32)
    return number, idx, valid, ok, emb, time.perf_counter() - t, time.thread_time() - cpu


# -- the client's side ---------------------------------------------------------------------
def _model_file(model_path: str | None, runtime: str, device: str) -> tuple[bytes, str, str, str]:
    """The model file's bytes, sha256, suffix, and the runtime that runs it."""
    from .errors import ModelError
    from .runtime import choose_runtime

    runtime, path = choose_runtime(model_path, runtime, device)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"Cannot read the model file '{path}': {exc.strerror or exc}",
                         "Check the path, or leave the model empty to use the shipped one") from exc
    return data, hashlib.sha256(data).hexdigest(), path.suffix, runtime


def _tile_failed(exc: BaseException) -> BaseException:
    """The error a failed task raises on the client: the engine's own error as the local search
    raises it (its message, no remote traceback); workers dying on a tile in words."""
    if isinstance(exc, AnalogFinderError):
        return exc.with_traceback(None)
    if type(exc).__name__ == "KilledWorker":
        return InputError(f"Dask workers kept dying while they read and encoded a tile of cells ({exc})",
                          "Give the workers more memory, or look at their logs")
    return exc


def iter_embedded_tiles(raster: str, grid: CellGrid, model_path: str | None, scheduler, *,
                        size: int | None = None, band: int | None = None, min_valid: float = 0.5,
                        batch_size: int = 128, device: str = "cpu", runtime: str = "auto",
                        tile_rows: int | None = None,
                        tile_cols: int | None = None, block_reads: bool = True, feedback: Feedback | None = None,
                        stats: dict | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(idx, valid, ok, emb)`` for every tile of ``grid``, in the order tiles finish.

    ``idx``: kept-cell indices (int64, rising); ``valid``: their valid fractions (float32);
    ``ok``: ``valid >= min_valid``; ``emb``: ``(ok.sum(), D)`` float32 embeddings of ``idx[ok]``.
    Each kept cell is in exactly one tile; a tile whose worker dies is computed again elsewhere
    (Dask reschedules it), and yielded once.

    Args:
        scheduler: a spec for :func:`connect`, or a ``distributed.Client`` already connected.
        size: the encoder's input size (``None``: read from the model file).
        device: where the workers encode (``auto`` picks each worker's GPU when it has one).
        runtime: ``auto``, ``onnx`` or ``torch`` (:func:`.runtime.choose_runtime`, decided here,
            once for every worker).
        tile_rows / tile_cols: tile shape in grid rows and columns (``None``: :func:`default_tile_shape`).
        feedback: progress per finished tile; a cancel stops the run (pending tasks are
            cancelled, the client and an embedded cluster are closed).
        stats: filled with facts of the run (workers, tiles, task seconds, per-task overhead).

    Raises:
        InputError: a bad scheduler, Dask missing, a tile whose read failed (the local
            search's message), workers that keep dying.
        SearchCancelled: the user cancelled.
    """
    from .imagery import GreyReader, describe_raster
    from .reads import ReadPlan, plan_reads

    feedback = feedback or Feedback()
    stats = stats if stats is not None else {}
    n = len(grid)
    model_bytes, sha, suffix, runtime = _model_file(model_path, runtime, device)
    if size is None:
        from .runtime import load_runtime

        size = load_runtime(model_path, runtime, "cpu").input_size
    info = describe_raster(raster)
    plan = plan_reads(info, grid, size) if block_reads else ReadPlan(False)
    with GreyReader(raster, band=band) as first:  # the stretch, once for every task
        stretch = (first.lo, first.hi)
    job = _Job(str(raster), band, int(size), stretch, plan, runtime, float(min_valid), int(batch_size), device, sha,
               suffix, grid.origin_x, grid.origin_y, grid.cell_w, grid.cell_h, grid.step_x, grid.step_y,
               grid.n_rows, grid.n_cols)
    stats.update(read_mode=plan.mode, tiles=0, task_seconds=0.0, task_cpu_seconds=0.0)
    if n == 0:
        return
    owned = isinstance(scheduler, str)
    with connect(scheduler, feedback) if owned else contextlib.nullcontext(scheduler) as client:
        distributed = _distributed()
        workers, slots = _worker_threads(client)
        stats.update(workers=len(workers), worker_threads=slots, scheduler=str(client.scheduler.address))
        feedback.log(f"Dask: {len(workers)} worker(s), {slots} thread(s) at {client.scheduler.address}; "
                     f"{plan.mode} reads")
        t_start = time.perf_counter()
        # Sent once: every worker holds the model file's bytes and the run's settings; a worker
        # that joins (or replaces a dead one) fetches them from a peer.
        model_f = client.scatter(model_bytes, broadcast=True, hash=False)
        job_f = client.scatter(job, broadcast=True, hash=False)
        tiles = plan_tiles(grid, tile_rows, tile_cols)
        # Tasks queued at once (each worker thread has the next one ready), and how far past the
        # oldest unfinished tile tasks go out (what the client may hold back to write in order):
        # both follow the cluster's size, which an adaptive cluster changes while it runs.
        in_flight = max(2, 2 * slots)
        ahead = max(4 * in_flight, 16)
        sized = time.monotonic()
        run = uuid.uuid4().hex[:8]
        pending: dict = {}  # future -> tile
        attempts: dict[int, int] = {}  # tile number -> times its result was lost and it was sent again
        unfinished: set[int] = set()
        ac = distributed.as_completed(loop=client.loop)
        done = 0
        next_tile = next(tiles, None)

        def fill() -> None:
            nonlocal next_tile, in_flight, ahead, sized
            if time.monotonic() - sized > RESIZE_S:
                sized = time.monotonic()
                in_flight = max(2, 2 * _worker_threads(client)[1])
                ahead = max(4 * in_flight, 16)
            oldest = min(unfinished) if unfinished else (next_tile.number if next_tile else 0)
            while next_tile is not None and len(pending) < in_flight and next_tile.number < oldest + ahead:
                submit(next_tile)
                next_tile = next(tiles, None)

        def submit(t: Tile) -> None:
            again = attempts.get(t.number, 0)
            fut = client.submit(_embed_tile, job_f, model_f, t.number, t.idx, t.rows, t.cols,
                                key=f"analog-tile-{run}-{t.number}" + (f"-{again}" if again else ""), pure=False,
                                retries=1)
            pending[fut] = t
            unfinished.add(t.number)
            ac.add(fut)

        try:
            fill()
            while pending:
                check_cancelled(feedback)
                batch = ac.next_batch(block=False)
                if not batch:
                    time.sleep(POLL_S)
                    fill()  # workers may have joined
                    continue
                for fut in batch:
                    tile = pending.pop(fut, None)
                    if tile is None:
                        continue
                    if fut.status == "error":
                        raise _tile_failed(fut.exception())
                    try:
                        number, idx, valid, ok, emb, seconds, cpu = fut.result()
                    except CancelledError:
                        # Finished, then lost with the worker that held it before it was fetched,
                        # and forgotten by the scheduler (a race Dask does not always recover
                        # from): computed again, under a new key.
                        attempts[tile.number] = attempts.get(tile.number, 0) + 1
                        if attempts[tile.number] > MAX_RESUBMITS:
                            raise InputError(f"The result of a tile of cells was lost {MAX_RESUBMITS + 1} times "
                                             "with the Dask workers that held it",
                                             "Check the workers (memory, logs) and run again") from None
                        submit(tile)
                        continue
                    fut.release()
                    unfinished.discard(number)
                    done += idx.size
                    stats["tiles"] += 1
                    stats["task_seconds"] += seconds
                    stats["task_cpu_seconds"] += cpu
                    elapsed = time.perf_counter() - t_start
                    feedback.progress(done / n, f"{done:,}/{n:,} cells, {done / max(elapsed, 1e-9):,.0f} cells/s "
                                                f"({stats['tiles']:,} tiles on {len(workers)} worker(s))")
                    fill()
                    yield idx, valid, ok, emb
        finally:
            if pending:
                with contextlib.suppress(Exception):
                    client.cancel(list(pending), force=True)
            pending.clear()
            for f in (model_f, job_f):
                with contextlib.suppress(Exception):
                    f.release()
        wall = time.perf_counter() - t_start
        stats["wall_seconds"] = wall
        # What a task costs beyond its own work: wall time x threads, less the tasks' seconds, per task.
        if stats["tiles"]:
            stats["overhead_per_task_s"] = max(0.0, (wall * slots - stats["task_seconds"]) / stats["tiles"])


def _worker_threads(client) -> tuple[dict, int]:
    """The cluster's workers now and their threads in all (at least 1)."""
    import inspect

    try:
        every = "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        every = False
    workers = (client.scheduler_info(n_workers=-1) if every else client.scheduler_info()).get("workers", {})
    return workers, max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))


def encode_on_cluster(params, encoder, info, grid: CellGrid, score, min_valid: float, consume, extra: dict,
                      feedback: Feedback, t0: float) -> float:
    """The pipeline's encoding step on a Dask cluster (``params.scheduler``), in place of
    :func:`~.search._encode_stream` and with its contract: the tiles come from
    :func:`iter_embedded_tiles`, are put back in cell order (:class:`CellOrder`), their
    embeddings rounded to half precision as the local pipeline rounds them, run through
    ``score(embeddings) -> columns`` (``None``: no query) here on the client, and handed to
    ``consume(idx, valid, ok, embeddings_of_ok, columns)`` in cell order. Returns the seconds the
    workers spent reading and encoding (summed over tasks)."""
    from .embeddings import quantise

    del info, t0  # the workers describe the raster themselves
    if not encoder.path:
        raise InputError("A run on a Dask cluster needs the model as a file (the workers load it)",
                         "Save the model with save_model and give its path")
    stats: dict = {}
    order = CellOrder(len(grid))
    tiles = iter_embedded_tiles(params.raster, grid, encoder.path, params.scheduler, size=encoder.input_size,
                                band=params.band, min_valid=min_valid, batch_size=params.batch_size,
                                device=params.device, runtime=encoder.runtime, block_reads=params.block_reads,
                                feedback=feedback, stats=stats)
    with contextlib.closing(tiles):
        for tile in tiles:
            for idx, valid, ok, emb in order.add(*tile):
                emb = quantise(emb) if emb is not None and len(emb) else None
                scored = score(emb) if (score is not None and emb is not None) else None
                consume(idx, quantise(valid), ok, emb, scored)
            check_cancelled(feedback)
    extra.update({k: stats[k] for k in ("workers", "worker_threads", "tiles", "read_mode") if k in stats})
    extra["cells_read"] = int(order.next)
    extra["scheduler"] = params.scheduler
    if "overhead_per_task_s" in stats:
        extra["overhead_per_task_s"] = round(stats["overhead_per_task_s"], 4)
    extra["encode_seconds"] = round(stats.get("task_seconds", 0.0), 3)
    extra["task_cpu_seconds"] = round(stats.get("task_cpu_seconds", 0.0), 3)
    return stats.get("task_seconds", 0.0)
