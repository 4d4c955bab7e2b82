//! Synthetic abdominal CTs with the 13 BTCV organs labelled, so the whole
//! pipeline runs with no download.
//!
//! Anatomy is drawn in world millimetres (RAS+: +x is the patient's right,
//! +y anterior, +z superior) from simple primitives: ellipsoids with a
//! low-frequency radial wobble for solid organs, capsule polylines for
//! vessels, the oesophagus and the pancreas. Each case varies organ
//! position, size, rotation and shape, body size, field of view, voxel
//! spacing and HU contrast; every third-ish case is stored in a non-RAS
//! orientation (LPS, LAS, RPI) so reorientation is exercised. The image is
//! int16 HU (fat −100, muscle 50, bone 400–800, air −1000, lung −850,
//! enhanced vessels 160–250, organs 30–150) plus Gaussian noise; the label
//! map is uint8 with BTCV ids.
//!
//! Determinism: per-case parameters come from a SplitMix64 stream seeded by
//! `(seed, case index)`, per-voxel noise from a hash of `(seed, case,
//! world-grid index)`, so the same seed gives the same voxels on any thread
//! count.
//!
//! Defaults (documented in docs/volumes.md): about 96×96×48 voxels at
//! ≈3.2×3.2×3.6 mm, i.e. a ≈307×307×173 mm field of view. After resampling
//! to 1.5×1.5×2 mm every organ but the adrenal glands (and at times the
//! gallbladder or oesophagus) has ≥ 1000 voxels.

use rayon::prelude::*;

use super::volume::{Affine, Volume, Voxels};

/// BTCV label names in BTCV order: label `i + 1` is `BTCV_ORGANS[i]`.
pub const BTCV_ORGANS: [&str; 13] = [
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
];

/// How phantom cases are generated.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhantomConfig {
    /// Seed of the whole set.
    pub seed: u64,
    /// Nominal grid (x, y, z in world-axis order), jittered per case.
    pub shape: [usize; 3],
    /// Nominal spacing (mm, world-axis order), jittered per case.
    pub spacing: [f64; 3],
    /// Standard deviation of the voxel noise (HU).
    pub noise_hu: f64,
    /// Store some cases in a non-RAS orientation.
    pub mixed_orientation: bool,
    /// Jitter grid size and spacing per case (off: exactly `shape` and
    /// `spacing`, e.g. for benchmarks on a fixed grid).
    pub jitter_grid: bool,
}

impl Default for PhantomConfig {
    fn default() -> Self {
        PhantomConfig {
            seed: 0,
            shape: [96, 96, 48],
            spacing: [3.2, 3.2, 3.6],
            noise_hu: 12.0,
            mixed_orientation: true,
            jitter_grid: true,
        }
    }
}

/// One generated case.
#[derive(Debug, Clone)]
pub struct PhantomCase {
    /// Case id (`case000`, …).
    pub id: String,
    /// int16 HU image.
    pub image: Volume,
    /// uint8 BTCV label map on the same grid.
    pub label: Volume,
}

