"""The objects of the synthetic benchmark (people, cars, bicycles and riders, dogs, bags): a random look, its extent
and how to draw it on a `_Sprite`, facing +x in metres with the origin on the ground under the object."""

from __future__ import annotations

import math

import numpy as np

from detkd.data.synth.draw import (_BAG_COLORS, _CAR_COLORS, _CLOTHES, _DOG_COLORS, _HAIR, _SKIN, _c, _pick, _shade,
                                   _Sprite)

#: Classes of the built-in benchmark, in label-index order.
DEFAULT_CLASSES: tuple[str, ...] = ("person", "car", "bicycle", "dog", "bag")




def _person_look(rng: np.random.Generator) -> dict:
    child = rng.random() < 0.1
    return {
        "H": rng.uniform(1.0, 1.4) if child else rng.uniform(1.55, 1.92),
        "skin": _c(rng, _pick(rng, _SKIN), 8),
        "hair": _c(rng, _pick(rng, _HAIR), 8),
        "top": _c(rng, _pick(rng, _CLOTHES), 18),
        "bottom": _c(rng, _pick(rng, _CLOTHES[:9] + _CLOTHES[14:17]), 14),
        "shoes": _c(rng, (30, 30, 35), 20),
        "style": _pick(rng, ("pants", "pants", "pants", "coat", "dress", "shorts")),
        "bulk": rng.uniform(0.9, 1.25),
        "hat": rng.random() < 0.12,
        "long_hair": rng.random() < 0.3,
        "view": _pick(rng, ("front", "back", "side", "side")),
        "stride": rng.uniform(0.0, 0.2) if rng.random() < 0.8 else 0.0,
        "phase": rng.uniform(0, 2 * math.pi),
        "phone": rng.random() < 0.1,
    }


def _person_ext(look: dict) -> tuple[float, float, float, float]:
    H = look["H"]
    return (-0.42 * H, -1.04 * H, 0.42 * H, 0.03 * H)


