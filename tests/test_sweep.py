"""`detkd sweep`: search-space parsing, Optuna samplers and pruning, resume after an interruption or a hard kill
(finished trials are not redone), the table (md + json) and a best config that `detkd train` runs as is.

Most tests script the per-epoch values (a fake runner, no training); one test runs real tiny `detkd train` trials
whose values, reported from the Ultralytics callback, are scripted so that the pruner has something to prune.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from detkd.errors import ConfigError
from detkd.sweep import parse_space, run_sweep

IMGSZ = 64
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny data + a 1-epoch YOLOv8n teacher + a base `detkd train` config (pico student, CWD features)."""
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from ultralytics import YOLO

    from detkd.assets import PICO_YAML
    from helpers import rect_dataset

    root = tmp_path_factory.mktemp("sweep")
    data = rect_dataset(root / "rects", IMGSZ)
    m = YOLO("yolov8n.yaml")
    m.train(data=str(data), epochs=1, imgsz=IMGSZ, batch=8, device="cpu", workers=0, project=str(root / "teacher"),
            name="t", plots=False, val=False, verbose=False, seed=0, amp=False)
    teacher = Path(m.trainer.best if Path(m.trainer.best).exists() else m.trainer.last)
    cfg = {"teacher": str(teacher), "student": str(PICO_YAML), "data": str(data), "epochs": 1, "imgsz": IMGSZ,
           "batch": 8, "device": "cpu", "workers": 0, "project": str(root / "runs"), "name": "base", "plots": False,
           "seed": 0, "amp": False,
           "distill": {"logits": None, "boxes": None, "features": "auto", "feature_method": "cwd",
                       "feature_weight": 1.0}}
    p = root / "base.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def scripted_runner(value, calls: list, fail: dict | None = None):
    """A runner that trains nothing: reports value(params, epoch) for each of the trial's epochs."""

    def run(cfg_path: Path, report) -> dict:
        cfg = yaml.safe_load(cfg_path.read_text())
        calls.append(cfg_path.name)
        for epoch in range(1, cfg["epochs"] + 1):
            if fail and fail.get("trial") == cfg_path.name and fail.get("epoch") == epoch:
                raise fail["exc"]
            report(epoch, value(cfg, epoch), {"save_dir": str(cfg_path.with_suffix("")), "gap": 0.5 - 0.1 * epoch})
        return {"save_dir": str(cfg_path.with_suffix(""))}

    return run


def fw(cfg: dict) -> float:
    return float(cfg["distill"]["feature_weight"])


# ----------------------------------------------------------------------------------------------------------------
# parsing and argument errors (no training)
# ----------------------------------------------------------------------------------------------------------------
def test_parse_space_lists_ranges_and_errors():
    s = parse_space(["distill.logits.temperature=1,2,4", "distill.logits.method=kd,sigmoid_kd", "lr0=0.001..0.1:log",
                     "close_mosaic=0..5", "amp=true,false", "x=2"])
    assert s["distill.logits.temperature"].choices == [1, 2, 4]
    assert s["distill.logits.method"].choices == ["kd", "sigmoid_kd"]
    assert (s["lr0"].low, s["lr0"].high, s["lr0"].log, s["lr0"].integer) == (0.001, 0.1, True, False)
    assert s["close_mosaic"].integer and s["amp"].choices == [True, False] and s["x"].choices == [2]
    assert [p.spec() for p in s.values()][:3] == ["distill.logits.temperature=1,2,4",
                                                  "distill.logits.method=kd,sigmoid_kd", "lr0=0.001..0.1:log"]
    for bad, msg in ((["a"], "expected KEY=V1"), (["a=1,,2"], "empty value"), (["a=1,1"], "listed twice"),
                     (["a=5..1"], "LO must be below HI"), (["a=0..1:log"], "LO > 0"), (["a=x..y"], "two numbers"),
                     (["a=1", "a=2"], "given twice"), ([], "at least one")):
        with pytest.raises(ConfigError, match=msg):
            parse_space(bad)


