"""What ``python -m jobs.query`` does once its arguments are parsed: build the request, run it in this
process (``--index``) or through the running query actor (``--address``), print the hits and export
them (:func:`mining.export.export_hits`).

Exit codes of :func:`run_query`: 0 ok, 2 bad query or settings (one line on stderr), 3 actor / index
not found, or a shard actor unavailable (restarting; one line, retry).
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
    if getattr(args, "novel", False):
        return "novel", (args.k,), {"by": args.by, "filters": _filters(args) or None}, {"type": "novel", "by": args.by}
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


def _date_error(args) -> str | None:
    """One line about a bad --date-from / --date-to (not YYYY-MM-DD, or from after to), else None."""
    import datetime as dt

    for flag, v in (("--date-from", args.date_from), ("--date-to", args.date_to)):
        if v is not None:
            try:
                dt.date.fromisoformat(v)
            except ValueError:
                return f"{flag} must be a date YYYY-MM-DD, got {v!r}"
    if args.date_from and args.date_to and args.date_from > args.date_to:
        return f"--date-from {args.date_from} is after --date-to {args.date_to}"
    return None


def _settings_error(args) -> str | None:
    novel = getattr(args, "novel", False)
    if not any(x is not None for x in (args.text, args.image, args.examples, args.embedding)) and not args.campaign \
            and not novel:
        return "give a query (--text, --image, --examples, --embedding or --novel) or --campaign NAME"
    if novel and args.campaign:
        return "--novel is query-free: it does not take --campaign"
    if getattr(args, "by", None) and not novel:
        return "--by only applies to --novel"
    bad_date = _date_error(args)
    if bad_date:
        return bad_date
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


def run_query(args: argparse.Namespace) -> int:
    """Run the query described by ``jobs.query``'s parsed arguments; print the rows (stdout), the
    timings (stderr) and, with ``args.out``, write the exports.

    Returns:
        the exit code: 0 ok, 2 bad query / settings / export, 3 actor or index not found.
    Raises:
        SystemExit: an unreadable ``--examples`` / ``--negatives`` / ``--image`` argument (message).
        Exception: anything that is not a user error (a bug) propagates.
    """
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
            down = _shard_unavailable(e)
            if down is None:
                raise
            print(f"error: {down}", file=sys.stderr)
            return 3
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

        q = info["query"] if method in ("campaign", "novel") else {**desc, "k": args.k, **({"filters": {
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
                             load_embedder=method not in ("campaign", "novel"))
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




def _shard_unavailable(e: BaseException) -> BaseException | None:
    """The :class:`mining.query.shards.ShardUnavailableError` a (Ray-wrapped) exception carries, else None."""
    from mining.query.shards import ShardUnavailableError

    for _ in range(8):
        cause = getattr(e, "cause", None)  # RayTaskError(.cause): the original exception
        if not isinstance(cause, BaseException) or cause is e:
            break
        e = cause
    return e if isinstance(e, ShardUnavailableError) else None


def _serving_error(kw: dict) -> str | None:
    """One-line message for an unusable serving setting of ``serve_query``, else None."""
    from mining.query.shards import ServingConfig

    for key, flag in (("max_concurrency", "--max-concurrency"), ("k_cap", "--k-cap")):
        if kw.get(key) is not None and kw[key] < 1:
            return f"{flag} must be >= 1, got {kw[key]}"
    if kw.get("num_cpus") is not None and not kw["num_cpus"] >= 0:
        return f"--num-cpus must be >= 0, got {kw['num_cpus']}"
    try:
        ServingConfig(shards_per_actor=kw.get("shards_per_actor", 1), shard_cpus=kw.get("shard_cpus", 1.0),
                      cache_dir=kw.get("cache_dir"), timeout_s=kw.get("shard_timeout_s", 30.0)).check()
    except ValueError as e:
        return str(e)
    return None


def serve_query(address: str | None, *, action: str = "start", index: str | None = None, name: str | None = None,
                namespace: str | None = None, **start_kwargs) -> int:
    """What ``python -m jobs.serve_query`` does: start (or get) the named detached query actor, or
    ``action`` "stop" / "reload" / "health" it; prints one JSON line.

    Args:
        address: Ray address (see :func:`mining.connect.connect`).
        index: index root (local or s3://); required to start.
        start_kwargs: the keyword arguments of :func:`mining.query_actor.start_actor`.
    Returns:
        the exit code: 0 ok, 2 no ``index`` to start or a bad setting, 3 no running actor (reload / health).
    """
    import ray

    from mining.connect import connect
    from mining.query_actor import ACTOR_NAME, NAMESPACE, get_actor, start_actor, stop_actor

    name, ns = name or ACTOR_NAME, namespace or NAMESPACE
    if action == "start":
        bad = _serving_error(start_kwargs)
        if bad:
            print(f"error: {bad}", file=sys.stderr)
            return 2
    connect(address, namespace=ns)
    try:
        if action == "stop":
            ok = stop_actor(name, ns)
            print(json.dumps({"stopped": ok, "name": name, "namespace": ns}))
            return 0
        if action in ("reload", "health"):
            try:
                actor = get_actor(name, ns, timeout_s=5)
            except LookupError as e:
                print(f"error: {e}", file=sys.stderr)
                return 3
            out = ray.get(actor.reload.remote() if action == "reload" else actor.health.remote())
            print(json.dumps(out, default=str))
            return 0
        if not index:
            print("error: --index <index root> is required to start the query actor", file=sys.stderr)
            return 2
        actor, health = start_actor(index, name=name, namespace=ns, **start_kwargs)
        if health.get("index_root") != index:
            print(f"note: actor {name!r} was already running on {health.get('index_root')!r}; "
                  f"stop it first to serve {index!r}", file=sys.stderr)
        if health.get("random_init"):
            print("WARNING: the index was built from RANDOMLY INITIALISED CLIP weights: results are not semantic",
                  file=sys.stderr)
        print(json.dumps(health, default=str))
        return 0
    finally:
        ray.shutdown()

