"""Latency a user can trust (issue 14, section 6): rows timed round-robin until they settle or a budget ends, a
plain "too noisy" verdict in the table, the report's headline and the demo, and GFLOPs with two significant digits.

Most tests run on scripted timings and fake runners (no model, no clock of the real machine); one real `bench`
call on two tiny checkpoints checks the noise section end to end."""

import itertools
import json
import shutil
import statistics
import time

import pytest

from detkd.bench.info import format_gflops
from detkd.bench.noise import NOISY_TEXT, interleave, noise_line, noise_verdict, spread
from detkd.bench.run import format_table, latency_entry, table_rows


# --------------------------------------------------------------------------------------------------------------
# scripted bench results
# --------------------------------------------------------------------------------------------------------------
def _row(model, engine, prec, p50, p95, params, gflops, sp=0.02):
    lat = {"p50": p50, "p95": p95, "mean": p50, "min": 0.9 * p50, "spread": sp, "rounds": 10, "runs": 50,
           "warmup": 5, "threads": 2, "imgsz": 96, "engine": engine, "cpu": "Test CPU"}
    return {"model": model, "source": f"/nowhere/{model}.pt", "path": f"/nowhere/{model}.{engine}.{prec}",
            "engine": engine, "precision": prec, "latency_ms": lat, "throughput": {1: 1000 / p50},
            "peak_rss_mb": 300.0, "model_rss_mb": 40.0, "params": params, "gflops": gflops, "size_mb": 2.0}


TEACHER, STUDENT = (3_157_200, 0.2046), (912_000, 0.0641)  # params, GFLOPs at 96 px (pico: 0.064 GFLOPs)


def _quiet_rows():
    return [_row("teacher", "pytorch", "fp32", 66.0, 71.0, *TEACHER),
            _row("teacher", "onnxruntime", "fp32", 40.0, 43.0, *TEACHER),
            _row("baseline", "pytorch", "fp32", 23.0, 24.6, *STUDENT),
            _row("baseline", "onnxruntime", "fp32", 9.0, 9.8, *STUDENT),
            _row("distilled", "pytorch", "fp32", 22.6, 24.1, *STUDENT),
            _row("distilled", "onnxruntime", "fp32", 9.1, 9.7, *STUDENT)]


def _res(rows):
    first: dict = {}
    for r in rows:
        ref = first.setdefault((r["engine"], r["precision"]), r)
        r["speedup_vs_first"] = ref["latency_ms"]["p50"] / r["latency_ms"]["p50"]
    noise = {**noise_verdict(rows), "rounds": 10, "per_round": 5, "stopped": "settled", "seconds": 12.0,
             "budget_s": 60.0}
    return {"cpu": "Test CPU", "threads": 2, "imgsz": 96, "batch_sizes": [1], "runs": 50, "warmup": 5,
            "versions": {"torch": "x", "onnxruntime": "y"}, "what": "model forward only", "rows": rows, "notes": [],
            "noise": noise}


# --------------------------------------------------------------------------------------------------------------
# the verdict (pure function)
# --------------------------------------------------------------------------------------------------------------
def test_quiet_rows_are_not_noisy():
    v = noise_verdict(_quiet_rows())
    assert v["noisy"] is False and v["verdict"] == "quiet" and v["reasons"] == []
    assert v["thresholds"]["p95_p50_max"] == 1.5 and v["thresholds"]["same_arch_p50_max_diff"] == 0.25


def test_high_p95_over_p50_is_noisy_and_says_which_row():
    rows = _quiet_rows()
    rows[1]["latency_ms"]["p95"] = 40.0 * 2.5  # teacher ORT FP32: p95/p50 = 2.5
    v = noise_verdict(rows)
    assert v["noisy"] and v["verdict"] == "noisy"
    assert len(v["reasons"]) == 1 and "teacher ORT FP32" in v["reasons"][0] and "p95/p50 = 2.50" in v["reasons"][0]


def test_same_architecture_rows_that_disagree_are_noisy():
    """The issue's case: baseline and distilled students (same architecture) at 23.2 vs 12.3 ms."""
    rows = _quiet_rows()
    rows[2]["latency_ms"].update(p50=23.2, p95=24.0)
    rows[4]["latency_ms"].update(p50=12.3, p95=13.0)
    v = noise_verdict(rows)
    assert v["noisy"]
    (reason,) = v["reasons"]
    assert "baseline and distilled have the same architecture on eager FP32" in reason
    assert "23.2 vs 12.3 ms" in reason and "1.89x" in reason