def test_cli_sweep_refuses_a_range_on_the_grid(tmp_path, capsys):
    from detkd.cli import main

    rc = main(["sweep", str(tmp_path / "cfg.yaml"), "--space", "lr0=0.001..0.1", "--sampler", "grid",
               "--out", str(tmp_path / "sw")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "detkd sweep: error: --sampler grid needs a list of values" in err and "lr0=0.001..0.1" in err


# ----------------------------------------------------------------------------------------------------------------
# scripted trials: samplers, pruning, table, resume
# ----------------------------------------------------------------------------------------------------------------
def test_grid_sweep_prunes_and_writes_table_and_best(tiny, tmp_path):
    calls: list = []
    out = tmp_path / "sw"
    res = run_sweep(tiny, ["distill.feature_weight=0.5,1,2,4,8"], epochs=3, out=out, startup_trials=1,
                    log=lambda s: None,
                    runner=scripted_runner(lambda c, e: 0.05 * fw(c) * e, calls))
    rows = res["trials"]
    assert len(calls) == 5 and len(rows) == 5 and res["counts"]["fail"] == 0
    assert {r["params"]["distill.feature_weight"] for r in rows} == {0.5, 1, 2, 4, 8}  # the whole grid, once each
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert pruned and all(r["epochs_run"] < 3 for r in pruned), rows  # weak trials stopped before their last epoch
    assert rows[0]["params"]["distill.feature_weight"] == 8 and rows[0]["state"] == "complete"
    assert rows[0]["value"] == pytest.approx(0.05 * 8 * 3) and rows[0]["best_epoch"] == 3
    assert [r["value"] for r in rows] == sorted((r["value"] for r in rows), reverse=True)
    # table files
    md = (out / "sweep.md").read_text()
    assert "| rank | trial | state | val mAP50-95 |" in md and "distill.feature_weight" in md and "pruned" in md
    js = json.loads((out / "sweep.json").read_text())
    assert js["best"]["params"] == {"distill.feature_weight": 8} and len(js["trials"]) == 5
    assert js["sweep"]["sampler"] == "grid" and js["sweep"]["pruner"] == "median"
    # each trial's config is a detkd train config with the trial's value and the sweep's epochs
    t = yaml.safe_load(Path(rows[0]["config"]).read_text())
    assert t["epochs"] == 3 and t["distill"]["feature_weight"] == 8 and t["val"] is True
    # best.yaml: the base config (its own epochs, project, name) with the best value
    from detkd.train import load_train_config, prepare

    best = load_train_config(out / "best.yaml")
    base = yaml.safe_load(tiny.read_text())
    assert best["distill"]["feature_weight"] == 8 and best["epochs"] == base["epochs"] and best["name"] == "base"
    prepare(best)  # every detkd train check passes
    # rerunning a finished sweep trains nothing
    calls.clear()
    res2 = run_sweep(tiny, ["distill.feature_weight=0.5,1,2,4,8"], epochs=3, out=out, startup_trials=1,
                     log=lambda s: None, runner=scripted_runner(lambda c, e: 0.05 * fw(c) * e, calls))
    assert calls == [] and len(res2["trials"]) == 5


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_samplers_with_ranges(tiny, tmp_path, sampler):
    calls: list = []
    res = run_sweep(tiny, ["distill.feature_weight=0.1..10:log", "close_mosaic=0,1"], trials=4, epochs=2,
                    sampler=sampler, pruner="none", out=tmp_path / sampler, log=lambda s: None,
                    runner=scripted_runner(lambda c, e: 0.01 * fw(c) * e, calls))
    assert len(calls) == 4 and res["counts"]["complete"] == 4
    ws = [r["params"]["distill.feature_weight"] for r in res["trials"]]
    assert all(0.1 <= w <= 10 for w in ws) and len(set(ws)) == 4
    assert res["best"]["value"] == pytest.approx(max(0.02 * w for w in ws))


def test_interrupted_sweep_resumes_without_redoing_finished_trials(tiny, tmp_path):
    out = tmp_path / "sw"
    space = ["distill.feature_weight=1,2,3,4"]
    value = lambda c, e: 0.1 * fw(c) * e  # noqa: E731  (ascending values: nothing is pruned)
    calls: list = []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the third trial's second epoch
        run_sweep(tiny, space, epochs=2, out=out, log=lambda s: None, pruner="none",
                  runner=scripted_runner(value, calls, fail={"trial": "trial_002.yaml", "epoch": 2,
                                                             "exc": KeyboardInterrupt()}))
    assert calls == ["trial_000.yaml", "trial_001.yaml", "trial_002.yaml"]
    js = json.loads((out / "sweep.json").read_text())  # the table is written even when interrupted
    assert sorted(r["state"] for r in js["trials"]) == ["complete", "complete", "fail"]
    interrupted = next(r for r in js["trials"] if r["state"] == "fail")

    # a different space in the same folder is refused
    with pytest.raises(ConfigError, match="different space"):
        run_sweep(tiny, ["distill.feature_weight=1,2"], epochs=2, out=out, log=lambda s: None, pruner="none",
                  runner=scripted_runner(value, []))

    calls.clear()
    logs: list = []
    res = run_sweep(tiny, space, epochs=2, out=out, log=logs.append, pruner="none",
                    runner=scripted_runner(value, calls))
    # only the interrupted point (retried) and the one never started ran; trials 0 and 1 were not redone
    assert len(calls) == 2 and "trial_000.yaml" not in calls and "trial_001.yaml" not in calls
    rows = res["trials"]
    assert res["counts"] == {"complete": 4, "pruned": 0, "fail": 1}
    done = {r["params"]["distill.feature_weight"] for r in rows if r["state"] == "complete"}
    assert done == {1, 2, 3, 4}
    retry = next(r for r in rows if r["retry_of"] is not None)
    assert retry["retry_of"] == interrupted["trial"] and retry["params"] == interrupted["params"]
    assert any("resuming" in s and "2 trials finished" in s for s in logs)
    assert any(f"trial {interrupted['trial']} did not finish" in s for s in logs)
    assert res["best"]["params"] == {"distill.feature_weight": 4}


def test_failing_trial_is_recorded_and_the_sweep_goes_on(tiny, tmp_path):
    calls: list = []
    res = run_sweep(tiny, ["distill.feature_weight=1,2,3"], epochs=1, out=tmp_path / "sw", pruner="none",
                    log=lambda s: None,
                    runner=scripted_runner(lambda c, e: 0.1 * fw(c), calls,
                                           fail={"trial": "trial_001.yaml", "epoch": 1, "exc": RuntimeError("boom")}))
    assert len(calls) == 3 and res["counts"] == {"complete": 2, "pruned": 0, "fail": 1}
    failed = next(r for r in res["trials"] if r["state"] == "fail")
    assert failed["error"] == "RuntimeError: boom" and res["trials"][-1] is failed  # failures sort last
    assert "RuntimeError: boom" in (tmp_path / "sw" / "sweep.md").read_text()


def test_bad_space_value_fails_before_any_training(tiny, tmp_path):
    calls: list = []
    with pytest.raises(ConfigError, match=r"--space distill.feature_method=cwdd.*did you mean 'cwd'"):
        run_sweep(tiny, ["distill.feature_method=cwd,cwdd"], epochs=1, out=tmp_path / "sw", log=lambda s: None,
                  runner=scripted_runner(lambda c, e: 0.0, calls))
    assert calls == []


# ----------------------------------------------------------------------------------------------------------------
# real tiny trials: prune from the Ultralytics callback, kill -9 mid-trial, resume, best.yaml trains
# ----------------------------------------------------------------------------------------------------------------
KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import yaml
    from detkd.sweep import run_sweep, train_runner

    real = train_runner()

    def runner(path, report):
        w = float(yaml.safe_load(Path(path).read_text())["distill"]["feature_weight"])
        def rep(epoch, value, extra):
            if Path(path).name == "trial_001.yaml" and epoch == 1:
                os._exit(9)  # as if killed: no cleanup, the trial stays RUNNING in the study
            report(epoch, 0.1 * w * epoch, extra)
        return real(path, rep)

    run_sweep(sys.argv[1], ["distill.feature_weight=1,2,0.5,0.25"], epochs=2, out=sys.argv[2], startup_trials=1,
              runner=runner)
""")


def test_real_sweep_prunes_resumes_after_kill_and_best_config_trains(tiny, tmp_path):
    from detkd.sweep import train_runner
    from detkd.train import load_train_config, train

    out = tmp_path / "sw"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(script), str(tiny), str(out)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 9, r.stdout[-2000:] + r.stderr[-3000:]
    assert "trial 0 complete" in r.stdout
    first = (out / "trials" / "trial_000" / "results.csv").read_text()
    assert "kd/gap" in first.splitlines()[0]  # the gap monitor's column, in a real trial

    calls: list = []
    real = train_runner()

    def runner(path, report):
        calls.append(Path(path).name)
        w = float(yaml.safe_load(Path(path).read_text())["distill"]["feature_weight"])
        return real(path, lambda epoch, value, extra: report(epoch, 0.1 * w * epoch, extra))

    logs: list = []
    res = run_sweep(tiny, ["distill.feature_weight=1,2,0.5,0.25"], epochs=2, out=out, startup_trials=1,
                    log=logs.append, runner=runner)
    assert "trial_000.yaml" not in calls and len(calls) == 3  # the killed trial's retry + the two never started
    assert (out / "trials" / "trial_000" / "results.csv").read_text() == first  # not redone
    assert any("trial 1 did not finish (interrupted" in s for s in logs)
    rows = res["trials"]
    assert res["counts"]["complete"] + res["counts"]["pruned"] == 4 and res["counts"]["fail"] == 1
    assert res["counts"]["pruned"] >= 1  # pruned from the on_fit_epoch_end callback, out of a real trainer
    for r in rows:
        if r["state"] == "pruned":
            assert r["epochs_run"] == 1 and r["params"]["distill.feature_weight"] < 1
    assert res["best"]["params"] == {"distill.feature_weight": 2}
    assert rows[0]["run"] and (Path(rows[0]["run"]) / "weights" / "best.pt").is_file()

    best = load_train_config(out / "best.yaml", [f"project={tmp_path / 'final'}", "name=best"])
    run = train(best)
    assert (run / "weights" / "best.pt").is_file()
    assert yaml.safe_load((run / "args.yaml").read_text())["epochs"] == 1  # the base config's epochs