/// SplitMix64: tiny, fast, and stable across crate versions.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        Rng(mix(seed ^ mix(stream.wrapping_add(0x9e37_79b9_7f4a_7c15))))
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// Uniform in [-a, a].
    fn jitter(&mut self, a: f64) -> f64 {
        self.range(-a, a)
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Standard normal from a hash (Box–Muller).
fn gauss(h: u64) -> f64 {
    let u1 = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = ((mix(h) >> 11) as f64) / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

type V3 = [f64; 3];

fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// A shape primitive.
#[derive(Debug, Clone)]
enum Shape {
    /// Ellipsoid rotated by `rot` about z, with a radial wobble.
    Blob {
        c: V3,
        r: V3,
        cos: f64,
        sin: f64,
        wobble: [(V3, f64, f64); 3],
    },
    /// Capsule polyline: points and radii at each point.
    Tube { pts: Vec<V3>, radii: Vec<f64> },
}

impl Shape {
    fn blob(rng: &mut Rng, c: V3, r: V3, rot_deg: f64, scale: f64) -> Shape {
        let c = [
            c[0] * scale + rng.jitter(6.0),
            c[1] * scale + rng.jitter(6.0),
            c[2] * scale + rng.jitter(6.0),
        ];
        let r = r.map(|x| x * scale * rng.range(0.88, 1.12));
        let a = (rot_deg + rng.jitter(12.0)).to_radians();
        let mut wobble = [([0.0; 3], 0.0, 0.0); 3];
        for w in wobble.iter_mut() {
            let dir = [rng.jitter(1.0), rng.jitter(1.0), rng.jitter(1.0)];
            *w = (
                dir.map(|d| d * rng.range(2.0, 4.0)),
                rng.range(0.0, 6.3),
                rng.range(0.02, 0.06),
            );
        }
        Shape::Blob {
            c,
            r,
            cos: a.cos(),
            sin: a.sin(),
            wobble,
        }
    }

    fn tube(rng: &mut Rng, pts: &[V3], radii: &[f64], scale: f64) -> Shape {
        let s = rng.range(0.9, 1.1);
        let shift = [rng.jitter(4.0), rng.jitter(4.0), rng.jitter(4.0)];
        let pts = pts
            .iter()
            .map(|p| {
                [
                    p[0] * scale + shift[0] + rng.jitter(3.0),
                    p[1] * scale + shift[1] + rng.jitter(3.0),
                    p[2] * scale + shift[2],
                ]
            })
            .collect();
        Shape::Tube {
            pts,
            radii: radii.iter().map(|r| r * s * scale.sqrt()).collect(),
        }
    }

    /// True when `p` is inside.
    fn contains(&self, p: V3) -> bool {
        match self {
            Shape::Blob {
                c,
                r,
                cos,
                sin,
                wobble,
            } => {
                let d = sub(p, *c);
                if d[0].abs() > r[0].max(r[1]) * 1.3
                    || d[1].abs() > r[0].max(r[1]) * 1.3
                    || d[2].abs() > r[2] * 1.2
                {
                    return false;
                }
                // Into the organ's frame (rotation about z).
                let u = [cos * d[0] + sin * d[1], -sin * d[0] + cos * d[1], d[2]];
                let q = [u[0] / r[0], u[1] / r[1], u[2] / r[2]];
                let n2 = dot(q, q);
                if n2 > 1.44 {
                    return false;
                }
                let n = n2.sqrt().max(1e-9);
                let dir = q.map(|x| x / n);
                let bump: f64 = wobble
                    .iter()
                    .map(|(k, ph, a)| a * (dot(*k, dir) + ph).sin())
                    .sum();
                n < 1.0 + bump
            }
            Shape::Tube { pts, radii } => {
                for i in 0..pts.len() - 1 {
                    let (a, b) = (pts[i], pts[i + 1]);
                    let ab = sub(b, a);
                    let t = (dot(sub(p, a), ab) / dot(ab, ab)).clamp(0.0, 1.0);
                    let q = [a[0] + t * ab[0], a[1] + t * ab[1], a[2] + t * ab[2]];
                    let r = radii[i] + t * (radii[i + 1] - radii[i]);
                    let d = sub(p, q);
                    if dot(d, d) < r * r {
                        return true;
                    }
                }
                false
            }
        }
    }
}

/// A painted structure: shape, label (0 = unlabelled tissue) and HU.
struct Part {
    shape: Shape,
    label: u8,
    hu: f64,
}

/// The per-case anatomy.
struct Anatomy {
    /// Body ellipse semi-axes (x, y) and centre.
    body: (f64, f64),
    parts: Vec<Part>,
    /// Ribs start above this z.
    rib_z: f64,
}

fn anatomy(rng: &mut Rng) -> Anatomy {
    let s = rng.range(0.92, 1.08); // body habitus
    let mut parts = Vec::new();
    let hu = |base: f64, rng: &mut Rng| base + rng.jitter(12.0);
    // Unlabelled context first: lung bases, vertebra, paraspinal muscle, bowel.
    for side in [-1.0, 1.0] {
        let lung = Shape::blob(rng, [side * 70.0, -25.0, 130.0], [55.0, 60.0, 45.0], 0.0, s);
        parts.push(Part {
            shape: lung,
            label: 0,
            hu: -850.0,
        });
        let m = Shape::blob(rng, [side * 35.0, -82.0, 0.0], [24.0, 18.0, 300.0], 0.0, s);
        parts.push(Part {
            shape: m,
            label: 0,
            hu: 50.0,
        });
    }
    for _ in 0..6 {
        let c = [
            rng.jitter(60.0),
            rng.range(10.0, 60.0),
            rng.range(-70.0, 10.0),
        ];
        let rot = rng.jitter(90.0);
        let b = Shape::blob(rng, c, [22.0, 18.0, 20.0], rot, s);
        let h = hu(25.0, rng);
        parts.push(Part {
            shape: b,
            label: 0,
            hu: h,
        });
    }
    let gx = rng.jitter(40.0);
    let gas = Shape::blob(rng, [gx, 55.0, -40.0], [10.0, 8.0, 10.0], 0.0, s);
    parts.push(Part {
        shape: gas,
        label: 0,
        hu: -900.0,
    });
    let spine = Shape::Tube {
        pts: vec![[0.0, -55.0 * s, -400.0], [0.0, -55.0 * s, 400.0]],
        radii: vec![17.0 * s, 17.0 * s],
    };
    parts.push(Part {
        shape: spine,
        label: 0,
        hu: 380.0,
    });
    let post = Shape::Tube {
        pts: vec![[0.0, -82.0 * s, -400.0], [0.0, -82.0 * s, 400.0]],
        radii: vec![9.0 * s, 9.0 * s],
    };
    parts.push(Part {
        shape: post,
        label: 0,
        hu: 650.0,
    });

    // Organs, low priority first (later parts overwrite earlier ones).
    let organ =
        |rng: &mut Rng, parts: &mut Vec<Part>, label: u8, c: V3, r: V3, rot: f64, h: f64| {
            let shape = Shape::blob(rng, c, r, rot, s);
            let hv = h + rng.jitter(12.0);
            parts.push(Part {
                shape,
                label,
                hu: hv,
            });
        };
    organ(
        rng,
        &mut parts,
        7,
        [-55.0, 28.0, 55.0],
        [45.0, 33.0, 48.0],
        30.0,
        30.0,
    ); // stomach
    organ(
        rng,
        &mut parts,
        6,
        [62.0, 2.0, 60.0],
        [68.0, 78.0, 68.0],
        -10.0,
        60.0,
    ); // liver, right lobe
    organ(
        rng,
        &mut parts,
        6,
        [-8.0, 38.0, 75.0],
        [50.0, 32.0, 32.0],
        10.0,
        60.0,
    ); // liver, left lobe
    organ(
        rng,
        &mut parts,
        1,
        [-92.0, -35.0, 50.0],
        [22.0, 42.0, 50.0],
        -35.0,
        110.0,
    ); // spleen
    organ(
        rng,
        &mut parts,
        2,
        [60.0, -45.0, -10.0],
        [26.0, 22.0, 52.0],
        20.0,
        150.0,
    ); // kidney R
    organ(
        rng,
        &mut parts,
        3,
        [-60.0, -45.0, 2.0],
        [26.0, 22.0, 52.0],
        -20.0,
        150.0,
    ); // kidney L
    organ(
        rng,
        &mut parts,
        4,
        [52.0, 40.0, 8.0],
        [16.0, 16.0, 34.0],
        20.0,
        10.0,
    ); // gallbladder
    organ(
        rng,
        &mut parts,
        12,
        [36.0, -32.0, 58.0],
        [13.0, 7.0, 18.0],
        40.0,
        35.0,
    ); // adrenal R
    organ(
        rng,
        &mut parts,
        13,
        [-36.0, -30.0, 62.0],
        [12.0, 7.0, 18.0],
        -40.0,
        35.0,
    ); // adrenal L
       // Pancreas: head near the duodenum on the right, tail at the splenic hilum.
    let p = Shape::tube(
        rng,
        &[[18.0, 5.0, -5.0], [-15.0, -5.0, 10.0], [-72.0, -20.0, 25.0]],
        &[15.0, 12.0, 10.0],
        s,
    );
    let h = hu(100.0, rng);
    parts.push(Part {
        shape: p,
        label: 11,
        hu: h,
    });
    // Vessels last: they cut through everything.
    let pv = Shape::tube(
        rng,
        &[
            [38.0, 8.0, 38.0],
            [5.0, -5.0, 15.0],
            [-45.0, -25.0, 28.0],
            [-82.0, -32.0, 40.0],
        ],
        &[8.0, 7.0, 6.0, 6.0],
        s,
    );
    let h = hu(175.0, rng);
    parts.push(Part {
        shape: pv,
        label: 10,
        hu: h,
    });
    let ivc = Shape::tube(
        rng,
        &[
            [22.0, -30.0, -300.0],
            [22.0, -30.0, 40.0],
            [28.0, -25.0, 130.0],
        ],
        &[11.0, 12.0, 12.0],
        s,
    );
    let h = hu(160.0, rng);
    parts.push(Part {
        shape: ivc,
        label: 9,
        hu: h,
    });
    let ao = Shape::tube(
        rng,
        &[
            [-20.0, -33.0, -300.0],
            [-18.0, -35.0, 60.0],
            [-15.0, -40.0, 300.0],
        ],
        &[11.0, 12.0, 13.0],
        s,
    );
    let h = hu(230.0, rng);
    parts.push(Part {
        shape: ao,
        label: 8,
        hu: h,
    });
    let es = Shape::tube(
        rng,
        &[
            [-8.0, -40.0, 300.0],
            [-12.0, -32.0, 100.0],
            [-35.0, 5.0, 65.0],
        ],
        &[9.0, 9.0, 10.0],
        s,
    );
    let h = hu(40.0, rng);
    parts.push(Part {
        shape: es,
        label: 5,
        hu: h,
    });
    Anatomy {
        body: (
            148.0 * s * rng.range(0.95, 1.05),
            108.0 * s * rng.range(0.95, 1.05),
        ),
        parts,
        rib_z: 45.0 + rng.jitter(10.0),
    }
}

impl Anatomy {
    /// Label and HU (before noise) at world point `p`.
    fn sample(&self, p: V3) -> (u8, f64) {
        let (bx, by) = self.body;
        let e = (p[0] / bx).powi(2) + (p[1] / by).powi(2);
        if e >= 1.0 {
            return (0, -1000.0);
        }
        // Skin/subcutaneous fat, then an abdominal-wall muscle ring.
        if e > 0.86 {
            return (0, -100.0);
        }
        let mut out = (0u8, -90.0); // visceral fat
        if e > 0.78 {
            out = (0, 50.0);
            // Ribs: a bony band with gaps, only in the upper abdomen.
            if p[2] > self.rib_z && e > 0.80 && e < 0.84 && ((p[2] - self.rib_z) / 9.0).sin() > 0.2
            {
                return (0, 750.0);
            }
            return out;
        }
        for part in &self.parts {
            if part.shape.contains(p) {
                out = (part.label, part.hu);
            }
        }
        out
    }
}

/// An affine for `codes` (e.g. `LPS`) over a world box starting at `lo`
/// with per-world-axis spacing and shape; returns the affine and the
/// storage shape (voxel-axis order).
fn oriented_grid(codes: &str, lo: V3, spacing: V3, shape: [usize; 3]) -> (Affine, [usize; 3]) {
    let mut a = super::volume::identity();
    let mut out_shape = [0; 3];
    for (i, c) in codes.chars().enumerate() {
        let (w, sign) = match c {
            'R' => (0, 1.0),
            'L' => (0, -1.0),
            'A' => (1, 1.0),
            'P' => (1, -1.0),
            'S' => (2, 1.0),
            _ => (2, -1.0),
        };
        for r in 0..3 {
            a[r][i] = 0.0;
        }
        a[w][i] = sign * spacing[w];
        out_shape[i] = shape[w];
        a[w][3] = if sign > 0.0 {
            lo[w]
        } else {
            lo[w] + (shape[w] - 1) as f64 * spacing[w]
        };
    }
    (a, out_shape)
}

/// The storage orientation of case `index`.
pub fn case_orientation(cfg: &PhantomConfig, index: usize) -> &'static str {
    if !cfg.mixed_orientation {
        return "RAS";
    }
    ["RAS", "LPS", "RAS", "LAS", "RAS", "RPI"][index % 6]
}

/// Generates case `index` of the set described by `cfg`.
pub fn generate_case(cfg: &PhantomConfig, index: usize) -> PhantomCase {
    let mut rng = Rng::new(cfg.seed, index as u64);
    let anat = anatomy(&mut rng);
    // Drawn even when unused, so `jitter_grid` changes nothing else.
    let (sxy, sz) = (rng.range(0.95, 1.05), rng.range(0.9, 1.1));
    let jit = |n: usize, r: &mut Rng| ((n as f64) * r.range(0.94, 1.06)).round().max(8.0) as usize;
    let shape = [
        jit(cfg.shape[0], &mut rng),
        jit(cfg.shape[1], &mut rng),
        jit(cfg.shape[2], &mut rng),
    ];
    let (spacing, shape) = if cfg.jitter_grid {
        // Square pixels, as scanners make them.
        (
            [
                cfg.spacing[0] * sxy,
                cfg.spacing[0] * sxy,
                cfg.spacing[2] * sz,
            ],
            shape,
        )
    } else {
        (cfg.spacing, cfg.shape)
    };
    // Field of view: centred on the body in-plane (± a few cm), and on the
    // upper abdomen in z (kidneys to liver dome).
    let centre = [
        rng.jitter(15.0),
        rng.jitter(10.0) - 5.0,
        20.0 + rng.jitter(15.0),
    ];
    let lo = [0, 1, 2].map(|i| centre[i] - (shape[i] - 1) as f64 * spacing[i] / 2.0);
    let codes = case_orientation(cfg, index);
    let (affine, st_shape) = oriented_grid(codes, lo, spacing, shape);
    let hu_gain = rng.range(0.95, 1.05);
    let n = st_shape.iter().product::<usize>();
    let mut img = vec![0i16; n];
    let mut lab = vec![0u8; n];
    let [nx, ny, _] = st_shape;
    let noise_seed = mix(cfg.seed ^ mix(index as u64 + 1));
    img.par_chunks_mut(nx * ny)
        .zip(lab.par_chunks_mut(nx * ny))
        .enumerate()
        .for_each(|(z, (is, ls))| {
            for y in 0..ny {
                for x in 0..nx {
                    let ijk = [x as f64, y as f64, z as f64];
                    let p = super::volume::apply(&affine, ijk);
                    let (l, hu) = anat.sample(p);
                    // Noise is keyed by the world-grid position (orientation-free).
                    let g = [0, 1, 2].map(|w| ((p[w] - lo[w]) / spacing[w]).round() as u64);
                    let key = noise_seed ^ mix(g[0] | (g[1] << 20) | (g[2] << 40));
                    let texture = if l > 0 {
                        4.0 * (p[0] / 11.0).sin() * (p[1] / 13.0).cos()
                    } else {
                        0.0
                    };
                    let v = if hu <= -999.0 {
                        hu + 5.0 * gauss(key)
                    } else {
                        hu * hu_gain + texture + cfg.noise_hu * gauss(key)
                    };
                    let i = x + nx * y;
                    is[i] = v.round().clamp(-1024.0, 3071.0) as i16;
                    ls[i] = l;
                }
            }
        });
    PhantomCase {
        id: format!("case{index:03}"),
        image: Volume::new(st_shape, affine, Voxels::I16(img)),
        label: Volume::new(st_shape, affine, Voxels::U8(lab)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oriented_grids_cover_the_same_box() {
        let (a, s) = oriented_grid("LPS", [-10.0, -20.0, -30.0], [2.0, 3.0, 4.0], [5, 6, 7]);
        assert_eq!(s, [5, 6, 7]);
        let far = super::super::volume::apply(&a, [4.0, 5.0, 6.0]);
        assert_eq!(far, [-10.0, -20.0, -6.0]);
        let (a, _) = oriented_grid("RPI", [0.0; 3], [1.0; 3], [3, 3, 3]);
        assert_eq!(super::super::volume::apply(&a, [0.0; 3]), [0.0, 2.0, 2.0]);
    }
}
