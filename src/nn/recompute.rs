//! Gradient checkpointing (MONAI's `use_checkpoint`): a block's forward keeps none of its
//! intermediate tensors; its backward runs the block again from the saved input and
//! differentiates that.
//!
//! Candle has no such op, and a custom op's backward can return gradients only for the op's own
//! inputs, not for the parameters the block uses. So the op takes the block's input as its one
//! argument and hands the parameters' gradients out through a [`RecomputedGrads`] store, which
//! [`super::SwinUnetr::backward`] adds to the loss's [`GradStore`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};

use super::carried::{attach1, Backward1};

/// A block to checkpoint: a pure function of its input (and of parameters it holds).
pub(crate) type Block = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// Parameter gradients produced by recomputed blocks during a backward pass, waiting to be added
/// to that pass's [`GradStore`].
#[derive(Clone, Default)]
pub(crate) struct RecomputedGrads {
    params: Arc<HashSet<TensorId>>,
    pending: Arc<Mutex<Vec<(TensorId, Tensor)>>>,
}

impl RecomputedGrads {
    /// A store for the gradients of `params` (other gradients are dropped at once).
    pub(crate) fn new(params: impl IntoIterator<Item = TensorId>) -> Self {
        Self {
            params: Arc::new(params.into_iter().collect()),
            pending: Arc::default(),
        }
    }

    /// Whether a backward pass left gradients that nobody collected.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.lock().expect("recompute lock").is_empty()
    }

    /// Adds every pending gradient to `grads` (summing with what is there), emptying the store.
    pub(crate) fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock().expect("recompute lock"));
        for (id, g) in pending {
            let sum = match grads.get_id(id) {
                Some(have) => (have + g)?,
                None => g,
            };
            grads.insert_id(id, sum);
        }
        Ok(())
    }

    /// Drops pending gradients (a forward without a matching `backward`, e.g. an aborted step).
    pub(crate) fn clear(&self) {
        self.pending.lock().expect("recompute lock").clear();
    }
}

/// `block(x)` whose graph keeps only `x` and the result; backward recomputes `block`.
pub(crate) fn checkpoint(x: &Tensor, block: Block, grads: &RecomputedGrads) -> Result<Tensor> {
    // Forward on a detached input: the block's graph hangs off the parameters only, and is
    // freed as soon as the detached result below outlives it.
    let y = block(&x.detach())?.detach();
    // An op on an untracked input (the image) is left out of the graph, and the block's
    // parameters with it: track the input so that backward reaches the op.
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.into_inner()
    };
    let backward = Recompute {
        block,
        grads: grads.clone(),
    };
    attach1(&x, y, backward)
}

/// Backward of [`checkpoint`]: runs the block again and differentiates it.
struct Recompute {
    block: Block,
    grads: RecomputedGrads,
}

impl Backward1 for Recompute {
    fn name(&self) -> &'static str {
        "recompute"
    }

    fn backward(&self, x: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let input = Var::from_tensor(&x.detach())?;
        let y = (self.block)(input.as_tensor())?;
        // d(sum(y ⊙ g)) is the vector-Jacobian product the outer backward asks for.
        let mut inner = y.mul(&g.detach())?.sum_all()?.backward()?;
        let dx = inner.remove(input.as_tensor());
        let mut pending = self.grads.pending.lock().expect("recompute lock");
        for id in self.grads.params.iter() {
            if let Some(gp) = inner.get_id(*id) {
                pending.push((*id, gp.clone()));
            }
        }
        Ok(dx)
    }
}
