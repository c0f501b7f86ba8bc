"""Checks run INSIDE the labeling-tools virtual environment (label-studio-sdk, datumaro, pycocotools).

label-studio-sdk and datumaro pin ``opencv-python-headless``, which clashes with the project's
``opencv-contrib-python-headless`` (both install ``cv2``), so they live in their own venv
(``.ci/labeltools-venv``) and the tests call this script there. Usage::

    python tests/labeltools_check.py ls-validate CONFIG TASKS      -> {"errors": [...], "tasks": n}
    python tests/labeltools_check.py ls-to-coco CONFIG EXPORT OUTDIR -> {"images": n, "annotations": n, "categories": [...]}
    python tests/labeltools_check.py datumaro-detect DIR            -> {"formats": [...]}
    python tests/labeltools_check.py datumaro-import DIR FORMAT     -> {"items": n, "bboxes": n}

Prints one JSON line.
"""
import json
import sys


def main(argv):
    cmd = argv[0]
    if cmd == "ls-validate":
        from label_studio_sdk.label_interface import LabelInterface

        li = LabelInterface(open(argv[1]).read())
        tasks = json.load(open(argv[2]))
        errors = []
        for i, t in enumerate(tasks):
            for p in t.get("predictions", []):
                errs = li.validate_prediction(p, return_errors=True)
                if errs:
                    errors.append([i, errs])
        print(json.dumps({"errors": errors, "tasks": len(tasks),
                          "labels": sorted(li.get_control("label").labels)}))
    elif cmd == "ls-to-coco":
        from label_studio_sdk.converter import Converter

        conv = Converter(config=open(argv[1]).read(), project_dir=None, download_resources=False)
        conv.convert_to_coco(argv[2], argv[3], is_dir=False)
        coco = json.load(open(argv[3] + "/result.json"))
        print(json.dumps({"images": len(coco["images"]), "annotations": len(coco["annotations"]),
                          "categories": [c["name"] for c in coco["categories"]],
                          "bboxes": [a["bbox"] for a in coco["annotations"]],
                          "sizes": [[im["width"], im["height"]] for im in coco["images"]]}))
    elif cmd == "datumaro-detect":
        from datumaro.components.environment import Environment

        print(json.dumps({"formats": sorted(Environment().detect_dataset(argv[1]))}))
    elif cmd == "datumaro-import":
        from datumaro.components.dataset import Dataset

        ds = Dataset.import_from(argv[1], argv[2])
        items = list(ds)
        print(json.dumps({"items": len(items), "bboxes": sum(1 for it in items for a in it.annotations
                                                          if type(a).__name__ == "Bbox")}))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
