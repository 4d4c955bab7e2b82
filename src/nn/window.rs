//! Swin's window layout as one row gather: zero-pad to whole windows, cyclic shift, partition
//! into windows (swin_unetr.py:410-441, 700-728), and the inverse (reverse, shift back, crop).
//!
//! Written with tensor ops this is up to seven copies of the tokens each way (three pads, three
//! rolls, a permute), and Candle keeps every one of them until backward is done, though none is
//! needed there. Each direction is a gather of whole C-channel rows by a precomputed index, and
//! the gradient of one is the other's gather; padded positions read zeros and get no gradient.

use std::sync::Arc;

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_data::with_slices;

/// Marks a padded window position: it reads zero.
const PAD: u32 = u32::MAX;

/// Where every window token comes from, for one (batch, grid, window, shift).
#[derive(Clone, Debug)]
pub(crate) struct WindowLayout {
    /// `[B,D,H,W]` of the token grid.
    grid: [usize; 4],
    /// Windows (`B·nW`) and tokens per window.
    windows: usize,
    per_window: usize,
    /// Window row → grid row (or [`PAD`]).
    from_grid: Arc<Vec<u32>>,
    /// Grid row → window row.
    to_grid: Arc<Vec<u32>>,
}

impl WindowLayout {
    /// The layout of `[B,D,H,W,·]` tokens in windows of `ws` after a cyclic shift by `-shift`
    /// (MONAI's `torch.roll(x, shifts=-shift)` before attention).
    pub(crate) fn new(grid: [usize; 4], ws: [usize; 3], shift: [usize; 3]) -> Result<Self> {
        let [b, d, h, w] = grid;
        let dims = [d, h, w];
        let padded: [usize; 3] = std::array::from_fn(|i| dims[i].div_ceil(ws[i]) * ws[i]);
        let rows = b * padded.iter().product::<usize>();
        if b * d * h * w >= PAD as usize || rows >= PAD as usize {
            candle_core::bail!("window layout: {grid:?} has too many tokens")
        }
        let counts: [usize; 3] = std::array::from_fn(|i| padded[i] / ws[i]);
        let mut from_grid = Vec::with_capacity(rows);
        let mut to_grid = vec![PAD; b * d * h * w];
        // Window rows in `window_partition` order: b, window (d,h,w), token in window (d,h,w).
        for bb in 0..b {
            for wd in 0..counts[0] {
                for wh in 0..counts[1] {
                    for ww in 0..counts[2] {
                        for a in 0..ws[0] {
                            for e in 0..ws[1] {
                                for f in 0..ws[2] {
                                    let at = [wd * ws[0] + a, wh * ws[1] + e, ww * ws[2] + f];
                                    // rolled[p] = padded[(p + shift) mod P]
                                    let q: [usize; 3] =
                                        std::array::from_fn(|i| (at[i] + shift[i]) % padded[i]);
                                    let src = if (0..3).all(|i| q[i] < dims[i]) {
                                        let t = ((bb * d + q[0]) * h + q[1]) * w + q[2];
                                        to_grid[t] = from_grid.len() as u32;
                                        t as u32
                                    } else {
                                        PAD
                                    };
                                    from_grid.push(src);
                                }
                            }
                        }
                    }
                }
            }
        }
        debug_assert!(to_grid.iter().all(|&r| r != PAD));
        let per_window = ws.iter().product();
        Ok(Self {
            grid,
            windows: rows / per_window,
            per_window,
            from_grid: Arc::new(from_grid),
            to_grid: Arc::new(to_grid),
        })
    }

    /// Tokens `[B,D,H,W,C]` → windows `[B·nW, n, C]`.
    pub(crate) fn partition(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(4)?;
        if x.dims()[..4] != self.grid {
            candle_core::bail!(
                "window partition: {:?} is not a {:?} grid",
                x.dims(),
                self.grid
            )
        }
        let rows = x.reshape((self.grid.iter().product::<usize>(), c))?;
        let out = gather(&rows, &self.from_grid, &self.to_grid)?;
        out.reshape((self.windows, self.per_window, c))
    }

    /// Windows `[B·nW, n, C]` → tokens `[B,D,H,W,C]` (shifted back, padding dropped).
    pub(crate) fn reverse(&self, win: &Tensor) -> Result<Tensor> {
        let (nw, n, c) = win.dims3()?;
        if (nw, n) != (self.windows, self.per_window) {
            candle_core::bail!(
                "window reverse: {:?} is not {} windows of {}",
                win.dims(),
                self.windows,
                self.per_window
            )
        }
        let rows = win.reshape((nw * n, c))?;
        let [b, d, h, w] = self.grid;
        gather(&rows, &self.to_grid, &self.from_grid)?.reshape((b, d, h, w, c))
    }
}

/// `out[r] = x[index[r]]` (zeros where [`PAD`]) over rows of `x` `[R,C]`; `inverse` is the
/// inverse map (each x row is read at most once), used for the gradient.
fn gather(x: &Tensor, index: &Arc<Vec<u32>>, inverse: &Arc<Vec<u32>>) -> Result<Tensor> {
    if super::fused::applies(x) {
        let op = RowGather {
            index: index.clone(),
            inverse: inverse.clone(),
        };
        return x.contiguous()?.apply_op1(op);
    }
    gather_by_index_select(x, index)
}

