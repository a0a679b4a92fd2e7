"""Ready distillation recipes for Ultralytics YOLO (plain data: no imports, safe to use anywhere).

``features: auto`` taps the layers feeding Detect (``Detect.f``) in both models; ``feature_method`` /
``feature_weight`` / ``feature_options`` apply to each of those taps.
"""

# Weights: logits 4 / boxes 4 / features 1 came out best of {1, 4, 8, 16} x {features 1, 4} on the built-in data
# (yolov8n -> yolov8-pico, 12 epochs, seed 0: mAP50-95 2.20 / 2.43 / 2.46 / 2.17 and 2.26 with features 4;
# baseline 1.97). At weight 1 the dense KD terms are ~5% of Ultralytics' detection loss and barely steer.
DEFAULT_RECIPE: dict = {
    # sigmoid KD normalised like Ultralytics' own cls loss (by the teacher's score mass, not the anchor count)
    "logits": {"method": "sigmoid_kd", "weight": 4.0, "temperature": 1.0, "options": {"avg_factor": "teacher_score"}},
    "boxes": {"method": "ld", "weight": 4.0, "temperature": 10.0},
    "features": "auto",
    "feature_method": "cwd",
    "feature_weight": 1.0,
}
