"""Teacher-cost options (``distill.teacher_runtime``): inference_mode, channels_last, fused Conv+BN, half, and the
per-sample teacher cache. Each option must leave the distillation terms (and the student's gradients) as they are
with the plain ``no_grad`` teacher; fusion is checked against the BN formula written out and against the unfused
model's outputs; the cache against the teacher's own call counter and against uncached terms.

Models: two tiny framework-free "detectors" built from an Ultralytics-style ``Conv`` (conv, bn, act), a Sequential
conv -> BN -> ReLU, a ``Conv2``-style block whose BN sees ``conv(x) + cv2(x)`` (must not be fused), a Sequential
whose conv is itself tapped (must not be fused), and an anchors-first dense head. Plus Ultralytics DetectionModels
at 64 px for the integration parts.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detkd.config import DistillConfig, TeacherRuntimeConfig, load_config
from detkd.distiller import Distiller, TeacherCache, fuse_conv_bn
from detkd.errors import ConfigError
from helpers import DenseHead

K, R, IMG = 3, 8, 32


class Conv(nn.Module):
    """Ultralytics' Conv: ``act(bn(conv(x)))``."""

    def __init__(self, c1: int, c2: int, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, s, 1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Conv2Like(nn.Module):
    """``bn(conv(x) + cv2(x))``: a conv/bn attribute pair whose BN does NOT see the conv's output alone."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.cv2 = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x) + self.cv2(x)).relu()


def Head(c: int, stride: int = 4) -> nn.Module:
    return DenseHead(c, K, R, stride)


class Net(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.stem = Conv(3, c, 2)  # 16x16
        self.stage = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.BatchNorm2d(2 * c), nn.ReLU())  # 8x8
        self.trap = Conv2Like(2 * c)
        self.neck = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 1), nn.BatchNorm2d(2 * c))
        self.head = Head(2 * c)
        self.calls, self.batch_sizes = 0, []

    def forward(self, x):
        self.calls += 1
        self.batch_sizes.append(int(x.shape[0]))
        return self.head(self.neck(self.trap(self.stage(self.stem(x)))).relu())


def randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model


# Taps: a BN that gets fused ("stage.1"), a conv followed by a BN ("neck.0": tapped, so left unfused), the Conv2-like
# block, the Conv block; every feature method, plus dense logits (sigmoid_kd) and boxes (ld).
CFG = {
    "logits": {"method": "sigmoid_kd", "weight": 2.0},
    "boxes": {"method": "ld", "weight": 0.5},
    "features": [
        {"student": "stage.1", "teacher": "stage.1", "method": "cwd", "options": {"tau": 2.0}},
        {"student": "neck", "teacher": "neck.0", "method": "fitnet"},
        {"student": "trap", "teacher": "trap", "method": "pkd"},
        {"student": "stem", "teacher": "stem", "method": "at"},
        {"student": "stage", "teacher": "stage", "method": "mgd"},
        {"student": "neck", "teacher": "neck", "method": "fgd"},
    ],
}
GT = torch.tensor([[[2.0, 3.0, 20.0, 25.0], [0, 0, 0, 0]], [[5.0, 5.0, 30.0, 12.0], [1, 1, 9, 9]],
                   [[0.0, 0.0, 16.0, 16.0], [0, 0, 0, 0]]])
VALID = torch.tensor([[True, False], [True, True], [True, False]])


@pytest.fixture()
def models():
    torch.manual_seed(0)
    s, t = Net(4).eval(), randomise_bn(Net(8)).eval()  # student in eval: identical outputs on repeated calls
    return s, t, torch.rand(3, 3, IMG, IMG)


def with_runtime(cfg: dict, **rt) -> dict:
    return {**cfg, "teacher_runtime": rt}


def step(kd: Distiller, x: torch.Tensor, keys=None, n: int | None = None) -> tuple[dict, list]:
    """One distillation step; returns the float terms and the student's gradients."""
    n = x.shape[0] if n is None else n
    kd.student.zero_grad(set_to_none=True)
    with kd.record():
        kd.student(x)
    torch.manual_seed(5)  # MGD draws a random mask
    terms = kd(x, gt_boxes=GT[:n], gt_valid=VALID[:n], teacher_keys=keys)
    terms["kd_total"].backward()
    grads = [p.grad.clone() for p in kd.student.parameters() if p.grad is not None]
    return {k: v.detach() for k, v in terms.items()}, grads


def assert_same(a: tuple[dict, list], b: tuple[dict, list], rtol=1e-4, atol=1e-6, exact=False):
    """Terms and gradients equal; ``exact``: up to float summation order only (live teacher tensors may be strided
    views where cached ones are contiguous)."""
    (ta, ga), (tb, gb) = a, b
    assert set(ta) == set(tb) and len(ga) == len(gb) and ga
    for k in ta:
        if exact:
            torch.testing.assert_close(ta[k], tb[k], rtol=2e-6, atol=1e-9, msg=k)
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=rtol, atol=atol, msg=k)
    for x, y in zip(ga, gb):
        if exact:
            torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-8)
        else:
            torch.testing.assert_close(x, y, rtol=rtol * 10, atol=atol * 10)


