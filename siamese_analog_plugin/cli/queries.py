"""Command line: ``embed-area`` (embed once), ``similar`` and ``compare`` (query many)."""

from __future__ import annotations

from pathlib import Path

from ..engine.errors import InputError
from ..engine.feedback import ConsoleFeedback
from .options import add_model_args, fraction, non_negative_int, positive_float, positive_int, share_below_one


def _grid_args(p, cell_help: str) -> None:
    p.add_argument("--area", help="polygon file (GeoPackage, GeoJSON, Shapefile; any CRS); default: raster extent")
    p.add_argument("--area-layer", help="layer of the area file (default: the first)")
    p.add_argument("--cell-size", type=positive_float, help=cell_help)
    p.add_argument("--stride", type=positive_float, help="distance between cells in metres (default: the cell size)")
    p.add_argument("--min-coverage", type=fraction, default=0.5, help="keep cells at least this share inside the area")
    p.add_argument("--max-nodata", type=share_below_one, default=0.5,
                   help="skip cells with more nodata than this share")
    p.add_argument("--band", type=positive_int, help="raster band to use (default: luminance of RGB, or band 1)")
    p.add_argument("--max-cells", type=positive_int, default=1_000_000, help="refuse larger grids unless --force")
    p.add_argument("--force", action="store_true", help="run even when the cell count is above --max-cells")


