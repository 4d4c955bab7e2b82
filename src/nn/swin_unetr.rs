//! SwinUNETR (Hatamizadeh et al. 2022), a port of MONAI's `monai/networks/nets/swin_unetr.py`
//! (1.6.1; line numbers below refer to that file) that keeps MONAI's state_dict names, numerics,
//! init distributions and quirks, plus the ≤1.4 PatchMerging order for old checkpoints.
//!
//! Layout conventions: images are `[B,C,D,H,W]`; the Swin stages work channels-last
//! `[B,D,H,W,C]`; attention windows are `[B·nW, n, C]`.

use super::attention;
use super::norm::{self, LayerNorm};
use super::ops::{self, Conv3dKernel};
use super::recompute::{self, Block, RecomputedGrads};
use super::window::WindowLayout;
use super::Error;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Result as CResult, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// PatchMerging neighbour order (swin_unetr.py:801-876; MONAI PR #8285 changed "merging" in 1.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Downsample {
    /// MONAI ≤ 1.4 "merging": slots 5 and 6 duplicate slots 2 and 3, so the (1,1,0) and (0,1,1)
    /// neighbours are never seen. Needed for checkpoints trained with MONAI ≤ 1.4.
    Legacy,
    /// MONAI ≥ 1.5 "merging" (the default): (0,0,0),(1,0,0),(0,1,0),(0,0,1),(1,1,0),(1,0,1),
    /// (0,1,1),(1,1,1) as (d,h,w) offsets.
    #[default]
    Merging,
    /// "mergingv2": `itertools.product(range(2), repeat=3)`, d-major, w fastest.
    Mergingv2,
}

impl Downsample {
    /// Slots of the 2×2×2 neighbourhood (flat index `d·4 + h·2 + w`) in concatenation order.
    fn order(self) -> [u32; 8] {
        match self {
            Downsample::Legacy => [0, 4, 2, 1, 5, 2, 1, 7],
            Downsample::Merging => [0, 4, 2, 1, 6, 5, 3, 7],
            Downsample::Mergingv2 => [0, 1, 2, 3, 4, 5, 6, 7],
        }
    }
}

fn default_feature_size() -> usize {
    24
}
fn default_depths() -> Vec<usize> {
    vec![2, 2, 2, 2]
}
fn default_heads() -> Vec<usize> {
    vec![3, 6, 12, 24]
}
fn default_window() -> usize {
    7
}
fn default_patch() -> usize {
    2
}
fn default_true() -> bool {
    true
}

/// SwinUNETR hyper-parameters, with MONAI's names and defaults (swin_unetr.py:66-100). Fixed to
/// MONAI's defaults and not configurable: 3D, qkv_bias, mlp_ratio 4, instance norm, no dropout,
/// no patch norm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwinUnetrConfig {
    /// Input image channels.
    pub in_channels: usize,
    /// Output classes (logit channels).
    pub out_channels: usize,
    /// Embedding width F (a multiple of 12); stages use F, 2F, 4F, 8F, 16F.
    #[serde(default = "default_feature_size")]
    pub feature_size: usize,
    /// Swin blocks per stage (4 stages).
    #[serde(default = "default_depths")]
    pub depths: Vec<usize>,
    /// Attention heads per stage.
    #[serde(default = "default_heads")]
    pub num_heads: Vec<usize>,
    /// Attention window edge (cubic).
    #[serde(default = "default_window")]
    pub window_size: usize,
    /// Patch-embedding edge; only 2 is supported (the decoder upsamples by 2 five times).
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// Add a residual conv block before each Swin stage (MONAI's SwinUNETR-v2).
    #[serde(default)]
    pub use_v2: bool,
    /// PatchMerging variant.
    #[serde(default)]
    pub downsample: Downsample,
    /// Layer-normalise (no affine) the hidden states fed to the decoder.
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// Gradient checkpointing (MONAI's `use_checkpoint`): each Swin block and each residual conv
    /// block keeps only its input for backward and is run again there. Trades about a third
    /// more time per train step for a fraction of the memory; no effect on the numbers. A
    /// training-time setting: never written to `model.json`, and ignored by a model without
    /// trainable variables.
    #[serde(default, skip_serializing)]
    pub use_checkpoint: bool,
}

