"""The `strongreid` command line.

Every subcommand parses its arguments here and hands over to one function in the package;
those imports are lazy so that `--help` stays instant (no torch).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from strongreid.errors import StrongReIDError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "--config_file",
        "--config-file",
        dest="config",
        default=None,
        metavar="FILE",
        help="yaml config (reid-strong-baseline ymls load unchanged)",
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="KEY VALUE pairs that override the config, e.g. SOLVER.MAX_EPOCHS 10",
    )


def _load_cfg(args: argparse.Namespace):
    from strongreid.config import load_config

    return load_config(args.config, list(args.opts or []))


def _pull_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Take this command's own --options out of the KEY VALUE list.

    `argparse.REMAINDER` swallows everything after the first KEY, so
    `strongreid extract --config F TEST.WEIGHT ckpt --images DIR --out FILE` would otherwise
    lose --images and --out to the config overrides. The command's options are declared once
    (its `_options` function) and parsed again from that list by a parser of their own.
    """
    own = argparse.ArgumentParser(prog=parser.prog, add_help=False, allow_abbrev=False)
    add = getattr(args, "_options", None)
    needed = add(own) if add is not None else ()
    # --config may follow the overrides too (`strongreid config SOLVER.MAX_EPOCHS 3 --config F`).
    own.add_argument("--config", "--config_file", "--config-file", dest="late_config",
                     default=None)
    # Options given before the KEY VALUE pairs are on `args` already and keep their values:
    # argparse only sets the defaults of attributes the namespace does not have.
    _, rest = own.parse_known_args(list(getattr(args, "opts", None) or []), namespace=args)
    args.opts = rest
    late = vars(args).pop("late_config", None)
    if late is not None:
        if args.config is not None and args.config != late:
            parser.error(f"--config is given twice ({args.config} and {late}): give it once")
        args.config = late
    missing = ["--" + dest.replace("_", "-") for dest in needed if getattr(args, dest, None) is None]
    if missing:
        parser.error("the following arguments are required: " + ", ".join(missing))


def _cmd_config(args: argparse.Namespace) -> int:
    from strongreid.config.loader import dump_config

    cfg = _load_cfg(args)
    sys.stdout.write(dump_config(cfg))
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from strongreid.data.datasets import stats_command

    if args.datasets_cmd == "list":
        from strongreid.data.datasets import DATASETS

        for name in DATASETS.names():
            print(name)
        return 0
    options = {}
    for item in args.option or []:
        key, _, value = item.partition("=")
        options[key] = value
    return stats_command(args.name, args.root, args.json, options)


def _domain_arg(p: argparse.ArgumentParser) -> None:
    from strongreid.data.synthetic_domains import DOMAINS

    p.add_argument("--domain", default="street", choices=DOMAINS.names(),
                   help="where the people are filmed: street (the default look) or night "
                        "(sodium lamps, high low-resolution cameras, winter clothes, new people)")


def _cmd_synth(args: argparse.Namespace) -> int:
    from strongreid.data.synthetic import synth_command

    return synth_command(args.out, args.ids, args.cams, args.images_per_id, args.seed,
                         args.domain)


def _cmd_train(args: argparse.Namespace) -> int:
    from strongreid.workflows import train_command

    return train_command(_load_cfg(args), resume=args.resume)


def _cmd_test(args: argparse.Namespace) -> int:
    from strongreid.evaluation.runner import test_command

    return test_command(_load_cfg(args))


def _cmd_extract(args: argparse.Namespace) -> int:
    from strongreid.deploy.extractor import extract_command

    return extract_command(_load_cfg(args), args.images, args.out)


def _cmd_export(args: argparse.Namespace) -> int:
    from strongreid.deploy.export import QUANTIZED_FORMATS, export_command

    cfg = _load_cfg(args)
    if args.format in QUANTIZED_FORMATS:
        from strongreid.deploy.quantize import export_int8_command

        return export_int8_command(cfg, args.out, args.calib, args.target)
    return export_command(cfg, args.format, args.out, args.target,
                          check_preprocessing=not args.no_preprocessing_check)


