"""Files shipped with detkd (model yamls)."""

from pathlib import Path

ASSETS = Path(__file__).parent
PICO_YAML = ASSETS / "yolov8-pico.yaml"
FEMTO_YAML = ASSETS / "yolov8-femto.yaml"
