"""Synthetic multi-view RGB-D scenes with exact geometry: a seeded, deterministic numpy ray caster.

A scene is a room (floor, four walls, optional ceiling; without one the sky shows, with depth 0) holding
boxes, spheres and cylinders at different depths. Every surface carries a texture from scikit-image's
bundled images (real photographs, and real repetitive textures: brick, grass, gravel, checkerboard) through
texture coordinates fixed on the surface, so the texture moves with the geometry. Shading is Lambertian
with one directional light fixed in the world, hence view-independent (brightness constancy across views).

"Camouflage" scenes put a box in front of the back wall with the wall's own repetitive texture (same image,
scale, tint and world-aligned texture coordinates): only depth tells the two apart.

Conventions (geometry/cameras.py): world y points down (floor at y = 0, ceiling at y = -height), OpenCV
cameras, ``cam_from_world`` (3, 4), pixel centres at +0.5. Rays are built with camera-frame direction
(x, y, 1), so the ray parameter t of a hit *is* its z-depth: depth is exact, no resampling.
Object ids: 0..5 are the room faces (-x wall, +x wall, ceiling, floor, -z wall, +z = back wall), solids
follow from 6; -1 = nothing (sky).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from gasp_vlm.geometry.cameras import invert_extrinsics, look_at, pixel_centers

PHOTO_TEXTURES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "coins", "clock")
REPETITIVE_TEXTURES = ("brick", "grass", "gravel", "checkerboard")
ALL_TEXTURES = PHOTO_TEXTURES + REPETITIVE_TEXTURES

ROOM_FACE_NAMES = ("wall_left", "wall_right", "ceiling", "floor", "wall_front", "wall_back")
BACK_WALL_ID = 5
CEILING_ID = 2
FIRST_SOLID_ID = 6
_EPS_T = 1e-9  # hits closer than this are the ray's own origin
SKY_TOP = np.array([0.55, 0.70, 0.95], np.float32)
SKY_BOTTOM = np.array([0.85, 0.90, 1.00], np.float32)


# ---------------------------------------------------------------------------------------------
# Textures
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def load_texture(name: str) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1] of a scikit-image bundled image (no download).

    Dark images are brightened (mean >= 0.4) so that no face renders black."""
    import skimage.data

    if name not in ALL_TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose from {ALL_TEXTURES}")
    img = np.asarray(getattr(skimage.data, name)())
    img = img.astype(np.float32) / (1.0 if img.dtype == bool else 255.0)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3]
    if name == "checkerboard":  # pure 0/1 squares: lift the black so tinted checks keep texture contrast
        img = 0.25 + 0.75 * img
    mean = float(img.mean())
    if mean < 0.4:
        img = np.clip(img * (0.4 / mean), 0.0, 1.0)
    return np.ascontiguousarray(img, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def is_gray_texture(name: str) -> bool:
    t = load_texture(name)
    return bool(np.array_equal(t[..., 0], t[..., 1]) and np.array_equal(t[..., 1], t[..., 2]))


@dataclass(frozen=True)
class Material:
    """Texture on a surface: texture-coordinate metres (s, t) -> texel, mirrored tiling."""

    texture: str
    scale: float  # metres per texture width
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)  # metres added to (s, t)

    def sample(self, st: np.ndarray) -> np.ndarray:
        """Texture coordinates (P, 2) in metres -> (P, 3) float32 colour (nearest texel)."""
        tex = load_texture(self.texture)
        h, w = tex.shape[:2]
        px = w / self.scale  # texels per metre, same along both axes
        col = _mirror(np.floor((st[:, 0] + self.offset[0]) * px).astype(np.int64), w)
        row = _mirror(np.floor((st[:, 1] + self.offset[1]) * px).astype(np.int64), h)
        return tex.reshape(-1, 3)[row * w + col] * np.asarray(self.tint, np.float32)

    def to_json(self) -> dict:
        return {"texture": self.texture, "scale": round(self.scale, 6), "tint": [round(c, 6) for c in self.tint],
                "offset": [round(c, 6) for c in self.offset]}


