"""Analytic chest anatomy for synthetic CT phantoms: random parameters, then rendering slab by slab.

Everything lives in a patient frame in mm: X to the patient's left, Y to the back (both LPS), Z up, with
X = Y = 0 the body axis and Z = 0 the base of the left lung. A block of voxels is described by its three
1D coordinate vectors (``Block``), so a volume can be rendered in z-slabs of bounded memory and every
structure is a vectorized function of those coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Region of the patient frame (z, y, x) in mm that random fields cover; scans always lie inside it.
FIELD_LOW = (-160.0, -240.0, -240.0)
FIELD_HIGH = (420.0, 240.0, 240.0)
LEFT, RIGHT = 1, 2  # label values; the left lung lies at positive X


@dataclass(frozen=True)
class Block:
    """Patient-frame coordinates (mm) of a block of voxels, and the in-plane voxel size (for partial volume)."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    voxel_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    def grids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.z[:, None, None], self.y[None, :, None], self.x[None, None, :]

    def box(self, low_zyx, high_zyx) -> tuple[slice, ...] | None:
        """Index slices of the voxels whose coordinates fall within [low, high], or None if none do."""
        slices = []
        for coords, low, high in zip((self.z, self.y, self.x), low_zyx, high_zyx):
            start, stop = np.searchsorted(coords, low), np.searchsorted(coords, high, side="right")
            if stop <= start:
                return None
            slices.append(slice(int(start), int(stop)))
        return tuple(slices)

    def sub(self, index: tuple[slice, ...]) -> "Block":
        return Block(self.z[index[0]], self.y[index[1]], self.x[index[2]], self.voxel_mm)

    def ellipsoid(self, centre, radii) -> tuple[tuple[slice, ...], "Block", np.ndarray] | None:
        """The voxels within 1.5 radii of an ellipsoid's centre (their index, their block) and each one's
        normalised distance from the centre (1 on the surface); None when the box misses this block."""
        reach = 1.5 * radii
        index = self.box(centre - reach, centre + reach)
        if index is None:
            return None
        sub = self.sub(index)
        z, y, x = sub.grids()
        distance = np.sqrt(((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                           + ((x - centre[2]) / radii[2]) ** 2)
        return index, sub, distance


@dataclass(frozen=True)
class SmoothField:
    """A smooth Gaussian random field with unit variance: normal weights on a lattice, Gaussian kernels."""

    values: np.ndarray  # (kz, ky, kx) standard normal lattice weights
    step: float  # lattice spacing and kernel width (mm)

    @classmethod
    def draw(cls, rng: np.random.Generator, step: float) -> "SmoothField":
        counts = [int(np.ceil((high - low) / step)) + 1 for low, high in zip(FIELD_LOW, FIELD_HIGH)]
        return cls(rng.standard_normal(counts).astype(np.float32), float(step))

    def _weights(self, coords: np.ndarray, axis: int) -> tuple[np.ndarray, slice]:
        nodes = FIELD_LOW[axis] + self.step * np.arange(self.values.shape[axis])
        # Only lattice nodes within four kernel widths matter; the rest would multiply by ~0.
        near = np.flatnonzero((nodes > coords.min() - 4 * self.step) & (nodes < coords.max() + 4 * self.step))
        keep = slice(int(near[0]), int(near[-1]) + 1)
        weights = np.exp(-0.5 * ((coords[:, None] - nodes[None, keep]) / self.step) ** 2)
        weights /= np.sqrt((weights ** 2).sum(axis=1, keepdims=True))  # unit variance everywhere
        return weights.astype(np.float32), keep

    def sample(self, block: Block) -> np.ndarray:
        (wz, kz), (wy, ky), (wx, kx) = (self._weights(c, a) for a, c in enumerate((block.z, block.y, block.x)))
        lattice = self.values[kz, ky, kx]
        return np.einsum("ai,bj,ck,ijk->abc", wz, wy, wx, lattice, optimize=True).astype(np.float32)


@dataclass(frozen=True)
class Segment:
    start: np.ndarray  # (z, y, x) mm
    end: np.ndarray
    radius: float


@dataclass(frozen=True)
class Lung:
    label: int
    centre_yx: tuple[float, float]
    radii_yx: tuple[float, float]
    base_z: float  # lowest point (costophrenic recess)
    apex_z: float
    dome_mm: float  # how far the diaphragm bulges up in the middle

    def normalized_radius2(self, y, x) -> np.ndarray:
        return ((y - self.centre_yx[0]) / self.radii_yx[0]) ** 2 + ((x - self.centre_yx[1]) / self.radii_yx[1]) ** 2

    def volume_mm3(self) -> float:
        """Volume of the undeformed shape (half-ellipsoid on an elliptic base) before carving."""
        return 2.0 / 3.0 * np.pi * self.radii_yx[0] * self.radii_yx[1] * (self.apex_z - self.base_z)


@dataclass(frozen=True)
class Anatomy:
    body_yx: tuple[float, float]  # body semi-axes (AP, left-right)
    fat_mm: float
    wall_mm: float  # muscle and ribs between the fat and the thoracic cavity
    lungs: tuple[Lung, Lung]
    heart_centre: tuple[float, float, float]
    heart_radii: tuple[float, float, float]
    spine_yx: tuple[float, float]
    rib_period: float
    rib_phase: float
    disc_period: float
    soft_hu: float
    vessels: tuple[Segment, ...]
    shape_field: SmoothField
    texture_field: SmoothField

    @property
    def cavity_yx(self) -> tuple[float, float]:
        inset = self.fat_mm + self.wall_mm
        return self.body_yx[0] - inset, self.body_yx[1] - inset

    def height(self) -> float:
        return max(lung.apex_z for lung in self.lungs)


def _vessel_tree(rng: np.random.Generator, lung: Lung, generations: int) -> list[Segment]:
    """Branching segments that start at the hilum and fan out through the lung, thinning as they go."""
    side = 1.0 if lung.label == LEFT else -1.0
    height = lung.apex_z - lung.base_z
    hilum = np.array([lung.base_z + 0.55 * height, lung.centre_yx[0] + 0.1 * lung.radii_yx[0],
                      lung.centre_yx[1] - side * 0.55 * lung.radii_yx[1]])
    segments: list[Segment] = []
    for target_t in (0.85, 0.45, 0.15):  # upper, middle and lower lobe trunks
        target = np.array([lung.base_z + target_t * height + 10, lung.centre_yx[0] + rng.uniform(-0.3, 0.4)
                           * lung.radii_yx[0], lung.centre_yx[1] + side * rng.uniform(0.0, 0.4) * lung.radii_yx[1]])
        direction = (target - hilum) / np.linalg.norm(target - hilum)
        stack = [(hilum, direction, 0.45 * np.linalg.norm(target - hilum), rng.uniform(5.0, 7.0), 0)]
        while stack:
            start, direction, length, radius, generation = stack.pop()
            end = start + direction * length
            segments.append(Segment(start, end, radius))
            if generation + 1 >= generations:
                continue
            for _ in range(2):
                turn = rng.standard_normal(3)
                turn -= turn.dot(direction) * direction
                turn /= np.linalg.norm(turn) + 1e-9
                angle = np.deg2rad(rng.uniform(20.0, 40.0))
                child = np.cos(angle) * direction + np.sin(angle) * turn
                stack.append((end, child, length * rng.uniform(0.65, 0.8), radius * 0.72, generation + 1))
    return segments


def draw_anatomy(rng: np.random.Generator, vessel_generations: int = 6) -> Anatomy:
    """One random patient: body size, lungs, heart, spine, ribs, vessel trees and texture fields."""
    body_yx = (rng.uniform(100.0, 120.0), rng.uniform(150.0, 170.0))
    fat_mm, wall_mm = rng.uniform(8.0, 20.0), rng.uniform(14.0, 20.0)
    cavity_y, cavity_x = body_yx[0] - fat_mm - wall_mm, body_yx[1] - fat_mm - wall_mm
    height = rng.uniform(185.0, 225.0)
    lungs = []
    for label, side in ((LEFT, 1.0), (RIGHT, -1.0)):
        base = 0.0 if label == LEFT else rng.uniform(8.0, 20.0)  # the liver lifts the right lung
        lungs.append(Lung(label, (0.1 * cavity_y, side * rng.uniform(0.48, 0.53) * cavity_x),
                          (rng.uniform(0.85, 0.95) * cavity_y, rng.uniform(0.46, 0.5) * cavity_x),
                          base, height + rng.uniform(-8.0, 8.0), rng.uniform(15.0, 30.0)))
    vessels = tuple(s for lung in lungs for s in _vessel_tree(rng, lung, vessel_generations))
    return Anatomy(body_yx=body_yx, fat_mm=fat_mm, wall_mm=wall_mm, lungs=tuple(lungs),
                   heart_centre=(0.3 * height, -0.35 * cavity_y, rng.uniform(0.1, 0.2) * cavity_x),
                   heart_radii=(rng.uniform(50.0, 65.0), 0.45 * cavity_y, rng.uniform(0.38, 0.45) * cavity_x),
                   spine_yx=(body_yx[0] - fat_mm - rng.uniform(40.0, 50.0), 0.0),
                   rib_period=rng.uniform(22.0, 28.0), rib_phase=rng.uniform(0.0, 28.0),
                   disc_period=rng.uniform(24.0, 30.0), soft_hu=rng.uniform(30.0, 50.0), vessels=vessels,
                   shape_field=SmoothField.draw(rng, 35.0), texture_field=SmoothField.draw(rng, 10.0))


def _heart_radius2(anatomy: Anatomy, z, y, x) -> np.ndarray:
    """Squared normalized distance from the heart centre (1 on the ellipsoid's surface)."""
    hz, hy, hx = anatomy.heart_centre
    rz, ry, rx = anatomy.heart_radii
    return ((z - hz) / rz) ** 2 + ((y - hy) / ry) ** 2 + ((x - hx) / rx) ** 2


def lung_labels(anatomy: Anatomy, block: Block, shape_noise: np.ndarray) -> np.ndarray:
    """uint8 map with LEFT/RIGHT lung labels, carved out of the heart, mediastinum and spine."""
    z, y, x = block.grids()
    cavity_y, cavity_x = anatomy.cavity_yx
    inside_cavity = (y / cavity_y) ** 2 + (x / cavity_x) ** 2 < 0.97
    heart = _heart_radius2(anatomy, z, y, x) < 1.1
    spine = (y - anatomy.spine_yx[0]) ** 2 + (x - anatomy.spine_yx[1]) ** 2 < 30.0 ** 2
    mediastinum = np.abs(x - 5.0) < 14.0 + 10.0 * (y < 0)
    allowed = inside_cavity & ~heart & ~spine & ~mediastinum
    labels = np.zeros(block.shape, np.uint8)
    for lung in anatomy.lungs:
        q = lung.normalized_radius2(y, x) * (1.0 + 0.18 * shape_noise)
        t = np.clip((z - lung.base_z) / (lung.apex_z - lung.base_z), 0.0, None)
        above_diaphragm = z > lung.base_z + lung.dome_mm * (1.0 - q)
        inside = (q < 1.0 - t ** 2) & above_diaphragm & allowed
        labels[inside] = lung.label
    return labels


def _segment_distance(z, y, x, segment: Segment) -> np.ndarray:
    axis = segment.end - segment.start
    length2 = float(axis.dot(axis)) + 1e-9
    dz, dy, dx = z - segment.start[0], y - segment.start[1], x - segment.start[2]
    t = np.clip((dz * axis[0] + dy * axis[1] + dx * axis[2]) / length2, 0.0, 1.0)
    return np.sqrt((dz - t * axis[0]) ** 2 + (dy - t * axis[1]) ** 2 + (dx - t * axis[2]) ** 2)


def vessel_weight(anatomy: Anatomy, block: Block) -> np.ndarray:
    """Fraction of each voxel filled by vessel (0…1), blurred over one voxel as partial volume would."""
    weight = np.zeros(block.shape, np.float32)
    blur = block.voxel_mm
    for segment in anatomy.vessels:
        reach = segment.radius + blur
        low, high = np.minimum(segment.start, segment.end), np.maximum(segment.start, segment.end)
        index = block.box(low - reach, high + reach)
        if index is None:
            continue
        z, y, x = block.sub(index).grids()
        distance = _segment_distance(z, y, x, segment)
        # Thin vessels fill only part of a coarse voxel, so they look fainter, as on real scans.
        fill = np.clip((segment.radius - distance) / blur + 0.5, 0.0, 1.0) * min(1.0, 2.0 * segment.radius / blur)
        np.maximum(weight[index], fill.astype(np.float32), out=weight[index])
    return weight


def body_and_bone_hu(anatomy: Anatomy, block: Block, texture: np.ndarray) -> np.ndarray:
    """HU of air, fat, soft tissue, heart, liver, spine, ribs and sternum (lungs are painted later)."""
    z, y, x = block.grids()
    body_y, body_x = anatomy.body_yx
    cavity_y, cavity_x = anatomy.cavity_yx
    body_r2 = (y / body_y) ** 2 + (x / body_x) ** 2
    inner_r2 = (y / (body_y - anatomy.fat_mm)) ** 2 + (x / (body_x - anatomy.fat_mm)) ** 2
    hu = np.full(block.shape, -1000.0, np.float32)
    hu[np.broadcast_to(body_r2 < 1.0, block.shape)] = -100.0
    soft = np.broadcast_to(inner_r2 < 1.0, block.shape)
    hu[soft] = (anatomy.soft_hu + 8.0 * texture)[soft]
    heart = _heart_radius2(anatomy, z, y, x) < 1.0
    hu[heart] = (anatomy.soft_hu + 10.0)
    right = anatomy.lungs[1]
    liver = (z < right.base_z + right.dome_mm) & ((y / cavity_y) ** 2 + (x / cavity_x) ** 2 < 1.0) & (x < 40.0)
    hu[liver] = 60.0
    _paint_bones(anatomy, block, hu, texture)
    return hu


def _paint_bones(anatomy: Anatomy, block: Block, hu: np.ndarray, texture: np.ndarray) -> None:
    z, y, x = block.grids()
    cavity_y, cavity_x = anatomy.cavity_yx
    top = anatomy.height() + 20.0
    # Ribs: a band just outside the cavity, repeating in z and sloping down towards the front.
    wall_r = np.sqrt((y / cavity_y) ** 2 + (x / cavity_x) ** 2)
    band = (wall_r > 1.02) & (wall_r < 1.02 + 10.0 / cavity_x)
    rib_z = np.mod(z + anatomy.rib_phase - 0.25 * (cavity_y - y), anatomy.rib_period)
    ribs = band & (rib_z < 9.0) & ((np.abs(x) > 30.0) | (y > 0)) & (z > -30.0) & (z < top)
    hu[ribs] = 550.0 + 80.0 * texture[ribs]
    sternum = (np.abs(x) < 14.0) & (np.abs(y + cavity_y + 6.0) < 6.0) & (z > 0.25 * top) & (z < top)
    hu[np.broadcast_to(sternum, block.shape)] = 400.0
    # Spine: cortical shell around cancellous bone, with discs between vertebrae, canal and spinous process.
    sy, sx = anatomy.spine_yx
    body_r2 = ((y - sy) / 16.0) ** 2 + ((x - sx) / 20.0) ** 2
    vertebra = np.broadcast_to(body_r2 < 1.0, block.shape)
    cancellous = np.broadcast_to(body_r2 < 0.7, block.shape)
    disc = np.broadcast_to(np.mod(z, anatomy.disc_period) < 7.0, block.shape) & vertebra
    hu[vertebra] = 900.0
    hu[cancellous] = (330.0 + 40.0 * texture)[cancellous]
    hu[disc] = 90.0
    process = (np.abs(x - sx) < 5.0) & (y > sy + 18.0) & (y < sy + 48.0)
    hu[np.broadcast_to(process, block.shape) & ~disc] = 700.0
    canal = (y - sy - 27.0) ** 2 + (x - sx) ** 2 < 8.0 ** 2
    hu[np.broadcast_to(canal, block.shape)] = 15.0
