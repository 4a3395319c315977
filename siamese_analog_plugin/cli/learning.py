"""Command line: ``train``, ``pretrain``, ``evaluate``, ``transfer`` (the learning side; needs torch)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..engine.classes import DEFAULT_SCALE
from ..engine.encoder import load_model
from ..engine.errors import InputError
from ..engine.feedback import ConsoleFeedback
from ..learning.datasets import default_cache_dir, default_data_root, discover_dataset, split_by_scene
from ..learning.evaluation import evaluate_model, format_table
from ..learning.leakfree import SITE_ROWS, evaluate_leakfree, format_leakfree_table
from ..learning.pretrain import PretrainConfig, pretrain
from ..learning.splits import HeldOutSplit
from ..learning.training import DEFAULT_OUT, TrainConfig, train
from ..learning.transfer import transfer_step1, transfer_step2
from .options import non_negative_float, non_negative_int, positive_float, positive_int, share_below_one


def _cmd_train(args: argparse.Namespace) -> int:
    config = TrainConfig(
        data=args.data, arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, margin=args.margin, seed=args.seed, device=args.device,
        out=args.out or str(DEFAULT_OUT if args.arch == "compact" else DEFAULT_OUT.with_name("siamese_paper.pt")),
        resume=args.resume or None, augment=args.augment, pairs_per_epoch=args.pairs_per_epoch,
        embedding_dim=args.embedding_dim, test_fraction=args.test_fraction, schedule=args.schedule,
        cache_dir=None if args.no_cache else args.cache_dir, threads=args.threads,
        class_loss=args.class_loss, class_scale=args.class_scale, class_targets=args.class_targets,
        arch_params={**({"pooling": args.pooling} if args.pooling else {}),
                     **({"widths": list(args.widths)} if args.widths else {})},
        split=args.split, init=args.init or None, dune_train_sites=tuple(args.dune_sites))
    if args.widths and args.arch != "compact":
        raise InputError("--widths only applies to the compact network", "Leave --widths out with --arch paper")
    if args.dune_sites and args.split != "leakfree":
        raise InputError("--dune-sites only applies to the leak-free split", "Add --split leakfree")
    train(config, ConsoleFeedback(quiet=args.quiet))
    return 0


def register_train(subparsers) -> None:
    """Add the ``train`` subcommand to the command line."""
    p = subparsers.add_parser("train", help="Train a Siamese encoder on labelled image folders",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--data", default=d.data, help="data folder (default: %(default)s)")
    p.add_argument("--arch", choices=("compact", "paper"), default="compact",
                   help="compact (shipped default) or paper (the published 40 M-parameter network)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs,
                   help="epochs (default %(default)s; the paper ran 300)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="labelled pairs per batch")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    p.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay, help="Adam weight decay")
    p.add_argument("--margin", type=positive_float, default=d.margin, help="contrastive margin")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split, initialisation and draws")
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--out", default="", help="model file to write (default: models/siamese_compact.pt)")
    p.add_argument("--resume", default="", help="continue from a training-state file (OUT.state.pt)")
    p.add_argument("--augment", type=positive_int, default=d.augment,
                   help="augmented views of each training image over the run (the paper's x10)")
    p.add_argument("--pairs-per-epoch", type=positive_int, default=None,
                   help="epoch length in pairs (default: augment x training images / (2 x epochs); "
                        "the shipped model used 5120)")
    p.add_argument("--embedding-dim", type=positive_int, default=None,
                   help="embedding size (default: 32 compact, 5 paper)")
    p.add_argument("--test-fraction", type=share_below_one, default=d.test_fraction,
                   help="held-out share (default 0.1)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule, help="learning-rate schedule")
    p.add_argument("--cache-dir", default=str(default_cache_dir()), help="decoded-patch cache (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="decode images without a disk cache")
    p.add_argument("--threads", type=positive_int, default=d.threads, help="CPU threads for torch")
    p.add_argument("--pooling", choices=("meanstd", "center"), default=None,
                   help="compact network pooling (default: the architecture default)")
    p.add_argument("--widths", type=positive_int, nargs="+", default=None, metavar="N",
                   help="compact trunk: filters of each conv layer, 2x2 max-pooling between them "
                        "(default 16 32 64 128)")
    p.add_argument("--class-loss", type=non_negative_float, default=d.class_loss,
                   help="weight of the auxiliary cosine-proxy class loss (0: contrastive only)")
    p.add_argument("--class-scale", type=positive_float, default=d.class_scale, help="logit scale of the class loss")
    p.add_argument("--class-targets", choices=("all", "non_analog"), default=d.class_targets,
                   help="groups scored by the class loss: all, or only those without a cross-group analog")
    p.add_argument("--split", choices=("legacy", "leakfree"), default=d.split,
                   help="leakfree: train/val/test with no ground on two sides (learning/leakfree.py); legacy: 9:1")
    p.add_argument("--dune-sites", nargs="+", default=[], metavar="SITE",
                   help="with --split leakfree: Earth dune-field sites to train on (all = every site); the others "
                        "stay test folds. One model per left-out site gives the leave-one-site-out estimate")
    p.add_argument("--init", default="", help="model file whose weights start the run (a pretrain output)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_train)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if not args.legacy and not args.fewshot:
        return _cmd_evaluate_leakfree(args)  # the default protocol: no ground on two sides
    fb = ConsoleFeedback(quiet=args.quiet)
    results = evaluate_model(args.model or None, args.data, args.seed, args.test_fraction,
                             baselines=not args.no_baselines, device=args.device,
                             cache_dir=None if args.no_cache else args.cache_dir, feedback=fb)
    info = results["_info"]
    print(f"held-out images: {info['held_out_images']} (seed {info['seed']}, "
          f"test fraction {info['test_fraction']})")
    print(format_table(results))
    if args.fewshot:
        results["fewshot"] = _fewshot_section(args, info["seed"], info["test_fraction"], fb)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


def _leakfree_evaluate_args(p: argparse.ArgumentParser) -> None:
    """Options of the leak-free protocol on the ``evaluate`` command."""
    p.add_argument("--part", choices=("val", "test"), default="test",
                   help="leak-free split side: val (for choices) or test (model-card numbers; default)")
    p.add_argument("--compare", nargs="*", default=[], metavar="LABEL=FILE",
                   help="more model files scored in the same run")
    p.add_argument("--fewshot-method", choices=("prototype", "knn"), default="prototype",
                   help="5-shot classifier (default %(default)s, as the fewshot command)")
    p.add_argument("--folds", nargs="*", default=None, metavar="FILE",
                   help="leave-one-site-out models: each dune site's rows are scored with the one that never saw "
                        "it (default for the shipped model: models/folds/*.pt; none: --folds with no file)")
    p.add_argument("--legacy", action="store_true",
                   help="the old protocol instead: the model's own 9:1 held-out split (leaks dune ground)")


def _cmd_evaluate_leakfree(args: argparse.Namespace) -> int:
    from ..engine.feedback import ConsoleFeedback

    fb = ConsoleFeedback(quiet=args.quiet)
    models: dict[str, str | None] = {"model": args.model or None}
    for item in args.compare:
        label, _, path = item.partition("=")
        if not path:
            raise InputError(f"'{item}' is not LABEL=FILE", "Write e.g. --compare new=models/new.pt")
        models[label] = path
    folds = args.folds
    if folds is None:  # the shipped model comes with its fold models
        from ..engine.encoder import default_model_path

        folds = sorted(str(f) for f in (default_model_path().parent / "folds").glob("*.pt")
                       if not f.name.endswith(".state.pt")) if not args.model else []
    t = time.perf_counter()
    report = evaluate_leakfree(models, args.data, args.part, args.seed if args.seed is not None else 0,
                               untrained=not args.no_baselines, texture=not args.no_baselines, draws=args.draws,
                               cache_dir=None if args.no_cache else args.cache_dir,
                               device="cpu" if args.device == "auto" else args.device, feedback=fb,
                               fewshot_method=args.fewshot_method, folds=folds)
    info = report["info"]
    print(f"\nLeak-free {info['part']} split (seed {info['seed']}): {info['images']} images, "
          f"{info['hirise_observations']} HiRISE observations, dune sites {info['sites'] or 'none (val: AID Desert)'}"
          f" ({time.perf_counter() - t:.0f} s)")
    if info["folds"]:
        print("site rows of 'model' from fold models that never saw the site: "
              + ", ".join(f"{s} <- {Path(f).name}" for s, f in info["folds"].items()))
    print(format_leakfree_table(report))
    first = report["columns"].get("model", {})
    for row in SITE_ROWS:
        per = first.get(row, {}).get("folds")
        if per:
            print(f"  {row} per site: " + ", ".join(f"{s} {v:.3f}" for s, v in per.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


def _fewshot_section(args: argparse.Namespace, seed: int, test_fraction: float, feedback) -> dict:
    """The k-shot part of ``evaluate --fewshot``: HiRISE classes and AID's 30 classes, on the
    held-out images of the same split as the retrieval numbers."""
    from ..learning.fewshot_eval import HIRISE_CLASSES, evaluate_fewshot, parse_transfer_models, results_table
    from ..learning.splits import HeldOutSplit

    root = Path(args.data)
    dataset = discover_dataset(root)
    held = split_by_scene(dataset.records, seed, test_fraction)
    split = HeldOutSplit({str(Path(r.path).resolve()) for r, h in zip(dataset.records, held) if h},
                         f"the evaluate split (seed {seed}, test fraction {test_fraction})")
    datasets = {name: (str(folder), classes) for name, folder, classes in (
        ("HiRISE", root / "mars" / "hirise_landmarks", list(HIRISE_CLASSES)), ("AID", root / "earth" / "aid", None))
        if folder.is_dir()}
    if not datasets:
        raise InputError(f"No HiRISE or AID folder under '{root}' for --fewshot",
                         "Give --data the shared data folder (mars/hirise_landmarks, earth/aid)")
    models = {"encoder": args.model or None}
    if args.transfer_model:
        models["stepwise transfer"] = parse_transfer_models(args.transfer_model, list(datasets))
    report = evaluate_fewshot(datasets, models, tuple(args.shots), args.draws, adapt_steps=args.adapt_steps,
                              device="cpu" if args.device == "auto" else args.device, feedback=feedback,
                              split=split)
    print()
    print(results_table(report))
    return report


def register_evaluate(subparsers) -> None:
    """Add the ``evaluate`` subcommand to the command line."""
    p = subparsers.add_parser("evaluate", help="Evaluate a model on the held-out split, with baselines",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model file (default: the shipped model)")
    p.add_argument("--data", default=str(default_data_root()), help="data folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the one in the model file)")
    p.add_argument("--test-fraction", type=share_below_one, default=None,
                   help="held-out share (default: from the model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-baselines", action="store_true", help="skip the untrained and texture baselines")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--cache-dir", default=str(default_cache_dir()), help="decoded-patch cache (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="decode images without a cache")
    p.add_argument("--fewshot", action="store_true",
                   help="also the k-shot accuracy of the cosine classifier (HiRISE and AID held-out images, "
                        "texture baseline beside it; the same as evaluate-fewshot)")
    p.add_argument("--transfer-model", nargs="+", default=None,
                   help="with --fewshot: also score the stepwise-transfer model (transfer --step 1): one FILE for "
                        "both datasets, or HiRISE=FILE AID=FILE")
    p.add_argument("--shots", type=positive_int, nargs="+", default=[1, 5, 10], help="with --fewshot: k values")
    p.add_argument("--draws", type=positive_int, default=10, help="with --fewshot: random support draws per k")
    p.add_argument("--adapt-steps", type=non_negative_int, default=0,
                   help="with --fewshot: also score step-2 fine-tuning on each support draw for this many steps")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _leakfree_evaluate_args(p)
    p.set_defaults(func=_cmd_evaluate)


def cmd_transfer(args) -> int:
    feedback = ConsoleFeedback(quiet=args.quiet)
    if args.step == 0:
        enc = load_model(args.model, "cpu")
        print("Step 0 is the encoder trained on the large set; nothing to do. It is:\n" + enc.describe())
        return 0
    if args.step == 1:
        if not args.data:
            raise InputError("Step 1 needs --data, a folder of labelled Mars images (<class>/*)",
                             "e.g. --data /work/shared/data/mars/hirise_landmarks")
        r = transfer_step1(args.data, args.out, args.model, args.classes, args.epochs, args.batch_size, args.lr,
                           args.head_lr, args.max_per_class, args.device, args.seed, feedback,
                           HeldOutSplit.load(args.split, args.model))
    else:
        if not args.support:
            raise InputError("Step 2 needs --support, a folder of the few labelled examples (<class>/*)",
                             "Put a few images of each landform in its own sub-folder")
        r = transfer_step2(args.support, args.out, args.model, args.steps, args.adapt_lr, args.scale,
                           not args.no_augment, args.device, args.seed, feedback)
    print(f"Step {args.step} done in {r.seconds:.1f} s; wrote {r.path}")
    return 0


def register_transfer(sub) -> None:
    """Add the ``transfer`` command (``--step 1`` or ``--step 2``)."""
    p = sub.add_parser("transfer", help="stepwise transfer: fine-tune on labelled Mars (1), adapt to few examples (2)",
                       description="Stepwise deep feature transfer. Step 0 is the encoder trained on the large set "
                                   "(--model, default the shipped one). Step 1 fine-tunes it on a labelled Mars set "
                                   "(--data <class>/*, training scenes only) with a linear classifier head. Step 2 "
                                   "adapts a model to a few labelled examples (--support <class>/*) with a "
                                   "cosine-distance classifier and stores the classes in the model file.")
    p.add_argument("--step", type=int, choices=(0, 1, 2), required=True)
    p.add_argument("--model", default=None, help="parent model (default: the shipped model)")
    p.add_argument("--out", help="model file to write (.pt)")
    p.add_argument("--data", help="step 1: labelled Mars images, <class>/*")
    p.add_argument("--classes", nargs="+", help="step 1: classes to use (default: every class folder but 'edge')")
    p.add_argument("--epochs", type=positive_int, default=8, help="step 1 (default: 8)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="step 1 (default: 32)")
    # A small encoder rate keeps what step 0 learnt; a large head rate lets the linear head keep up.
    p.add_argument("--lr", type=positive_float, default=1e-4, help="step 1: encoder learning rate (default: 1e-4)")
    p.add_argument("--head-lr", type=positive_float, default=1e-2,
                   help="step 1: linear head learning rate (default: 1e-2)")
    p.add_argument("--max-per-class", type=positive_int, default=300,
                   help="step 1: images per class at most (default: 300)")
    p.add_argument("--split", help="step 1: split.json of held-out images, never trained on (default: the one "
                                   "beside the shipped model, else a hash of the scene id)")
    p.add_argument("--support", help="step 2: the few labelled examples, <class>/*")
    p.add_argument("--steps", type=non_negative_int, default=30,
                   help="step 2: fine-tuning steps of the last layers (0 = none)")
    p.add_argument("--adapt-lr", type=positive_float, default=1e-3, help="step 2: learning rate (default: 1e-3)")
    p.add_argument("--scale", type=positive_float, default=DEFAULT_SCALE, help="step 2: cosine logit scale")
    p.add_argument("--no-augment", action="store_true", help="step 2: no rotated/reflected copies of the examples")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_checked_transfer)


def _checked_transfer(args) -> int:
    if args.step in (1, 2) and not args.out:
        raise InputError(f"Step {args.step} needs --out, the model file to write", "e.g. --out models/step1.pt")
    return cmd_transfer(args)




def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from ..learning.export import export_onnx

    if not str(args.model).lower().endswith(".pt"):
        raise InputError(f"--model '{args.model}' is not a .pt model file", "Give the .pt file written by train or "
                                                                           "transfer")
    out = args.out or str(Path(args.model).with_suffix(".onnx"))
    if not out.lower().endswith(".onnx"):
        raise InputError(f"--out '{out}' does not end in .onnx", "Name the ONNX file M.onnx")
    done = export_onnx(args.model, out)
    print(f"Wrote {done['path']}: ONNX Runtime's embeddings within {done['max_abs_diff']:.1e} of torch's "
          f"on {done['patches']} test patches")
    return 0


def register_export(sub) -> None:
    """Add the ``export-onnx`` command."""
    p = sub.add_parser("export-onnx", help="write a .pt model as .onnx (for the onnx runtime)",
                       description="Export a model file to ONNX for ONNX Runtime: the inference network (batch norm "
                                   "folded), a dynamic batch axis, and the model's metadata inside the file. The "
                                   "export is checked against torch (embeddings within 1e-5). Needs torch and onnx.")
    p.add_argument("--model", required=True, help="the .pt model file")
    p.add_argument("--out", default="", help="the .onnx file to write (default: the model's name with .onnx)")
    p.set_defaults(func=_cmd_export_onnx)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ..engine.feedback import ConsoleFeedback

    config = PretrainConfig(data=args.data, out=args.out, steps=args.steps, batch=args.batch, lr=args.lr,
                            temperature=args.temperature, strength=args.strength, min_scale=args.min_scale,
                            seed=args.seed, threads=args.threads,
                            cache_dir=None if args.no_cache else args.cache_dir, max_minutes=args.max_minutes,
                            schedule_steps=args.schedule_steps,
                            widths=tuple(args.widths))
    pretrain(config, ConsoleFeedback(quiet=args.quiet))
    return 0


def register_pretrain(subparsers) -> None:
    """Add the ``pretrain`` subcommand (self-supervised NT-Xent pre-training)."""
    from ..learning import pretrain as pretrain_module

    d = PretrainConfig()
    p = subparsers.add_parser("pretrain", help="Self-supervised (NT-Xent) pre-training on unlabelled imagery",
                              description=pretrain_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=d.data, help="data folder (default: %(default)s)")
    p.add_argument("--out", default=d.out, help="model file to write (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="images a batch, two views each (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate, cosine decay")
    p.add_argument("--temperature", type=float, default=d.temperature, help="NT-Xent temperature")
    p.add_argument("--strength", type=float, default=d.strength, help="augment_batch strength")
    p.add_argument("--min-scale", type=float, default=d.min_scale, help="smallest crop, share of the side")
    p.add_argument("--widths", type=int, nargs=4, default=list(d.widths), help="trunk widths")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads for torch")
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this many minutes")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the cosine learning-rate decay (default: --steps); with a smaller --steps "
                        "it repeats a run that a --max-minutes budget stopped early")
    p.add_argument("--cache-dir", default=str(default_cache_dir()), help="decoded-patch cache")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_pretrain)
