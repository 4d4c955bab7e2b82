//! Attaching a result computed outside the autograd graph to the graph, with a backward of our
//! own.
//!
//! Many ops here compute their output on detached tensors (a gemm kernel, a fused loop, a
//! recomputed block) and need Candle to record exactly one node for it, whose backward they
//! supply. Candle's custom ops expect the forward to be computed inside `cpu_fwd`/`cuda_fwd`
//! from raw storage; [`attach1`], [`attach2`] and [`attach3`] instead hand the finished result
//! in, and the op's forward returns it. The op takes the result out of its slot, so the graph
//! holds one copy of it, not two.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// The backward of a one-input node: `g` is the gradient of the node's output; returns the
/// input's gradient.
pub(crate) trait Backward1: Send + Sync + 'static {
    /// The node's name in Candle's graph.
    fn name(&self) -> &'static str;
    fn backward(&self, a: &Tensor, g: &Tensor) -> Result<Option<Tensor>>;
}

/// The backward of a two-input node.
pub(crate) trait Backward2: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn backward(
        &self,
        a: &Tensor,
        b: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)>;
}

/// The backward of a three-input node.
pub(crate) trait Backward3: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;
}

/// `y` as the output of a node over `a` whose backward is `backward`; `y` itself when `a` is
/// not tracked. `y` must be contiguous and on `a`'s device.
pub(crate) fn attach1(a: &Tensor, y: Tensor, backward: impl Backward1) -> Result<Tensor> {
    if !a.track_op() {
        return Ok(y);
    }
    a.apply_op1(Attached::new(y, backward))
}

/// `y` as the output of a node over `(a, b)`; `y` itself when neither input is tracked.
pub(crate) fn attach2(
    a: &Tensor,
    b: &Tensor,
    y: Tensor,
    backward: impl Backward2,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        return Ok(y);
    }
    a.apply_op2(b, Attached::new(y, backward))
}

/// `y` as the output of a node over `(a, b, c)`; `y` itself when no input is tracked.
pub(crate) fn attach3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    y: Tensor,
    backward: impl Backward3,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() && !c.track_op() {
        return Ok(y);
    }
    a.apply_op3(b, c, Attached::new(y, backward))
}

/// The custom op: the result waiting to be returned by the forward, and the backward.
struct Attached<B> {
    y: Mutex<Option<Tensor>>,
    backward: B,
}

impl<B> Attached<B> {
    fn new(y: Tensor, backward: B) -> Self {
        Self {
            y: Mutex::new(Some(y)),
            backward,
        }
    }

    fn take(&self) -> Result<Tensor> {
        let Some(y) = self.y.lock().expect("attached result lock").take() else {
            candle_core::bail!("attached result already used")
        };
        Ok(y)
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(s), Some((0, _))) => {
                Ok((s.try_clone(layout)?, layout.shape().clone()))
            }
            _ => candle_core::bail!("attached result must be a contiguous CPU tensor"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.take()?;
        let (storage, layout) = y.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cuda(s), Some((0, _))) => {
                Ok((s.try_clone(layout)?, layout.shape().clone()))
            }
            _ => candle_core::bail!("attached result must be a contiguous CUDA tensor"),
        }
    }
}

impl<B: Backward1> candle_core::CustomOp1 for Attached<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(&self, a: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        self.backward.backward(a, g)
    }
}

impl<B: Backward2> candle_core::CustomOp2 for Attached<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward.backward(a, b, g)
    }
}

impl<B: Backward3> candle_core::CustomOp3 for Attached<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward.backward(a, b, c, g)
    }
}