# ------------------------------------------------------------------------------------------------------------------
# fusion
# ------------------------------------------------------------------------------------------------------------------
def test_fuse_conv_bn_formula_outputs_names_and_skips():
    torch.manual_seed(0)
    t = randomise_bn(Net(8)).eval()
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = t(x)
        ref_neck0 = t.neck[0](t.trap(t.stage(t.stem(x))))
    stem_w, stem_bn = t.stem.conv.weight.detach().clone(), copy.deepcopy(t.stem.bn)
    stage_w, stage_b = t.stage[0].weight.detach().clone(), t.stage[0].bias.detach().clone()
    stage_bn = copy.deepcopy(t.stage[1])
    trap_bn = t.trap.bn

    assert fuse_conv_bn(t, x, keep=["neck.0"]) == 2  # stem (conv/bn attributes) and stage (Sequential neighbours)
    # the BN formula written out: W' = W * g / sqrt(v + e), b' = (b - m) * g / sqrt(v + e) + beta
    for conv, w, b, bn in ((t.stem.conv, stem_w, torch.zeros(8), stem_bn), (t.stage[0], stage_w, stage_b, stage_bn)):
        s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(conv.weight.detach(), w * s.view(-1, 1, 1, 1))
        torch.testing.assert_close(conv.bias.detach(), (b - bn.running_mean) * s + bn.bias.detach())
    names = dict(t.named_modules())
    assert isinstance(names["stem.bn"], nn.Identity) and isinstance(names["stage.1"], nn.Identity)
    assert names["trap.bn"] is trap_bn  # bn(conv(x) + cv2(x)): not fused
    assert isinstance(names["neck.1"], nn.BatchNorm2d)  # its conv is tapped: not fused
    with torch.no_grad():
        out = t(x)
        torch.testing.assert_close(t.neck[0](t.trap(t.stage(t.stem(x)))), ref_neck0)  # tapped conv output unchanged
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)
    assert fuse_conv_bn(t, x, keep=["neck.0"]) == 0  # nothing left to fuse: no probe forward
    assert fuse_conv_bn(t, x) == 1 and isinstance(t.neck[1], nn.Identity)  # untapped: now fused too


