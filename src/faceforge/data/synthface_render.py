"""SynthFace rendering: sample identity and per-image nuisance parameters, draw batches of 112x112 RGB faces.

Coordinates live in the [-1, 1] image frame (x right, y down). Identity geometry is given for a frontal face;
pose maps screen pixels back into that frame (similarity transform, then a cylinder model for yaw).
"""

from __future__ import annotations

import numpy as np

SIZE = 112
Params = dict[str, np.ndarray]

_PX = 2.0 / SIZE
_GRID = ((np.arange(SIZE, dtype=np.float32) + 0.5) * _PX - 1.0).astype(np.float32)
_TEXTURE_TERMS = 3
_MOLES = 3
# Sensor noise for an image is a random SIZE x SIZE window of this fixed field.
_NOISE = np.random.default_rng(20240611).standard_normal((3, 2 * SIZE, 2 * SIZE), dtype=np.float32)
_SKIN_LIGHT = np.array([0.96, 0.82, 0.71])
_SKIN_DARK = np.array([0.30, 0.19, 0.12])
_HAIR = np.array([
    [0.07, 0.05, 0.04], [0.22, 0.13, 0.07], [0.42, 0.28, 0.15], [0.80, 0.66, 0.40],
    [0.55, 0.22, 0.09], [0.60, 0.60, 0.60], [0.88, 0.88, 0.86],
])
_IRIS = np.array([
    [0.30, 0.18, 0.08], [0.10, 0.07, 0.05], [0.25, 0.45, 0.68], [0.28, 0.50, 0.30],
    [0.45, 0.50, 0.55], [0.55, 0.40, 0.18],
])


def sample_identity(rng: np.random.Generator) -> Params:
    """Draw one identity: face shape, colours, part geometry, hair, marks, glasses and beard."""
    u = rng.uniform
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * u() ** 1.2 + rng.normal(0, 0.025, 3)
    hair = _HAIR[rng.integers(len(_HAIR))] * u(0.8, 1.15) + rng.normal(0, 0.03, 3)
    long_hair, bald = u() < 0.35, u() < 0.08
    moles = np.stack([u(-0.45, 0.45, _MOLES), u(-0.55, 0.75, _MOLES), u(0.012, 0.028, _MOLES),
                      (u(size=_MOLES) < 0.3) * u(0.5, 0.9, _MOLES)], axis=1)
    params = {
        "face": [u(0.56, 0.70), u(0.84, 0.98), u(0.08, 0.16), u(0.0, 0.45)],
        "skin": skin,
        "blush": [u(0.0, 0.25)],
        "tex_freq": u(1.5, 5.0, 2 * _TEXTURE_TERMS),
        "tex_phase": u(0, 2 * np.pi, 2 * _TEXTURE_TERMS),
        "tex_amp": (rng.normal(0, 0.05, (_TEXTURE_TERMS, 1)) + rng.normal(0, 0.012, (_TEXTURE_TERMS, 3))),
        "ear": [u(0.07, 0.11), u(0.045, 0.07)],
        "eye": [u(-0.15, -0.02), u(0.27, 0.36), u(0.085, 0.125), u(0.035, 0.06), u(-0.15, 0.2), u(0.45, 0.7)],
        "iris": _IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 0.04, 3),
        "brow": [u(0.09, 0.16), u(0.11, 0.17), u(0.018, 0.045), u(-0.25, 0.2), u(0.0, 0.06), u(0.5, 1.0)],
        "nose": [u(0.2, 0.36), u(0.07, 0.13), u(0.2, 0.5)],
        "mouth": [u(0.5, 0.68), u(0.14, 0.25), u(0.025, 0.055)],
        "lips": skin * np.array([0.95, 0.6, 0.6]) * u(0.6, 1.0) + rng.normal(0, 0.03, 3),
        "hair": hair,
        "hairline": [-10.0 if bald else u(-0.78, -0.4), u(0.0, 0.5), u(-0.3, 0.3),
                     u(0.08, 0.22) if long_hair else u(0.02, 0.12),
                     -10.0 if bald else u(0.8, 1.25) if long_hair else u(-0.2, 0.2)],
        "moles": moles.ravel(),
        "glasses": [float(u() < 0.22), u(0.13, 0.18), u(0.08, 0.12), u(0.012, 0.025)],
        "frame": rng.uniform(0.0, 0.6, 3),
        "beard": [float(u() < 0.2) * u(0.5, 0.95), u(0.0, 0.12)],
    }
    return {k: np.asarray(v, np.float32).ravel() for k, v in params.items()}