def _draw_person(sp: _Sprite, L: dict) -> list:
    """Standing or walking person of height L['H'] metres; front/back view or side view (facing +x)."""
    s, b = L["H"], L["bulk"]
    y_sh, y_hip, y_knee, y_ank = -0.815 * s, -0.53 * s, -0.29 * s, -0.035 * s
    leg_t, arm_t = 0.078 * s * b, 0.056 * s * b
    low_leg = L["skin"] if L["style"] == "shorts" else L["bottom"]
    hand = []
    if L["view"] in ("front", "back"):
        hw, hh = 0.125 * s * b, 0.095 * s * b
        st = 0.02 * s * math.sin(L["phase"])
        for sg in (-1, 1):
            hip = (sg * 0.05 * s, y_hip)
            knee, ank = (sg * 0.055 * s, y_knee + sg * st), (sg * 0.06 * s, y_ank + sg * st)
            sp.line([hip, knee], leg_t, L["bottom"])
            sp.line([knee, ank], leg_t * 0.9, low_leg)
            sp.ellipse((ank[0], ank[1] + 0.015 * s), (0.045 * s, 0.022 * s), L["shoes"])
        sp.rect(-hh, y_hip - 0.03 * s, hh, y_hip + 0.06 * s, L["bottom"])
        if L["style"] == "dress":
            skirt = [(-0.09, -0.6), (0.09, -0.6), (0.17, -0.3), (-0.17, -0.3)]
            sp.poly([(u * s, v * s) for u, v in skirt], L["top"])
        bottom_y = -0.36 * s if L["style"] == "coat" else y_hip + 0.02 * s
        flare = 0.03 * s if L["style"] == "coat" else 0.0
        sp.poly([(-hw, y_sh), (hw, y_sh), (hh + flare, bottom_y), (-hh - flare, bottom_y)], L["top"])
        for sg in (-1, 1):
            sh = (sg * (hw - 0.02 * s), y_sh + 0.025 * s)
            if L["phone"] and sg > 0:
                el, hd = (sg * (hw + 0.03 * s), -0.66 * s), (sg * 0.07 * s, -0.86 * s)
            else:
                el, hd = (sg * (hw + 0.015 * s), -0.665 * s), (sg * (hw + 0.01 * s), -0.505 * s)
            sp.line([sh, el, hd], arm_t, L["top"])
            sp.ellipse(hd, (0.026 * s, 0.028 * s), L["skin"])
            hand.append(hd)
        sp.rect(-0.028 * s, -0.87 * s, 0.028 * s, y_sh + 0.01 * s, L["skin"])
        face = L["hair"] if L["view"] == "back" else L["skin"]
        sp.ellipse((0, -0.925 * s), (0.062 * s, 0.075 * s), face)
        if L["long_hair"]:
            sp.rect(-0.066 * s, -0.93 * s, 0.066 * s, -0.8 * s if L["view"] == "back" else -0.86 * s, L["hair"])
        sp.ellipse((0, -0.94 * s), (0.066 * s, 0.066 * s), L["hair"], a0=180, a1=360)
    else:  # side view, facing +x
        a = L["stride"] * s * math.sin(L["phase"])
        far_b, far_t = _shade(L["bottom"], 0.75), _shade(L["top"], 0.75)
        for sg, cb in ((-1, far_b), (1, L["bottom"])):
            foot = sg * a
            knee = (0.5 * foot + 0.03 * s * (1 if sg * a < 0 else 0.4), y_knee)
            ank = (foot, y_ank)
            sp.line([(0, y_hip), knee], leg_t, cb)
            sp.line([knee, ank], leg_t * 0.9, _shade(low_leg, 0.75) if sg < 0 else low_leg)
            sp.ellipse((foot + 0.03 * s, -0.018 * s), (0.055 * s, 0.02 * s), L["shoes"])
            if sg < 0:  # far arm behind the torso
                sp.line([(0, y_sh + 0.03 * s), (0.3 * a, -0.66 * s), (0.7 * a, -0.51 * s)], arm_t, far_t)
        if L["style"] == "dress":
            skirt = [(-0.06, -0.6), (0.06, -0.6), (0.12, -0.3), (-0.11, -0.3)]
            sp.poly([(u * s, v * s) for u, v in skirt], L["top"])
        bottom_y = -0.36 * s if L["style"] == "coat" else y_hip + 0.02 * s
        sp.poly([(-0.065 * s, y_sh), (0.07 * s, y_sh), (0.065 * s, bottom_y), (-0.07 * s, bottom_y)], L["top"])
        sp.rect(-0.025 * s, -0.87 * s, 0.03 * s, y_sh + 0.01 * s, L["skin"])
        sp.ellipse((0.012 * s, -0.925 * s), (0.058 * s, 0.075 * s), L["skin"])
        sp.ellipse((0.066 * s, -0.915 * s), (0.014 * s, 0.012 * s), L["skin"])  # nose
        sp.ellipse((-0.005 * s, -0.94 * s), (0.062 * s, 0.066 * s), L["hair"], a0=150, a1=360)
        if L["long_hair"]:
            sp.rect(-0.06 * s, -0.93 * s, 0.0, -0.82 * s, L["hair"])
        hd = (-0.7 * a, -0.51 * s)
        sp.line([(0, y_sh + 0.03 * s), (-0.3 * a, -0.66 * s), hd], arm_t, L["top"])
        sp.ellipse(hd, (0.026 * s, 0.028 * s), L["skin"])
        hand.append(hd)
    if L["hat"]:
        sp.ellipse((0, -0.975 * s), (0.07 * s, 0.04 * s), _shade(L["top"], 0.6), a0=180, a1=360)
        sp.rect(-0.08 * s, -0.978 * s, 0.08 * s, -0.965 * s, _shade(L["top"], 0.6))
    return hand


# Bicycle side-view geometry (metres, facing +x).
_BIKE = {"r": 0.34, "rear": (-0.52, -0.34), "front": (0.52, -0.34), "bb": (-0.04, -0.29), "seat": (-0.21, -0.86),
         "head_top": (0.36, -0.84), "head_bot": (0.40, -0.70), "saddle": (-0.23, -0.92), "bar": (0.27, -1.0)}


def _bike_look(rng: np.random.Generator) -> dict:
    return {
        "frame": _c(rng, _pick(rng, _CAR_COLORS + [(20, 20, 200), (200, 60, 20), (30, 200, 30)]), 20),
        "tyre": _c(rng, (25, 25, 25), 8),
        "view": "side" if rng.random() < 0.85 else "end",
        "crank": rng.uniform(0, 2 * math.pi),
        "rider": False,
        "scale": rng.uniform(0.85, 1.1),
    }


def _bike_ext(look: dict) -> tuple[float, float, float, float]:
    k = look["scale"]
    if look["rider"]:
        return (-0.95 * k, -1.85 * k, 0.95 * k, 0.03)
    return (-0.92 * k, -1.08 * k, 0.92 * k, 0.03)