def _mirror(i: np.ndarray, n: int) -> np.ndarray:
    """Mirrored-repeat index into [0, n): no seams where tiles meet."""
    m = np.mod(i, 2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


# ---------------------------------------------------------------------------------------------
# Primitives. intersect(o, d) -> t (R,) with inf on a miss; surface(p) -> (normal (R, 3), st (R, 2)).
# ---------------------------------------------------------------------------------------------
def _safe(d: np.ndarray) -> np.ndarray:
    return np.where(np.abs(d) < 1e-15, 1e-15, d)


@dataclass
class Room:
    """Axis-aligned room seen from inside: x in [lo0, hi0], y in [lo1 (ceiling), hi1 = 0 (floor)], z ..."""

    lo: np.ndarray
    hi: np.ndarray
    ceiling: bool
    materials: tuple[Material, ...]  # one per face, in object-id order

    def intersect(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exit hit of rays starting inside: t (R,), face id (R,) in 0..5 (t = inf through a missing ceiling)."""
        ds = _safe(d)
        t_axis = np.where(d > 0, (self.hi - o) / ds, (self.lo - o) / ds)  # (R, 3)
        t_axis = np.where(np.abs(d) < 1e-15, np.inf, t_axis)
        axis = np.argmin(t_axis, axis=1)
        t = np.take_along_axis(t_axis, axis[:, None], 1)[:, 0]
        face = 2 * axis + (np.take_along_axis(d, axis[:, None], 1)[:, 0] > 0)
        if not self.ceiling:
            t = np.where(face == CEILING_ID, np.inf, t)
        return t, face

    @staticmethod
    def surface(face: int, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        axis, positive = divmod(face, 2)
        n = np.zeros(3)
        n[axis] = -1.0 if positive else 1.0  # inward
        tangents = {0: (2, 1), 1: (0, 2), 2: (0, 1)}[axis]
        return np.broadcast_to(n, p.shape), p[:, tangents]


@dataclass
class Box:
    """Box rotated by ``yaw`` about the vertical (y) axis. Texture coordinates are local coordinates plus
    ``tex_origin`` (with yaw 0 and tex_origin = center they equal world coordinates)."""

    center: np.ndarray
    half: np.ndarray
    yaw: float
    material: Material
    tex_origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    kind: str = "box"

    @property
    def _rot(self) -> np.ndarray:  # world_from_local
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        r = self._rot
        ol = ((o - self.center) @ r).T  # local = R^T (p - c); (3, R) rows are contiguous: fast slabs
        dl = (d @ r).T
        tn = np.full(len(d), -np.inf)
        tf = np.full(len(d), np.inf)
        for k in range(3):  # slab method
            inv = 1.0 / _safe(dl[k])
            a = (-self.half[k] - ol[k]) * inv
            b = (self.half[k] - ol[k]) * inv
            tn = np.maximum(tn, np.minimum(a, b))
            tf = np.minimum(tf, np.maximum(a, b))
        return np.where((tn <= tf) & (tn > _EPS_T), tn, np.inf)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = self._rot
        pl = (p - self.center) @ r
        axis = np.argmax(np.abs(pl) / self.half, axis=1)  # the face the point lies on
        nl = np.zeros_like(pl)
        nl[np.arange(len(p)), axis] = np.sign(pl[np.arange(len(p)), axis])
        q = pl + self.tex_origin
        st = np.where((axis == 0)[:, None], q[:, [2, 1]], np.where((axis == 1)[:, None], q[:, [0, 2]], q[:, [0, 1]]))
        return nl @ r.T, st

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        return self.center, float(np.linalg.norm(self.half))

    def to_json(self) -> dict:
        return {"center": _r(self.center), "half_size": _r(self.half), "yaw": round(float(self.yaw), 6)}


@dataclass
class Sphere:
    center: np.ndarray
    radius: float
    material: Material
    kind: str = "sphere"

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        oc = o - self.center
        a = np.einsum("ij,ij->i", d, d)
        b = np.einsum("ij,ij->i", d, oc)
        c = np.einsum("ij,ij->i", oc, oc) - self.radius ** 2
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        t = (-b - root) / a
        t = np.where(t > _EPS_T, t, (-b + root) / a)  # origin inside the sphere: the far root
        return np.where((disc >= 0) & (t > _EPS_T), t, np.inf)

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = (p - self.center) / self.radius
        lon = np.arctan2(n[:, 0], n[:, 2])
        lat = np.arcsin(np.clip(n[:, 1], -1.0, 1.0))
        return n, np.stack([lon, lat], axis=1) * self.radius

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        return self.center, float(self.radius)

    def to_json(self) -> dict:
        return {"center": _r(self.center), "radius": round(float(self.radius), 6)}


@dataclass
class Cylinder:
    """Vertical cylinder: axis through (cx, cz), y in [y0, y1] (y0 < y1; y points down)."""

    cx: float
    cz: float
    y0: float
    y1: float
    radius: float
    material: Material
    kind: str = "cylinder"

    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        ox, oz = o[:, 0] - self.cx, o[:, 2] - self.cz
        dx, dz = d[:, 0], d[:, 2]
        a = _safe(dx * dx + dz * dz)
        b = dx * ox + dz * oz
        c = ox * ox + oz * oz - self.radius ** 2
        disc = b * b - a * c
        ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        ys = o[:, 1] + ts * d[:, 1]
        t_side = np.where((disc >= 0) & (ts > _EPS_T) & (ys >= self.y0) & (ys <= self.y1), ts, np.inf)
        dy = _safe(d[:, 1])
        best = t_side
        for yc in (self.y0, self.y1):
            tc = (yc - o[:, 1]) / dy
            xc, zc = ox + tc * dx, oz + tc * dz
            ok = (tc > _EPS_T) & (xc * xc + zc * zc <= self.radius ** 2)
            best = np.minimum(best, np.where(ok, tc, np.inf))
        return best

    def surface(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, z, y = p[:, 0] - self.cx, p[:, 2] - self.cz, p[:, 1]
        rad = np.sqrt(x * x + z * z)
        cap_dist = np.minimum(np.abs(y - self.y0), np.abs(y - self.y1))
        side = np.abs(rad - self.radius) < cap_dist
        n_side = np.stack([x, np.zeros_like(x), z], axis=1) / self.radius
        n_cap = np.zeros_like(p)
        n_cap[:, 1] = np.where(np.abs(y - self.y0) < np.abs(y - self.y1), -1.0, 1.0)
        st_side = np.stack([np.arctan2(x, z) * self.radius, y], axis=1)
        st_cap = np.stack([x, z], axis=1)
        return np.where(side[:, None], n_side, n_cap), np.where(side[:, None], st_side, st_cap)

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        half_h = 0.5 * (self.y1 - self.y0)
        return np.array([self.cx, 0.5 * (self.y0 + self.y1), self.cz]), float(np.hypot(half_h, self.radius))

    def to_json(self) -> dict:
        return {"axis_xz": [round(float(self.cx), 6), round(float(self.cz), 6)],
                "y_range": [round(float(self.y0), 6), round(float(self.y1), 6)], "radius": round(float(self.radius), 6)}


def _r(a: np.ndarray) -> list[float]:
    return [round(float(x), 6) for x in a]




@dataclass
class SynthScene:
    """Geometry, materials and light of one synthetic scene (ids: room faces 0..5, solids[k] -> 6 + k)."""

    room: Room
    solids: list
    solid_names: list[str]
    light: np.ndarray  # unit vector towards the light (world)
    ambient: float = 0.35

    @property
    def names(self) -> list[str]:
        return list(ROOM_FACE_NAMES) + list(self.solid_names)

    def material(self, oid: int) -> Material:
        return self.room.materials[oid] if oid < FIRST_SOLID_ID else self.solids[oid - FIRST_SOLID_ID].material


@dataclass
class Hits:
    t: np.ndarray  # (R,) ray parameter (= z-depth for camera rays); inf = miss
    object_id: np.ndarray  # (R,) int16, -1 = miss
    normal: np.ndarray  # (R, 3) unit outward (room: inward) normal; 0 on a miss
    st: np.ndarray  # (R, 2) texture coordinates in metres


def cast_rays(scene: SynthScene, origins: np.ndarray, dirs: np.ndarray, shading: bool = True) -> Hits:
    """First hit of rays ``origins + t * dirs`` (R, 3) (float64). With shading=False only t and ids."""
    o = np.asarray(origins, np.float64)
    d = np.asarray(dirs, np.float64)
    t_best, owner = scene.room.intersect(o, d)
    dd = np.einsum("ij,ij->i", d, d)
    for k, solid in enumerate(scene.solids):
        # Cull with the bounding sphere first: each solid covers a small part of the image.
        center, radius = solid.bound
        oc = center - o
        proj = np.einsum("ij,ij->i", d, oc)
        cand = np.flatnonzero(np.einsum("ij,ij->i", oc, oc) - proj * proj / dd <= radius * radius * (1 + 1e-9))
        if cand.size == 0:
            continue
        t = solid.intersect(o[cand], d[cand])
        closer = t < t_best[cand]
        t_best[cand[closer]] = t[closer]
        owner[cand[closer]] = FIRST_SOLID_ID + k
    hit = np.isfinite(t_best)
    owner = np.where(hit, owner, -1).astype(np.int16)
    normal = np.zeros_like(o)
    st = np.zeros((len(o), 2))
    if shading:
        p = o + np.where(hit, t_best, 0.0)[:, None] * d
        for oid in np.unique(owner[hit]):
            m = owner == oid
            if oid < FIRST_SOLID_ID:
                n, s = Room.surface(int(oid), p[m])
            else:
                n, s = scene.solids[oid - FIRST_SOLID_ID].surface(p[m])
            normal[m], st[m] = n, s
    return Hits(t_best, owner, normal, st)


def camera_rays(K: np.ndarray, cam_from_world: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rays through pixel positions uv (P, 2): origins (P, 3) and world directions (P, 3) whose camera-frame
    z component is 1, so a hit at parameter t has z-depth exactly t."""
    K = np.asarray(K, np.float64)
    cam = np.stack([(uv[:, 0] - K[0, 2]) / K[0, 0], (uv[:, 1] - K[1, 2]) / K[1, 1], np.ones(len(uv))], axis=1)
    wfc = invert_extrinsics(np.asarray(cam_from_world, np.float64))
    return np.broadcast_to(wfc[:, 3], cam.shape), cam @ wfc[:, :3].T


def depth_at(scene: SynthScene, K: np.ndarray, cam_from_world: np.ndarray,
             uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact z-depth (P,) float64 (0 = nothing) and object id (P,) seen through arbitrary uv (P, 2)."""
    o, d = camera_rays(K, cam_from_world, np.asarray(uv, np.float64).reshape(-1, 2))
    h = cast_rays(scene, o, d, shading=False)
    return np.where(np.isfinite(h.t), h.t, 0.0), h.object_id


def render_view(scene: SynthScene, K: np.ndarray, cam_from_world: np.ndarray, height: int,
                width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view -> image (H, W, 3) uint8, z-depth (H, W) float32 (0 = sky), object ids (H, W) int16."""
    uv = pixel_centers(height, width).reshape(-1, 2)
    o, d = camera_rays(K, cam_from_world, uv)
    h = cast_rays(scene, o, d)
    hit = h.object_id >= 0
    color = np.empty((len(uv), 3), np.float32)
    lambert = np.maximum(h.normal @ scene.light, 0.0).astype(np.float32)
    shade = scene.ambient + (1.0 - scene.ambient) * lambert
    for oid in np.unique(h.object_id[hit]):
        m = h.object_id == oid
        color[m] = scene.material(int(oid)).sample(h.st[m]) * shade[m, None]
    if not hit.all():  # sky: a vertical gradient by ray elevation (world -y is up)
        dn = d[~hit] / np.linalg.norm(d[~hit], axis=1, keepdims=True)
        a = np.clip(-dn[:, 1], 0.0, 1.0).astype(np.float32)[:, None]
        color[~hit] = SKY_BOTTOM * (1 - a) + SKY_TOP * a
    image = np.clip(np.rint(color * 255.0), 0, 255).astype(np.uint8).reshape(height, width, 3)
    depth = np.where(hit, h.t, 0.0).astype(np.float32).reshape(height, width)
    return image, depth, h.object_id.reshape(height, width)


# ---------------------------------------------------------------------------------------------
# Random scenes
# ---------------------------------------------------------------------------------------------
def _rng(seed: int | Sequence[int]) -> np.random.Generator:
    seq = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    if any(s < 0 for s in seq):
        raise ValueError(f"seeds must be non-negative, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([len(seq), *seq]))  # length first: (7,) != (7, 0)


def _random_material(rng: np.random.Generator, texture: str, scale_range: tuple[float, float]) -> Material:
    if is_gray_texture(texture):  # grey images get a colour so that objects differ
        tint = rng.uniform(0.45, 1.0, size=3)
        tint = tint / tint.max()
    else:
        tint = np.ones(3)
    return Material(texture, float(rng.uniform(*scale_range)), tuple(float(c) for c in tint),
                    tuple(float(c) for c in rng.uniform(0.0, 5.0, size=2)))


def build_scene(seed: int | Sequence[int], camouflage: bool | None = None,
                num_frames: int = 8, size: int | tuple[int, int] = 224) -> tuple[SynthScene, np.ndarray, np.ndarray, dict]:
    """Random scene + camera path: (scene, K (N, 3, 3), cam_from_world (N, 3, 4), meta dict)."""
    height, width = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"need num_frames >= 1 and a positive size, got {num_frames}, {size}")
    rng = _rng(seed)
    if camouflage is None:
        camouflage = bool(rng.random() < 0.5)
    else:
        rng.random()  # keep the stream aligned with camouflage=None
    half_x, half_z = rng.uniform(2.6, 3.4), rng.uniform(2.6, 3.4)
    room_h = rng.uniform(2.4, 3.0)
    ceiling = bool(rng.random() < 0.5)
    lo = np.array([-half_x, -room_h, -half_z])
    hi = np.array([half_x, 0.0, half_z])

    # Room textures; the back wall is repetitive in camouflage scenes (so a box can hide in it).
    back_tex = rng.choice(REPETITIVE_TEXTURES) if camouflage else rng.choice(ALL_TEXTURES)
    room_tex = [rng.choice(ALL_TEXTURES) for _ in range(5)] + [back_tex]
    room_mats = tuple(_random_material(rng, str(t), (1.0, 2.5)) for t in room_tex)
    solid_textures = [t for t in ALL_TEXTURES if t != back_tex]  # only camouflage boxes share it

    # Camera path: orbit about the room centre with a dolly and a slight bob, looking at a target.
    f = rng.uniform(0.85, 1.05) * max(height, width)
    K = np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])
    theta0, span = rng.uniform(-0.25, 0.25), rng.uniform(0.45, 0.6)
    r0, dolly = rng.uniform(1.7, 2.1), rng.uniform(-0.3, 0.3)
    cam_h, bob = rng.uniform(1.2, 1.6), rng.uniform(0.0, 0.08)
    target = np.array([rng.uniform(-0.2, 0.2), -rng.uniform(0.7, 1.1), rng.uniform(0.3, 0.8)])
    s = np.linspace(-0.5, 0.5, num_frames) if num_frames > 1 else np.zeros(1)
    theta = theta0 + span * s
    radius = r0 + dolly * s
    eyes = np.stack([-radius * np.sin(theta), -(cam_h + bob * np.sin(np.pi * s)), -radius * np.cos(theta)], axis=1)
    # The look-at point also sweeps sideways (a pan on top of the orbit): without it, points near the
    # target barely move in the image and "same token" (zero motion) stays right over the whole path.
    # Its sign follows the orbit's so that the pan adds to the parallax of the (mostly distant) walls.
    pan = float(rng.uniform(0.4, 0.8))
    targets = target[None, :] + np.outer(s, [pan, 0.0, 0.0])
    poses = np.stack([look_at(e, t) for e, t in zip(eyes, targets)])

    # Solids: footprints (x, z, radius) must not overlap each other or come near the camera path.
    tan_half = 0.5 * width / f
    placed: list[tuple[float, float, float]] = []

    def place(fr: float, z_range: tuple[float, float], x_lim: float | None = None) -> tuple[float, float] | None:
        for _ in range(200):
            z = rng.uniform(*z_range)
            xl = min(half_x - fr - 0.1, 0.8 * (z + r0) * tan_half) if x_lim is None else x_lim
            if xl <= 0:
                continue
            x = rng.uniform(-xl, xl)
            if all((x - px) ** 2 + (z - pz) ** 2 > (fr + pr + 0.1) ** 2 for px, pz, pr in placed) and \
                    np.min((eyes[:, 0] - x) ** 2 + (eyes[:, 2] - z) ** 2) > (fr + 0.5) ** 2:
                placed.append((x, z, fr))
                return x, z
        return None

    solids: list = []
    names: list[str] = []
    meta_objects: list[dict] = []
    camo_id = None
    if camouflage:  # a box parallel to the back wall, 0.3-1.0 m in front of it, wearing the wall
        half = np.array([rng.uniform(0.35, 0.6), rng.uniform(0.35, 0.8), rng.uniform(0.2, 0.4)])
        gap = rng.uniform(0.3, 1.0)
        cz = half_z - gap - half[2]
        xz = place(float(np.hypot(half[0], half[2])), (cz, cz), x_lim=min(1.0, half_x - 1.0))
        if xz is None:  # cannot happen for an empty room; keep the error loud if it ever does
            raise RuntimeError("could not place the camouflage box")
        center = np.array([xz[0], -half[1], xz[1]])
        solids.append(Box(center, half, 0.0, room_mats[BACK_WALL_ID], tex_origin=center.copy()))
        names.append("camouflage_box")
        camo_id = FIRST_SOLID_ID
    n_solids = int(rng.integers(3, 7))
    kinds = ["box", "box"] + [str(rng.choice(["box", "sphere", "cylinder"])) for _ in range(n_solids - 2)]
    for kind in kinds:
        mat = _random_material(rng, str(rng.choice(solid_textures)), (0.4, 0.9))
        z_range = (-0.3, half_z - 0.6)
        if kind == "box":
            half = np.array([rng.uniform(0.15, 0.5), rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.5)])
            xz = place(float(np.hypot(half[0], half[2])), z_range)
            if xz is None:
                continue
            solids.append(Box(np.array([xz[0], -half[1], xz[1]]), half, float(rng.uniform(-0.8, 0.8)), mat,
                              tex_origin=rng.uniform(0, 3, size=3)))
        elif kind == "sphere":
            rad = float(rng.uniform(0.2, 0.45))
            xz = place(rad, z_range)
            if xz is None:
                continue
            lift = rng.uniform(0.3, 1.0) if rng.random() < 0.4 else 0.0  # some float: more occlusion
            solids.append(Sphere(np.array([xz[0], -rad - lift, xz[1]]), rad, mat))
        else:
            rad, height_c = float(rng.uniform(0.12, 0.35)), float(rng.uniform(0.4, 1.5))
            xz = place(rad, z_range)
            if xz is None:
                continue
            solids.append(Cylinder(xz[0], xz[1], -height_c, 0.0, rad, mat))
        names.append(f"{kind}_{sum(n.startswith(kind + '_') for n in names)}")

    light = np.array([rng.uniform(-0.5, 0.5), -1.0, rng.uniform(-0.9, -0.3)])
    light /= np.linalg.norm(light)
    scene = SynthScene(Room(lo, hi, ceiling, room_mats), solids, names, light)
    for oid, name in enumerate(scene.names):
        entry = {"id": oid, "name": name, "kind": "room_face" if oid < FIRST_SOLID_ID else solids[oid - 6].kind,
                 **scene.material(oid).to_json()}
        if oid >= FIRST_SOLID_ID:
            entry.update(solids[oid - FIRST_SOLID_ID].to_json())
        meta_objects.append(entry)
    meta = {
        "generator": "gasp_vlm.data.synth",
        "seed": [int(seed)] if np.isscalar(seed) else [int(x) for x in seed],
        "camouflage": bool(camouflage),
        "camouflage_object_id": camo_id,
        "background_object_id": BACK_WALL_ID,
        "ceiling": ceiling,
        "room_min": _r(lo), "room_max": _r(hi),
        "light_direction": _r(light),
        "camera_path": {"orbit_span_rad": round(float(span), 6), "radius": round(float(r0), 6),
                        "dolly": round(float(dolly), 6), "target": _r(target),
                        "pan_m": round(pan, 6)},
        "objects": meta_objects,
    }
    return scene, np.repeat(K[None], num_frames, axis=0), poses, meta