def sample_nuisance(rng: np.random.Generator, strength: float) -> Params:
    """Draw one image's nuisance: pose, background, expression, light, occlusion, blur, noise, JPEG quality."""
    s, u, n = strength, rng.uniform, rng.normal
    occluded = u() < 0.3 * s
    return {k: np.asarray(v, np.float32).ravel() for k, v in {
        "pose": [n(0, 0.12 * s), 1 + n(0, 0.06 * s), n(0, 0.05 * s), n(0, 0.05 * s), u(-0.6, 0.6) * s],
        "background": [*u(0, 1, 6), u(0, 2 * np.pi), u(0, 1.5)],
        "clothes": u(0, 1, 3),
        "expression": [u(-1, 1) * s, u(0, 1) ** 2 * s, u(-1, 1) * s, 1 - u(0, 0.5) * s],
        "light": [u(0, 2 * np.pi), 0.6 * s * u(0.2, 1), 1 + u(-0.45, 0.45) * s, *n(0, 0.06 * s, 3)],
        "occlusion": [float(occluded), u(14, 45), u(14, 45), u(0, SIZE), u(0, SIZE), *u(0, 1, 3)],
        "degrade": [u(0, 1.2 * s), u(0, 0.05 * s), *rng.integers(0, SIZE, 2), round(95 - 60 * s * u())],
    }.items()}


def stack_params(items: list[Params]) -> Params:
    """Stack per-image parameter dicts into one dict of [n, k] arrays."""
    return {k: np.stack([p[k] for p in items]) for k in items[0]}


def _col(a: np.ndarray) -> np.ndarray:
    return a[:, None, None]