def _cmd_index(args: argparse.Namespace) -> int:
    from strongreid.search.retrieval import index_build_command

    return index_build_command(args.features, args.out, index_type=args.type, metric=args.metric,
                               nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                               ef_search=args.ef_search)


def _cmd_search(args: argparse.Namespace) -> int:
    from strongreid.search.retrieval import search_command

    return search_command(args.index, args.query, k=args.k, out=args.out, config=args.config,
                          opts=list(args.opts or []))


def _cmd_visualize(args: argparse.Namespace) -> int:
    from strongreid.viz.ranked import visualize_command

    return visualize_command(args.results, queries=args.queries, topk=args.topk, out=args.out,
                             seed=args.seed, query=args.query)


def _cmd_report(args: argparse.Namespace) -> int:
    from strongreid.viz.report import report_command

    return report_command(args.results, out=args.out)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from strongreid.adapt.calibrate import calibrate_command

    calibrate_command(args.model, config=args.config, data=args.data,
                      from_clusters=args.from_clusters, dataset=args.dataset, split=args.split,
                      measure_on=args.measure_on, measure_dataset=args.measure_dataset,
                      measure_split=args.measure_split,
                      precision=args.precision, holdout=args.holdout, rule=args.rule,
                      out=args.out,
                      seed=args.seed, eps=args.eps, min_samples=args.min_samples,
                      people=args.people, device=args.device)
    return 0


def _add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="same-person threshold and probability of a model, "
                                         "written beside it (MODEL.calibration.json)")
    p.add_argument("--model", required=True, help="trained checkpoint (best.pt) or .safetensors")
    p.add_argument("--config", default=None, help="yaml config (default: the checkpoint's)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--data", help="labelled images the model did not train on: a folder or "
                                      "list file (<pid>_c<camera>... names), or a dataset root "
                                      "with --dataset")
    given.add_argument("--from-clusters", help="unlabelled images: identities come from "
                                               "clustering (k-reciprocal + DBSCAN)")
    p.add_argument("--dataset", default=None,
                   help="read --data / --from-clusters (and --measure-on) as this registered dataset")
    p.add_argument("--split", default="train",
                   choices=["train", "val", "query", "gallery", "test"],
                   help="with --dataset: the split to calibrate on (default train)")
    p.add_argument("--measure-on", default=None,
                   help="labelled images to measure on instead of a held-out part of --data")
    p.add_argument("--measure-dataset", default=None,
                   help="read --measure-on as this registered dataset (default: --dataset)")
    p.add_argument("--measure-split", default="test",
                   choices=["train", "val", "query", "gallery", "test"],
                   help="with --dataset: the split --measure-on reads (default test)")
    p.add_argument("--precision", type=float, default=0.95, help="requested precision")
    p.add_argument("--holdout", type=float, default=0.5,
                   help="share of --data's identities held out to measure (0: none)")
    p.add_argument("--rule", default="logistic", choices=["logistic", "counts"],
                   help="threshold where the fitted (default) or the counted precision of the "
                        "calibration pairs reaches --precision")
    p.add_argument("--out", default=None, help="JSON to write (default: beside the model)")
    p.add_argument("--seed", type=int, default=0, help="draws the held-out identities")
    p.add_argument("--eps", type=float, default=None,
                   help="--from-clusters: DBSCAN eps (default: the model's ADAPT.EPS, 0.6)")
    p.add_argument("--min-samples", type=int, default=None,
                   help="--from-clusters: DBSCAN min_samples (default: its ADAPT.MIN_SAMPLES, 4)")
    p.add_argument("--people", type=int, default=None,
                   help="about how many people the gallery to be searched holds: the thresholds "
                        "and probability are for that population (default: as many as the "
                        "calibration data); precision falls as a gallery holds more people")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.set_defaults(func=_cmd_calibrate)


# -- gallery search (strongreid.search): footage, ingest, serve, demo ------------------------


def _cmd_synth_video(args: argparse.Namespace) -> int:
    from strongreid.data.synthetic_video import synth_video_command

    return synth_video_command(args.out, args.people, args.cams, args.frames, args.fps,
                               args.seed, args.start, args.domain)


