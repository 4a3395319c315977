"""Command line: ``fewshot``, ``fewshot-map``, ``evaluate-fewshot`` (landforms from a few examples)."""

from __future__ import annotations

import json
import time

import numpy as np

from ..engine.classes import DEFAULT_SCALE
from ..engine.classify import classify_folder, write_predictions_csv
from ..engine.errors import InputError
from ..engine.feedback import ConsoleFeedback
from ..engine.landforms import FewShotParams, run_fewshot_map
from ..engine.outputs import atomic_outputs, check_destination
from ..engine.support import read_labelled_features
from ..learning.fewshot_eval import HIRISE_CLASSES, evaluate_fewshot, parse_transfer_models, results_table
from ..learning.splits import HeldOutSplit
from .options import add_model_args, fraction, non_negative_int, positive_float, positive_int, share_below_one


def cmd_fewshot(args) -> int:
    feedback = ConsoleFeedback(quiet=args.quiet)
    rows, clf = classify_folder(args.support, args.query, args.model, args.device, args.batch_size, feedback,
                                scale=args.scale, runtime=args.runtime)
    write_predictions_csv(args.out, rows)
    counts = {c: sum(r["predicted"] == c for r in rows) for c in clf.class_names}
    print("Predicted: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    # When the query folder is itself <class>/*, say how often the prediction matches.
    truth = [r["path"].split("/", 1)[0] for r in rows]
    if all("/" in r["path"] for r in rows) and set(truth) <= set(clf.class_names):
        acc = np.mean([t == r["predicted"] for t, r in zip(truth, rows)])
        print(f"Accuracy against the query sub-folder names: {100 * acc:.1f} % of {len(rows)} images")
    print(f"Wrote {args.out}")
    return 0


def cmd_fewshot_map(args) -> int:
    from ..engine.safety import check_output_format, check_outputs, hold_destinations

    # Before anything is read: formats, outputs that are inputs or one another, the lock.
    check_outputs({"--out-raster": args.out_raster, "--out-cells": args.out_cells},
                  {"--raster": args.raster, "--embeddings": args.embeddings, "--labels": args.labels,
                   "--area": args.area, "--support": args.support, "--model": args.model})
    check_output_format(args.out_raster, "class raster", (".tif", ".tiff"), "GeoTIFF")
    check_output_format(args.out_cells, "cell layer", (".gpkg",), "GeoPackage")
    with hold_destinations([args.out_raster, args.out_cells]):
        return _fewshot_map(args)


def _fewshot_map(args) -> int:
    from ..engine.vector import read_area

    feedback = ConsoleFeedback(quiet=args.quiet)
    if bool(args.labels) == bool(args.support):
        if not args.labels and not args.support and args.model:
            support = None  # a step-2 model carries its classes
        else:
            raise InputError("Give either --labels (points/polygons with --class-field) or --support (a folder)",
                             "Use one source of labelled examples")
    elif args.labels:
        if not args.class_field:
            raise InputError("--labels needs --class-field", "Name the field that holds each example's class")
        support = read_labelled_features(args.labels, args.class_field, args.labels_layer)
    else:
        support = args.support
    params = FewShotParams(raster=args.raster, area=read_area(args.area, args.area_layer) if args.area else None,
                           cell_size_m=args.cell_size, stride_m=args.stride, min_coverage=args.min_coverage,
                           max_nodata=args.max_nodata, band=args.band, model=args.model, device=args.device,
                           batch_size=args.batch_size, max_cells=args.max_cells, force=args.force, scale=args.scale,
                           embeddings=args.embeddings, runtime=args.runtime)
    result = run_fewshot_map(params, support, args.out_raster, args.out_cells, feedback)
    print(f"Classified {int(result.classified.sum()):,} of {len(result.grid):,} cells in {result.seconds:.1f} s:")
    for c, n in result.counts().items():
        print(f"  {c:<20} {n:>8,}")
    print(f"Wrote {args.out_raster or ''} {args.out_cells or ''}".rstrip())
    return 0


def cmd_evaluate_fewshot(args) -> int:
    feedback = ConsoleFeedback(quiet=args.quiet)
    datasets = {}
    if args.hirise:
        datasets["HiRISE"] = (args.hirise, args.hirise_classes or list(HIRISE_CLASSES))
    if args.aid:
        datasets["AID"] = (args.aid, None)
    if not datasets:
        raise InputError("No dataset to evaluate on", "Give --hirise DIR and/or --aid DIR")
    models = {"encoder": args.model}
    if args.transfer_model:
        models["stepwise transfer"] = parse_transfer_models(args.transfer_model, list(datasets))
    for out in (args.out, args.markdown):
        if out:
            check_destination(out, "results file")
    t = time.perf_counter()
    report = evaluate_fewshot(datasets, models, tuple(args.shots), args.draws, args.max_per_class, args.seed,
                              args.adapt_steps, args.device, feedback, split=HeldOutSplit.load(args.split, args.model),
                              threads=args.threads)
    report["facts"]["seconds"] = round(time.perf_counter() - t, 1)
    table = results_table(report)
    print(table)
    print(f"\n{args.draws} draws of the support set; {report['facts']['metric']}; at most {args.max_per_class} "
          f"held-out images a class; {report['facts']['seconds']} s")
    if args.out:
        with atomic_outputs({"json": args.out}) as tmp, open(tmp["json"], "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        print(f"Wrote {args.out}")
    if args.markdown:
        with atomic_outputs({"md": args.markdown}) as tmp, open(tmp["md"], "w", encoding="utf-8") as fh:
            fh.write(table + "\n")
        print(f"Wrote {args.markdown}")
    return 0


def register(sub) -> None:
    """Add ``fewshot``, ``fewshot-map``, ``evaluate-fewshot`` and ``transfer`` to the command line."""
    p = sub.add_parser("fewshot", help="classify images from a few labelled examples per class",
                       description="Classify every image under --query with a cosine-distance classifier whose "
                                   "class prototypes are the mean embeddings of the examples in --support/<class>/*. "
                                   "Writes a CSV: path (relative to --query), predicted, cosine, confidence, margin "
                                   "and cos_<class> for every class.")
    p.add_argument("--support", help="folder of labelled examples: <class>/* images (optional with a model "
                                     "written by 'transfer --step 2')")
    p.add_argument("--query", required=True, help="folder of images to classify (searched recursively)")
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--scale", type=positive_float, default=None, help=f"logit scale for the confidence (default "
                                                             f"{DEFAULT_SCALE:g} or the model's)")
    add_model_args(p, "patches")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fewshot)

    p = sub.add_parser("fewshot-map", help="map landforms over an area from a few labelled examples",
                       description="Cut the area into cells, classify each cell with a cosine-distance classifier "
                                   "built from labelled points/polygons on the raster (or image folders), and write "
                                   "a class GeoTIFF (with colour table) and a GeoPackage of cells (class, cosine, "
                                   "confidence, margin).")
    p.add_argument("--raster", required=True, help="imagery to map (georeferenced)")
    p.add_argument("--embeddings", help="embedding raster of this imagery (from embed-area): its cells are "
                                        "classified without encoding them again")
    p.add_argument("--labels", help="points or polygons with a class field (GeoPackage, GeoJSON, Shapefile)")
    p.add_argument("--labels-layer", help="layer of the labels file (default: the first)")
    p.add_argument("--class-field", help="field holding each example's class")
    p.add_argument("--support", help="instead of --labels: folder of <class>/* example images")
    p.add_argument("--area", help="polygon file (default: the raster's extent)")
    p.add_argument("--area-layer", help="layer of the area file")
    p.add_argument("--cell-size", type=positive_float, help="cell side in metres (default: 100 raster pixels)")
    p.add_argument("--stride", type=positive_float, help="distance between cells in metres (default: the cell size)")
    p.add_argument("--min-coverage", type=fraction, default=0.5)
    p.add_argument("--max-nodata", type=share_below_one, default=0.5)
    p.add_argument("--band", type=positive_int)
    p.add_argument("--scale", type=positive_float, default=None, help="logit scale for the confidence")
    add_model_args(p, "patches", "the shipped model; on a Mars raster the shipped Mars landform model, "
                                  "models/siamese_compact_mars")
    p.add_argument("--max-cells", type=positive_int, default=1_000_000)
    p.add_argument("--force", action="store_true")
    p.add_argument("--out-raster", required=True, help="class GeoTIFF to write")
    p.add_argument("--out-cells", required=True, help="GeoPackage of cells to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fewshot_map)

    p = sub.add_parser("evaluate-fewshot", help="k-shot accuracy: encoder, stepwise transfer, texture baseline",
                       description="k-shot balanced accuracy of the cosine classifier on held-out images (the test "
                                   "part of the scene split), over random draws of the support set, reported as "
                                   "mean ± std, for the encoder, the stepwise-transfer model and the texture "
                                   "baseline.")
    p.add_argument("--hirise", help="HiRISE landmark folder (<class>/*.jpg)")
    p.add_argument("--hirise-classes", nargs="+", help=f"classes to use (default: {' '.join(HIRISE_CLASSES)})")
    p.add_argument("--aid", help="AID folder (<Class>/*.jpg; all classes)")
    p.add_argument("--model", default=None, help="the encoder (default: the shipped model)")
    p.add_argument("--transfer-model", nargs="+",
                   help="model after the stepwise transfer (transfer --step 1), for every dataset; or one per "
                        "dataset as HiRISE=FILE AID=FILE (step 1 on that dataset's labelled training images)")
    p.add_argument("--shots", type=positive_int, nargs="+", default=[1, 5, 10])
    p.add_argument("--draws", type=positive_int, default=10, help="random support draws per k (default: 10)")
    p.add_argument("--max-per-class", type=positive_int, default=60,
                   help="held-out images used per class (default: 60)")
    p.add_argument("--adapt-steps", type=non_negative_int, default=0,
                   help="also fine-tune the last layers on each support draw for this many steps (step 2)")
    p.add_argument("--split", help="split.json of held-out images (default: the one beside the shipped model, "
                                   "else a hash of the scene id)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default: 1, fastest for the many small fine-tuning steps)")
    p.add_argument("--out", help="JSON file of all results")
    p.add_argument("--markdown", help="Markdown table to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate_fewshot)