def _draw_bicycle(sp: _Sprite, L: dict) -> list:
    k, G = L["scale"], _BIKE
    P = {n: (v[0] * k, v[1] * k) for n, v in G.items() if n != "r"}
    r, fr, ty = G["r"] * k, L["frame"], L["tyre"]
    if L["view"] == "end":  # seen from front/back: a thin vertical sliver with a handlebar
        sp.ellipse((0, -r), (0.03 * k, r), ty)
        sp.line([(0, -0.3 * k), (0, -0.95 * k)], 0.04 * k, fr)
        sp.line([(-0.3 * k, -0.98 * k), (0.3 * k, -0.98 * k)], 0.03 * k, _shade(fr, 0.5))
        sp.ellipse((0, -0.9 * k), (0.06 * k, 0.03 * k), (30, 30, 30))
        return []
    for hub in (P["rear"], P["front"]):
        sp.ellipse(hub, (r, r), ty, t=0.045 * k)
        sp.ellipse(hub, (r * 0.86, r * 0.86), (150, 150, 150), t=0.012 * k)
        for ang in np.arange(0, math.pi, math.pi / 4):
            dx, dy = 0.85 * r * math.cos(ang), 0.85 * r * math.sin(ang)
            sp.line([(hub[0] - dx, hub[1] - dy), (hub[0] + dx, hub[1] + dy)], 0.006 * k, (170, 170, 170))
    t = 0.032 * k
    sp.line([P["rear"], P["bb"], P["seat"], P["rear"]], t, fr)
    sp.line([P["bb"], P["head_bot"], P["front"]], t, fr)
    sp.line([P["seat"], P["head_top"], P["head_bot"]], t, fr)
    sp.line([P["seat"], P["saddle"]], 0.025 * k, (60, 60, 60))
    sp.ellipse(P["saddle"], (0.1 * k, 0.025 * k), (30, 30, 30))
    sp.line([P["head_top"], P["bar"], (P["bar"][0] - 0.08 * k, P["bar"][1] + 0.02 * k)], 0.025 * k, (50, 50, 50))
    c = L["crank"]
    for sg in (-1, 1):
        p = (P["bb"][0] + sg * 0.17 * k * math.cos(c), P["bb"][1] + sg * 0.17 * k * math.sin(c))
        sp.line([P["bb"], p], 0.02 * k, (80, 80, 80))
    return []


def _draw_rider(sp: _Sprite, L: dict) -> list:
    """A person sitting on `_BIKE` (same anchor and facing as the bicycle)."""
    k, P = L["scale"], L["person"]
    B = {n: (v[0] * k, v[1] * k) for n, v in _BIKE.items() if n != "r"}
    hip = (B["saddle"][0] + 0.02 * k, B["saddle"][1] - 0.04 * k)
    sh = (hip[0] + 0.22 * k, hip[1] - 0.5 * k)
    c = L["crank"]
    for sg, shade in ((-1, 0.75), (1, 1.0)):
        ped = (B["bb"][0] + sg * 0.17 * k * math.cos(c), B["bb"][1] + sg * 0.17 * k * math.sin(c))
        dx, dy = ped[0] - hip[0], ped[1] - hip[1]
        d = min(math.hypot(dx, dy), 0.88 * k)
        lt = 0.45 * k
        h = math.sqrt(max(lt * lt - (d / 2) ** 2, 0.0))
        mx, my = hip[0] + dx / 2, hip[1] + dy / 2
        nx, ny = -dy / max(math.hypot(dx, dy), 1e-6), dx / max(math.hypot(dx, dy), 1e-6)
        knee = (mx - nx * h, my - ny * h) if nx < 0 else (mx + nx * h, my + ny * h)
        if knee[1] > hip[1] + 0.2 * k and knee[0] < hip[0]:
            knee = (mx + abs(nx) * h, my - abs(ny) * h)
        sp.line([hip, knee], 0.085 * k, _shade(P["bottom"], shade))
        sp.line([knee, ped], 0.075 * k, _shade(P["bottom"] if P["style"] != "shorts" else P["skin"], shade))
        sp.ellipse((ped[0] + 0.03 * k, ped[1]), (0.06 * k, 0.025 * k), P["shoes"])
    sp.line([hip, sh], 0.2 * k, P["top"])
    sp.ellipse((sh[0] + 0.05 * k, sh[1] - 0.17 * k), (0.1 * k, 0.12 * k), P["skin"])
    helmet = P["hat"] or P["long_hair"]
    sp.ellipse((sh[0] + 0.04 * k, sh[1] - 0.2 * k), (0.11 * k, 0.1 * k), P["top"] if helmet else P["hair"],
               a0=170, a1=370)
    el = ((sh[0] + B["bar"][0]) / 2 + 0.02 * k, (sh[1] + B["bar"][1]) / 2 + 0.06 * k)
    sp.line([sh, el, B["bar"]], 0.06 * k, P["top"])
    sp.ellipse(B["bar"], (0.03 * k, 0.03 * k), P["skin"])
    return []