impl SwinUnetrConfig {
    /// MONAI's defaults for the given channels (feature_size 24).
    pub fn new(in_channels: usize, out_channels: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            feature_size: default_feature_size(),
            depths: default_depths(),
            num_heads: default_heads(),
            window_size: default_window(),
            patch_size: default_patch(),
            use_v2: false,
            downsample: Downsample::default(),
            normalize: true,
            use_checkpoint: false,
        }
    }

    /// Checks the constraints MONAI enforces (swin_unetr.py:160-175) and ours.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Config(what));
        if self.feature_size == 0 || self.feature_size % 12 != 0 {
            return bad(format!(
                "feature_size must be a multiple of 12, got {}",
                self.feature_size
            ));
        }
        if self.depths.len() != 4 || self.num_heads.len() != 4 {
            return bad(format!(
                "depths and num_heads need 4 entries, got {:?} and {:?}",
                self.depths, self.num_heads
            ));
        }
        if self.patch_size != 2 {
            return bad(format!(
                "only patch_size 2 is supported, got {}",
                self.patch_size
            ));
        }
        if self.window_size < 2 {
            return bad(format!(
                "window_size must be at least 2, got {}",
                self.window_size
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return bad("in_channels and out_channels must be positive".into());
        }
        for (i, &h) in self.num_heads.iter().enumerate() {
            let dim = self.feature_size << i;
            if h == 0 || dim % h != 0 {
                return bad(format!(
                    "stage {} width {dim} is not divisible by {h} heads",
                    i + 1
                ));
            }
        }
        Ok(())
    }
}

/// A VarBuilder that also records every tensor it hands out under its full name, so a model can
/// be saved and its expected keys listed.
#[derive(Clone)]
pub(crate) struct Params<'a> {
    vb: VarBuilder<'a>,
    seen: Arc<Mutex<Vec<(String, Tensor)>>>,
}

impl<'a> Params<'a> {
    pub(crate) fn new(vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn pp(&self, s: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(s),
            seen: self.seen.clone(),
        }
    }

    fn get(&self, shape: &[usize], name: &str, init: Init) -> CResult<Tensor> {
        let t = self.vb.get_with_hints(shape, name, init)?;
        let prefix = self.vb.prefix();
        let full = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        self.seen
            .lock()
            .expect("params lock")
            .push((full, t.clone()));
        Ok(t)
    }

    /// PyTorch's default init for Linear/Conv weights and biases: kaiming_uniform(a=√5) is
    /// U(±1/√fan_in), and so is the bias.
    fn uniform(&self, shape: &[usize], name: &str, fan_in: usize) -> CResult<Tensor> {
        let b = 1.0 / (fan_in as f64).sqrt();
        self.get(shape, name, Init::Uniform { lo: -b, up: b })
    }

    pub(crate) fn take(&self) -> Vec<(String, Tensor)> {
        std::mem::take(&mut *self.seen.lock().expect("params lock"))
    }
}

/// `nn.Linear` applied over the last dim of a tensor of any rank.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(input: usize, output: usize, bias: bool, p: Params) -> CResult<Self> {
        let weight = p.uniform(&[output, input], "weight", input)?;
        let bias = if bias {
            Some(p.uniform(&[output], "bias", input)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let dims = x.dims().to_vec();
        let input = *dims.last().expect("rank ≥ 1");
        let rows = x.elem_count() / input;
        // [..., in] -> [N, in] × [in, out] -> [N, out] -> [..., out]
        let x = x.reshape((rows, input))?;
        let y = match &self.bias {
            Some(b) => ops::linear_with_bias(&x, &self.weight, b)?,
            None => super::matmul::matmul(&x, &self.weight.t()?)?,
        };
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = self.weight.dim(0)?;
        y.reshape(out)
    }
}

fn layer_norm(dim: usize, p: Params) -> CResult<LayerNorm> {
    let w = p.get(&[dim], "weight", Init::Const(1.0))?;
    let b = p.get(&[dim], "bias", Init::Const(0.0))?;
    Ok(LayerNorm::new(w, b))
}

/// Python's `slice(start, stop)` on a dim of length `n`, as a half-open range (negative indices
/// count from the end; `-0` is `0`). Needed to reproduce `compute_mask` for zero shifts.
fn py_slice(start: Option<isize>, stop: Option<isize>, n: usize) -> std::ops::Range<usize> {
    let n = n as isize;
    let fix = |i: isize| if i < 0 { (n + i).max(0) } else { i.min(n) };
    let s = start.map(fix).unwrap_or(0);
    let e = stop.map(fix).unwrap_or(n);
    (s as usize)..(e.max(s) as usize)
}

