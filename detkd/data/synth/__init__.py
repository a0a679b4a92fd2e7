"""Built-in benchmark: synthetic fixed security-camera footage with boxes, in Ultralytics and COCO layouts.

`generate(out_dir)` writes a detection dataset that looks like square ``imgsz`` x ``imgsz`` frames from
``n_cameras`` (default 8) fixed CCTV cameras. Everything is drawn procedurally with numpy/cv2 (no asset files,
nothing downloaded) and is a pure function of ``(seed, split, index)``: the same seed gives byte-identical
label files and identical images, whatever the number of worker processes. `render_frame` renders one frame in
memory (image, boxes, labels).

Scene model (one per camera, built once per process and cached):

* A pinhole camera at height ``hc`` metres over a flat ground plane, image rows measured from the horizon
  ``yh`` (which may lie above the frame for steep cameras) and a vanishing point ``vx``. A ground point at
  depth ``Z`` and lateral offset ``X`` projects to ``x = vx + f X / Z``, ``y = yh + f hc / Z``; an object of
  height ``H`` metres standing at image row ``y`` is ``H (y - yh) / hc`` pixels tall, so size follows the
  perspective (a few pixels near the horizon, > 100 px at the bottom of a low camera).
* Layouts ``street`` / ``crossing`` / ``plaza`` / ``parking``: textured asphalt, paving and grass, lane
  markings, zebra crossings, parking bays, building facades with windows, a far skyline, and static props
  (lamp posts, trees, bins, bollards, benches, hydrants, signs, fences, hedges, bike racks). Props stand on
  the ground and occlude whatever stands behind them.
* Lighting per frame: day (gain, white balance, sun shadows, haze toward the horizon) or night (dark blue
  ambient light, lamp light pools and glare, lit windows, car head/tail lights; some cameras switch to
  grey IR mode), then vignetting, sensor noise, sometimes a low-resolution stream, an on-screen timestamp,
  and JPEG compression at quality 30-95.

Objects (``DEFAULT_CLASSES``): people (front/back/side views, walking stride, clothes, children, cyclists),
cars (sedan/hatchback/SUV/van, side, front and rear views), bicycles (thin frames, side or end-on, parked
or ridden), dogs, and bags (handbags, shopping bags, suitcases, backpacks, duffels; often carried by or
standing next to a person). Each frame holds 0-15 objects, drawn far-to-near together with the props, so
they occlude one another. Some moving objects get motion blur.

Boxes are the tight extents of each object's *visible* pixels (coverage > 25 % after anti-aliasing),
clipped to the image, in integer pixels. An object is dropped when more than 80 % of its drawn area is
hidden (by nearer objects, props, the on-screen text or the image border) or when its visible box is less
than 4 px wide or high, so no zero-area box is ever written.

Layouts written under ``out_dir``:

* Ultralytics: ``images/{train,val}/NNNNNN.jpg``, ``labels/{train,val}/NNNNNN.txt`` (``class cx cy w h``,
  normalised, 6 decimals; empty file for an empty frame) and ``data.yaml`` (``path`` absolute, ``train``,
  ``val``, ``names`` as ``{index: name}``; no ``download`` key).
* COCO: ``annotations/instances_{train,val}.json``: image ids 1..N (the file stem), ``file_name`` relative
  to ``images/{split}/``, ``bbox`` ``[x, y, w, h]`` pixels, ``area = w * h``, ``iscrowd = 0``, category ids
  1..K in class order.

Optional held-out splits, written the same way (``images/<split>``, ``labels/<split>``,
``annotations/instances_<split>.json`` and a ``<split>:`` key in ``data.yaml``) only when asked for, so train
and val output stays byte-identical whether or not they are:

* ``test`` (``n_test`` frames): in-distribution, the same ``n_cameras`` cameras as train and val.
* ``test_ood`` (``n_test_ood`` frames, ``ood_cameras`` > 0): unseen cameras, indices ``n_cameras`` ..
  ``n_cameras + ood_cameras - 1`` (named ``CAM <index + 1>``), which never appear in train, val or test. A
  camera is a pure function of ``(seed, camera index)``, so these are new scenes (geometry, layout, props,
  lighting), not new frames of known ones.

Speed: each camera's background, props and light maps are built once per process (about 0.1 s each); a
320 px frame then costs about 10 ms of one CPU core including JPEG encoding (2,000 frames: about 25 s). Object
sprites are drawn supersampled (2-4x for small objects) on small local canvases; every full-frame operation is
a single numpy/cv2 call.

Modules, lowest first: ``draw`` (colour jitter, value noise, glows, compositing, the ground-plane camera geometry,
object sprites, palettes), ``objects`` (the five classes: look, extent, drawing), ``props`` (street furniture),
``camera`` (one scene per camera: layout, ground and markings, buildings, props, light maps; cached),
``scene`` (the objects of one frame), ``render`` (``render_frame``), ``dataset`` (``generate``). Every random
draw comes from a generator seeded by ``(seed, camera)`` or ``(seed, split, index)`` and happens in a fixed
order: reordering draws changes the output, so ``tests/test_synth_ood.py`` compares the bytes with an older
commit's generator.
"""

from detkd.data.synth.camera import _camera  # noqa: F401  (tests build cameras directly)
from detkd.data.synth.dataset import generate
from detkd.data.synth.objects import DEFAULT_CLASSES
from detkd.data.synth.render import render_frame

__all__ = ["DEFAULT_CLASSES", "generate", "render_frame"]