def test_rows_of_other_engines_or_architectures_are_not_compared():
    """A teacher 3x slower than its student, or ORT 2.5x faster than eager for one model, is not noise."""
    v = noise_verdict(_quiet_rows())
    assert not v["noisy"]
    rows = _quiet_rows()
    rows[3]["latency_ms"].update(p50=4.0, p95=4.3)  # baseline ORT now far from baseline eager: other engine
    rows[5]["latency_ms"].update(p50=4.1, p95=4.4)
    assert not noise_verdict(rows)["noisy"]


def test_round_to_round_spread_above_the_limit_is_noisy():
    rows = _quiet_rows()
    rows[0]["latency_ms"]["spread"] = 0.4
    v = noise_verdict(rows)
    assert v["noisy"] and "teacher eager FP32: per-round medians spread 40%" in v["reasons"][0]


def test_spread_is_iqr_over_median():
    assert spread([10.0]) == 0.0
    assert spread([10.0, 10.0, 10.0, 10.0]) == 0.0
    assert spread([8.0, 9.0, 10.0, 11.0, 12.0]) == pytest.approx((11.0 - 9.0) / 10.0)


# --------------------------------------------------------------------------------------------------------------
# the round-robin scheduler on fake runners
# --------------------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_interleave_order_rotates_and_every_call_gets_a_batch():
    calls = []

    def timer(name):
        def f(k):
            calls.append((name, k))
            return [1.0] * k
        return f

    r = interleave({n: timer(n) for n in "abc"}, runs=6, per_round=2, budget_s=60)
    assert [n for n, _ in calls[:9]] == list("abc" "bca" "cab")  # one batch of each per round, start rotates
    assert all(k == 2 for _, k in calls)
    assert r["order"] == [n for n, _ in calls]
    assert r["stopped"] == "settled" and r["rounds"] == 3  # 6 runs / 2 per round, and constant times: settled
    assert all(len(v) == 6 for v in r["times"].values())


def test_interleave_stops_when_every_row_settles():
    clock = FakeClock()

    def steady(ms):
        def f(k):
            clock.t += 0.1
            return [ms] * k
        return f

    r = interleave({"t": steady(60.0), "s": steady(20.0)}, runs=20, per_round=5, budget_s=1000, clock=clock)
    assert r["stopped"] == "settled" and r["rounds"] == 4  # needs 20 runs = 4 rounds of 5; spread 0
    assert {k: len(v) for k, v in r["times"].items()} == {"t": 20, "s": 20}
    assert r["seconds"] == pytest.approx(0.8)


def test_interleave_goes_on_while_noisy_and_stops_when_the_budget_ends():
    clock = FakeClock()
    n = itertools.count()

    def jumpy(k):  # round medians alternate 10 / 30 ms: never settles
        clock.t += 0.5
        return [10.0 if next(n) % 2 else 30.0] * k

    def steady(k):
        clock.t += 0.5
        return [5.0] * k

    r = interleave({"a": jumpy, "b": steady}, runs=1000, per_round=5, budget_s=5.0, clock=clock)
    assert r["stopped"] == "budget" and r["rounds"] == 5  # 1 s per round; the budget ends long before 1000 runs
    assert spread(r["round_p50"]["a"]) > 0.5 and spread(r["round_p50"]["b"]) == 0.0


def test_interleave_runs_at_least_three_rounds_and_at_most_the_cap():
    clock = FakeClock()
    flip = itertools.cycle([1.0, 3.0])

    def jumpy(k):
        clock.t += 100.0
        return [next(flip)] * k

    r = interleave({"a": jumpy}, runs=1, per_round=1, budget_s=0, clock=clock)
    assert r["rounds"] == 3 and r["stopped"] == "budget"  # a spread needs a few rounds, whatever the budget
    r = interleave({"a": jumpy}, runs=4, per_round=1, budget_s=float("inf"), clock=clock)
    assert r["rounds"] == 40 and r["stopped"] == "max_rounds"  # default cap: 10x the rounds `runs` needs