/// The shifted-window attention mask `[nW, n, n]` (0 or -100) for padded dims `dims`,
/// reproducing `compute_mask` (swin_unetr.py:879-916) including its behaviour for dims whose
/// shift is 0 (the third slice `[-0:]` then covers the whole dim).
fn compute_mask(dims: [usize; 3], ws: [usize; 3], shift: [usize; 3]) -> Vec<f32> {
    let [dp, hp, wp] = dims;
    let mut img = vec![0f32; dp * hp * wp];
    let slices = |n: usize, w: usize, s: usize| {
        let (w, s) = (w as isize, s as isize);
        [
            py_slice(None, Some(-w), n),
            py_slice(Some(-w), Some(-s), n),
            py_slice(Some(-s), None, n),
        ]
    };
    let mut cnt = 0f32;
    for sd in slices(dp, ws[0], shift[0]) {
        for sh in slices(hp, ws[1], shift[1]) {
            for sw in slices(wp, ws[2], shift[2]) {
                for d in sd.clone() {
                    for h in sh.clone() {
                        for w in sw.clone() {
                            img[(d * hp + h) * wp + w] = cnt;
                        }
                    }
                }
                cnt += 1.0;
            }
        }
    }
    let n = ws[0] * ws[1] * ws[2];
    let (nd, nh, nw) = (dp / ws[0], hp / ws[1], wp / ws[2]);
    let mut mask = Vec::with_capacity(nd * nh * nw * n * n);
    let mut win = Vec::with_capacity(n);
    for bd in 0..nd {
        for bh in 0..nh {
            for bw in 0..nw {
                win.clear();
                for d in 0..ws[0] {
                    for h in 0..ws[1] {
                        for w in 0..ws[2] {
                            let (z, y, x) = (bd * ws[0] + d, bh * ws[1] + h, bw * ws[2] + w);
                            win.push(img[(z * hp + y) * wp + x]);
                        }
                    }
                }
                for i in 0..n {
                    for j in 0..n {
                        mask.push(if win[j] != win[i] { -100.0 } else { 0.0 });
                    }
                }
            }
        }
    }
    mask
}

/// The `[w³, w³]` relative-position index of a cubic window of edge `w` (swin_unetr.py:545-566),
/// row-major.
fn relative_position_index(w: usize) -> Vec<u32> {
    let coords: Vec<[isize; 3]> = (0..w)
        .flat_map(|d| (0..w).flat_map(move |h| (0..w).map(move |x| [d, h, x])))
        .map(|[d, h, x]| [d as isize, h as isize, x as isize])
        .collect();
    let (wi, m) = (w as isize, 2 * w as isize - 1);
    let mut idx = Vec::with_capacity(coords.len() * coords.len());
    for a in &coords {
        for b in &coords {
            let r = |k: usize| a[k] - b[k] + wi - 1;
            idx.push((r(0) * m * m + r(1) * m + r(2)) as u32);
        }
    }
    idx
}

/// `get_window_size` (swin_unetr.py:476-500): a dim not larger than the window uses a window of
/// its own size and no shift.
fn effective_window(dims: [usize; 3], window: usize, shift: usize) -> ([usize; 3], [usize; 3]) {
    let mut ws = [window; 3];
    let mut sh = [shift; 3];
    for i in 0..3 {
        if dims[i] <= window {
            ws[i] = dims[i];
            sh[i] = 0;
        }
    }
    (ws, sh)
}

/// Window attention with a relative position bias (swin_unetr.py:503-629).
#[derive(Debug, Clone)]
struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    relative_position_bias_table: Tensor,
    /// Full `[w³·w³]` index of the configured window; sliced `[:n,:n]` for smaller windows.
    index: Vec<u32>,
    index_side: usize,
    num_heads: usize,
}

