"""sparsehead-predict: COCO results a COCO index loads, head GMACs per image, unreadable images counted."""

import json
import shutil

import pytest
from pycocotools.coco import COCO
from test_trainer import DEMO, tiny_cfg, tiny_overrides

from sparsehead.engine.predict import main
from sparsehead.engine.trainer import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(dataset_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "run"
    Trainer(tiny_cfg(dataset_root, out, **{"solver.max_iter": 1, "model.head.kind": "dynamic"})).run()
    return out / "model_final.pth"


def _args(dataset_root, tmp_path, weights, *extra):
    # every detection the model makes (an untrained model scores low)
    opts = tiny_overrides(dataset_root, tmp_path / "unused", **{"model.head.kind": "dynamic", "model.score_thresh": 0.0,
                                                               "model.detections_per_img": 5})
    return [str(DEMO), *opts, "--weights", str(weights), "--score-thresh", "0", "--batch-size", "3", *extra]


def test_folder_with_a_bad_image(dataset_root, tmp_path, trained, capsys):
    images = tmp_path / "images"
    shutil.copytree(dataset_root / "val", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "preds.json"
    assert main(_args(dataset_root, tmp_path, trained, "--input", str(images), "--out", str(out),
                      "--draw", str(tmp_path / "drawn"))) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "1 unreadable image(s) skipped" in captured.out
    results = json.loads(out.read_text())
    record = json.loads((tmp_path / "preds_images.json").read_text())
    good = sorted(p.name for p in (dataset_root / "val").iterdir())
    assert record["num_images"] == 4 and record["num_bad_images"] == 1
    (broken,) = record["bad_images"]
    assert broken["file_name"].endswith("broken.png") and "cannot read" in broken["error"]
    assert sorted(r["image_id"] for r in record["images"]) == good  # file names without --ann-file
    assert all(r["head_gmacs"] > 0 for r in record["images"])
    assert len(results) == sum(r["num_detections"] for r in record["images"]) > 0
    for r in results:
        assert r["image_id"] in good and 0 <= r["category_id"] < 3 and len(r["bbox"]) == 4 and r["bbox"][2] >= 0
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == sorted(f"{n.rsplit('.', 1)[0]}.png" for n in good)


def test_ids_from_annotation_file_load_as_coco_results(dataset_root, tmp_path, trained):
    ann = dataset_root / "annotations" / "val.json"
    out = tmp_path / "preds.json"
    assert main(_args(dataset_root, tmp_path, trained, "--input", str(dataset_root / "val"), "--out", str(out),
                      "--ann-file", str(ann))) == 0
    gt = COCO(str(ann))
    dt = gt.loadRes(str(out))
    assert set(dt.getImgIds()) <= set(gt.getImgIds()) and len(dt.anns) > 0
    assert {a["category_id"] for a in dt.anns.values()} <= set(gt.getCatIds())


def test_bad_arguments_are_one_line(dataset_root, tmp_path, trained, capsys):
    assert main(_args(dataset_root, tmp_path, trained, "--input", str(tmp_path / "none"), "--out",
                      str(tmp_path / "p.json"))) == 1
    assert "--input not found" in capsys.readouterr().err
    (tmp_path / "only.png").write_bytes(b"garbage")
    assert main(_args(dataset_root, tmp_path, trained, "--input", str(tmp_path / "only.png"), "--out",
                      str(tmp_path / "p.json"))) == 1
    assert not (tmp_path / "p.json").read_text().strip("[]\n")
