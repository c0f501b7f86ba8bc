"""Record a labeled export as the next feedback round of a campaign (the ``labels`` table of the store).

    python -m jobs.feedback --labels runs/q1/labelstudio/export.json --index runs/idx --campaign narrows
    python -m jobs.feedback --labels ~/Downloads/feedback-<run>.json --index runs/idx --campaign narrows
    python -m jobs.feedback --labels cvat_export/annotations/instances_default.json --manifest runs/q1/manifest.parquet \\
        --index runs/idx --campaign narrows --source cvat

The labels file may be the review page's feedback JSON, a Label Studio JSON export, a COCO file
(CVAT "COCO 1.0", FiftyOne, any tool) or a Datumaro JSON file (format detected; see
``mining.feedback``). COCO/Datumaro files need the export's manifest to know which hits were shown:
``manifest-*.parquet`` beside the labels file (or two levels up) is found, else pass ``--manifest``.
Prints the round and the campaign's precision per round. Exit codes: 0 ok, 2 bad arguments or labels file.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.feedback", description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", required=True, help="labeled export: feedback JSON, Label Studio JSON, COCO or Datumaro")
    p.add_argument("--campaign", required=True, help="campaign name (letters, digits, . _ -)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", help="index directory (its manifest names the store root; boxes are matched to patches)")
    where.add_argument("--data", help="store root (local or s3://) when no index is at hand")
    p.add_argument("--manifest", action="append", default=None, help="manifest of the export (repeatable)")
    p.add_argument("--format", default="auto", choices=["auto", "gallery", "labelstudio", "coco", "datumaro"])
    p.add_argument("--source", help="tool name to record (default: the format, e.g. labelstudio; say cvat for CVAT's COCO)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mining.feedback import LabelsError, run_feedback

    try:
        res = run_feedback(args.labels, args.campaign, index=args.index, data_root=args.data, fmt=args.format,
                           manifests=args.manifest, source=args.source)
    except (LabelsError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(res, default=str))
        return 0
    print(f"campaign {args.campaign} round {res['round']} from {res['format']} labels: {res['accepted']} accepted, "
          f"{res['rejected']} rejected, {res['corrected']} corrected boxes, {res['added']} added boxes "
          f"({res['matched_added']} matched to mined patches) -> {res['path']}")
    print(f"{'round':>5}  {'reviewed':>8}  {'accepted':>8}  {'precision':>9}  method / source")
    for r in res["rounds"]:
        prec = "-" if r["precision"] is None else f"{r['precision']:.3f}"
        print(f"{r['round']:>5}  {r['reviewed']:>8}  {r['accepted']:>8}  {prec:>9}  {r['method'] or '?'} / {r['source']}")
    return 0


if __name__ == "__main__":
    from jobs._common import exit_process

    exit_process(main())