def _cmd_tracklets(args: argparse.Namespace) -> int:
    from strongreid.data.tracklets import tracklets_command

    return tracklets_command(args.footage, args.out, boxes=args.boxes, tracker=args.tracker,
                             per_tracklet=args.per_tracklet, min_length=args.min_length,
                             frame_step=args.frame_step, min_score=args.min_score,
                             overwrite=args.overwrite)


def _cmd_gallery(args: argparse.Namespace) -> int:
    from strongreid.search.ingest import ingest_command

    return ingest_command(args.gallery, args.model, config=args.config, device=args.device,
                          token=args.token, thumbs=args.thumbs, crops=args.crops or (),
                          meta=args.meta, videos=args.videos or (), detections=args.detections,
                          frame_step=args.frame_step, min_score=args.min_score,
                          start_time=args.start_time, batch=args.batch, index_type=args.index)


def _cmd_gallery_migrate(args: argparse.Namespace) -> int:
    from strongreid.search.store import migrate_command

    return migrate_command(args.source, args.target, token=args.token,
                           target_token=args.target_token, thumbs_from=args.thumbs_from,
                           thumbs_to=args.thumbs_to, index_type=args.index)


def _cmd_token(args: argparse.Namespace) -> int:
    from strongreid.search.security import create_token

    token = create_token(args.auth_file, args.name)
    print(token)
    print(f"(its SHA-256 was added to {args.auth_file}; the token itself is shown only now)",
          file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from strongreid.search.service import serve_command

    return serve_command(args.gallery, args.model, config=args.config, device=args.device,
                         token=args.token, thumbs=args.thumbs, host=args.host, port=args.port,
                         max_upload=args.max_upload, auth_file=args.auth_file,
                         allowed_host=tuple(args.allowed_host or ()), ingest_root=args.ingest_root,
                         max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         max_decodes=args.max_decodes, calibration=args.calibration,
                         no_calibration=args.no_calibration, workers=args.workers,
                         runtime=args.runtime, people=args.people)


def _cmd_demo(args: argparse.Namespace) -> int:
    from strongreid.search.demo import demo_search_command

    return demo_search_command(model=args.model, footage=args.footage, gallery=args.gallery,
                               people=args.people, cams=args.cams, frames=args.frames,
                               seed=args.seed, frame_step=args.frame_step, device=args.device)


def _add_search_parsers(sub) -> None:
    from strongreid.data.synthetic_video import (
        DEFAULT_CAMS,
        DEFAULT_FPS,
        DEFAULT_FRAMES,
        DEFAULT_PEOPLE,
        DEFAULT_START,
    )
    from strongreid.data.tracklets import DEFAULT_MIN_LENGTH, DEFAULT_PER_TRACKLET, TRACKERS

    def gallery_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gallery", required=True,
                       help="gallery file (gallery.db; an existing Milvus Lite gallery also opens) "
                            "or a Milvus server URI (http://host:19530)")
        # --token is the older spelling: it never was the web service's access token.
        p.add_argument("--milvus-token", "--token", dest="token", default="",
                       help="Milvus server token (user:password); not the page's access token")
        p.add_argument("--thumbs", default=None,
                       help="thumbnail folder (default: GALLERY.thumbs beside a .db file)")
        p.add_argument("--model", required=True, help="trained checkpoint (best.pt) or .safetensors")
        p.add_argument("--config", default=None, help="yaml config (default: the checkpoint's)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")

    p = sub.add_parser("synth-video", help="synthetic multi-camera footage with MOT ground truth")
    p.add_argument("--out", required=True, help="output folder, e.g. data/footage")
    p.add_argument("--people", type=int, default=DEFAULT_PEOPLE)
    p.add_argument("--cams", type=int, default=DEFAULT_CAMS)
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames per camera")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", default=DEFAULT_START, help="ISO-8601 time of frame 1")
    _domain_arg(p)
    p.set_defaults(func=_cmd_synth_video)

    p = sub.add_parser("tracklets", help="MOT footage -> an unlabelled training set of tracklets")
    p.add_argument("--footage", required=True,
                   help="folder of MOT sequences (what synth-video writes: cam*/video.mp4 or "
                        "img1/, gt/gt.txt, det/det.txt)")
    p.add_argument("--out", required=True, help="output folder (DATASETS.NAMES tracklets)")
    p.add_argument("--boxes", choices=["gt", "det"], default="gt",
                   help="gt: gt.txt's track ids; det: det.txt linked by --tracker")
    p.add_argument("--tracker", choices=TRACKERS, default=None,
                   help="BoxMOT motion tracker for --boxes det (default bytetrack)")
    p.add_argument("--per-tracklet", type=int, default=DEFAULT_PER_TRACKLET,
                   help="crops per tracklet, evenly spread over it")
    p.add_argument("--min-length", type=int, default=DEFAULT_MIN_LENGTH,
                   help="drop tracklets with fewer boxes than this")
    p.add_argument("--frame-step", type=int, default=1, help="use every N-th frame")
    p.add_argument("--min-score", type=float, default=0.0, help="drop boxes scored below this")
    p.add_argument("--overwrite", action="store_true",
                   help="cut again over a previous run with other options")
    p.set_defaults(func=_cmd_tracklets)

    p = sub.add_parser("gallery", help="gallery tools (person search)")
    gsub = p.add_subparsers(dest="gallery_cmd", metavar="ACTION", required=True)
    s = gsub.add_parser("ingest", help="embed crops / video detections into the gallery")
    gallery_args(s)
    s.add_argument("--crops", action="append", help="folder of crops (repeatable)")
    s.add_argument("--meta", default=None, help="CSV path,camera,timestamp[,video,frame,track,pid]")
    s.add_argument("--videos", action="append", help="folder of MOT sequences (repeatable)")
    s.add_argument("--detections", choices=["auto", "gt", "det"], default="auto",
                   help="which MOT file to cut crops from (auto: gt/gt.txt, else det/det.txt)")
    s.add_argument("--frame-step", type=int, default=1, help="keep every N-th frame")
    s.add_argument("--min-score", type=float, default=0.0, help="skip weaker detections")
    s.add_argument("--start-time", default=None, help="time of frame 1 (default: seqinfo.ini)")
    s.add_argument("--batch", type=int, default=256, help="crops embedded per batch")
    s.add_argument("--index", choices=["FLAT", "IVF_FLAT", "HNSW"], default=None,
                   help="vector index of a new gallery (default: IVF_FLAT in a gallery file, "
                        "exact until it has 40 960 rows, then cells that grow with it; HNSW "
                        "on a Milvus server; FLAT: exact)")
    s.set_defaults(func=_cmd_gallery)
    s = gsub.add_parser("migrate", help="copy a gallery into a new one (Milvus Lite -> gallery.db)")
    s.add_argument("--from", dest="source", required=True, help="the gallery to copy")
    s.add_argument("--to", dest="target", required=True, help="the new gallery (file or URI)")
    s.add_argument("--token", default="", help="Milvus server token of --from")
    s.add_argument("--target-token", default="", help="Milvus server token of --to")
    s.add_argument("--thumbs-from", default=None, help="thumbnails of --from (default beside it)")
    s.add_argument("--thumbs-to", default=None, help="thumbnails of --to (default beside it)")
    s.add_argument("--index", choices=["FLAT", "IVF_FLAT", "HNSW"], default=None,
                   help="vector index of the new gallery (default: IVF_FLAT in a gallery "
                        "file, HNSW on a Milvus server)")
    s.set_defaults(func=_cmd_gallery_migrate)
    s = gsub.add_parser("token", help="create an access token for `strongreid serve --auth-file`")
    s.add_argument("--auth-file", required=True,
                   help="token file: the new token's SHA-256 is appended (created 0600)")
    s.add_argument("--name", default="", help="a label for the token (who holds it)")
    s.set_defaults(func=_cmd_token)

    p = sub.add_parser("serve", help="the person-search page and JSON API on a gallery")
    gallery_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload", type=int, default=5 * 1024 * 1024, help="upload limit, bytes")
    p.add_argument("--auth-file", default=None,
                   help="token file (strongreid gallery token): clients must present a token; "
                        "required for a --host other than loopback")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="a Host name served besides the loopback names (repeatable; '*' any)")
    p.add_argument("--ingest-root", default=None,
                   help="folder whose footage token holders may ingest (POST /api/ingest)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="concurrent upload queries embedded in one forward pass, at most")
    p.add_argument("--batch-wait-ms", type=float, default=3.0,
                   help="how long a forward pass waits at most for uploads already being "
                        "decoded to join it (a query alone never waits)")
    p.add_argument("--max-decodes", type=int, default=2,
                   help="uploads decoded at once (each may take up to 4096x4096 pixels)")
    p.add_argument("--calibration", default=None,
                   help="same-person calibration (strongreid calibrate); default: "
                        "MODEL.calibration.json beside --model when it exists")
    p.add_argument("--no-calibration", action="store_true",
                   help="serve without same-person marks even if a calibration lies beside --model")
    p.add_argument("--people", type=int, default=None,
                   help="about how many people the gallery holds: the calibration's "
                        "probabilities and thresholds are re-targeted to that population "
                        "(default: the one it was made for)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port, each with the model and the index "
                        "(not with --ingest-root or a Milvus Lite gallery)")
    p.add_argument("--runtime", choices=("auto", "onnxruntime", "torch"), default="auto",
                   help="what runs the model: onnxruntime (fastest on a CPU, features checked "
                        "against the model's at start), torch, or auto: onnxruntime when "
                        "installed and in agreement (default)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="demos")
    dsub = p.add_subparsers(dest="demo_cmd", metavar="DEMO", required=True)
    s = dsub.add_parser("search", help="footage -> gallery -> the serve command (after make demo)")
    s.add_argument("--model", default="runs/demo/best.pt")
    s.add_argument("--footage", default="data/footage")
    s.add_argument("--gallery", default="runs/demo-search/gallery.db")
    s.add_argument("--people", type=int, default=12)
    s.add_argument("--cams", type=int, default=4)
    s.add_argument("--frames", type=int, default=150)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--frame-step", type=int, default=2)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_cmd_demo)


# Options of the commands that also take KEY VALUE overrides. Each function declares them on a
# parser and returns the destinations that are required (checked after the overrides are read,
# since the options may follow them).


def _train_options(p: argparse.ArgumentParser) -> tuple[str, ...]:
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last.pt")
    return ()


def _extract_options(p: argparse.ArgumentParser) -> tuple[str, ...]:
    p.add_argument("--images", help="folder of images or a list file")
    p.add_argument("--out", help="output .npz or .safetensors file")
    return ("images", "out")


def _export_options(p: argparse.ArgumentParser) -> tuple[str, ...]:
    # No `choices`: the formats are deploy/export.py's registry, so a registered one works too.
    p.add_argument("--format", help="onnx, torchscript, safetensors, openvino, onnx-int8 or another "
                                    "registered export format; default: from the --out suffix")
    p.add_argument("--calib", help="onnx-int8: folder or list file of calibration images")
    p.add_argument("--target", choices=["strongreid", "boxmot"], default="strongreid",
                   help="boxmot: ImageNet-normalised input and NAME.onnx.metadata.json for BoxMOT")
    p.add_argument("--no-preprocessing-check", action="store_true",
                   help="boxmot: skip evaluating the model on the test split under BoxMOT's "
                        "preprocessing (cv2 bilinear resize)")
    p.add_argument("--out", help="output file")
    return ("out",)


def _search_options(p: argparse.ArgumentParser) -> tuple[str, ...]:
    p.add_argument("--query", help=".npz of features, or images (needs --config)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--out", default=None, help="write JSON here instead of stdout")
    return ("query",)


def _command_options(p: argparse.ArgumentParser,
                     options: Callable[[argparse.ArgumentParser], tuple[str, ...]]) -> None:
    """The command's options, then --config and the KEY VALUE overrides."""
    options(p)
    _add_config_args(p)
    p.set_defaults(_options=options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strongreid",
        description="Bag of Tricks strong baseline for re-identification.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="print the merged, validated config as YAML")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("datasets", help="dataset tools")
    dsub = p.add_subparsers(dest="datasets_cmd", metavar="ACTION", required=True)
    s = dsub.add_parser("stats", help="ids / images / cameras of train, query, gallery")
    s.add_argument("name", help="registered dataset name, e.g. market1501")
    s.add_argument("--root", required=True, help="DATASETS.ROOT_DIR or the dataset folder itself")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="loader option, e.g. merge_val=true (msmt17) or kind=detected (cuhk03)",
    )
    s.set_defaults(func=_cmd_datasets)
    s = dsub.add_parser("list", help="registered dataset names")
    s.set_defaults(func=_cmd_datasets)

    p = sub.add_parser("synth", help="write the synthetic pedestrian dataset (Market layout)")
    p.add_argument("--out", required=True, help="output folder, e.g. data/synthetic")
    p.add_argument("--ids", type=int, default=None, help="number of identities")
    p.add_argument("--cams", type=int, default=None, help="number of cameras")
    p.add_argument("--images-per-id", type=int, default=None, help="images per identity")
    p.add_argument("--seed", type=int, default=0)
    _domain_arg(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train a model")
    _command_options(p, _train_options)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("test", help="evaluate TEST.WEIGHT on the test split")
    _add_config_args(p)
    p.set_defaults(func=_cmd_test)

    p = sub.add_parser("extract", help="features of a folder or list of images to .npz")
    _command_options(p, _extract_options)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("export", help="export the inference model")
    _command_options(p, _export_options)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("index", help="retrieval index tools")
    isub = p.add_subparsers(dest="index_cmd", metavar="ACTION", required=True)
    s = isub.add_parser("build", help="build a faiss index from extracted features")
    s.add_argument("features", help=".npz written by `strongreid extract`")
    s.add_argument("--out", required=True, help="index folder to write")
    s.add_argument("--type", choices=["flat", "ivf", "hnsw"], default="flat")
    s.add_argument("--metric", choices=["euclidean", "cosine"], default="euclidean")
    s.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(N))")
    s.add_argument("--nprobe", type=int, default=8, help="IVF lists searched")
    s.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    s.add_argument("--ef-search", type=int, default=64, help="HNSW search breadth")
    s.set_defaults(func=_cmd_index)

    p = sub.add_parser("search", help="top-k gallery matches as JSON")
    p.add_argument("index", help="folder written by `strongreid index build`")
    _command_options(p, _search_options)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("visualize", help="ranked-list pictures of a test run")
    p.add_argument("--results", required=True, help="OUTPUT_DIR of `strongreid test`/train")
    p.add_argument("--queries", type=int, default=8, help="queries per picture")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--out", default=None, help="folder for the PNGs (default RESULTS/viz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query", action="extend", nargs="+", default=None, metavar="N|FILE",
                   help="draw only these queries: 0-based index or image file name (several "
                        "allowed, as layumi's demo.py --query_index)")
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("report", help="one static HTML page of a run")
    p.add_argument("--results", required=True, help="OUTPUT_DIR of a run")
    p.add_argument("--out", default=None, help="HTML file (default RESULTS/report/index.html)")
    p.set_defaults(func=_cmd_report)
    _add_search_parsers(sub)
    _add_calibrate_parser(sub)
    for p in sub.choices.values():
        p.set_defaults(_parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from strongreid import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if hasattr(args, "opts"):
        _pull_options(args._parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except StrongReIDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `strongreid config | head`: the reader left. Python's own advice: point stdout at
        # devnull so that the flush at exit does not raise again.
        with contextlib.suppress(OSError, ValueError):  # a stdout without a file descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A path the commands did not check themselves (a full disk, a folder that vanished,
        # permissions): the path and the reason, not a traceback.
        if not exc.filename:
            print(f"error: {exc.strerror or exc}", file=sys.stderr)
            return 2
        also = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
        print(f"error: cannot use {exc.filename}{also}: {exc.strerror or exc}; check the path, "
              "its permissions and the free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        from strongreid.engine.runtime import close_log_file

        close_log_file()


if __name__ == "__main__":
    sys.exit(main())