impl WindowAttention {
    fn new(dim: usize, num_heads: usize, window: usize, p: Params) -> CResult<Self> {
        let m = 2 * window - 1;
        // trunc_normal_(std=.02) truncates at ±2 (absolute), i.e. at 100σ: a plain normal.
        let table = p.get(
            &[m * m * m, num_heads],
            "relative_position_bias_table",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        Ok(Self {
            qkv: Linear::new(dim, 3 * dim, true, p.pp("qkv"))?,
            proj: Linear::new(dim, dim, true, p.pp("proj"))?,
            relative_position_bias_table: table,
            index: relative_position_index(window),
            index_side: window * window * window,
            num_heads,
        })
    }

    /// The bias `[heads, n, n]` from `index[:n, :n]` (swin_unetr.py:596-599; for windows smaller
    /// than configured this is the top-left block of the full index, not a smaller window's).
    fn bias(&self, n: usize) -> CResult<Tensor> {
        let side = self.index_side;
        let idx: Vec<u32> = (0..n)
            .flat_map(|i| self.index[i * side..i * side + n].to_vec())
            .collect();
        let dev = self.relative_position_bias_table.device();
        let idx = Tensor::from_vec(idx, n * n, dev)?;
        // [n·n, heads] -> [n, n, heads] -> [heads, n, n]
        self.relative_position_bias_table
            .index_select(&idx, 0)?
            .reshape((n, n, self.num_heads))?
            .permute((2, 0, 1))
    }

    /// x `[Bw, n, C]`; mask `[nW, n, n]` for shifted windows.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> CResult<Tensor> {
        let (bw, n, c) = x.dims3()?;
        let (h, hd) = (self.num_heads, c / self.num_heads);
        // [Bw,n,3C] -> [Bw,n,3,h,hd] (a view)
        let qkv = self.qkv.forward(x)?.reshape((bw, n, 3, h, hd))?;
        // bias [h,n,n] (+ mask [nW,n,n]), added in MONAI's order (swin_unetr.py:616-626)
        let bias = self.bias(n)?;
        // softmax(q·scale·kᵀ + bias + mask)·v -> [Bw,n,h,hd] -> [Bw,n,C]
        let y = attention::window_attention(&qkv, &bias, mask, (hd as f64).powf(-0.5))?
            .reshape((bw, n, c))?;
        self.proj.forward(&y)
    }
}

/// MONAI's MLPBlock in "swin" mode: Linear(C→4C) → GELU(erf) → Linear(4C→C).
#[derive(Debug, Clone)]
struct Mlp {
    linear1: Linear,
    linear2: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.linear2.forward(&ops::gelu(&self.linear1.forward(x)?)?)
    }
}

/// One Swin transformer block (swin_unetr.py:632-798).
#[derive(Debug, Clone)]
struct SwinBlock {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    mlp: Mlp,
    shifted: bool,
}

impl SwinBlock {
    fn new(dim: usize, heads: usize, window: usize, shifted: bool, p: Params) -> CResult<Self> {
        Ok(Self {
            norm1: layer_norm(dim, p.pp("norm1"))?,
            attn: WindowAttention::new(dim, heads, window, p.pp("attn"))?,
            norm2: layer_norm(dim, p.pp("norm2"))?,
            mlp: Mlp {
                linear1: Linear::new(dim, 4 * dim, true, p.pp("mlp.linear1"))?,
                linear2: Linear::new(4 * dim, dim, true, p.pp("mlp.linear2"))?,
            },
            shifted,
        })
    }

    /// x `[B,D,H,W,C]`; `ws`/`shift` are the layer's effective window and shift.
    fn forward(
        &self,
        x: &Tensor,
        ws: [usize; 3],
        shift: [usize; 3],
        mask: Option<&Tensor>,
    ) -> CResult<Tensor> {
        let (b, d, h, w, _) = x.dims5()?;
        let shift = if self.shifted { shift } else { [0; 3] };
        let shifted = shift.iter().any(|&s| s > 0);
        // norm, zero-pad to whole windows, cyclic shift, partition (swin_unetr.py:700-728), all
        // but the norm as one gather; attention; and the inverse gather.
        let layout = WindowLayout::new([b, d, h, w], ws, shift)?;
        let win = layout.partition(&self.norm1.forward(x)?)?;
        let win = self.attn.forward(&win, if shifted { mask } else { None })?;
        let y = layout.reverse(&win)?;
        let x = (x + y)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?)?
    }
}

/// 2×2×2 patch merging: `[B,D,H,W,C]` -> `[B,D/2,H/2,W/2,2C]` (swin_unetr.py:801-876).
#[derive(Debug, Clone)]
struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
    order: Tensor,
}

impl PatchMerging {
    fn new(dim: usize, variant: Downsample, p: Params) -> CResult<Self> {
        let order = Tensor::new(&variant.order(), p.vb.device())?;
        Ok(Self {
            norm: layer_norm(8 * dim, p.pp("norm"))?,
            reduction: Linear::new(8 * dim, 2 * dim, false, p.pp("reduction"))?,
            order,
        })
    }
}