def _car_look(rng: np.random.Generator) -> dict:
    body = _pick(rng, ("sedan", "sedan", "hatch", "suv", "van"))
    Hc = {"sedan": (1.38, 1.5), "hatch": (1.42, 1.55), "suv": (1.62, 1.8), "van": (1.9, 2.2)}[body]
    Lc = {"sedan": (4.3, 4.9), "hatch": (3.8, 4.2), "suv": (4.4, 4.9), "van": (4.8, 5.4)}[body]
    return {
        "body": body, "H": rng.uniform(*Hc), "L": rng.uniform(*Lc), "W": rng.uniform(1.72, 1.95),
        "color": _c(rng, _pick(rng, _CAR_COLORS), 15), "glass": _c(rng, (70, 60, 50), 15),
        "view": "side", "lights_on": True,
    }


def _car_ext(look: dict) -> tuple[float, float, float, float]:
    half = look["L"] / 2 if look["view"] == "side" else look["W"] / 2 + 0.12
    return (-half - 0.05, -look["H"] - 0.05, half + 0.05, 0.02)


def _draw_car(sp: _Sprite, L: dict) -> list:
    """Car in side view (facing +x) or front/rear view. Returns its lights [(x, y, size_m, kind), ...]."""
    H, col, glass = L["H"], L["color"], L["glass"]
    dark, trim = _shade(col, 0.7), (35, 35, 38)
    belt, roof = -(0.56 if L["body"] != "van" else 0.5) * H, -H
    if L["view"] == "side":
        hl = L["L"] / 2
        rw = 0.36 if L["body"] in ("suv", "van") else 0.32
        wx = hl - (0.8 if L["body"] != "hatch" else 0.7)
        nose = 0.35 if L["body"] != "van" else 0.15
        sp.poly([(-hl, -0.22), (-hl, belt + 0.06), (-hl + 0.12, belt), (hl - nose, belt + 0.02),
                 (hl - 0.04, belt + 0.14), (hl, -0.38), (hl - 0.05, -0.22)], col)
        sp.rect(-hl + 0.05, -0.3, hl - 0.08, -0.2, dark)
        cab = {"sedan": [(-0.78, 0), (-0.45, 1), (0.18, 1), (0.5, 0)],
               "hatch": [(-0.96, 0), (-0.86, 1), (0.14, 1), (0.5, 0)],
               "suv": [(-0.97, 0), (-0.94, 1), (0.3, 1), (0.56, 0)],
               "van": [(-1.0, 0), (-1.0, 1), (0.55, 1), (0.8, 0)]}[L["body"]]  # (x / half length, height fraction)
        cabin = [(u * hl, belt + v * (roof - belt)) for u, v in cab]
        sp.poly(cabin, col)
        cx = sum(p[0] for p in cabin) / 4
        cy = belt + 0.5 * (roof - belt)
        win = [(cx + (x - cx) * 0.88, cy + (y - cy) * 0.78) for x, y in cabin]
        sp.poly(win, glass)
        glare = [win[0], win[1], ((win[1][0] + win[2][0]) / 2, win[1][1]),
                 ((win[0][0] + win[3][0]) / 2 - 0.3, win[0][1])]  # a lighter reflection on the glass
        sp.poly(glare, _shade(glass, 1.35))
        sp.line([(cx + 0.1, belt), (cx + 0.05, roof + 0.05)], 0.07, col)  # B-pillar
        for x in (cx - 0.55, cx + 0.55):
            sp.line([(x, belt + 0.03), (x, -0.3)], 0.015, dark)
        for x in (-wx, wx):
            sp.ellipse((x, -rw), (rw * 1.13, rw * 1.13), (20, 20, 22), a0=180, a1=360)
            sp.ellipse((x, -rw), (rw, rw), (28, 28, 30))
            sp.ellipse((x, -rw), (rw * 0.55, rw * 0.55), (140, 140, 145) if L["body"] != "van" else (60, 60, 60))
        sp.poly([(hl - 0.02, belt + 0.16), (hl - 0.22, belt + 0.08), (hl - 0.06, belt + 0.06)], (200, 225, 235))
        sp.rect(-hl, belt + 0.07, -hl + 0.1, belt + 0.2, (30, 30, 170))
        return [(hl - 0.05, belt + 0.12, 0.25, "head"), (-hl + 0.03, belt + 0.14, 0.15, "tail")]
    hw = L["W"] / 2
    front = L["view"] == "front"
    for sg in (-1, 1):
        sp.rect(sg * (hw - 0.32), -0.45, sg * (hw - 0.07), 0.0, (25, 25, 28))
    sp.poly([(-hw, -0.22), (-hw, belt + 0.06), (-hw + 0.08, belt), (hw - 0.08, belt), (hw, belt + 0.06), (hw, -0.22)],
            col)
    top = 0.72 if L["body"] != "van" else 0.86
    sp.poly([(-hw * 0.88, belt), (-hw * top, roof), (hw * top, roof), (hw * 0.88, belt)], col)
    wl, wr = (-hw * 0.8, belt - 0.03), (-hw * (top - 0.05), roof + 0.07)
    sp.poly([wl, wr, (hw * (top - 0.05), roof + 0.07), (hw * 0.8, belt - 0.03)], glass if front else _shade(glass, 0.8))
    sp.poly([wl, wr, (-hw * 0.2, roof + 0.07), (-hw * 0.5, belt - 0.03)], _shade(glass, 1.3))
    for sg in (-1, 1):
        sp.rect(sg * hw, belt - 0.05, sg * (hw + 0.1), belt - 0.17, dark)  # mirrors
    sp.rect(-hw, -0.2, hw, -0.34, trim)
    sp.rect(-0.26, -0.26, 0.26, -0.37, (225, 225, 225))
    lights = []
    for sg in (-1, 1):
        if front:
            sp.ellipse((sg * hw * 0.72, belt + 0.13), (0.17, 0.065), (215, 235, 240))
            lights.append((sg * hw * 0.72, belt + 0.13, 0.3, "head"))
        else:
            sp.rect(sg * hw * 0.95, belt + 0.06, sg * hw * 0.62, belt + 0.2, (25, 25, 185))
            lights.append((sg * hw * 0.8, belt + 0.13, 0.18, "tail"))
    if front:
        sp.rect(-hw * 0.42, belt + 0.1, hw * 0.42, belt + 0.28, trim)
    return lights