def test_interleave_with_sleeping_runners_stops_at_the_budget():
    """Real sleeps and the real clock: one row alternates 1 / 6 ms batches, so only the budget can stop it."""
    flip = itertools.cycle([0.001, 0.006])

    def jumpy(k):
        s = next(flip)
        out = []
        for _ in range(k):
            t = time.perf_counter()
            time.sleep(s)
            out.append((time.perf_counter() - t) * 1000)
        return out

    def steady(k):
        time.sleep(0.001 * k)
        return [1.0] * k

    t0 = time.monotonic()
    r = interleave({"jumpy": jumpy, "steady": steady}, runs=3, per_round=3, budget_s=0.3)
    took = time.monotonic() - t0
    assert r["stopped"] == "budget" and r["rounds"] >= 3
    assert 0.3 <= r["seconds"] <= took < 5.0
    assert r["order"][:4] == ["jumpy", "steady", "steady", "jumpy"]


def test_round_robin_cancels_a_load_change_that_sequential_timing_does_not():
    """Two identical models on a machine that gets 4x slower a third of the way through: one after the other they
    differ 4x (the issue's 0.01x-272x speed-ups); round-robin gives them the same p50."""
    def machine():
        clock = FakeClock()

        def model(k):
            out = []
            for _ in range(k):
                ms = 10.0 * (4.0 if clock.t > 0.4 else 1.0)
                clock.t += ms / 1000
                out.append(ms)
            return out
        return clock, model

    clock, m = machine()
    a, b = m(30), m(30)  # sequential: all of a, then all of b
    assert statistics.median(b) / statistics.median(a) == pytest.approx(4.0)
    clock, m = machine()
    r = interleave({"a": m, "b": m}, runs=30, per_round=3, budget_s=1000, clock=clock, max_rounds=10)
    pa, pb = (statistics.median(r["times"][k]) for k in "ab")
    assert pa == pytest.approx(pb)


# --------------------------------------------------------------------------------------------------------------
# what the user sees: table line, GFLOPs, report headline and caption
# --------------------------------------------------------------------------------------------------------------
def test_gflops_have_two_significant_digits():
    assert [format_gflops(g) for g in (165.3, 28.4, 8.74, 0.43, 0.0641, 0.00123)] == \
        ["165", "28", "8.7", "0.43", "0.064", "0.0012"]
    assert format_gflops(None) == "—" and format_gflops(float("nan")) == "n/a" and format_gflops(0) == "0"
    table = format_table(_res(_quiet_rows()))
    assert "| baseline | 0.91 | 0.064 | 2.00 |" in table and "| teacher | 3.16 | 0.20 | 2.00 |" in table


def test_table_says_quiet_or_too_noisy_under_the_latency_table():
    quiet = format_table(_res(_quiet_rows()))
    assert "Latency check: quiet. Rows timed round-robin, 10 rounds x 5 runs" in quiet and "noisy" not in quiet
    head, rows = table_rows(_res(_quiet_rows()))
    assert head[5] == "spread" and rows[0][5] == "2%"
    rows_ = _quiet_rows()
    rows_[2]["latency_ms"].update(p50=23.2, p95=24.0)
    rows_[4]["latency_ms"].update(p50=12.3, p95=13.0)
    noisy = format_table(_res(rows_))
    line = next(x for x in noisy.splitlines() if "too noisy" in x)
    assert line.startswith("**Machine too noisy: latency figures unreliable.**") and "23.2 vs 12.3 ms" in line
    # the line sits between the latency table and the size table
    lines = noisy.splitlines()
    assert lines[lines.index(line) - 2].startswith("| distilled | ORT |") and "params M" in lines[lines.index(line) + 2]


def test_noise_line_lists_at_most_three_reasons():
    rows = _quiet_rows()
    for r in rows:
        r["latency_ms"]["p95"] = 3 * r["latency_ms"]["p50"]
    line = noise_line(_res(rows)["noise"])
    assert line.count("p95/p50 = 3.00") == 3 and "3 more in bench.json (noise.reasons)" in line
    assert noise_line(None) is None