class ReuseNet(nn.Module):
    """A conv whose output is used twice (``bn(y) + y``): folding the BN into it would change the model's output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, 1, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fuse_refuses_and_restores_when_conv_output_is_used_twice():
    m = randomise_bn(ReuseNet()).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x)
    w = m.conv.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"teacher_runtime\.fuse.*changed the teacher's outputs.*fuse: false"):
        fuse_conv_bn(m, x)
    assert isinstance(m.bn, nn.BatchNorm2d) and torch.equal(m.conv.weight, w)
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_fuse_ultralytics_model_all_conv_bn_and_taps_unchanged():
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from ultralytics.nn.modules import Conv as UConv
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    m = randomise_bn(DetectionModel("yolov8n.yaml", nc=3, verbose=False)).eval()
    x = torch.rand(2, 3, 64, 64)
    taps = {}
    hooks = [m.model[i].register_forward_hook(lambda mod, i, o, i_=i: taps.__setitem__(i_, o)) for i in (15, 18, 21)]
    with torch.no_grad():
        ref = m(x)[0]
    ref_taps = dict(taps)
    n_conv = sum(isinstance(q, UConv) for q in m.modules())
    assert fuse_conv_bn(m, x) == n_conv == 57  # every Conv block of YOLOv8n
    assert not any(isinstance(q, nn.BatchNorm2d) for q in m.modules())
    assert isinstance(dict(m.named_modules())["model.0.bn"], nn.Identity)
    with torch.no_grad():
        out = m(x)[0]
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    for i in (15, 18, 21):
        torch.testing.assert_close(taps[i], ref_taps[i], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# options leave the terms and gradients unchanged
# ------------------------------------------------------------------------------------------------------------------
OFF = {"fuse": False, "channels_last": False}


@pytest.mark.parametrize("rt", [
    {},  # the defaults: inference_mode, and on the CPU fuse / channels_last auto = on
    {**OFF, "inference_mode": True},
    {**OFF, "inference_mode": True, "channels_last": True},
    {**OFF, "inference_mode": True, "fuse": True},
    {"inference_mode": True, "fuse": True, "channels_last": True},
    {"inference_mode": False, "fuse": True, "channels_last": True},
])
def test_options_give_the_same_terms_and_gradients(models, rt):
    s, t, x = models
    base = Distiller(s, copy.deepcopy(t), with_runtime(CFG, inference_mode=False, **OFF), example_inputs=x)
    ref = step(base, x)
    assert all(float(v) > 0 for v in ref[0].values())
    opt_t = copy.deepcopy(t)
    kd = Distiller(s, opt_t, with_runtime(CFG, **rt), example_inputs=x)
    kd.adapters.load_state_dict(base.adapters.state_dict())
    kd.feature_losses.load_state_dict(base.feature_losses.state_dict())
    got = step(kd, x)
    assert_same(got, ref)
    assert all(v.dtype == torch.float32 for v in got[0].values())
    fused, chlast = (rt.get(k, "auto") is not False for k in ("fuse", "channels_last"))
    assert isinstance(opt_t.stage[1], nn.Identity if fused else nn.BatchNorm2d)
    assert isinstance(opt_t.neck[1], nn.BatchNorm2d)  # its conv is tapped: never fused
    assert opt_t.stem.conv.weight.is_contiguous(memory_format=torch.channels_last) is chlast
    assert isinstance(base.teacher.stage[1], nn.BatchNorm2d)
    assert base.teacher.stem.conv.weight.is_contiguous()
    assert kd.teacher_forwards == 1


def test_inference_mode_really_records_inference_tensors(models):
    s, t, x = models
    for on in (True, False):
        kd = Distiller(s, t, with_runtime(CFG, inference_mode=on), example_inputs=x)
        out = kd.teacher_forward(x)
        assert out["cls"].is_inference() is on and kd.teacher_runner.tap("stage.1").is_inference() is on
        with kd.record():
            s(x)
        torch.manual_seed(5)
        kd(x, gt_boxes=GT, gt_valid=VALID)["kd_total"].backward()  # autograd never saw an inference tensor


def test_half_true_on_a_cpu_teacher_is_a_clear_error(models):
    s, t, x = models
    kd = Distiller(s, t, with_runtime({"logits": "kd"}, half=True))
    with kd.record():
        s(x)
    with pytest.raises(ConfigError, match=r"teacher_runtime\.half: true needs the teacher on a CUDA device; it is on cpu"):
        kd(x)
    kd = Distiller(s, t, with_runtime({"logits": "kd"}, half="auto"))  # auto: float32 on CPU, even under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with kd.record():
            s(x)
        kd(x)
    assert t.stem.conv.weight.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------------
# the teacher cache
# ------------------------------------------------------------------------------------------------------------------
def cached(s, t, x, **rt) -> Distiller:
    return Distiller(s, t, with_runtime(CFG, **{"cache": "memory", **rt}), example_inputs=x)


def test_cache_full_hit_skips_teacher_and_gives_identical_terms(models):
    s, t, x = models
    kd = cached(s, t, x)
    keys = ["a.jpg", "b.jpg", "c.jpg"]
    first = step(kd, x, keys)
    calls = t.calls
    assert kd.teacher_forwards == 1 and kd.cache_misses == 3 and kd.cache_hits == 0 and len(kd.teacher_cache) == 3
    # what is stored: own copies (not views of the batch), on the CPU, batch dim dropped, normal tensors
    e = kd.teacher_cache.get("b.jpg")
    assert set(e["t"]) == {"tap:stage.1", "tap:neck.0", "tap:trap", "tap:stem", "tap:stage", "tap:neck", "cls",
                           "box_dist", "boxes"}
    assert e["t"]["tap:neck.0"].shape == (16, 8, 8) and e["t"]["cls"].shape == (64, K)
    assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in e["t"].values())
    assert not any(v.is_inference() for v in e["t"].values())
    again = step(kd, x, keys)
    assert t.calls == calls and kd.teacher_forwards == 1 and kd.cache_hits == 3
    assert_same(again, first, exact=True)
    # and the same as a Distiller without any cache
    plain = Distiller(s, copy.deepcopy(t), CFG, example_inputs=x)
    plain.load_state_dict(kd.state_dict())
    assert_same(step(plain, x), first, exact=True)


def test_cache_partial_hit_runs_teacher_on_missing_samples_only(models):
    s, t, x = models
    kd = cached(s, t, x)
    step(kd, x[:2], ["a", "b"], n=2)
    plain = Distiller(s, copy.deepcopy(t), CFG, example_inputs=x)
    plain.load_state_dict(kd.state_dict())
    t.batch_sizes.clear()
    got = step(kd, x, ["a", "b", "c"])
    assert t.batch_sizes == [1] and kd.cache_hits == 1 + 1 and kd.cache_misses == 2 + 1  # noqa: PLR2004
    assert_same(got, step(plain, x))


def test_cache_verify_turns_a_changed_input_into_a_miss(models):
    s, t, x = models
    flipped = x.flip(-1)
    for verify in (True, False):
        kd = cached(s, copy.deepcopy(t), x, cache_verify=verify)
        step(kd, x, ["a", "b", "c"])
        n = kd.teacher_forwards
        got = step(kd, flipped, ["a", "b", "c"])  # same keys, changed images (a random flip would do this)
        plain = Distiller(s, copy.deepcopy(t), CFG, example_inputs=x)
        plain.load_state_dict(kd.state_dict())
        if verify:
            assert kd.teacher_forwards == n + 1 and kd.cache_misses == 6
            assert_same(got, step(plain, flipped), exact=True)
        else:  # without the fingerprint the stale teacher outputs are served: why the integration refuses augmentation
            assert kd.teacher_forwards == n and kd.cache_hits == 3
            assert float((got[0]["kd_total"] - step(plain, flipped)[0]["kd_total"]).abs()) > 1e-4
    kd = cached(s, t, x)
    step(kd, x, ["a", "b", "c"])
    step(kd, F.interpolate(x, size=(IMG + 8, IMG + 8)), ["a", "b", "c"], n=3)  # another input size: a miss
    assert kd.cache_misses == 6


def test_cache_bounds(models):
    s, t, x = models
    kd = cached(s, t, x, cache_max_items=2)
    step(kd, x, ["a", "b", "c"])
    assert len(kd.teacher_cache) == 2 and kd.teacher_cache.get("c") is None  # full: new keys are not stored
    t.batch_sizes.clear()
    step(kd, x, ["a", "b", "c"])
    assert t.batch_sizes == [1]
    per_sample = kd.teacher_cache.nbytes // 2
    kd = cached(s, t, x, cache_max_bytes=int(per_sample * 2.5))
    step(kd, x, ["a", "b", "c"])
    assert len(kd.teacher_cache) == 2 and kd.teacher_cache.nbytes == 2 * per_sample


def test_cache_directory_survives_processes_and_is_keyed_by_teacher(models, tmp_path):
    s, t, x = models
    d = tmp_path / "tcache"
    kd = cached(s, copy.deepcopy(t), x, cache=str(d))
    first = step(kd, x, ["a", "b", "c"])
    files = list(d.glob("*/*.pt"))
    assert len(files) == 3 and not list(d.glob("*/*.tmp"))
    # a new Distiller (another run) with the same teacher weights reads them back: no teacher forward
    t2 = copy.deepcopy(t)
    kd2 = cached(s, t2, x, cache=str(d))
    kd2.load_state_dict(kd.state_dict())
    calls = t2.calls
    assert_same(step(kd2, x, ["a", "b", "c"]), first, exact=True)
    assert t2.calls == calls and kd2.cache_hits == 3 and kd2.teacher_forwards == 0
    # another teacher (changed weights): another namespace, so a miss
    t3 = copy.deepcopy(t)
    with torch.no_grad():
        t3.head.cls.bias.add_(1.0)
    kd3 = cached(s, t3, x, cache=str(d))
    step(kd3, x, ["a", "b", "c"])
    assert kd3.cache_misses == 3 and len(list(d.glob("*/*.pt"))) == 6


def test_cache_shared_by_copies_empty_after_pickle_and_bad_keys(models):
    s, t, x = models
    kd = cached(s, t, x, cache_max_items=10)
    step(kd, x, ["a", "b", "c"])
    cp = copy.deepcopy(kd)  # e.g. Ultralytics' EMA copy: shares the teacher and the cache
    assert cp.teacher_cache is kd.teacher_cache and cp.teacher is kd.teacher
    cp.teacher = None  # what ModelEMA does to its copy: the shared cache is untouched
    assert len(kd.teacher_cache) == 3
    pk = pickle.loads(pickle.dumps(kd))
    assert isinstance(pk.teacher_cache, TeacherCache) and len(pk.teacher_cache) == 0
    assert pk.teacher_cache.max_items == 10 and len(pickle.dumps(kd)) < 10 * len(pickle.dumps(t)) + 10**6
    kd.teacher = copy.deepcopy(t)  # a new teacher: a fresh cache (the old one may be shared)
    assert len(kd.teacher_cache) == 0 and len(cp.teacher_cache) == 3
    with kd.record():
        s(x)
    with pytest.raises(ConfigError, match=r"got 2 keys for a batch of 3"):
        kd(x, gt_boxes=GT, gt_valid=VALID, teacher_keys=["a", "b"])


def test_cache_with_fuse_and_channels_last_hits_identically(models):
    s, t, x = models
    kd = cached(s, t, x, fuse=True, channels_last=True)
    first = step(kd, x, ["a", "b", "c"])
    assert_same(step(kd, x, ["a", "b", "c"]), first, rtol=1e-5, atol=1e-6)
    assert kd.teacher_forwards == 1 and kd.cache_hits == 3


# ------------------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------------------
def test_config_defaults_parsing_and_roundtrip(tmp_path):
    c = DistillConfig.from_dict({"logits": "kd"})
    assert c.teacher_runtime == TeacherRuntimeConfig() and c.teacher_runtime.inference_mode
    assert not c.teacher_runtime.cache_enabled and c.teacher_runtime.half == "auto"
    assert (c.teacher_runtime.fuse, c.teacher_runtime.channels_last) == ("auto", "auto")
    assert DistillConfig.from_dict(c.to_dict()) == c
    rt = DistillConfig.from_dict({"teacher_runtime": {"cache": True, "cache_max_bytes": "512MiB", "fuse": True,
                                                      "half": False, "cache_max_items": 100}}).teacher_runtime
    assert (rt.cache, rt.cache_max_bytes, rt.fuse, rt.half) == ("memory", 512 * 2**20, True, False)
    assert rt.cache_max_items == 100
    gb = DistillConfig.from_dict({"teacher_runtime": {"cache_max_bytes": "8GB"}}).teacher_runtime
    assert gb.cache_max_bytes == 8 * 10**9
    assert DistillConfig.from_dict({"teacher_runtime": {"cache": "./tc"}}).teacher_runtime.cache == "./tc"
    full = DistillConfig.from_dict({"logits": "kd", "teacher_runtime": {"cache": "memory", "channels_last": True}})
    assert DistillConfig.from_dict(full.to_dict()) == full
    # a `detkd train` config: top-level `teacher:` is the .pt path; the options live under distill.teacher_runtime
    p = tmp_path / "train.yaml"
    p.write_text("teacher: t.pt\nepochs: 3\ndistill:\n  logits: kd\n  teacher_runtime: {fuse: true, half: auto}\n")
    assert load_config(p).teacher_runtime.fuse is True


@pytest.mark.parametrize("rt, pattern", [
    ({"half": "yes"}, r"^distill\.teacher_runtime\.half: expected auto, true or false, got 'yes'"),
    ({"inference_mode": "no"}, r"^distill\.teacher_runtime\.inference_mode: expected true or false, got str 'no'"),
    ({"fuse": 1}, r"^distill\.teacher_runtime\.fuse: expected auto, true or false, got int 1"),
    ({"channels_last": "yes"}, r"^distill\.teacher_runtime\.channels_last: expected auto, true or false, got str"),
    ({"cache": 3}, r"^distill\.teacher_runtime\.cache: expected false, true, memory or a directory path, got int 3"),
    ({"cache": "memroy"}, r"^distill\.teacher_runtime\.cache: 'memroy': did you mean 'memory'\?"),
    ({"cache_max_bytes": "lots"}, r"^distill\.teacher_runtime\.cache_max_bytes: cannot read 'lots' as a size"),
    ({"cache_max_bytes": -1}, r"^distill\.teacher_runtime\.cache_max_bytes: must be >= 0"),
    ({"cache_max_items": 0}, r"^distill\.teacher_runtime\.cache_max_items: expected null or an integer >= 1, got 0"),
    ({"fusee": True}, r"^distill\.teacher_runtime\.fusee: unknown key; did you mean 'fuse'\?"),
])
def test_bad_values_name_the_key(rt, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DistillConfig.from_dict({"teacher_runtime": rt})


# ------------------------------------------------------------------------------------------------------------------
# Ultralytics integration: keys are image files; the cache is refused while random augmentation is on
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ul():
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from detkd.integrations import ultralytics as ul

    return ul


def test_ultralytics_cache_refused_with_augmentation(ul):
    from ultralytics.cfg import get_cfg

    cfg = DistillConfig.from_dict({"logits": "kd", "teacher_runtime": {"cache": "memory"}})
    with pytest.raises(ConfigError, match=r"random augmentations are on: .*mosaic=1\.0.*fliplr=0\.5.*cache_force: true"):
        ul.check_teacher_cache(get_cfg(), cfg)
    off = {k: 0.0 for k in ul.RANDOM_AUGMENTATIONS}
    ul.check_teacher_cache(get_cfg(overrides=off), cfg)  # all off: accepted
    with pytest.raises(ConfigError, match=r"scale=\(0\.5, 1\.5\)"):
        ul.check_teacher_cache(get_cfg(overrides={**off, "scale": (0.5, 1.5)}), cfg)
    forced = DistillConfig.from_dict({"logits": "kd", "teacher_runtime": {"cache": "memory", "cache_force": True}})
    ul.check_teacher_cache(get_cfg(), forced)
    ul.check_teacher_cache(get_cfg(), DistillConfig.from_dict({"logits": "kd"}))  # no cache: nothing to check
    unverified = DistillConfig.from_dict({"logits": "kd", "teacher_runtime": {"cache": "memory", "cache_verify": False}})
    with pytest.raises(ConfigError, match=r"cache_verify: false, but Ultralytics applies random Albumentations"):
        ul.check_teacher_cache(get_cfg(overrides=off), unverified)


def test_ultralytics_kd_model_uses_image_files_as_cache_keys(ul):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from detkd.assets import PICO_YAML

    def build(cfg):
        m = DetectionModel(cfg, nc=3, verbose=False)
        m.names, m.args = {0: "a", 1: "b", 2: "c"}, get_cfg()
        return m

    torch.manual_seed(0)
    teacher = randomise_bn(build(str(PICO_YAML))).eval()
    recipe = {"logits": {"method": "sigmoid_kd"}, "boxes": {"method": "ld"}, "features": "auto", "feature_method": "cwd",
              "teacher_runtime": {"cache": "memory", "fuse": True}}
    model = ul.KDDetectionModel(build(str(PICO_YAML)), teacher, recipe, imgsz=64).train()
    model.student_model.eval()  # fixed BN statistics: the same batch gives the same student output
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]]), "im_file": ("x/1.jpg", "x/2.jpg")}
    d = model.distiller
    _, first = model.loss(batch)
    _, again = model.loss(batch)
    assert d.teacher_forwards == 1 and d.cache_hits == 2 and d.cache_misses == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())  # fused through the config
    for k in ("kd_cls", "kd_box", "kd_feat"):
        assert float(first[k]) > 0, k
        torch.testing.assert_close(again[k], first[k], rtol=1e-5, atol=0, msg=k)
    no_files = {k: v for k, v in batch.items() if k != "im_file"}  # no keys: no caching, the teacher runs
    model.loss(no_files)
    assert d.teacher_forwards == 2


def test_fuse_auto_leaves_an_unfusable_teacher_unfused_with_a_warning_and_true_raises():
    x = torch.rand(2, 3, 8, 8)
    cfg = {"features": [{"student": "bn", "teacher": "bn", "method": "fitnet"}]}
    t = randomise_bn(ReuseNet()).eval()
    with pytest.warns(UserWarning, match=r"fuse: auto left the teacher unfused: .*changed the teacher's outputs"):
        kd = Distiller(ReuseNet().eval(), t, cfg, example_inputs=x)  # the probe forward applies the runtime
    assert isinstance(t.bn, nn.BatchNorm2d)
    assert t.conv.weight.is_contiguous(memory_format=torch.channels_last)  # channels_last auto still applies
    with kd.record():
        kd.student(x)
    assert float(kd(x)["kd_total"].detach()) > 0
    with pytest.raises(ConfigError, match=r"teacher_runtime\.fuse: folding BatchNorm .*changed the teacher's outputs"):
        Distiller(ReuseNet().eval(), randomise_bn(ReuseNet()).eval(), with_runtime(cfg, fuse=True), example_inputs=x)


def test_auto_runtime_leaves_online_and_self_teachers_alone(models):
    s, t, x = models
    for mode, teacher in (("online", t), ("self", None)):
        kd = Distiller(s, teacher, {"mode": mode, "logits": "sigmoid_kd"}, example_inputs=x)
        kd.teacher_forward(x)
        m = t if mode == "online" else s
        assert isinstance(m.stage[1], nn.BatchNorm2d), mode
        assert m.stem.conv.weight.is_contiguous(), mode


def test_ultralytics_teacher_head_runs_raw_and_cross_head_keeps_it_unfused(ul):
    """detkd's teacher forward skips Detect's eval-mode decode (its output is the raw dict, the flag is back to eval
    afterwards) and the KD terms equal those of a teacher run with the decode, unfused, contiguous; with cross_head
    (the teacher head runs with gradients) fuse: auto folds nothing."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from detkd.assets import PICO_YAML

    def build(seed):
        torch.manual_seed(seed)
        m = DetectionModel(str(PICO_YAML), nc=3, verbose=False)
        m.names, m.args = {0: "a", 1: "b", 2: "c"}, get_cfg()
        return m

    teacher = randomise_bn(build(1)).eval()
    recipe = {"logits": {"method": "sigmoid_kd"}, "boxes": {"method": "ld"}, "features": "auto", "feature_method": "cwd"}
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]])}
    terms = {}
    for name, rt in (("default", {}), ("plain", OFF)):
        model = ul.KDDetectionModel(build(0), copy.deepcopy(teacher), {**recipe, "teacher_runtime": rt}, imgsz=64)
        model.train()
        model.student_model.eval()
        d = model.distiller
        det = ul.detect_layer(d.teacher)
        out = d.teacher_forward(batch["img"])
        d.reset_step()
        assert isinstance(out, dict) and {"boxes", "scores", "feats"} <= set(out), name  # no (decoded, raw) tuple
        assert det.training is False and not any(m.training for m in d.teacher.modules()), name
        fused = not any(isinstance(m, nn.BatchNorm2d) for m in d.teacher.modules())
        assert fused is (name == "default"), name
        _, terms[name] = model.loss(batch)
    for k in ("kd_cls", "kd_box", "kd_feat"):
        assert float(terms["plain"][k]) > 0, k
        torch.testing.assert_close(terms["default"][k], terms["plain"][k], rtol=1e-4, atol=1e-6, msg=k)
    cross = {"logits": {"method": "sigmoid_kd", "weight": 0}, "boxes": {"method": "ld", "weight": 0}, "cross_head": True}
    model = ul.KDDetectionModel(build(0), copy.deepcopy(teacher), cross, imgsz=64).train()
    model.loss(batch)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.distiller.teacher.modules())