def _soft(t: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Anti-aliased step (overwriting t) of an implicit shape t = 1 - d, d = 1 on the edge, of the given radius."""
    t *= np.asarray(radius / (2 * _PX), np.float32)
    t += np.float32(0.5)
    return np.clip(t, 0.0, 1.0, out=t)


def _edge(distance: np.ndarray, width: float = _PX) -> np.ndarray:
    """Ramp (overwriting distance) from 0 to 1 across a band of `width` around a signed distance of 0."""
    distance *= np.float32(1.0 / width)
    distance += np.float32(0.5)
    return np.clip(distance, 0.0, 1.0, out=distance)


def _ellipse(x: np.ndarray, y: np.ndarray, rx: np.ndarray | float, ry: np.ndarray | float) -> np.ndarray:
    d = x / rx
    d *= d
    e = y / ry
    e *= e
    d += e
    return _soft(np.subtract(1.0, d, out=d), np.minimum(rx, ry))


class _Scene:
    """A batch canvas [n,3,H,W] with its head-frame coordinate fields; band() gives a row-slice view."""

    def __init__(self, image: np.ndarray, fields: dict[str, np.ndarray], pose: np.ndarray) -> None:
        self.image, self.f, self.pose, self.rows = image, fields, pose, slice(0, SIZE)
        self.scratch = np.empty_like(image)

    def band(self, lo: np.ndarray | float, hi: np.ndarray | float) -> _Scene:
        """The rows that head-frame heights lo..hi (any u in [-1, 1]) can reach in any image of the batch."""
        rot, scale, _, sy = (_col(c) for c in self.pose.T[:4])
        c, s = np.cos(rot), np.abs(np.sin(rot))
        top = np.min(sy + scale * (c * lo - s)) + 1.0
        bottom = np.max(sy + scale * (c * hi + s)) + 1.0
        rows = slice(max(int(top / _PX) - 1, 0), min(int(bottom / _PX) + 2, SIZE))
        view = _Scene.__new__(_Scene)
        view.image, view.scratch, view.pose, view.rows = self.image[:, :, rows], self.scratch[:, :, rows], self.pose, rows
        view.f = {k: a[:, rows] if a.shape[1] == SIZE else a for k, a in self.f.items()}
        return view

    def paint(self, mask: np.ndarray, colour: np.ndarray) -> None:
        """Alpha-composite a [n,3] colour (or [n,3,h,w] image) through mask [n,h,w]."""
        colour = colour[:, :, None, None] if colour.ndim == 2 else colour
        np.subtract(colour, self.image, out=self.scratch)
        np.multiply(self.scratch, mask[:, None], out=self.scratch)
        self.image += self.scratch


def render_images(identity: Params, nuisance: Params) -> np.ndarray:
    """Render n faces from stacked identity and nuisance parameters (row i = image i) as uint8 [n,112,112,3]."""
    p = {k: v.astype(np.float32) for k, v in identity.items()}
    q = {k: v.astype(np.float32) for k, v in nuisance.items()}
    X, Y = _GRID[None, None, :], _GRID[None, :, None]
    frx, fry, fcy, jaw = (_col(c) for c in p["face"].T)
    radius = frx * 1.08
    affine, yaw = _head_frame(q["pose"], radius[:, 0, 0])
    u = _col(affine[:, 0, 0]) * X + _col(affine[:, 0, 1]) * Y + _col(affine[:, 0, 2])
    v = _col(affine[:, 1, 0]) * X + _col(affine[:, 1, 1]) * Y + _col(affine[:, 1, 2])
    # Cylinder model: screen u on a head of this radius turned by yaw comes from frontal coordinate fu.
    fu = u * np.cos(yaw) - np.sqrt(np.maximum(radius**2 - u**2, 0.0)) * np.sin(yaw)
    vn = (v - fcy) / fry
    face = _soft(1.0 - (u / (frx * (1.0 - jaw * np.clip(vn, 0.0, 1.0) ** 2))) ** 2 - vn**2, frx)
    scene = _Scene(_background(q["background"], X, Y), {
        "u": u, "v": v, "fu": fu, "au": np.abs(fu), "fn": fu - 0.12 * np.sin(yaw), "face": face}, q["pose"])

    skin = p["skin"]
    body = scene.band(fcy, 2.0)
    bu, bv = body.f["u"], body.f["v"]
    body.paint(_ellipse(bu, bv - 1.5, 1.25, 0.62), q["clothes"])
    body.paint(_edge(frx * 0.55 - np.abs(bu)) * (bv > fcy), skin * 0.85)
    hline, hcurve, hpart, hvol, hcut = (_col(c) for c in p["hairline"].T)
    hair_shape = _ellipse(u, v - fcy + 0.06, frx + hvol, fry + hvol)
    scene.paint(hair_shape * _edge(hcut - v, 0.1), p["hair"])
    ey, ear_r, ear_h = _col(p["eye"][:, 0]), *(_col(c) for c in p["ear"].T)
    ears = scene.band(ey - 0.05, ey + 0.2)
    ears.paint(_ellipse(np.abs(ears.f["u"]) - frx * np.cos(yaw) * 1.02, ears.f["v"] - ey - 0.08, ear_h, ear_r),
               skin * 0.9)
    tex_frame = affine.copy()  # fu ~ u cos(yaw) - r sin(yaw) near the centre: still affine in the pixels
    tex_frame[:, 0] *= np.cos(yaw[:, 0])
    tex_frame[:, 0, 2] -= (radius * np.sin(yaw))[:, 0, 0]
    scene.paint(face, _skin_image(skin, p, tex_frame))
    cheeks = scene.band(ey + 0.1, ey + 0.45)
    blush = _ellipse(cheeks.f["au"] - 0.32, cheeks.f["v"] - ey - 0.28, 0.16, 0.11)
    cheeks.paint(blush * cheeks.f["face"] * _col(p["blush"][:, 0]), skin * np.array([1.1, 0.7, 0.7], np.float32))

    _moles(scene, p, q["pose"], radius[:, 0, 0])
    my, tip = _col(p["mouth"][:, 0]), _col(p["nose"][:, 0])
    _beard(scene.band(my - 0.42, 1.3), p, frx)
    _nose(scene.band(ey, tip + 0.06), p, skin)
    _mouth(scene.band(my - 0.2, my + 0.2), p, q["expression"])
    eyes = scene.band(ey - 0.32, ey + 0.16)
    _eyes(eyes, p, q["expression"], skin)
    scene.paint(hair_shape * _edge(hline + hcurve * (fu - hpart) ** 2 - v, 0.04), p["hair"])
    _glasses(eyes, p)

    _light(scene.image, q["light"], u, vn, frx)
    return _degrade(scene.image, q)


def _head_frame(pose: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Affine maps [n,2,3] from pixel coordinates (x, y, 1) to the head frame (u, v), and yaw as [n,1,1]."""
    rot, scale, sx, sy, yaw = pose.T
    c, s = np.cos(rot) / scale, np.sin(rot) / scale
    affine = np.stack([np.stack([c, s, -c * sx - s * sy], 1), np.stack([-s, c, s * sx - c * sy], 1)], 1)
    return affine.astype(np.float32), _col(yaw)


def _background(bg: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    a, b = bg[:, 0:3, None, None], bg[:, 3:6, None, None]
    angle, steep = _col(bg[:, 6]), _col(bg[:, 7])
    ramp = np.clip(0.5 + steep * (np.cos(angle) * X + np.sin(angle) * Y) * 0.5, 0.0, 1.0)
    return (a + (b - a) * ramp[:, None]).astype(np.float32)


def _skin_image(skin: np.ndarray, p: Params, affine: np.ndarray) -> np.ndarray:
    """Skin colour times a per-identity low-frequency texture.

    Each texture term is cos(f1 fu + p1) cos(f2 v + p2) with fu linearised in u; as u, v are affine in the pixel
    coordinates, every term splits into rank-1 row x column products and the texture is one batched matmul.
    """
    n, k = len(skin), _TEXTURE_TERMS
    freq, phase = p["tex_freq"].reshape(n, k, 2), p["tex_phase"].reshape(n, k, 2)
    # affine rows (fu, v) x (coefficient of x, of y, constant); a term's arguments are f * coordinate + phase.
    args = freq[..., None] * affine[:, None]
    args[..., 2] += phase
    forms = np.concatenate([args[:, :, 0] + args[:, :, 1], args[:, :, 0] - args[:, :, 1]], axis=1)
    ax, by = forms[..., 0, None] * _GRID, forms[..., 1, None] * _GRID + forms[..., 2, None]
    rows = np.concatenate([np.cos(by), np.sin(by)], axis=1).transpose(0, 2, 1)
    cols = np.concatenate([np.cos(ax), -np.sin(ax)], axis=1)
    amp = 0.5 * np.tile(p["tex_amp"].reshape(n, k, 3), (1, 4, 1))
    tex = np.matmul(rows[:, None], amp.transpose(0, 2, 1)[..., None] * cols[:, None])
    tex += np.float32(1.0)
    tex *= skin[:, :, None, None]
    return tex


def _moles(scene: _Scene, p: Params, pose: np.ndarray, radius: np.ndarray) -> None:
    """Small dark discs painted image by image in a window around each mole's projected position."""
    for i, moles in enumerate(p["moles"].reshape(len(pose), _MOLES, 4)):
        rot, scale, sx, sy, yaw = pose[i]
        for fu, v, r, alpha in moles[moles[:, 3] > 0]:
            u = radius[i] * np.sin(np.arcsin(np.clip(fu / radius[i], -1.0, 1.0)) + yaw)
            x = sx + scale * (np.cos(rot) * u - np.sin(rot) * v)
            y = sy + scale * (np.sin(rot) * u + np.cos(rot) * v)
            r = r * scale
            cols = slice(max(int((x - r + 1.0) / _PX) - 1, 0), max(int((x + r + 1.0) / _PX) + 2, 0))
            rows = slice(max(int((y - r + 1.0) / _PX) - 1, 0), max(int((y + r + 1.0) / _PX) + 2, 0))
            dist = np.hypot(_GRID[rows, None] - y, _GRID[None, cols] - x)
            mask = np.clip(0.5 + (r - dist) / _PX, 0.0, 1.0) * alpha * scene.f["face"][i, rows, cols]
            patch = scene.image[i, :, rows, cols]
            patch += mask * (p["skin"][i, :, None, None] * 0.45 - patch)


def _beard(scene: _Scene, p: Params, frx: np.ndarray) -> None:
    density, height = (_col(c) for c in p["beard"].T)
    if not density.any():
        return
    v, r = scene.f["v"], scene.f["au"] / frx
    top = _col(p["mouth"][:, 0]) - 0.06 - height - 0.2 * r + 0.3 * r**2
    stubble = 0.8 + 0.1 * _NOISE[0, scene.rows, :SIZE]
    scene.paint(scene.f["face"] * density * stubble * _edge(v - top, 0.06), p["hair"] * 0.8)


def _nose(scene: _Scene, p: Params, skin: np.ndarray) -> None:
    fn, v = scene.f["fn"], scene.f["v"]
    tip, width, shade = (_col(c) for c in p["nose"].T)
    dark = skin * 0.55
    scene.paint(_ellipse(fn, v - tip - 0.01, width, 0.04) * shade, dark)
    scene.paint(_ellipse(fn + width * 0.35, v - tip * 0.6, 0.018, tip * 0.5) * shade * 0.6, dark)
    scene.paint(_ellipse(np.abs(fn) - width * 0.5, v - tip, 0.026, 0.016) * 0.8, dark * 0.6)


def _mouth(scene: _Scene, p: Params, expr: np.ndarray) -> None:
    fu, v = scene.f["fu"], scene.f["v"]
    my, hw, lip = (_col(c) for c in p["mouth"].T)
    smile, open_ = _col(expr[:, 0]), _col(expr[:, 1])
    hw = hw * (1.0 + 0.15 * smile)
    mv = v - my + 0.06 * smile * (fu / hw) ** 2
    scene.paint(_ellipse(fu, mv, hw, lip * (1.0 + open_)), p["lips"])
    inner = _ellipse(fu, mv, hw * 0.85, 0.006 + lip * open_ * 0.9)
    scene.paint(inner, np.full((len(my), 3), 0.12, np.float32))


def _eyes(scene: _Scene, p: Params, expr: np.ndarray, skin: np.ndarray) -> None:
    """Both eyes at once through the mirrored coordinate |fu|; then the brows."""
    au, v = scene.f["au"], scene.f["v"]
    ey, edx, erx, ery, tilt, iris_r = (_col(c) for c in p["eye"].T)
    raise_, openness = _col(expr[:, 2]), _col(expr[:, 3])
    x0, y0 = au - edx, v - ey
    x, y = x0 * np.cos(tilt) + y0 * np.sin(tilt), y0 * np.cos(tilt) - x0 * np.sin(tilt)
    scene.paint(_ellipse(x, y + 0.02, erx * 1.4, ery * 2.2) * 0.35, skin * 0.6)
    ry = ery * openness
    scene.paint(_ellipse(x, y, erx * 1.12, ry * 1.3 + 0.006), skin * 0.25)
    white = _ellipse(x, y, erx, ry)
    scene.paint(white, np.full((len(ey), 3), 0.93, np.float32))
    scene.paint(_ellipse(x, y, ery * iris_r * 1.8, ery * iris_r * 1.8) * white, p["iris"])
    scene.paint(_ellipse(x, y, ery * 0.45, ery * 0.45) * white, np.full((len(ey), 3), 0.03, np.float32))

    bdy, blen, bthick, bangle, barch, bdark = (_col(c) for c in p["brow"].T)
    by = y0 + bdy + 0.025 * raise_ + bangle * x0 - barch * (1.0 - (x0 / blen) ** 2)
    scene.paint(_ellipse(x0, by, blen, bthick) * bdark, p["hair"] * 0.7)


def _glasses(scene: _Scene, p: Params) -> None:
    on, rx, ry, thick = (_col(c) for c in p["glasses"].T)
    if not on.any():
        return
    ey, edx = _col(p["eye"][:, 0]), _col(p["eye"][:, 1])
    au = scene.f["au"]
    x, y = au - edx, scene.f["v"] - ey
    ring = _ellipse(x, y, rx + thick, ry + thick) - _ellipse(x, y, rx, ry)
    bridge = _edge(thick - np.abs(y)) * (au < edx - rx)
    scene.paint(np.clip(ring + bridge, 0.0, 1.0) * on, p["frame"])


def _light(image: np.ndarray, light: np.ndarray, u: np.ndarray, vn: np.ndarray, frx: np.ndarray) -> None:
    """Directional shading over a head-shaped normal field, then a global gain with colour cast."""
    angle, strength, gain = (_col(c) for c in light[:, :3].T)
    nx, ny = np.clip(u / (frx * 1.1), -1.0, 1.0), np.clip(vn, -1.0, 1.0)
    shade = 1.0 + strength * (np.cos(angle) * nx + np.sin(angle) * ny)
    image *= (shade * gain)[:, None] * (1.0 + light[:, 3:6, None, None])


def _blur(image: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of [n,3,H,W] with a per-image sigma in pixels, edges clamped."""
    taps = np.arange(-int(np.ceil(2.5 * sigma.max())), int(np.ceil(2.5 * sigma.max())) + 1, dtype=np.float32)
    w = np.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    w = (w / w.sum(axis=1, keepdims=True))[:, :, None, None, None]
    radius = len(taps) // 2
    for axis in (2, 3):
        padded = np.pad(image, [(0, 0)] * axis + [(radius, radius)] + [(0, 0)] * (3 - axis), mode="edge")
        window = [slice(None)] * 4
        image = np.zeros_like(image)
        for k in range(len(taps)):
            window[axis] = slice(k, k + SIZE)
            image += w[:, k] * padded[tuple(window)]
    return image


def _degrade(image: np.ndarray, q: Params) -> np.ndarray:
    """Occlusion patches, Gaussian blur, sensor noise, then quantisation to uint8 HWC."""
    for i in range(len(image)):
        on, w, h, cx, cy, *colour = q["occlusion"][i]
        if on:
            x0, y0 = int(max(cx - w / 2, 0)), int(max(cy - h / 2, 0))
            image[i, :, y0:int(cy + h / 2), x0:int(cx + w / 2)] = np.asarray(colour)[:, None, None]
    sigma, noise, ox, oy = q["degrade"][:, :4].T
    blurred = sigma >= 0.3
    if blurred.any():
        image[blurred] = _blur(image[blurred], sigma[blurred])
    for i in range(len(image)):
        x, y = int(ox[i]), int(oy[i])
        image[i] += _NOISE[:, y:y + SIZE, x:x + SIZE] * noise[i]
    out = image.transpose(0, 2, 3, 1) * np.float32(255.0)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 255.0, out=out).astype(np.uint8)
