"""Five-point face alignment onto the ArcFace 112×112 template (what InsightFace's `norm_crop` does), without OpenCV.

Coordinates follow OpenCV's convention, as landmark detectors and InsightFace do: pixel (i, j) has its centre at
x = j, y = i. Pillow puts centres at +0.5; `align_face` converts, so its output matches `cv2.warpAffine` with
the same matrix (bilinear, border 0) up to rounding (|difference| <= 1 grey level measured).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# The SphereFace/CosFace 96×112 reference points (left eye, right eye, nose tip, left and right mouth corners),
# shifted 8 px right to centre them in 112×112: InsightFace's `arcface_dst`.
_TEMPLATE_96x112 = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]]
)
ARCFACE_TEMPLATE = _TEMPLATE_96x112 + np.array([8.0, 0.0])
ARCFACE_TEMPLATE.flags.writeable = False


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2×3 matrix [sR | t] of the rotation + uniform scale + shift that maps `src` points onto `dst` in the
    least-squares sense (Umeyama 1991); a proper rotation even when the best fit would be a mirror image."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need two matching N×2 point arrays with N >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("points must be finite")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12 * max(1.0, np.abs(src).max() ** 2):
        raise ValueError("source points all coincide; no similarity transform is defined")
    u, sigma, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    # Flip the weakest axis when U·Vᵀ would be a reflection: the best fit among proper rotations.
    d = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ np.diag(d) @ vt
    scale = (sigma * d).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def template(size: int = 112) -> np.ndarray:
    """ARCFACE_TEMPLATE scaled to a size×size crop."""
    return ARCFACE_TEMPLATE * (size / 112.0)


def align_face(image: np.ndarray, landmarks5: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp a uint8 H×W×3 image so its 5 landmarks (x, y rows) land on the ArcFace template: a size×size crop."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 H×W×3 image, got {image.dtype} {image.shape}")
    if np.shape(landmarks5) != (5, 2):
        raise ValueError(f"expected 5×2 landmarks, got shape {np.shape(landmarks5)}")
    forward = np.vstack([similarity_transform(landmarks5, template(size)), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]
    linear, shift = inverse[:, :2], inverse[:, 2]
    # Work on the part of the image the crop can sample (plus a pixel either side): cheaper on large photos.
    corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]])
    reach = corners @ linear.T + shift
    x0, y0 = np.clip(np.floor(reach.min(0)).astype(int) - 1, 0, [image.shape[1], image.shape[0]])
    x1, y1 = np.clip(np.ceil(reach.max(0)).astype(int) + 2, 0, [image.shape[1], image.shape[0]])
    if x1 <= x0 or y1 <= y0:
        return np.zeros((size, size, 3), np.uint8)
    # Pillow samples the input at T(x + 0.5, y + 0.5) in a frame whose pixel centres sit at +0.5, and
    # replicates edge pixels; a 1-pixel zero frame (hence +1) makes the border blend to 0 as in OpenCV.
    shift = shift - [x0, y0] + 1.5 - linear @ np.array([0.5, 0.5])
    coefficients = (*linear[0], shift[0], *linear[1], shift[1])
    framed = np.pad(image[y0:y1, x0:x1], ((1, 1), (1, 1), (0, 0)))
    # One float ("F") plane per channel: Pillow's 8-bit bilinear truncates, a -0.5 grey-level bias; this rounds.
    planes = np.ascontiguousarray(framed.transpose(2, 0, 1), dtype=np.float32)
    warped = [
        np.asarray(Image.fromarray(plane).transform(
            (size, size), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR, fillcolor=0.0
        ))
        for plane in planes
    ]
    return np.rint(np.stack(warped, axis=-1)).clip(0, 255).astype(np.uint8)
