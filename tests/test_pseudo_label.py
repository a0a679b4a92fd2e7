"""detkd.pseudo / `detkd pseudo-label`: hard-label distillation datasets from a teacher, on a tiny untrained
YOLOv8-pico teacher (nc=3) and 64 px images of coloured rectangles."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from detkd.eval.predict import ensure_ultralytics_offline, predict_ultralytics

ensure_ultralytics_offline()  # before Ultralytics is first imported

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

import detkd.pseudo as pseudo  # noqa: E402
from detkd.assets import PICO_YAML  # noqa: E402
from detkd.data.validate import validate_dataset  # noqa: E402
from detkd.pseudo import f1_thresholds, pseudo_label  # noqa: E402
from helpers import rect_dataset  # noqa: E402

IMGSZ = 64
NAMES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A labeled rectangle dataset (6 train + 4 val), an unlabeled folder (its train images, no labels) and a
    teacher .pt: an untrained pico whose BatchNorm is recalibrated so boxes and scores depend on the image."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    d = tmp_path_factory.mktemp("pseudo")
    data = rect_dataset(d / "rects", IMGSZ, n_train=6, n_val=4)
    unl = d / "unlabeled"
    unl.mkdir()
    for p in sorted((d / "rects/images/train").glob("*.jpg")):
        shutil.copy(p, unl / f"u{p.name}")
    torch.manual_seed(0)
    dm = DetectionModel(str(PICO_YAML), nc=3, verbose=False)
    head = dm.model[-1]
    with torch.no_grad():
        for m in dm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0
        for conv in head.cv2:  # short DFL distances: boxes not all clipped to the image
            conv[-1].bias.copy_(-0.4 * torch.arange(head.reg_max).repeat(4).float())
        for conv in head.cv3:  # scores spread over (0, 1) instead of ~1e-5
            conv[-1].bias.fill_(-1.0)
        dm.train()
        dm(torch.rand(4, 3, IMGSZ, IMGSZ))
        dm.eval()
    dm.names = dict(enumerate(NAMES))
    y = YOLO(str(PICO_YAML))
    y.model = dm
    pt = d / "teacher.pt"
    y.save(pt)
    return {"data": data, "unlabeled": unl, "teacher": pt, "root": d}


def _rows(p: Path) -> np.ndarray:
    return np.array([[float(v) for v in ln.split()] for ln in p.read_text().splitlines()]).reshape(-1, 5)


def _manifest(out: Path) -> dict:
    return json.loads((out / "pseudo_manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Thresholds: an independent brute-force sweep
# ---------------------------------------------------------------------------------------------------------------
def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _brute_force_best(gt, dets, c):
    """For every candidate threshold t (each distinct score), keep dets of class c with score >= t, match them
    from scratch (per image, by descending score, to the best unmatched GT at IoU >= 0.5) and compute F1 =
    2TP / (2TP + FP + FN); return (t, F1) of the best, the highest t among ties (None if no GT / no TP)."""
    n_gt = sum(int((np.asarray(gc) == c).sum()) for _, gc in gt)
    cands = sorted({float(s) for _, ss, cc in dets for s, k in zip(ss, cc) if k == c}, reverse=True)
    best = None
    for t in cands:
        tp = fp = 0
        for (gb, gc), (db, ds, dc) in zip(gt, dets):
            g = [list(b) for b, k in zip(gb, gc) if k == c]
            used = [False] * len(g)
            mine = sorted([(s, i) for i, (s, k) in enumerate(zip(ds, dc)) if k == c and s >= t], key=lambda x: -x[0])
            for s, i in mine:
                ious = [(_iou(db[i], g[j]) if not used[j] else -1.0) for j in range(len(g))]
                j = int(np.argmax(ious)) if ious else -1
                if j >= 0 and ious[j] >= 0.5:
                    used[j] = True
                    tp += 1
                else:
                    fp += 1
        fn = n_gt - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
        if best is None or f1 > best[1]:
            best = (t, f1)
    if n_gt == 0 or best is None or best[1] == 0:
        return None
    return best


def _scripted(rng, n_images=12, nc=3, size=100):
    """GT boxes and detections near them (jittered: some match at IoU >= 0.5, some not), duplicates and
    false positives, with scores that tie now and then."""
    gt, dets = [], []
    for _ in range(n_images):
        n = int(rng.integers(0, 5))
        xy = rng.uniform(0, size - 30, (n, 2))
        wh = rng.uniform(8, 30, (n, 2))
        gb = np.c_[xy, xy + wh]
        gc = rng.integers(0, nc - 1, n)  # the last class never has GT
        db, ds, dc = [], [], []
        for b, c in zip(gb, gc):
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections per object (duplicates)
                db.append(b + rng.normal(0, rng.choice([1.0, 6.0]), 4))
                ds.append(rng.choice([0.3, 0.5, 0.7, rng.uniform(0.05, 1)]))
                dc.append(c if rng.random() < 0.9 else (c + 1) % nc)
        for _ in range(int(rng.integers(0, 4))):  # false positives
            p = rng.uniform(0, size - 20, 2)
            db.append(np.r_[p, p + rng.uniform(5, 20, 2)])
            ds.append(rng.uniform(0.01, 1))
            dc.append(int(rng.integers(0, nc)))
        gt.append((gb, gc))
        dets.append((np.array(db).reshape(-1, 4), np.array(ds, float), np.array(dc, np.int64)))
    return gt, dets


def test_f1_threshold_by_hand():
    gt = [(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50.0]]), np.array([0, 0, 2]))]
    db = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 31], [0, 0, 10, 10], [5, 5, 8, 8], [70, 70, 80, 80.0]])
    dets = [(db, np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]), np.array([0, 0, 0, 0, 1, 2]))]
    t = f1_thresholds(gt, dets, NAMES)
    # class 0: t=.9 F1 2/3, t=.8 1/2, t=.7 4/5 (best), t=.6 2/3 (the duplicate is a false positive)
    assert (t[0].threshold, t[0].source) == (0.7, "f1")
    assert t[0].f1 == pytest.approx(0.8) and t[0].precision == pytest.approx(2 / 3) and t[0].recall == 1.0
    assert (t[1].threshold, t[1].source) == (pseudo.DEFAULT_CONF, "default")  # no val boxes of class 1
    assert (t[2].threshold, t[2].source, t[2].n_gt) == (None, "no_tp", 1)  # the teacher never finds it


@pytest.mark.parametrize("seed", range(5))
def test_auto_threshold_equals_brute_force_f1_sweep(seed):
    gt, dets = _scripted(np.random.default_rng(seed))
    got = f1_thresholds(gt, dets, NAMES)
    for c in range(3):
        ref = _brute_force_best(gt, dets, c)
        if ref is None:
            assert got[c].source in ("default", "no_tp")
        else:
            assert got[c].source == "f1" and got[c].threshold == ref[0] and got[c].f1 == pytest.approx(ref[1])
    assert got[2].source == "default"


def test_auto_thresholds_end_to_end(assets, tmp_path, monkeypatch):
    """--conf auto with --val-data: the teacher's predictions on the val split (scripted here) give the
    manifest's thresholds, equal to the brute-force sweep on the val labels, and labels keep score >= them."""
    rng = np.random.default_rng(7)
    val = validate_dataset(assets["data"], split="val").dataset
    gt = [(r.boxes.astype(float), r.classes) for r in val.images]
    _, dets = _scripted(rng, n_images=len(gt), size=IMGSZ)
    for k, (gb, gc) in enumerate(gt):  # plus near-GT detections so that each class has true positives
        extra = gb + rng.normal(0, 1.0, gb.shape)
        db, ds, dc = dets[k]
        dets[k] = (np.r_[db, extra], np.r_[ds, rng.uniform(0.2, 0.9, len(gb))], np.r_[dc, gc])
    by_file = {str(Path(r.file).resolve()): d for r, d in zip(val.images, dets)}
    unl_scores = np.linspace(0.02, 0.98, 15)
    calls = []

    def fake_predict(model, images, imgsz=640, conf=0.001, **kw):
        calls.append((len(images), conf))
        out = []
        for image_id, path in images:
            d = by_file.get(str(Path(path).resolve()))
            if d is None:  # an unlabeled image: boxes of every class at scores 0.02 .. 0.98
                d = (np.tile([2, 2, 20, 20.0], (15, 1)), unl_scores, np.arange(15) % 3)
            for b, s, c in zip(*d):
                if s > conf:
                    out.append({"image_id": image_id, "category_id": int(c) + 1,
                                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
        return out

    monkeypatch.setattr(pseudo, "predict_ultralytics", fake_predict)
    out = tmp_path / "ds"
    r = pseudo_label(assets["teacher"], [assets["unlabeled"]], out, conf="auto", val_data=assets["data"],
                     imgsz=IMGSZ, progress=False)
    assert calls[0] == (4, pseudo.EVAL_CONF)  # val split first, at the evaluation confidence
    man = _manifest(out)
    for c, name in enumerate(NAMES):
        ref = _brute_force_best(gt, dets, c)
        t = man["thresholds"][name]
        assert ref is not None and t["source"] == "f1" and t["threshold"] == ref[0], (name, t, ref)
        assert r.thresholds[c].threshold == ref[0]
    thr = np.array([man["thresholds"][n]["threshold"] for n in NAMES])
    want = (unl_scores >= thr[np.arange(15) % 3]).sum()
    for e in man["images"]:
        assert e["pseudo"] and len(e["boxes"]) == want == len(_rows(out / e["label"]))
        assert all(b[1] >= thr[b[0]] for b in e["boxes"])
    assert "F1" in r.summary() and man["settings"]["conf"] == "auto"
    with pytest.raises(pseudo.DataError, match="--val-data"):
        pseudo_label(assets["teacher"], [assets["unlabeled"]], tmp_path / "x", conf="auto", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# End to end with the real (tiny) teacher
# ---------------------------------------------------------------------------------------------------------------
def test_round_trip_into_training(assets, tmp_path):
    from ultralytics import YOLO

    out = tmp_path / "ds"
    r = pseudo_label(assets["teacher"], [assets["unlabeled"]], out, conf=0.5, val_data=assets["data"], imgsz=IMGSZ,
                     fmt="coco", progress=False)
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data == {"train": "images/train", "val": "images/val", "names": dict(enumerate(NAMES))}
    for split, n in (("train", 6), ("val", 4)):  # detkd's validation, strict: not even a warning
        rep = validate_dataset(out / "data.yaml", split=split, strict=True, decode=True)
        assert rep.images_read == n
    man = _manifest(out)
    assert man["teacher"]["sha256"] == hashlib.sha256(assets["teacher"].read_bytes()).hexdigest()
    assert man["thresholds"]["red"] == {**man["thresholds"]["red"], "threshold": 0.5, "source": "fixed"}
    assert len(man["images"]) == 6 and all(e["pseudo"] for e in man["images"])
    n_boxes = 0
    for e in man["images"]:
        rows = _rows(out / e["label"])
        assert len(rows) == len(e["boxes"]) and all(b[1] >= 0.5 for b in e["boxes"])
        assert rows[:, 0].tolist() == [b[0] for b in e["boxes"]]
        # the labels are the teacher's own predictions (eval NMS), score >= 0.5, normalised xywh
        ref = [d for d in predict_ultralytics(assets["teacher"], [(0, out / e["file"])], imgsz=IMGSZ, progress=False)
               if d["score"] >= 0.5]
        assert len(ref) == len(rows)
        if len(ref):
            xywh = np.array([d["bbox"] for d in ref]) / IMGSZ
            np.testing.assert_allclose(rows[:, 1:3], xywh[:, :2] + xywh[:, 2:] / 2, atol=1e-5)
            np.testing.assert_allclose(rows[:, 3:], xywh[:, 2:], atol=1e-5)
        n_boxes += len(rows)
    assert n_boxes > 0 and sum(r.boxes_per_class.values()) == n_boxes
    coco = json.loads((out / "annotations/instances_train.json").read_text())
    assert len(coco["images"]) == 6 and len(coco["annotations"]) == n_boxes
    assert (out / "annotations/instances_val.json").is_file()

    m = YOLO(str(PICO_YAML))
    m.train(data=str(out / "data.yaml"), epochs=1, imgsz=IMGSZ, batch=4, device="cpu", workers=0, project=str(tmp_path),
            name="student", plots=False, verbose=False, seed=0, amp=False)
    assert Path(m.trainer.last).is_file()
    assert len((Path(m.trainer.save_dir) / "results.csv").read_text().splitlines()) == 2  # header + 1 epoch


def _write_video(path: Path, n: int, fourcc: str = "MJPG") -> None:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (IMGSZ, 48))
    assert w.isOpened()
    for i in range(n):  # frame i is flat grey level 20 * i: the written frames say which ones they are
        w.write(np.full((48, IMGSZ, 3), 20 * i, np.uint8))
    w.release()


@pytest.mark.parametrize("suffix,fourcc", [("avi", "MJPG"), ("mp4", "mp4v")])
def test_video_every_kth_frame(assets, tmp_path, suffix, fourcc):
    video = tmp_path / f"cam.{suffix}"
    _write_video(video, 11, fourcc)
    out = tmp_path / "ds"
    r = pseudo_label(assets["teacher"], [video], out, conf=0.5, every=3, imgsz=IMGSZ, progress=False)
    names = sorted(p.name for p in (out / "images/train").iterdir())
    assert names == ["cam_f000000.jpg", "cam_f000003.jpg", "cam_f000006.jpg", "cam_f000009.jpg"]
    for name in names:
        k = int(name[5:11])
        im = cv2.imread(str(out / "images/train" / name))
        assert im.shape == (48, IMGSZ, 3) and abs(im.mean() - 20 * k) < 6, (name, im.mean())
        assert (out / "labels/train" / name.replace(".jpg", ".txt")).is_file()
    man = _manifest(out)
    assert [(e["frame"], e["source"]) for e in man["images"]] == [(k, str(video.resolve())) for k in (0, 3, 6, 9)]
    assert r.counts["new"] == 4 and r.counts["unreadable"] == 0
    assert yaml.safe_load((out / "data.yaml").read_text())["val"] == "images/train"  # no labeled val given
    assert "no labeled val split" in r.summary()


def test_unreadable_files_are_counted_and_listed_not_fatal(assets, tmp_path, capsys):
    from detkd.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(assets["unlabeled"].glob("*.jpg"))[:2]:
        shutil.copy(p, src / p.name)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (src / "empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    (src / "bad.mp4").write_bytes(b"\x00" * 64)
    out = tmp_path / "ds"
    rc = main(["pseudo-label", str(assets["teacher"]), str(src), "--out", str(out), "--conf", "0.5",
               "--imgsz", str(IMGSZ), "--format", "coco"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "2 pseudo-labelled" in text and "3 unreadable" in text and "unreadable (3)" in text
    assert "broken.jpg" in text and "empty.png" in text and "bad.mp4" in text and "ignored 1 file" in text
    man = _manifest(out)
    assert {Path(u["file"]).name for u in man["unreadable"]} == {"broken.jpg", "empty.png", "bad.mp4"}
    assert man["counts"]["unreadable"] == 3 and len(man["images"]) == 2
    assert sorted(p.name for p in (out / "images/train").iterdir()) == sorted(p.name for p in src.glob("u*.jpg"))
    assert validate_dataset(out / "data.yaml", split="train", strict=True).images_read == 2

    assert main(["pseudo-label", str(assets["teacher"]), str(tmp_path / "nope"), "--out", str(out), "--conf",
                 "0.5"]) == 2  # a missing source is a user error: one line, exit 2
    assert "source not found" in capsys.readouterr().err
    evil = tmp_path / "evil.pt"
    torch.save({"model": shutil.rmtree}, evil)  # would call a function when unpickled: refused, never loaded
    assert main(["pseudo-label", str(evil), str(src), "--out", str(tmp_path / "ds2"), "--conf", "0.5"]) == 2
    assert "refused" in capsys.readouterr().err and not (tmp_path / "ds2").exists()


def test_rerun_skips_finished_frames(assets, tmp_path, monkeypatch):
    video = tmp_path / "cam.avi"
    _write_video(video, 6)
    out = tmp_path / "ds"
    kw = dict(conf=0.5, every=2, imgsz=IMGSZ, progress=False)
    r1 = pseudo_label(assets["teacher"], [assets["unlabeled"], video], out, **kw)
    assert (r1.counts["new"], r1.counts["skipped"]) == (9, 0)
    labels = sorted((out / "labels/train").glob("*.txt"))
    stamp = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in labels}
    images1 = _manifest(out)["images"]

    calls = []
    real = pseudo.predict_ultralytics
    monkeypatch.setattr(pseudo, "predict_ultralytics", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    r2 = pseudo_label(assets["teacher"], [assets["unlabeled"], video], out, **kw)
    assert (r2.counts["new"], r2.counts["skipped"]) == (0, 9) and calls == []  # the teacher never ran
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in labels} == stamp
    assert _manifest(out)["images"] == images1 and len(images1) == 9  # same boxes and scores, from the log

    (out / "labels/train/cam_f000002.txt").unlink()  # an interrupted frame: image but no label
    (out / "images/train/u3.jpg").unlink()  # and an image whose label survived
    r3 = pseudo_label(assets["teacher"], [assets["unlabeled"], video], out, **kw)
    assert (r3.counts["new"], r3.counts["skipped"]) == (2, 7) and calls == [2]
    assert (out / "labels/train/cam_f000002.txt").is_file() and (out / "images/train/u3.jpg").is_file()

    r4 = pseudo_label(assets["teacher"], [assets["unlabeled"], video], out, **{**kw, "conf": 0.6})
    assert (r4.counts["new"], r4.counts["skipped"]) == (9, 0)  # other thresholds: everything is relabelled
    r5 = pseudo_label(assets["teacher"], [video], out, **{**kw, "conf": 0.6})  # fewer sources: stale files go
    assert r5.counts["skipped"] == 3 and r5.counts["stale_removed"] == 6
    assert sorted(p.name for p in (out / "images/train").iterdir()) == [f"cam_f00000{k}.jpg" for k in (0, 2, 4)]
    assert len(list((out / "labels/train").iterdir())) == 3


def test_merge_keeps_real_labels(assets, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    real_dir = assets["root"] / "rects/images/train"
    for name in ("0.jpg", "1.jpg"):  # the same images as two labeled ones, same stems
        shutil.copy(real_dir / name, src / name)
    shutil.copy(assets["unlabeled"] / "u2.jpg", src / "new.jpg")
    out = tmp_path / "ds"
    r = pseudo_label(assets["teacher"], [src], out, conf=0.3, merge=assets["data"], imgsz=IMGSZ, progress=False)
    assert r.counts["real"] == 6 and r.counts["replaced_by_real"] == 2 and r.counts["pseudo"] == 1
    for i in range(6):  # real labels, byte for byte
        assert (out / f"labels/train/{i}.txt").read_bytes() == (assets["root"] / f"rects/labels/train/{i}.txt").read_bytes()
    man = _manifest(out)
    flags = {Path(e["file"]).stem: e["pseudo"] for e in man["images"]}
    assert flags == {**{str(i): False for i in range(6)}, "new": True}
    assert sorted(Path(p).name for p in man["replaced_by_real"]) == ["0.jpg", "1.jpg"]
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["val"] == "images/val" and len(list((out / "images/val").iterdir())) == 4  # merge's val split
    assert validate_dataset(out / "data.yaml", split="train", strict=True).images_read == 7
