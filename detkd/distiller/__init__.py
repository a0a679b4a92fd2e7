"""The `Distiller`: teacher -> student distillation for any PyTorch detector, framework-free.

Three lines in a training loop::

    kd = Distiller(student, teacher, "kd.yaml", example_inputs=images)   # + add kd.parameters() to the optimizer
    with kd.record(): loss = student_loss(student(images), targets)
    loss = loss + kd(images, gt_boxes=boxes, gt_valid=valid)["kd_total"]

``record()`` captures the student's tapped outputs during its forward; ``kd(images, ...)`` runs the frozen
teacher on the same images and returns the weighted terms ``kd_cls`` / ``kd_box`` / ``kd_feat`` (those
configured) and their sum ``kd_total``, each a 0-dim float32 tensor. ``config.task_weight`` is for the caller to
apply to its own detection loss.

The parts, one job each:

* ``distiller.py`` -- :class:`Distiller`, the façade: config, progress (``set_progress``), ``record()``,
  ``teacher_forward()``, ``forward()``; holds the learnable ``adapters`` / ``feature_losses`` (its whole
  ``state_dict``).
* ``taps.py`` -- :class:`~detkd.distiller.taps.Taps`: module outputs by name (``name``, ``name:0``,
  ``name:key``), hooks only while recording, so copies and pickles of a model never carry detkd objects.
* ``dense.py`` -- :class:`DenseOutputs`, the dense-head contract an integration fills (logits, DFL bins, decoded
  boxes, class scores, per-anchor confidence, sigmoid / softmax classes).
* ``adapters.py`` -- the 1x1 conv (+ BN) adapters and feature-loss modules, sized by one probe forward.
* ``teacher.py`` -- :class:`~detkd.distiller.teacher.TeacherRunner`: the frozen teacher, its ``teacher_runtime``
  options (``fuse.py``: Conv+BN folding) and its per-sample cache (``teacher_cache.py``), and this step's teacher
  tensors.
* ``terms.py`` -- weights x schedules and the dense-head terms.

Per-step state lives in :class:`~detkd.distiller.taps.Taps` (student and teacher recordings), the teacher runner's
run record and ``last_terms``; each is empty in copies and pickles (a model deep-copied mid-step, Ultralytics'
EMA, starts clean), and :meth:`Distiller.reset_step` drops it after every step.
"""

from detkd.distiller.dense import DenseOutputs, default_head_extractor
from detkd.distiller.distiller import Distiller
from detkd.distiller.fuse import fuse_conv_bn
from detkd.distiller.teacher_cache import TeacherCache

__all__ = ["Distiller", "DenseOutputs", "default_head_extractor", "fuse_conv_bn", "TeacherCache"]