# -- embed-area ----------------------------------------------------------------------------------
def register_embed_area(sub) -> None:
    p = sub.add_parser("embed-area", help="embed an area's cells once into an embedding raster",
                       description="Cut an area of imagery into cells, encode every cell and write an embedding "
                                   "raster: a tiled GeoTIFF on the cell grid with one band per embedding dimension "
                                   "(and one of valid-pixel share). search --embeddings, similar, compare and "
                                   "fewshot-map --embeddings then answer from it without encoding again.")
    p.add_argument("--raster", required=True, help="imagery (GeoTIFF or any georeferenced GDAL raster)")
    _grid_args(p, "cell side in metres (default: 100 raster pixels)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="embedding raster to write (.tif)")
    p.add_argument("--scheduler", help="embed the cells on Dask: local[:N], tcp://HOST:PORT or a scheduler file "
                                       "(default: this process; see docs/distributed.md)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_embed_area)


def cmd_embed_area(args) -> int:
    from ..engine.embed import EmbedParams, run_embed_area
    from ..engine.safety import check_outputs
    from ..engine.vector import read_area

    check_outputs({"--out": args.out}, {"--raster": args.raster, "--area": args.area, "--model": args.model})
    area = read_area(args.area, args.area_layer) if args.area else None
    params = EmbedParams(raster=args.raster, area=area, cell_size_m=args.cell_size, stride_m=args.stride,
                         min_coverage=args.min_coverage, max_nodata=args.max_nodata, band=args.band,
                         model=args.model, device=args.device, batch_size=args.batch_size, max_cells=args.max_cells,
                         force=args.force, runtime=args.runtime, scheduler=args.scheduler)
    r = run_embed_area(params, args.out, ConsoleFeedback(quiet=args.quiet))
    print(f"Embedded {r.encoded:,} of {len(r.grid):,} cells of {r.grid.cell_size_m:g} m "
          f"(grid {r.grid.n_rows} x {r.grid.n_cols}) in {r.seconds:.1f} s on {r.device}; wrote {args.out}")
    return 0


# -- similar -------------------------------------------------------------------------------------
def register_similar(sub) -> None:
    p = sub.add_parser("similar", help="where else does the ground look like this cell? (from an embedding raster)",
                       description="Dissimilarity of every cell of an embedding raster to an example: the cell under "
                                   "a point, cells by id, or an image. Writes a GeoTIFF and a cell layer like search.")
    p.add_argument("--embeddings", required=True, help="embedding raster (from embed-area)")
    p.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"),
                   help="the example is the cell holding this point (repeat for several)")
    p.add_argument("--crs", help="CRS of --point (e.g. EPSG:4326 for lon lat; default: the raster's)")
    p.add_argument("--cells", nargs="+", type=int, help="the examples are these cell ids (the cell layer's id)")
    p.add_argument("--image", nargs="+", help="the example is this image (encoded with the raster's model)")
    p.add_argument("--model", help="the model that made the embedding raster, where it has moved since (default: "
                                   "the path the raster records)")
    p.add_argument("--aggregate", choices=("nearest", "mean"), default="nearest",
                   help="with several examples: distance to the nearest one or to their mean")
    p.add_argument("--max-nodata", type=share_below_one, default=0.5,
                   help="leave out cells with more nodata than this share")
    p.add_argument("--device", default="auto", help="for --image: auto | cpu | cuda (default: auto)")
    p.add_argument("--runtime", default="auto", choices=("auto", "onnx", "torch"),
                   help="for --image: inference runtime")
    p.add_argument("--out-raster", required=True, help="dissimilarity GeoTIFF to write")
    p.add_argument("--out-cells", required=True, help="GeoPackage of cells to write")
    p.add_argument("--out-png", help="also write a picture of the map")
    p.add_argument("--top", type=non_negative_int, default=10, help="how many most similar cells to print and list")
    p.add_argument("--json", action="store_true", help="print the most similar cells as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_similar)


def cmd_similar(args) -> int:
    from ..engine.outputs import check_destination
    from ..engine.safety import check_output_format, check_outputs, hold_destinations
    from ..engine.similar import SimilarParams, run_similar
    from . import report_sites

    outputs = {"--out-raster": args.out_raster, "--out-cells": args.out_cells, "--out-png": args.out_png}
    check_outputs(outputs, {"--embeddings": args.embeddings, "--image": args.image, "--model": args.model})
    check_output_format(args.out_raster, "output raster", (".tif", ".tiff"), "GeoTIFF")
    check_output_format(args.out_cells, "output cell layer", (".gpkg",), "GeoPackage")
    check_output_format(args.out_png, "picture", (".png",), "PNG picture")
    if args.out_png:
        check_destination(args.out_png, "picture")
    params = SimilarParams(embeddings=args.embeddings, points=[tuple(p) for p in args.point] if args.point else None,
                           crs=args.crs, cells=args.cells, images=args.image, aggregate=args.aggregate,
                           max_nodata=args.max_nodata, device=args.device, top_k=args.top, runtime=args.runtime,
                           model=args.model)
    with hold_destinations(list(filter(None, outputs.values()))):  # the picture, drawn last, too
        result = run_similar(params, args.out_raster, args.out_cells, ConsoleFeedback(quiet=args.quiet))
        examples = ", ".join(Path(r.path).name for r in result.references)
        report_sites(result, args, f"Cells most like {examples}", "more alike", [args.out_raster, args.out_cells])
    return 0


# -- compare -------------------------------------------------------------------------------------
def register_compare(sub) -> None:
    p = sub.add_parser("compare", help="regions x Mars references: min, quartiles and best site of each pair",
                       description="For every region of a polygon layer and every Mars reference: the minimum, "
                                   "quartiles, median and maximum dissimilarity over the region's cells and the "
                                   "lon/lat of its best cell (the paper's table), as CSV, an HTML page with the "
                                   "heatmap matrix and a box plot per region, and optionally the cell layer.")
    p.add_argument("--raster", help="Earth imagery (optional with --embeddings)")
    p.add_argument("--embeddings", help="embedding raster of the imagery covering the regions (from embed-area)")
    p.add_argument("--regions", required=True, help="polygon layer of the regions (GeoPackage, GeoJSON, Shapefile)")
    p.add_argument("--regions-layer", help="layer of the regions file (default: the first)")
    p.add_argument("--name-field", required=True, help="field holding each region's name")
    p.add_argument("--reference", required=True, nargs="+",
                   help="Mars reference image(s) or folder(s) of them: one column of the matrix each")
    p.add_argument("--cell-size", type=positive_float,
                   help="cell side in metres (default: the references' ground size, else 100 raster pixels)")
    p.add_argument("--stride", type=positive_float, help="distance between cells in metres (default: the cell size)")
    p.add_argument("--min-coverage", type=fraction, default=0.5, help="keep cells at least this share inside a region")
    p.add_argument("--max-nodata", type=share_below_one, default=0.5,
                   help="skip cells with more nodata than this share")
    p.add_argument("--band", type=positive_int, help="raster band to use")
    p.add_argument("--reference-resolution", type=positive_float,
                   help="metres per pixel of non-georeferenced references")
    add_model_args(p)
    p.add_argument("--max-cells", type=positive_int, default=1_000_000, help="refuse larger grids unless --force")
    p.add_argument("--force", action="store_true")
    p.add_argument("--out-csv", required=True, help="the table to write (.csv)")
    p.add_argument("--out-html", help="also an HTML page with the heatmap and box plots")
    p.add_argument("--out-cells", help="also the cell layer (.gpkg), one dissimilarity column per reference")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from ..engine.compare import CompareParams, run_compare
    from ..engine.safety import check_outputs

    check_outputs({"--out-csv": args.out_csv, "--out-html": args.out_html, "--out-cells": args.out_cells},
                  {"--raster": args.raster, "--embeddings": args.embeddings, "--regions": args.regions,
                   "--reference": args.reference, "--model": args.model})
    if not args.raster and not args.embeddings:
        raise InputError("compare needs the imagery (--raster) or its embeddings (--embeddings)",
                         "Give --raster FILE, or --embeddings EMB.tif made by embed-area")
    params = CompareParams(raster=args.raster, regions=args.regions, name_field=args.name_field,
                           references=args.reference, regions_layer=args.regions_layer, embeddings=args.embeddings,
                           cell_size_m=args.cell_size, stride_m=args.stride, min_coverage=args.min_coverage,
                           max_nodata=args.max_nodata, band=args.band, reference_resolution_m=args.reference_resolution,
                           model=args.model, device=args.device, batch_size=args.batch_size,
                           max_cells=args.max_cells, force=args.force, runtime=args.runtime)
    result = run_compare(params, args.out_csv, args.out_html, args.out_cells, ConsoleFeedback(quiet=args.quiet))
    width = max(len(r) for r in result.regions) + 2
    print(f"\nMinimum dissimilarity (lower = more Mars-like), {len(result.regions)} regions x "
          f"{len(result.references)} references:")
    print(" " * width + "".join(f"{Path(r).stem[:14]:>16}" for r in result.references))
    for region in result.regions:
        cells = [row for row in result.rows if row["region"] == region]
        print(f"{region:<{width}}" + "".join(f"{row['min']:>16.4f}" if row["cells"] else f"{'-':>16}"
                                            for row in cells))
    print(f"\nWrote {', '.join(p for p in (args.out_csv, args.out_html, args.out_cells) if p)}")
    return 0
