"""Command line: ``bench``."""

from __future__ import annotations

import json

from ..engine.benchmark import run_benchmark
from .options import positive_float, positive_int


def register(subparsers) -> None:
    """Add the ``bench`` sub-command."""
    p = subparsers.add_parser("bench", help="measure the search's speed and memory",
                              description="Make large rasters and measure: end-to-end cells/s vs the encoder alone, "
                                          "vs a naive loop, peak memory at three area sizes, cached re-query time. "
                                          "The last line printed is a JSON object of the figures.")
    p.add_argument("--cells", type=positive_int,
                   help="cells of the speed run (default 16384: seconds of search, so its fixed costs weigh little; "
                        "--quick: 144)")
    p.add_argument("--rss-cells", help="comma-separated area sizes for memory (default 1000,10000,100000)")
    p.add_argument("--model", default=None,
                   help="shipped (default; an untrained network of its architecture when absent), untrained, tiny "
                        "or a model file")
    p.add_argument("--rss-model", default="auto",
                   help="model of the memory runs: auto (the model when fast enough, else tiny), or as --model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--runtime", default="auto", choices=("auto", "onnx", "torch", "both"),
                   help="inference runtime as the search chooses it (auto), onnx, torch, or both: the figures of "
                        "auto's choice plus end-to-end and model-only speeds of each runtime")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--naive-seconds", type=positive_float, help="time given to the naive loop (default 20; --quick: 2)")
    p.add_argument("--workdir", help="keep the rasters and outputs here (default: a temporary folder)")
    p.add_argument("--requery-cells", type=positive_int,
                   help="cells of the embedding-raster re-query (default 1,000,000; --quick: 10,000)")
    p.add_argument("--quick", action="store_true", help="small sizes and the tiny model: a smoke run of seconds")
    p.add_argument("--distributed", action="store_true",
                   help="instead: the search on Dask LocalClusters against the single-process pipeline "
                        "(default 50,176 cells; --quick: 400 cells, the tiny model)")
    p.add_argument("--workers", default="1,2", help="with --distributed: worker counts to run (default 1,2)")
    p.set_defaults(func=cmd_bench)


def _export(pt_path: str) -> None:
    """The onnx runtime's model for a .pt the bench made (the export needs torch and onnx)."""
    from pathlib import Path

    from ..learning.export import export_onnx

    export_onnx(pt_path, Path(pt_path).with_suffix(".onnx"))


def cmd_bench(args) -> int:
    quick = args.quick
    if args.distributed:
        from ..engine.benchmark_distributed import run_distributed_benchmark

        figures = run_distributed_benchmark(args.cells or (400 if quick else 50_176),
                                            tuple(int(v) for v in args.workers.split(",")),
                                            args.model or ("tiny" if quick else "shipped"), args.batch_size,
                                            workdir=args.workdir, log=lambda m: print(m, flush=True))
        print(json.dumps(figures))
        return 0
    cells = args.cells or (144 if quick else 16384)
    rss = tuple(int(v) for v in args.rss_cells.split(",")) if args.rss_cells else \
        ((100, 400, 1600) if quick else (1000, 10000, 100000))
    model = args.model or ("tiny" if quick else "shipped")
    naive = args.naive_seconds if args.naive_seconds is not None else (2.0 if quick else 20.0)
    requery = args.requery_cells or (10_000 if quick else 1_000_000)
    figures = run_benchmark(cells, rss, model, args.rss_model, args.device, args.batch_size, naive, args.workdir,
                            log=lambda m: print(m, flush=True), requery_cells=requery, runtime=args.runtime,
                            export=_export)
    print(json.dumps(figures))
    return 0