def render_scene(seed: int | Sequence[int], num_frames: int = 8, size: int | tuple[int, int] = 224,
                 camouflage: bool | None = None) -> dict:
    """Render one random scene (deterministic in ``seed``; camouflage None = decided by the seed).

    Returns dict: images (N, H, W, 3) uint8, depths (N, H, W) float32 z-depth (0 = sky), K (N, 3, 3),
    cam_from_world (N, 3, 4) float64, objects (N, H, W) int16 ids (-1 = sky), meta (JSON-able dict),
    scene (the SynthScene, for exact re-casting with depth_at)."""
    scene, K, poses, meta = build_scene(seed, camouflage, num_frames, size)
    height, width = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    views = [render_view(scene, K[i], poses[i], height, width) for i in range(num_frames)]
    return {"images": np.stack([v[0] for v in views]), "depths": np.stack([v[1] for v in views]),
            "K": K, "cam_from_world": poses, "objects": np.stack([v[2] for v in views]), "meta": meta,
            "scene": scene}


def is_camouflage_index(i: int, fraction: float) -> bool:
    """Scene i is a camouflage scene iff ceil((i+1) f) > ceil(i f): spread evenly, exactly ceil(n f) among
    the first n scenes, and independent of the total number of scenes."""
    return int(np.ceil((i + 1) * fraction - 1e-9)) > int(np.ceil(i * fraction - 1e-9))