impl Module for PatchMerging {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut x = x.clone();
        for i in 1..4 {
            if x.dim(i)? % 2 == 1 {
                x = x.pad_with_zeros(i, 0, 1)?;
            }
        }
        let (b, d, h, w, c) = x.dims5()?;
        let (d2, h2, w2) = (d / 2, h / 2, w / 2);
        // [B,D,H,W,C] -> [B,D/2,2,H/2,2,W/2,2,C] -> [B,D/2,H/2,W/2,2,2,2,C] -> [..,8,C]
        let x = x
            .reshape(vec![b, d2, 2, h2, 2, w2, 2, c])?
            .permute([0usize, 1, 3, 5, 2, 4, 6, 7])?
            .contiguous()?
            .reshape((b, d2, h2, w2, 8, c))?;
        // pick the 8 slots in the variant's order, concatenated along channels: [.., 8C]
        let x = x
            .index_select(&self.order, 4)?
            .reshape((b, d2, h2, w2, 8 * c))?;
        self.reduction.forward(&self.norm.forward(&x)?)
    }
}

/// One Swin stage: blocks alternating unshifted/shifted, then PatchMerging (swin_unetr.py:919-1068).
#[derive(Debug, Clone)]
struct BasicLayer {
    blocks: Vec<SwinBlock>,
    downsample: PatchMerging,
    window: usize,
}

impl BasicLayer {
    fn new(
        dim: usize,
        depth: usize,
        heads: usize,
        window: usize,
        variant: Downsample,
        p: Params,
    ) -> CResult<Self> {
        let blocks = (0..depth)
            .map(|i| SwinBlock::new(dim, heads, window, i % 2 == 1, p.pp(format!("blocks.{i}"))))
            .collect::<CResult<Vec<_>>>()?;
        let downsample = PatchMerging::new(dim, variant, p.pp("downsample"))?;
        Ok(Self {
            blocks,
            downsample,
            window,
        })
    }

    /// `[B,C,D,H,W]` -> `[B,2C,D/2,H/2,W/2]`; each block checkpointed when `ckpt` is given.
    fn forward(&self, x: &Tensor, ckpt: Option<&RecomputedGrads>) -> CResult<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        let (ws, shift) = effective_window([d, h, w], self.window, self.window / 2);
        // [B,C,D,H,W] -> [B,D,H,W,C]
        let mut x = x.permute((0, 2, 3, 4, 1))?.contiguous()?;
        let mask = if shift.iter().any(|&s| s > 0) {
            let padded = [0, 1, 2].map(|i| [d, h, w][i].div_ceil(ws[i]) * ws[i]);
            let n = ws.iter().product::<usize>();
            let m = compute_mask(padded, ws, shift);
            let nw = m.len() / (n * n);
            Some(Tensor::from_vec(m, (nw, n, n), x.device())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        for blk in &self.blocks {
            x = match ckpt {
                None => blk.forward(&x, ws, shift, mask.as_ref())?,
                Some(grads) => {
                    let (blk, mask) = (blk.clone(), mask.clone());
                    let block: Block = Arc::new(move |x| blk.forward(x, ws, shift, mask.as_ref()));
                    recompute::checkpoint(&x, block, grads)?
                }
            };
        }
        let x = self.downsample.forward(&x)?;
        // [B,D',H',W',C'] -> [B,C',D',H',W']
        x.permute((0, 4, 1, 2, 3))?.contiguous()
    }
}

/// MONAI's UnetResBlock with instance norm and LeakyReLU(0.01) (dynunet_block.py:25-111).
#[derive(Clone)]
struct UnetResBlock {
    conv1: Tensor,
    conv2: Tensor,
    conv3: Option<Tensor>,
    kernel: Arc<dyn Conv3dKernel>,
}

impl UnetResBlock {
    fn new(cin: usize, cout: usize, kernel: &Arc<dyn Conv3dKernel>, p: Params) -> CResult<Self> {
        let conv1 = p
            .pp("conv1.conv")
            .uniform(&[cout, cin, 3, 3, 3], "weight", cin * 27)?;
        let conv2 = p
            .pp("conv2.conv")
            .uniform(&[cout, cout, 3, 3, 3], "weight", cout * 27)?;
        let conv3 = if cin != cout {
            Some(
                p.pp("conv3.conv")
                    .uniform(&[cout, cin, 1, 1, 1], "weight", cin)?,
            )
        } else {
            None
        };
        Ok(Self {
            conv1,
            conv2,
            conv3,
            kernel: kernel.clone(),
        })
    }

