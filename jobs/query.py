"""Query the patch index and export the hits for labeling.

In-process (the vertical slice; loads the index and CLIP here)::

    python -m jobs.query --index <index dir> --text "a road narrows sign" --k 16 --out out/
    python -m jobs.query --index <index dir> --image frame.jpg --box 100,200,324,424 --k 16 --out out/

Through the running query actor (``python -m jobs.serve_query`` started it), from a laptop via the
Ray client or from a submitted job (``--address auto``)::

    python -m jobs.query --address ray://<head>:10001 --examples deer/ --mode mean --k 100 \
        --out export/ --exclude-exported

Query-free novelty: the rarest patches of a date range (a night), one per frame, ranked by epitome
novelty and / or kNN uniqueness (``mining.novel``; ``--by novelty|uniqueness|both``, default both
when the patches have both), printed and exported like any other query (rarity in the score column)::

    python -m jobs.query --index idx --novel --date-from 2026-11-20 --date-to 2026-11-20 --k 100 --out runs/rare

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

Thin CLI: parses the arguments; :func:`mining.query_cli.run_query` does the rest.
"""
from __future__ import annotations

import argparse
import warnings


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
    what.add_argument("--novel", action="store_true",
                      help="query-free: the rarest patches of --date-from..--date-to, one per frame")
    p.add_argument("--by", choices=["novelty", "uniqueness", "both"], default=None,
                   help="--novel: rank by epitome novelty, kNN uniqueness, or the mean of their percentile ranks "
                        "(default: both when the patches have both, else the one they have)")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    from mining.query_cli import run_query

    return run_query(args)


if __name__ == "__main__":
    from jobs._common import exit_process

    exit_process(main())
