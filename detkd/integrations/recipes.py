"""Ready distillation recipes for Ultralytics YOLO (plain data: no imports, safe to use anywhere).

``features: auto`` taps the layers feeding Detect (``Detect.f``) in both models; ``feature_method`` /
``feature_weight`` / ``feature_options`` apply to each of those taps.
"""

DEFAULT_RECIPE: dict = {
    # sigmoid KD normalised like Ultralytics' own cls loss (by the teacher's score mass, not the anchor count)
    "logits": {"method": "sigmoid_kd", "weight": 1.0, "temperature": 1.0, "options": {"avg_factor": "teacher_score"}},
    "boxes": {"method": "ld", "weight": 1.0, "temperature": 10.0},
    "features": "auto",
    "feature_method": "cwd",
    "feature_weight": 1.0,
}