def _dog_look(rng: np.random.Generator) -> dict:
    h = rng.uniform(0.28, 0.7)
    return {
        "H": h, "L": h * rng.uniform(1.2, 1.6) + 0.1, "color": _c(rng, _pick(rng, _DOG_COLORS), 15),
        "patch": rng.random() < 0.35, "ears": _pick(rng, ("up", "down")), "tail": rng.uniform(-0.6, 1.0),
        "phase": rng.uniform(0, 2 * math.pi),
    }


def _dog_ext(look: dict) -> tuple[float, float, float, float]:
    return (-0.7 * look["L"] - 0.1, -1.5 * look["H"] - 0.05, 0.75 * look["L"] + 0.05, 0.02)


def _draw_dog(sp: _Sprite, L: dict) -> list:
    h, l, col = L["H"], L["L"], L["color"]
    T = 0.36 * h
    by = -(h - T / 2)
    legt = max(0.1 * h, 0.035)
    sw = 0.07 * l * math.sin(L["phase"])
    far = _shade(col, 0.7)
    for x, dx, c in ((0.3 * l, -sw, far), (-0.3 * l, sw, far)):
        sp.line([(x, by + 0.2 * T), (x + dx, -0.01)], legt, c)
    tail_end = (-0.62 * l, by - 0.45 * h * L["tail"])
    sp.line([(-0.38 * l, by - 0.2 * T), (-0.52 * l, by - 0.3 * h * L["tail"]), tail_end], 0.055 * h + 0.015, col)
    sp.ellipse((0, by), (0.42 * l, T / 2), col)
    if L["patch"]:
        sp.ellipse((0.2 * l, by + 0.15 * T), (0.14 * l, 0.3 * T), (225, 230, 235))
    head = (0.5 * l, by - 0.33 * h)
    sp.line([(0.33 * l, by - 0.1 * T), head], 0.6 * T, col)
    sp.ellipse(head, (0.17 * h + 0.03, 0.14 * h + 0.025), col)
    sp.ellipse((head[0] + 0.16 * h + 0.04, head[1] + 0.05 * h), (0.1 * h + 0.02, 0.065 * h + 0.015), col)
    sp.ellipse((head[0] + 0.26 * h + 0.055, head[1] + 0.03 * h), (0.025 * h + 0.006, 0.022 * h + 0.006), (20, 20, 20))
    if L["ears"] == "up":
        sp.poly([(head[0] - 0.08 * h, head[1] - 0.08 * h), (head[0] - 0.02 * h, head[1] - 0.3 * h),
                 (head[0] + 0.05 * h, head[1] - 0.1 * h)], _shade(col, 0.85))
    else:
        sp.ellipse((head[0] - 0.06 * h, head[1] + 0.04 * h), (0.05 * h + 0.01, 0.12 * h + 0.015), _shade(col, 0.6),
                   angle=15)
    for x, dx in ((0.3 * l, sw), (-0.3 * l, -sw)):
        sp.line([(x, by + 0.2 * T), (x + dx, -0.01)], legt, col)
    return []