    /// `forward`, checkpointed when `ckpt` is given.
    fn checkpointed(&self, x: &Tensor, ckpt: Option<&RecomputedGrads>) -> CResult<Tensor> {
        match ckpt {
            None => self.forward(x),
            Some(grads) => {
                let me = self.clone();
                recompute::checkpoint(x, Arc::new(move |x| me.forward(x)), grads)
            }
        }
    }
}

impl Module for UnetResBlock {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let y = ops::conv3d_k3(x, &self.conv1, &self.kernel)?;
        let y = norm::instance_norm_leaky_relu(&y)?;
        let y = ops::conv3d_k3(&y, &self.conv2, &self.kernel)?;
        // LeakyReLU(IN(y) + IN(conv3(x))), or LeakyReLU(IN(y) + x) without conv3
        match &self.conv3 {
            Some(w) => norm::residual_block_tail(&y, &ops::conv3d_1x1(x, w, None)?, true),
            None => norm::residual_block_tail(&y, x, false),
        }
    }
}

/// MONAI's UnetrUpBlock: ConvTranspose3d(k2,s2), concat with the skip, UnetResBlock
/// (unetr_block.py:22-86).
#[derive(Clone)]
struct UnetrUpBlock {
    transp_conv: Tensor,
    conv_block: UnetResBlock,
}

impl UnetrUpBlock {
    fn new(cin: usize, cout: usize, kernel: &Arc<dyn Conv3dKernel>, p: Params) -> CResult<Self> {
        // PyTorch's fan_in for a ConvTranspose weight [in,out,k,k,k] is out·k³.
        let transp_conv =
            p.pp("transp_conv.conv")
                .uniform(&[cin, cout, 2, 2, 2], "weight", cout * 8)?;
        let conv_block = UnetResBlock::new(2 * cout, cout, kernel, p.pp("conv_block"))?;
        Ok(Self {
            transp_conv,
            conv_block,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        skip: &Tensor,
        ckpt: Option<&RecomputedGrads>,
    ) -> CResult<Tensor> {
        // the upsampled tensor comes first (unetr_block.py:84)
        let cat = ops::conv_transpose3d_k2_cat(x, &self.transp_conv, skip)?;
        self.conv_block.checkpointed(&cat, ckpt)
    }
}

/// `proj_out` (swin_unetr.py:1258-1271): channel LayerNorm without affine.
fn proj_out(x: &Tensor, normalize: bool) -> CResult<Tensor> {
    if !normalize {
        return Ok(x.clone());
    }
    // [B,C,D,H,W] -> [B,D,H,W,C] -> LN -> [B,C,D,H,W]
    let y = norm::layer_norm(&x.permute((0, 2, 3, 4, 1))?.contiguous()?, None, None)?;
    y.permute((0, 4, 1, 2, 3))?.contiguous()
}

/// The Swin encoder (`swinViT`, swin_unetr.py:1071-1293).
#[derive(Clone)]
struct SwinTransformer {
    patch_w: Tensor,
    patch_b: Tensor,
    layers: Vec<BasicLayer>,
    layers_c: Option<Vec<UnetResBlock>>,
}

impl SwinTransformer {
    fn new(cfg: &SwinUnetrConfig, kernel: &Arc<dyn Conv3dKernel>, p: Params) -> CResult<Self> {
        let f = cfg.feature_size;
        let pe = p.pp("patch_embed.proj");
        let fan = cfg.in_channels * 8;
        let patch_w = pe.uniform(&[f, cfg.in_channels, 2, 2, 2], "weight", fan)?;
        let patch_b = pe.uniform(&[f], "bias", fan)?;
        let mut layers = Vec::new();
        let mut layers_c = Vec::new();
        for i in 0..4 {
            let dim = f << i;
            if cfg.use_v2 {
                let q = p.pp(format!("layers{}c.0.layer", i + 1));
                layers_c.push(UnetResBlock::new(dim, dim, kernel, q)?);
            }
            layers.push(BasicLayer::new(
                dim,
                cfg.depths[i],
                cfg.num_heads[i],
                cfg.window_size,
                cfg.downsample,
                p.pp(format!("layers{}.0", i + 1)),
            )?);
        }
        let layers_c = cfg.use_v2.then_some(layers_c);
        Ok(Self {
            patch_w,
            patch_b,
            layers,
            layers_c,
        })
    }

    /// The five hidden states fed to the decoder (normalised when `normalize`).
    fn forward(
        &self,
        x: &Tensor,
        normalize: bool,
        ckpt: Option<&RecomputedGrads>,
    ) -> CResult<Vec<Tensor>> {
        let mut h = ops::patch_embed_k2(x, &self.patch_w, &self.patch_b)?;
        let mut out = vec![proj_out(&h, normalize)?];
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(c) = &self.layers_c {
                h = c[i].checkpointed(&h, ckpt)?;
            }
            h = layer.forward(&h, ckpt)?;
            out.push(proj_out(&h, normalize)?);
        }
        Ok(out)
    }
}

/// SwinUNETR: Swin encoder + residual CNN encoder/decoder, logits at full resolution.
#[derive(Clone)]
pub struct SwinUnetr {
    cfg: SwinUnetrConfig,
    swin_vit: SwinTransformer,
    encoders: [UnetResBlock; 5],
    decoders: [UnetrUpBlock; 5],
    out_w: Tensor,
    out_b: Tensor,
    params: Vec<(String, Tensor)>,
    /// Set when `cfg.use_checkpoint`: where recomputed blocks leave their parameters' gradients.
    recomputed: Option<RecomputedGrads>,
}

impl std::fmt::Debug for SwinUnetr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: usize = self.params.iter().map(|(_, t)| t.elem_count()).sum();
        f.debug_struct("SwinUnetr")
            .field("cfg", &self.cfg)
            .field("parameters", &n)
            .finish()
    }
}