def synth_dataset(out: str | os.PathLike, num_scenes: int, num_frames: int = 24, size: int | tuple[int, int] = 224,
                  seed: int = 0, camouflage_fraction: float = 0.5, progress: bool = True,
                  overwrite: bool = False) -> list[Path]:
    """Write ``num_scenes`` scenes ``out/scene_XXXX`` in the canonical format; scene i is seeded by
    (seed, i), so a larger dataset with the same seed extends a smaller one. Returns the scene paths."""
    from tqdm import tqdm

    from gasp_vlm.data.scene import write_scene

    if not 0.0 <= camouflage_fraction <= 1.0:
        raise ValueError(f"camouflage_fraction must be in [0, 1], got {camouflage_fraction}")
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    t0 = time.perf_counter()
    for i in tqdm(range(num_scenes), desc="synth scenes", unit="scene", disable=not progress):
        r = render_scene((seed, i), num_frames, size, is_camouflage_index(i, camouflage_fraction))
        meta = dict(r["meta"], num_frames=num_frames)
        paths.append(write_scene(out / f"scene_{i:04d}", r["images"], r["depths"], r["K"], r["cam_from_world"],
                                 objects=r["objects"], source="synth", depth_units="m", extra=meta,
                                 overwrite=overwrite))
    if progress:
        dt = time.perf_counter() - t0
        print(f"wrote {num_scenes} scenes x {num_frames} frames to {out} in {dt:.1f} s "
              f"({dt / (num_scenes * num_frames) * 1e3:.0f} ms/frame incl. png)")
    return paths


def benchmark(num_frames: int = 8, size: int = 224, seeds: Sequence[int] = (0, 1, 2, 3)) -> dict:
    """CPU seconds (process time: robust on a shared machine) to render ``num_frames`` views per scene,
    textures already loaded; median over ``seeds``. Run: ``python -m gasp_vlm.data.synth``."""
    for name in ALL_TEXTURES:
        load_texture(name)
    times = []
    for seed in seeds:
        t0 = time.process_time()
        render_scene(seed, num_frames, size)
        times.append(time.process_time() - t0)
    return {"num_frames": num_frames, "size": size, "median_s": float(np.median(times)),
            "max_s": float(np.max(times))}


if __name__ == "__main__":
    try:  # numpy's BLAS may spin threads on the small matmuls; one core is the target
        import threadpoolctl

        threadpoolctl.threadpool_limits(1)
    except ImportError:
        pass
    r = benchmark()
    print(f"render_scene: {r['num_frames']} views at {r['size']}x{r['size']}: median {r['median_s']:.2f} s, "
          f"max {r['max_s']:.2f} s CPU (one process)")