/// [`gather`] on any device: index_select from the rows plus one zero row (its backward is
/// index_add).
fn gather_by_index_select(x: &Tensor, index: &[u32]) -> Result<Tensor> {
    let (r, c) = x.dims2()?;
    let padded = Tensor::cat(&[x, &Tensor::zeros((1, c), x.dtype(), x.device())?], 0)?;
    let idx: Vec<u32> = index
        .iter()
        .map(|&i| if i == PAD { r as u32 } else { i })
        .collect();
    padded.index_select(&Tensor::new(idx, x.device())?, 0)
}

struct RowGather {
    index: Arc<Vec<u32>>,
    inverse: Arc<Vec<u32>>,
}

fn gather_rows<T: candle_core::WithDType>(x: &[T], index: &[u32], c: usize) -> Vec<T> {
    let mut out = vec![T::zero(); index.len() * c];
    out.par_chunks_mut(c * 256)
        .zip(index.par_chunks(256))
        .for_each(|(o, idx)| {
            for (o, &i) in o.chunks_exact_mut(c).zip(idx) {
                if i != PAD {
                    let i = i as usize;
                    o.copy_from_slice(&x[i * c..(i + 1) * c]);
                }
            }
        });
    out
}

impl candle_core::CustomOp1 for RowGather {
    fn name(&self) -> &'static str {
        "window-gather"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, c) = l.shape().dims2()?;
        if self.inverse.len() != rows {
            candle_core::bail!(
                "window-gather: {rows} rows, index for {}",
                self.inverse.len()
            )
        }
        let out = with_slices!("window-gather", [(x, s, l)], gather_rows(x, &self.index, c));
        Ok((out, Shape::from((self.index.len(), c))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gather(&g.detach(), &self.inverse, &self.index)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::ops::tests::{check_grads, flat, max_diff, randn};

    /// MONAI's steps one by one (pad, roll, window_partition), as tensor ops.
    fn reference_partition(x: &Tensor, ws: [usize; 3], shift: [usize; 3]) -> Tensor {
        let (b, d, h, w, c) = x.dims5().unwrap();
        let mut y = x.clone();
        let dims = [d, h, w];
        let mut p = [0; 3];
        for i in 0..3 {
            let pad = (ws[i] - dims[i] % ws[i]) % ws[i];
            y = y.pad_with_zeros(i + 1, 0, pad).unwrap();
            p[i] = dims[i] + pad;
        }
        for i in 0..3 {
            y = y.roll(-(shift[i] as i32), i + 1).unwrap();
        }
        let [a, e, f] = ws;
        y.reshape(vec![b, p[0] / a, a, p[1] / e, e, p[2] / f, f, c])
            .unwrap()
            .permute([0usize, 1, 3, 5, 2, 4, 6, 7])
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b * (p[0] / a) * (p[1] / e) * (p[2] / f), a * e * f, c))
            .unwrap()
    }

    #[test]
    fn gather_equals_pad_roll_partition_and_reverse_inverts_it() {
        // 2 batches, a 5×4×3 grid in 3×2×2 windows (padding on two axes), 3 channels.
        let x = randn(&[2, 5, 4, 3, 3], 31);
        let ws = [3, 2, 2];
        for shift in [[0, 0, 0], [1, 1, 1], [2, 0, 1]] {
            let layout = WindowLayout::new([2, 5, 4, 3], ws, shift).unwrap();
            let win = layout.partition(&x).unwrap();
            let want = reference_partition(&x, ws, shift);
            assert_eq!(win.dims(), want.dims());
            assert_eq!(max_diff(&flat(&win), &flat(&want)), 0.0);
            assert_eq!(
                max_diff(&flat(&layout.reverse(&win).unwrap()), &flat(&x)),
                0.0
            );
            // Both directions are linear maps; their gradients against finite differences.
            check_grads(&[x.clone()], &|t| layout.partition(&t[0]).unwrap(), 1e-6);
            let w = randn(want.dims(), 32);
            check_grads(&[w], &|t| layout.reverse(&t[0]).unwrap(), 1e-6);
        }
    }

    #[test]
    fn the_index_select_path_gives_the_same_rows_and_gradients() {
        let x = randn(&[1, 5, 4, 3, 2], 33);
        let layout = WindowLayout::new([1, 5, 4, 3], [3, 2, 2], [1, 1, 1]).unwrap();
        let rows = x.reshape((60, 2)).unwrap();
        let fused = gather(&rows, &layout.from_grid, &layout.to_grid).unwrap();
        let generic = gather_by_index_select(&rows, &layout.from_grid).unwrap();
        assert_eq!(max_diff(&flat(&fused), &flat(&generic)), 0.0);
        check_grads(
            &[rows],
            &|t| gather_by_index_select(&t[0], &layout.from_grid).unwrap(),
            1e-6,
        );
    }
}