impl SwinUnetr {
    /// Builds the model, fetching every parameter from `vb` under MONAI's state_dict name
    /// (`swinViT.patch_embed.proj.weight`, `encoder1.layer.conv1.conv.weight`, …). With a
    /// `VarBuilder::from_varmap` the parameters are created with MONAI's init distributions.
    pub fn new(cfg: &SwinUnetrConfig, vb: VarBuilder) -> Result<Self, Error> {
        Self::with_kernel(cfg, vb, ops::default_conv3d_kernel())
    }

    /// [`SwinUnetr::new`] with a chosen 3×3×3 convolution implementation.
    pub fn with_kernel(
        cfg: &SwinUnetrConfig,
        vb: VarBuilder,
        kernel: Arc<dyn Conv3dKernel>,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        let p = Params::new(vb);
        let f = cfg.feature_size;
        let k = &kernel;
        let swin_vit = SwinTransformer::new(cfg, k, p.pp("swinViT"))?;
        // encoder1, encoder2, encoder3, encoder4, encoder10 (swin_unetr.py:206-258)
        let enc = |name: &str, cin: usize, cout: usize| {
            UnetResBlock::new(cin, cout, k, p.pp(format!("{name}.layer")))
        };
        let encoders = [
            enc("encoder1", cfg.in_channels, f)?,
            enc("encoder2", f, f)?,
            enc("encoder3", 2 * f, 2 * f)?,
            enc("encoder4", 4 * f, 4 * f)?,
            enc("encoder10", 16 * f, 16 * f)?,
        ];
        let dec = |name: &str, cin: usize, cout: usize| UnetrUpBlock::new(cin, cout, k, p.pp(name));
        let decoders = [
            dec("decoder5", 16 * f, 8 * f)?,
            dec("decoder4", 8 * f, 4 * f)?,
            dec("decoder3", 4 * f, 2 * f)?,
            dec("decoder2", 2 * f, f)?,
            dec("decoder1", f, f)?,
        ];
        let o = p.pp("out.conv.conv");
        let out_w = o.uniform(&[cfg.out_channels, f, 1, 1, 1], "weight", f)?;
        let out_b = o.uniform(&[cfg.out_channels], "bias", f)?;
        let params = p.take();
        let trainable = params.iter().any(|(_, t)| t.is_variable());
        let recomputed = (cfg.use_checkpoint && trainable)
            .then(|| RecomputedGrads::new(params.iter().map(|(_, t)| t.id())));
        Ok(Self {
            cfg: cfg.clone(),
            swin_vit,
            encoders,
            decoders,
            out_w,
            out_b,
            params,
            recomputed,
        })
    }

    /// The same network without autograd, for validation and inference during training: every
    /// parameter detached (sharing its storage, so optimiser steps taken later show through), no
    /// checkpointing, and the attention fused into one pass that keeps no `n×n` tensor.
    pub fn frozen(&self) -> Result<Self, Error> {
        let tensors: std::collections::HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(name, t)| (name.clone(), t.detach()))
            .collect();
        let mut cfg = self.cfg.clone();
        cfg.use_checkpoint = false;
        let vb = VarBuilder::from_tensors(tensors, self.out_w.dtype(), self.out_w.device());
        Self::with_kernel(&cfg, vb, self.encoders[0].kernel.clone())
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &SwinUnetrConfig {
        &self.cfg
    }

