"""Test-wide settings: detkd/Ultralytics state goes to a throwaway directory, threads are fixed."""

import atexit
import os
import shutil
import tempfile

_home = tempfile.mkdtemp(prefix="detkd-test-home-")
atexit.register(shutil.rmtree, _home, True)
os.environ.setdefault("DETKD_HOME", _home)
os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(_home, "ultralytics"))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")
os.environ.setdefault("YOLO_VERBOSE", "False")
