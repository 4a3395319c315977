"""Command line over the engine: ``python -m siamese_analog_plugin <command> ...``.

Every command is registered here, in :data:`COMMANDS`: the engine's (``search``, ``embed``,
``info``, ...) in this module, the others in the modules of this package beside it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from .. import __version__
from ..engine.errors import AnalogFinderError
from .options import (
    OneLineParser,
    add_model_args,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
    share_below_one,
)

# Every command of the command line, in the order ``--help`` lists them: (module of this
# package, function that adds its parser(s)). "" is this module.
COMMANDS = (
    ("", "_search_parser"),
    ("", "_embed_parser"),
    ("", "_info_parser"),
    ("queries", "register_embed_area"),
    ("queries", "register_similar"),
    ("queries", "register_compare"),
    ("landforms", "register"),
    ("learning", "register_train"),
    ("learning", "register_pretrain"),
    ("learning", "register_evaluate"),
    ("learning", "register_transfer"),
    ("learning", "register_export"),
    ("bench", "register"),
)


def _search_parser(sub) -> None:
    p = sub.add_parser("search", help="map how Mars-like every cell of an area is",
                       description="Cut an area of Earth imagery into cells, compare each with a Mars reference "
                                   "image and write a dissimilarity GeoTIFF and a GeoPackage of cells. "
                                   "Low dissimilarity = more Mars-like.")
    p.add_argument("--raster", help="Earth imagery (GeoTIFF or any georeferenced GDAL raster); optional with "
                                    "--embeddings")
    p.add_argument("--embeddings", help="query this embedding raster (from embed-area) instead of encoding: "
                                        "its grid, raster and model are used")
    p.add_argument("--keep-embeddings", help="also write the cells' embeddings to this embedding raster (.tif)")
    p.add_argument("--reference", required=True, nargs="+",
                   help="Mars reference image(s) (PNG/JPEG/GeoTIFF) or folder(s) of them")
    p.add_argument("--area", help="polygon file (GeoPackage, GeoJSON, Shapefile; any CRS); default: raster extent")
    p.add_argument("--area-layer", help="layer of the area file (default: the first)")
    p.add_argument("--cell-size", type=positive_float,
                   help="cell side in metres (default: the reference's ground size when it is georeferenced, "
                        "else 100 raster pixels)")
    p.add_argument("--stride", type=positive_float, help="distance between cells in metres (default: the cell size)")
    p.add_argument("--min-coverage", type=fraction, default=0.5, help="keep cells at least this share inside the area")
    p.add_argument("--max-nodata", type=share_below_one, default=0.5,
                   help="skip cells with more nodata than this share")
    p.add_argument("--band", type=positive_int, help="raster band to use (default: luminance of RGB, or band 1)")
    p.add_argument("--reference-resolution", type=positive_float,
                   help="metres per pixel of references that are not georeferenced")
    p.add_argument("--aggregate", choices=("nearest", "mean"), default="nearest",
                   help="with several references: distance to the nearest one or to their mean")
    add_model_args(p)
    p.add_argument("--max-cells", type=positive_int, default=1_000_000, help="refuse larger grids unless --force")
    p.add_argument("--force", action="store_true", help="run even when the cell count is above --max-cells")
    p.add_argument("--out-raster", required=True, help="dissimilarity GeoTIFF to write")
    p.add_argument("--out-cells", required=True, help="GeoPackage of cells to write")
    p.add_argument("--out-png", help="also write a picture of the map")
    p.add_argument("--top", type=non_negative_int, default=10, help="how many best sites to print and list")
    p.add_argument("--cache", help="folder of cached cell embeddings: a later search of the same area, raster and "
                                   "model only computes distances")
    p.add_argument("--amp", action="store_true",
                   help="on CUDA, encode in mixed precision (dissimilarity within ~0.03)")
    p.add_argument("--scheduler", help="embed the cells on Dask: local[:N] (N worker processes here), "
                                       "tcp://HOST:PORT (a running scheduler) or a scheduler file (.json/.yaml); "
                                       "default: this process (see docs/distributed.md)")
    p.add_argument("--json", action="store_true", help="print the best sites as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from ..engine.outputs import check_destination
    from ..engine.safety import check_output_format, check_outputs, hold_destinations

    # Before anything is read: formats, outputs that are inputs or one another, the lock.
    outputs = {"--out-raster": args.out_raster, "--out-cells": args.out_cells, "--out-png": args.out_png,
               "--keep-embeddings": args.keep_embeddings}
    check_outputs(outputs, {"--raster": args.raster, "--embeddings": args.embeddings, "--reference": args.reference,
                            "--area": args.area, "--model": args.model})
    check_output_format(args.keep_embeddings, "embedding raster", (".tif", ".tiff"), "GeoTIFF")
    check_output_format(args.out_raster, "output raster", (".tif", ".tiff"), "GeoTIFF")
    check_output_format(args.out_cells, "output cell layer", (".gpkg",), "GeoPackage")
    check_output_format(args.out_png, "picture", (".png",), "PNG picture")
    for path, what in ((args.out_raster, "output raster"), (args.out_cells, "output cell layer"),
                       (args.out_png, "picture")):
        if path:
            check_destination(path, what)
    with hold_destinations(list(filter(None, outputs.values()))):
        return _search(args)


def _search(args) -> int:
    from ..engine.feedback import ConsoleFeedback
    from ..engine.search import SearchParams, run_search
    from ..engine.vector import read_area

    feedback = ConsoleFeedback(quiet=args.quiet)
    area = read_area(args.area, args.area_layer) if args.area else None
    params = SearchParams(
        raster=args.raster, references=args.reference, area=area, cell_size_m=args.cell_size,
        stride_m=args.stride, min_coverage=args.min_coverage, max_nodata=args.max_nodata, band=args.band,
        reference_resolution_m=args.reference_resolution, model=args.model, device=args.device,
        batch_size=args.batch_size, aggregate=args.aggregate, max_cells=args.max_cells, force=args.force,
        top_k=args.top, cache_dir=args.cache, amp=args.amp, embeddings=args.embeddings,
        keep_embeddings=args.keep_embeddings, runtime=args.runtime, scheduler=args.scheduler)
    if not args.raster and not args.embeddings:
        from ..engine.errors import InputError

        raise InputError("search needs the imagery (--raster) or its embeddings (--embeddings)",
                         "Give --raster FILE, or --embeddings EMB.tif made by embed-area")
    also = None
    if args.out_png:
        from ..engine.figures import render_search_png

        # The picture is one of the run's outputs: moved into place with the others, or none is.
        also = {"png": (args.out_png, lambda result, tmp: render_search_png(
            result, args.raster or result.extra.get("raster"), tmp, top=min(args.top, 5)))}
    result = run_search(params, args.out_raster, args.out_cells, feedback, also_write=also)
    report_sites(result, args, "Best analog sites", "more Mars-like",
                 [args.out_raster, args.out_cells, args.keep_embeddings, args.out_png], picture_written=True)
    return 0


def report_sites(result, args, title: str, lower: str, written: list, picture_written: bool = False) -> None:
    """Print the best cells of a search-like result (or JSON), what was written, and the picture
    (unless the run already wrote it with its other outputs: ``picture_written``)."""
    best = result.best(args.top)
    if args.json:
        print(json.dumps({"device": result.device, "cells": len(result.grid), "seconds": round(result.seconds, 3),
                          "best": best}, indent=2))
    else:
        print(f"\n{title} (of {int(result.scored.sum()):,} cells scored; lower = {lower}):")
        print(f"{'rank':>4} {'id':>7} {'row':>5} {'col':>5} {'dissimilarity':>13} {'lon':>12} {'lat':>11}  reference")
        for s in best:
            print(f"{s['rank']:>4} {s['id']:>7} {s['row']:>5} {s['col']:>5} {s['dissimilarity']:>13.4f} "
                  f"{s['lon']:>12.6f} {s['lat']:>11.6f}  {s['reference']}")
    written = [w for w in written if w]
    say = sys.stderr if args.json else sys.stdout  # with --json, standard output is the JSON alone
    if written:
        print(f"\nWrote {', '.join(written)}", file=say)
    if getattr(args, "out_png", None) and not picture_written:
        from ..engine.figures import render_search_png

        raster = getattr(args, "raster", None) or result.extra.get("raster")
        render_search_png(result, raster, args.out_png, top=min(args.top, 5))
        print(f"Wrote {args.out_png}", file=say)


def _embed_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed every image under a folder",
                       description="Embed every image under DIR (recursively) and save arrays 'paths' "
                                   "(relative to DIR, forward slashes) and 'embeddings' (N x D) to an .npz file.")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help=".npz file to write")
    add_model_args(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    import numpy as np

    from ..engine.feedback import ConsoleFeedback
    from ..engine.image_embeddings import embed_folder
    from ..engine.outputs import atomic_outputs, check_destination
    from ..engine.safety import check_outputs

    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    check_outputs({"--out": out}, {"--images": args.images, "--model": args.model})
    check_destination(out, "output file")
    paths, emb, device = embed_folder(args.images, args.model, args.device, args.batch_size,
                                      ConsoleFeedback(quiet=args.quiet), runtime=args.runtime)
    with atomic_outputs({"npz": out}) as tmp:
        with open(tmp["npz"], "wb") as fh:
            np.savez(fh, paths=np.array(paths), embeddings=emb)
    print(f"Embedded {len(paths)} images into {emb.shape[1]}-d vectors on {device}; wrote {out}")
    return 0


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="the model card and the devices available")
    p.add_argument("--model", default=None, help="model file, .onnx or .pt (default: the shipped model)")
    p.add_argument("--runtime", default="auto", choices=("auto", "onnx", "torch"), help="inference runtime")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from ..engine.devices import available_devices
    from ..engine.runtime import default_model_path, load_runtime, onnxruntime_available, torch_available

    print(f"Siamese Analog Finder {__version__}")
    if onnxruntime_available():
        import onnxruntime

        print(f"onnxruntime {onnxruntime.__version__}: {', '.join(onnxruntime.get_available_providers())}")
    else:
        print("onnxruntime: not installed")
    if torch_available():
        print(f"torch devices available: {', '.join(available_devices())}")
    else:
        print("torch: not installed (the onnx runtime needs none)")
    enc = load_runtime(args.model, args.runtime, "cpu")
    print("\nModel card")
    print(enc.describe())
    card = Path(enc.path).with_name("README.md")
    if not args.model and card.exists():
        print(f"\nFull model card: {card}")
    elif not args.model:
        print(f"\n(default model: {default_model_path(enc.runtime)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m siamese_analog_plugin",
                                     description="Siamese Analog Finder: where on Earth does the ground look like "
                                                 "this patch of Mars?")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, function in COMMANDS:
        owner = importlib.import_module(f"{__name__}.{module}") if module else sys.modules[__name__]
        getattr(owner, function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..engine.safety import committed_outputs, install_signal_handlers, restore_signal_handlers

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    handlers = install_signal_handlers()  # SIGTERM as Ctrl-C: temporary files removed, older outputs kept
    # GDAL prints its own "ERROR 1: ..." lines besides the exception it raises; the one-line
    # error printed below already carries GDAL's message.
    os.environ.setdefault("CPL_LOG", os.devnull)
    before = len(committed_outputs())
    try:
        return int(args.func(args) or 0)
    except AnalogFinderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        written = committed_outputs()[before:]
        if written:
            print(f"interrupted after writing {', '.join(written)}", file=sys.stderr)
        else:
            print("interrupted: nothing was written", file=sys.stderr)
        return 130
    finally:
        restore_signal_handlers(handlers)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