def _entries(res, tmp_path):
    from detkd.report.report import ModelEntry

    metrics = {"AP": 0.3, "AP50": 0.5, "AP75": 0.3, "APs": 0.1, "APm": 0.3, "APl": 0.4, "AR1": 0.2, "AR10": 0.3,
               "AR100": 0.4, "ARs": 0.1, "ARm": 0.3, "ARl": 0.4, "per_class": {"a": {"AP": 0.3, "AP50": 0.5}}}
    return [ModelEntry(role=role, name=name, metrics={**metrics, "AP": ap}, params=p, gflops=g,
                       latency_ms=latency_entry(res, name))
            for role, name, ap, (p, g) in (("teacher", "teacher", 0.4, TEACHER), ("baseline", "baseline", 0.2, STUDENT),
                                           ("distilled", "distilled", 0.3, STUDENT))]


def test_report_headline_and_caption_on_a_quiet_and_a_noisy_machine(tmp_path):
    from detkd.report.report import build_report

    quiet = _res(_quiet_rows())
    p = build_report(_entries(quiet, tmp_path), tmp_path / "quiet", bench=quiet)
    rep = json.loads(p["json"].read_text())
    assert NOISY_TEXT not in rep["headline"]["text"] and rep["headline"]["latency"]["noisy"] is False
    html = p["html"].read_text()
    assert "same engine and precision" in html and "Latency check: quiet" in html
    assert "<td class=\"n\">0.064</td>" in html or ">0.064<" in html  # model table GFLOPs, two significant digits

    rows = _quiet_rows()
    rows[2]["latency_ms"].update(p50=23.2, p95=24.0)
    rows[4]["latency_ms"].update(p50=12.3, p95=13.0)
    noisy = _res(rows)
    p = build_report(_entries(noisy, tmp_path), tmp_path / "noisy", bench=noisy)
    rep = json.loads(p["json"].read_text())
    assert rep["headline"]["text"].endswith(f"vs 66.0 ms (teacher) ({NOISY_TEXT})")
    assert rep["headline"]["latency"]["noisy"] is True
    html, md = p["html"].read_text(), p["md"].read_text()
    assert 'class="noisy"' in html and "Machine too noisy: latency figures unreliable." in html
    assert "**Machine too noisy: latency figures unreliable.**" in md and f"({NOISY_TEXT})" in md
    assert "same engine and precision" in md


# --------------------------------------------------------------------------------------------------------------
# one real bench: two tiny checkpoints of the same architecture, each row in its own worker, round-robin
# --------------------------------------------------------------------------------------------------------------
def test_bench_has_a_noise_section(tmp_path):
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from ultralytics import YOLO

    from detkd.assets import PICO_YAML
    from detkd.bench.run import bench

    y = YOLO(str(PICO_YAML))
    y.model.names = {0: "a", 1: "b"}
    y.save(tmp_path / "baseline.pt")
    shutil.copy(tmp_path / "baseline.pt", tmp_path / "distilled.pt")
    res = bench([tmp_path / "baseline.pt", tmp_path / "distilled.pt"], imgsz=64, threads=1, batch_sizes=(1, 2), runs=6,
                warmup=1, engines=["pytorch"], out_dir=tmp_path / "b", progress=False, budget_s=3)
    noise = json.loads((tmp_path / "b" / "bench.json").read_text())["noise"]
    assert noise == json.loads(json.dumps(res["noise"]))
    assert noise["verdict"] in ("quiet", "noisy") and noise["noisy"] == bool(noise["reasons"])
    assert set(noise["thresholds"]) >= {"p95_p50_max", "spread_max", "same_arch_p50_max_diff"}
    assert noise["stopped"] in ("settled", "budget", "max_rounds") and noise["rounds"] >= 3
    assert noise["per_round"] == 2 and noise["budget_s"] == 3
    b, d = res["rows"]
    for r in (b, d):  # every row got the same rounds, a spread, and its own worker's peak memory
        lat = r["latency_ms"]
        assert lat["runs"] == noise["rounds"] * 2 == res["runs"] and lat["runs"] >= 6
        assert lat["spread"] >= 0 and 0 < lat["min"] <= lat["p50"] <= lat["p95"]
        assert r["peak_rss_mb"] > r["model_rss_mb"] > 0 and set(r["throughput"]) == {1, 2}
    table = (tmp_path / "b" / "bench.md").read_text()
    assert ("Latency check: quiet" in table) != ("Machine too noisy" in table)
    assert latency_entry(res, "distilled")["noisy"] == noise["noisy"]