def _bag_look(rng: np.random.Generator) -> dict:
    kind = _pick(rng, ("handbag", "shopping", "suitcase", "backpack", "duffel"))
    return {"kind": kind, "color": _c(rng, _pick(rng, _BAG_COLORS), 18), "s": rng.uniform(0.85, 1.2)}


def _bag_ext(look: dict) -> tuple[float, float, float, float]:
    s = look["s"]
    return (-0.34 * s, -0.95 * s, 0.34 * s, 0.02)


def _draw_bag(sp: _Sprite, L: dict) -> list:
    s, col, k = L["s"], L["color"], L["kind"]
    dark = _shade(col, 0.6)
    if k == "handbag":
        sp.ellipse((0, -0.25 * s), (0.1 * s, 0.1 * s), dark, a0=180, a1=360, t=0.02 * s)
        sp.poly([(-0.13 * s, -0.23 * s), (0.13 * s, -0.23 * s), (0.17 * s, 0), (-0.17 * s, 0)], col)
        sp.rect(-0.15 * s, -0.16 * s, 0.15 * s, -0.13 * s, dark)
    elif k == "shopping":
        for x in (-0.07, 0.07):
            sp.ellipse((x * s, -0.36 * s), (0.045 * s, 0.09 * s), dark, a0=180, a1=360, t=0.012 * s)
        sp.rect(-0.15 * s, -0.36 * s, 0.15 * s, 0, col)
        sp.rect(-0.15 * s, -0.36 * s, 0.15 * s, -0.32 * s, _shade(col, 0.85))
    elif k == "suitcase":
        handle = [(-0.07, -0.6), (-0.07, -0.9), (0.07, -0.9), (0.07, -0.6)]
        sp.line([(u * s, v * s) for u, v in handle], 0.02 * s, (60, 60, 60))
        sp.rect(-0.22 * s, -0.65 * s, 0.22 * s, -0.04 * s, col)
        for x in (-0.08, 0.0, 0.08):
            sp.line([(x * s, -0.62 * s), (x * s, -0.07 * s)], 0.012 * s, dark)
        for x in (-0.17, 0.17):
            sp.ellipse((x * s, -0.03 * s), (0.03 * s, 0.03 * s), (25, 25, 25))
    elif k == "backpack":
        sp.ellipse((0, -0.36 * s), (0.08 * s, 0.06 * s), dark, a0=180, a1=360, t=0.025 * s)
        sp.ellipse((0, -0.2 * s), (0.16 * s, 0.2 * s), col)
        sp.rect(-0.11 * s, -0.14 * s, 0.11 * s, -0.02 * s, dark)
    else:  # duffel
        sp.ellipse((0, -0.24 * s), (0.14 * s, 0.08 * s), dark, a0=180, a1=360, t=0.02 * s)
        sp.ellipse((0, -0.12 * s), (0.28 * s, 0.13 * s), col)
        sp.line([(-0.22 * s, -0.18 * s), (0.22 * s, -0.18 * s)], 0.012 * s, dark)
    return []


_LOOK = {"person": _person_look, "car": _car_look, "bicycle": _bike_look, "dog": _dog_look, "bag": _bag_look}
_EXT = {"person": _person_ext, "car": _car_ext, "bicycle": _bike_ext, "dog": _dog_ext, "bag": _bag_ext}
_DRAW = {"person": _draw_person, "car": _draw_car, "bicycle": _draw_bicycle, "dog": _draw_dog, "bag": _draw_bag,
         "rider": _draw_rider}