    /// Every parameter under its MONAI state_dict name, in construction order.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Checks an input shape `[B,C,D,H,W]`: channels, divisibility by 32, and the 1-voxel
    /// bottleneck that instance norm cannot normalise (MONAI raises in `encoder10` for 32³).
    pub fn check_input(&self, dims: &[usize]) -> Result<(), Error> {
        let err = |reason: String| {
            Err(Error::Input {
                shape: dims.to_vec(),
                reason,
            })
        };
        if dims.len() != 5 {
            return err("expected [B, C, D, H, W]".into());
        }
        if dims[1] != self.cfg.in_channels {
            return err(format!("expected {} input channels", self.cfg.in_channels));
        }
        let bad: Vec<usize> = (2..5)
            .filter(|&i| dims[i] == 0 || dims[i] % 32 != 0)
            .collect();
        if !bad.is_empty() {
            return err(format!(
                "spatial dims {bad:?} must be positive multiples of 2**5 = 32"
            ));
        }
        if dims[2..].iter().all(|&d| d == 32) {
            return err(
                "the bottleneck would be 1 voxel, and instance norm needs more than one \
                        spatial element (MONAI refuses 32³ too); use at least 64 in one dim"
                    .into(),
            );
        }
        Ok(())
    }

    /// Gradients of `loss` for every parameter. Use this rather than `loss.backward()`: with
    /// `use_checkpoint` the checkpointed blocks' parameter gradients arrive only through it.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore, Error> {
        let run = || {
            let mut grads = loss.backward()?;
            if let Some(r) = &self.recomputed {
                r.merge_into(&mut grads)?;
            }
            Ok::<_, candle_core::Error>(grads)
        };
        let grads = run();
        if let Some(r) = &self.recomputed {
            r.clear(); // nothing of a failed pass may leak into the next one
        }
        Ok(grads?)
    }

    /// Logits `[B, out_channels, D, H, W]` for an image `[B, in_channels, D, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        self.check_input(x.dims())?;
        Ok(self.forward_unchecked(x)?)
    }

    fn forward_unchecked(&self, x: &Tensor) -> CResult<Tensor> {
        let ckpt = self.recomputed.as_ref();
        if ckpt.is_some_and(|c| c.has_pending()) {
            candle_core::bail!(
                "SwinUNETR with use_checkpoint: the last backward pass left the checkpointed \
                 blocks' gradients uncollected; call `SwinUnetr::backward(&loss)` instead of \
                 `loss.backward()` so that they reach the optimiser"
            )
        }
        // 1. Swin encoder hidden states hs[0..5].
        let hs = self.swin_vit.forward(x, self.cfg.normalize, ckpt)?;
        let [e1, e2, e3, e4, e10] = &self.encoders;
        // 2. CNN encoders on the image and the hidden states (swin_unetr.py:394-402).
        let enc0 = e1.checkpointed(x, ckpt)?;
        let enc1 = e2.checkpointed(&hs[0], ckpt)?;
        let enc2 = e3.checkpointed(&hs[1], ckpt)?;
        let enc3 = e4.checkpointed(&hs[2], ckpt)?;
        let dec4 = e10.checkpointed(&hs[4], ckpt)?;
        // 3. decoders; hs[3] is used raw as the deepest skip.
        let [d5, d4, d3, d2, d1] = &self.decoders;
        let dec3 = d5.forward(&dec4, &hs[3], ckpt)?;
        let dec2 = d4.forward(&dec3, &enc3, ckpt)?;
        let dec1 = d3.forward(&dec2, &enc2, ckpt)?;
        let dec0 = d2.forward(&dec1, &enc1, ckpt)?;
        let out = d1.forward(&dec0, &enc0, ckpt)?;
        // 4. 1×1×1 output conv with bias.
        ops::conv3d_1x1(&out, &self.out_w, Some(&self.out_b))
    }

    /// Builds a model on the `Var`s of `varmap`, for training: names already in `varmap` are
    /// reused (shape-checked), the others are created with MONAI's init distributions.
    pub fn from_varmap(
        cfg: &SwinUnetrConfig,
        varmap: &candle_nn::VarMap,
        device: &Device,
    ) -> Result<Self, Error> {
        Self::new(cfg, VarBuilder::from_varmap(varmap, DType::F32, device))
    }
}
