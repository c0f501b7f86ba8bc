"""Query the patch index and export the hits for labeling.

In-process (the vertical slice; loads the index and CLIP here)::

    python -m jobs.query --index <index dir> --text "a road narrows sign" --k 16 --out out/
    python -m jobs.query --index <index dir> --image frame.jpg --box 100,200,324,424 --k 16 --out out/

Through the running query actor (``python -m jobs.serve_query`` started it), from a laptop via the
Ray client or from a submitted job (``--address auto``)::

    python -m jobs.query --address ray://<head>:10001 --examples deer/ --mode mean --k 100 \
        --out export/ --exclude-exported

Active learning (campaigns): a seed query with ``--campaign NAME`` exports hits for labeling;
``python -m jobs.feedback`` records the labels; then ``--campaign NAME`` alone re-queries with what was
learned (``--method probe|mean|mean_neg|single``, ``mining.campaign``). Frames the campaign already
labeled are excluded from its queries (``--include-labeled`` keeps them)::

    python -m jobs.query --index idx --text "a road narrows sign" --campaign narrows --k 100 \
        --out runs/q1 --format labelstudio,coco,cvat,fiftyone --where "camera = 'front'"
    python -m jobs.query --index idx --campaign narrows --k 100 --out runs/q2 --format labelstudio

Prints the top-k rows (rank, score, image_uri, box); with ``--out`` writes the labeling manifest
(JSONL + Parquet), ``contact_sheet.png``, the review page ``gallery.html`` and the ``--format`` exports
(see ``mining.export``). Hits that overlap a better hit from the same frame are dropped (thesis
§3.3.1). Exit codes: 0 ok, 2 bad query or settings (message on stderr), 3 actor / index not found.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from pathlib import Path

IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.query", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", help="index directory: run the query in this process")
    where.add_argument("--address", help="Ray address (ray://host:10001, host:6379 or auto): ask the query actor")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--text", help="text query")
    what.add_argument("--image", help="query image: a local file (sent as bytes) or a URI under the allowed prefixes")
    what.add_argument("--examples", help="directory of example images (multi-example query); optional boxes.csv "
                                         "with file,x0,y0,x1,y1")
    what.add_argument("--embedding", help=".npy file with one (D,) query embedding")
    p.add_argument("--box", help="x0,y0,x1,y1 crop of --image (pixels, x1/y1 exclusive); default whole frame")
    p.add_argument("--mode", default="mean", choices=["mean", "max", "sum"],
                   help="how --examples are combined: mean embedding (thesis Eq. 4.1), or max/sum of scores")
    p.add_argument("--negatives", help="directory of negative example images (pushed away)")
    p.add_argument("--negative-weight", type=float, default=None)
    p.add_argument("--k", type=int, default=16, help="number of hits (default 16)")
    p.add_argument("--out", help="export directory: manifest JSONL/Parquet, contact sheet, review page, --format files")
    p.add_argument("--format", action="append", default=[],
                   help="exports besides the manifest: coco, labelstudio, cvat, fiftyone (comma-separated or repeated)")
    p.add_argument("--category", help="label name in the exports (default: the campaign, else the text query)")
    p.add_argument("--url-prefix", help="Label Studio frame URLs: PREFIX + images/<file> (e.g. /data/local-files/?d=runs/q/), "
                                        "or s3-presign (presigned URLs of s3:// frames); default: local-files absolute path")
    p.add_argument("--url-expiry", type=int, default=3600, help="seconds a presigned URL stays valid (default 3600)")
    p.add_argument("--campaign", help="active-learning campaign: exclude its labeled frames; without a seed query, "
                                      "rank with its labels (--method)")
    p.add_argument("--method", default="probe", choices=["probe", "mean", "mean_neg", "single"],
                   help="campaign scorer: linear probe (default), mean of positives (Eq. 4.1), mean - negatives, single")
    p.add_argument("--candidates", type=int, default=2000, help="campaign: ANN candidates per search direction")
    p.add_argument("--include-labeled", action="store_true", help="campaign: do not exclude frames already labeled")
    p.add_argument("--data", help="store root holding the campaign labels (default: the index manifest's data_root)")
    p.add_argument("--where", help="SQL condition over the frames' sidecar metadata (DuckDB), "
                                   "e.g. \"camera = 'front' and hour >= 20\"")
    p.add_argument("--exclude-exported", action="store_true",
                   help="skip images already in a manifest under --out")
    p.add_argument("--date-from", help="keep patches ingested on/after YYYY-MM-DD")
    p.add_argument("--date-to", help="keep patches ingested on/before YYYY-MM-DD")
    p.add_argument("--exclude-image-ids", help="comma-separated image ids, or @file with one id per line")
    p.add_argument("--overlap", type=float, default=None,
                   help="in-process: dedup threshold, intersection/area of larger box (default 0 = any overlap)")
    p.add_argument("--no-dedup", action="store_true", help="keep overlapping hits from the same frame")
    rr = p.add_mutually_exclusive_group()
    rr.add_argument("--rerank", dest="rerank", action="store_true", default=None, help="exact re-rank")
    rr.add_argument("--no-rerank", dest="rerank", action="store_false", help="no exact re-rank")
    p.add_argument("--version", help="in-process: index version (default CURRENT)")
    p.add_argument("--allow-prefix", action="append", default=[],
                   help="in-process: URI prefix image queries may read (repeatable)")
    p.add_argument("--k-cap", type=int, default=1000, help="in-process: largest k")
    p.add_argument("--clip-model", help="in-process: CLIP model (default: the one recorded in the index manifest)")
    p.add_argument("--clip-pretrained", help="open_clip tag or checkpoint path (default: from the manifest)")
    p.add_argument("--clip-random-init", action="store_true", help="random CLIP weights (smoke runs only)")
    p.add_argument("--device", help="in-process: torch device (default cuda if available)")
    p.add_argument("--namespace", default=None, help="actor namespace (default mining)")
    p.add_argument("--actor-name", default=None, help="actor name (default rare-object-query)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of a table")
    return p


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _example_dir(d: str) -> list[dict]:
    root = Path(d)
    if not root.is_dir():
        raise SystemExit(f"error: --examples/--negatives {d!r} is not a directory")
    boxes = {}
    if (root / "boxes.csv").exists():
        with open(root / "boxes.csv") as f:
            for r in csv.DictReader(f):
                boxes[r["file"]] = (int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"]))
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXT)
    if not files:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_EXT)}) in {d!r}")
    return [{"image": p.read_bytes(), "box": boxes.get(p.name)} for p in files]


def _filters(args) -> dict:
    f = {}
    if args.date_from:
        f["date_from"] = args.date_from
    if args.date_to:
        f["date_to"] = args.date_to
    ex: list[str] = []
    if args.exclude_image_ids:
        v = args.exclude_image_ids
        if v.startswith("@"):
            ex += [x.strip() for x in open(v[1:]) if x.strip()]
        else:
            ex += [x.strip() for x in v.split(",") if x.strip()]
    if args.exclude_exported:
        if not args.out:
            raise SystemExit("error: --exclude-exported needs --out (the export directory to read)")
        from mining.export import exported_image_ids

        prev = sorted(exported_image_ids(args.out))
        print(f"excluding {len(prev)} already exported images", file=sys.stderr)
        ex += prev
    if ex:
        f["exclude_image_ids"] = ex
    if args.where is not None:
        f["where"] = args.where
    return f


def _request(args) -> tuple[str, tuple, dict, dict]:
    """(method, args, kwargs, description) for the engine / actor."""
    kw = {"filters": _filters(args) or None, "dedup": not args.no_dedup, "rerank": args.rerank}
    if args.text is not None:
        return "text", (args.text, args.k), kw, {"type": "text", "text": args.text}
    if args.text is None and args.image is None and args.embedding is None and args.examples is None:
        kw.pop("rerank")
        kw.update(method=args.method, candidates=args.candidates)
        return "campaign", (args.campaign, args.k), kw, {"type": "campaign", "campaign": args.campaign,
                                                        "method": args.method}
    if args.image is not None:
        if os.path.exists(args.image):
            img = _read_bytes(args.image)
        elif "://" in args.image:
            img = args.image  # read by the engine, only under its allowed prefixes
        else:
            raise SystemExit(f"error: --image {args.image!r}: no such file")
        return "image", (img, args.box, args.k), kw, {"type": "image", "image": args.image, "box": args.box}
    if args.embedding is not None:
        import numpy as np

        return "embedding", (np.load(args.embedding), args.k), kw, {"type": "embedding", "file": args.embedding}
    exs = _example_dir(args.examples)
    negs = _example_dir(args.negatives) if args.negatives else None
    kw.update(mode=args.mode, negatives=negs, negative_weight=args.negative_weight)
    return "examples", (exs, args.k), kw, {"type": "examples", "dir": args.examples, "mode": args.mode,
                                           "n": len(exs), "negatives": args.negatives}


def _print_rows(table, as_json: bool) -> None:
    rows = table.to_pylist()
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'rank':>4}  {'score':>7}  {'box (x0,y0,x1,y1)':<22}  image_uri")
    for r in rows:
        box = f"{r['x0']},{r['y0']},{r['x1']},{r['y1']}"
        print(f"{r['rank']:>4}  {r['score']:>7.4f}  {box:<22}  {r['image_uri']}")


def _settings_error(args) -> str | None:
    if not any(x is not None for x in (args.text, args.image, args.examples, args.embedding)) and not args.campaign:
        return "give a query (--text, --image, --examples or --embedding) or --campaign NAME"
    if args.k is not None and args.k < 1:
        return f"--k must be >= 1, got {args.k}"
    if args.candidates < 1:
        return f"--candidates must be >= 1, got {args.candidates}"
    if args.url_expiry < 1:
        return f"--url-expiry must be >= 1 second, got {args.url_expiry}"
    if (args.format or args.url_prefix or args.category) and not args.out:
        return "--format/--url-prefix/--category need --out (the export directory)"
    try:
        from mining.export import check_formats

        check_formats(args.format)
        if args.campaign:
            from mining.labels import check_campaign

            check_campaign(args.campaign)
    except ValueError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    if args.k is None:
        args.k = 16
    bad = _settings_error(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    method, pargs, kw, desc = _request(args)
    try:
        if args.index:
            table, data_root = _run_local(args, method, pargs, kw)
        else:
            table, data_root = _run_actor(args, method, pargs, kw), args.data
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        from mining.errors import user_error

        qe = user_error(e)  # QueryError / WeightsError ... through ray:// and jobs (RayTaskError.cause)
        if qe is None:
            raise
        print(f"error: bad query: {qe}" if type(qe).__name__ == "QueryError" else f"error: {qe}", file=sys.stderr)
        return 2
    from mining.query import query_info, timings_of

    info = query_info(table)
    if info["random_init"]:
        print("WARNING: the index was built from RANDOMLY INITIALISED CLIP weights: results are not semantic",
              file=sys.stderr)
    _print_rows(table, args.json)
    print(f"index version {info['index_version']}, model {info['model']}, {table.num_rows} hits; "
          f"timings (ms) {json.dumps(timings_of(table))}", file=sys.stderr)
    if args.out:
        from mining.export import ExportError, export_hits

        q = info["query"] if method == "campaign" else {**desc, "k": args.k, **({"filters": {
            k: (v if k != "exclude_image_ids" else f"{len(v)} ids") for k, v in (kw.get("filters") or {}).items()}}
            if kw.get("filters") else {})}
        try:
            res = export_hits(table, args.out, query=q, index_version=info["index_version"], model=info["model"],
                              random_init=info["random_init"], formats=args.format, category=args.category,
                              url_prefix=args.url_prefix, url_expiry=args.url_expiry, data_root=data_root,
                              campaign=args.campaign or "")
        except ExportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"exported {res['hits']} hits in {res['images']} images: {res['manifest_jsonl']}, "
              f"{res['manifest_parquet']}, {res['contact_sheet']}, {res['gallery']}")
        for name, paths in res["formats"].items():
            print(f"  {name}: {paths if isinstance(paths, str) else ', '.join(paths.values())}")
        if res["unreadable"]:
            print(f"WARNING: {len(res['unreadable'])} frame(s) could not be read (left out of the tool exports): "
                  f"{res['unreadable'][:3]}", file=sys.stderr)
    return 0


def _campaign_exclusion(args, kw, data_root: str | None, labeled_ids) -> None:
    """Seed queries of a campaign skip the frames it already labeled."""
    if args.campaign and not args.include_labeled:
        ids = sorted(labeled_ids())
        if ids:
            f = dict(kw.get("filters") or {})
            f["exclude_image_ids"] = sorted(set(f.get("exclude_image_ids", [])) | set(ids))
            kw["filters"] = f
            print(f"campaign {args.campaign}: excluding {len(ids)} labeled frames", file=sys.stderr)


def _run_local(args, method, pargs, kw):
    from mining.embed import ClipSpec
    from mining.query import QueryConfig, QueryEngine

    clip = None
    if args.clip_model:
        clip = ClipSpec(args.clip_model, None, True) if args.clip_random_init else \
            ClipSpec(args.clip_model, args.clip_pretrained)
    elif args.clip_pretrained or args.clip_random_init:
        from mining.index import open_index
        from mining.query import spec_from_manifest

        m = open_index(args.index, version=args.version).manifest
        base = spec_from_manifest(m, clip_pretrained=args.clip_pretrained)
        clip = ClipSpec(base.model, None, True) if args.clip_random_init else ClipSpec(base.model, args.clip_pretrained)
    cfg = QueryConfig(k_cap=args.k_cap, allowed_prefixes=tuple(args.allow_prefix),
                      **({"dedup_overlap": args.overlap} if args.overlap is not None else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init warning is printed once below from the result
        engine = QueryEngine(args.index, version=args.version, clip=clip, device=args.device, config=cfg,
                             load_embedder=method != "campaign")
    data_root = args.data or engine.snapshot.manifest.get("data_root")
    if method == "campaign":
        from mining.campaign import campaign_query

        return campaign_query(engine, *pargs, data_root=data_root, **kw), data_root
    if args.campaign and data_root:
        from mining.labels import campaign_state

        _campaign_exclusion(args, kw, data_root, lambda: campaign_state(data_root, args.campaign).image_ids)
    return getattr(engine, method)(*pargs, **kw), data_root


def _run_actor(args, method, pargs, kw):
    import ray

    from mining.connect import connect
    from mining.query_actor import ACTOR_NAME, NAMESPACE, get_actor

    ns = args.namespace or NAMESPACE
    if args.clip_model or args.clip_pretrained or args.clip_random_init:
        print("note: CLIP options are fixed by the running actor (jobs.serve_query); ignored here", file=sys.stderr)
    connect(args.address, namespace=ns, log_to_driver=False)  # ray://: the work stays in the cluster
    try:
        actor = get_actor(args.actor_name or ACTOR_NAME, ns)
        if method == "campaign":
            kw["data_root"] = args.data
        elif args.campaign:
            _campaign_exclusion(args, kw, args.data,
                                lambda: ray.get(actor.campaign_image_ids.remote(args.campaign, args.data)))
        return ray.get(getattr(actor, method).remote(*pargs, **kw))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
