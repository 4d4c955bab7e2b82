//! Checkpoint I/O for [`SwinUnetr`]: reads MONAI/PyTorch state_dicts (`.pt`/`.pth` through
//! Candle's pickle reader, or safetensors), checks them against the model's parameters, and saves
//! safetensors with the config as JSON beside them.
//!
//! Accepted layouts: a bare state_dict, a dict holding it under `state_dict` (MONAI
//! research-contributions), and keys prefixed `module.` (DataParallel). The
//! `relative_position_index` buffers are recomputed, so they are ignored when present.

use super::swin_unetr::{SwinUnetr, SwinUnetrConfig};
use super::Error;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn io_err(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

/// Reads every tensor of a checkpoint onto the CPU, with `module.` prefixes removed and the
/// `state_dict` nesting resolved.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>, Error> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let tensors: Vec<(String, Tensor)> = if is_safetensors {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| io_err(path, e))?
            .into_iter()
            .collect()
    } else {
        match candle_core::pickle::read_all_with_key(path, Some("state_dict")) {
            Ok(t) if !t.is_empty() => t,
            _ => candle_core::pickle::read_all_with_key(path, None).map_err(|e| io_err(path, e))?,
        }
    };
    Ok(tensors
        .into_iter()
        .map(|(k, t)| {
            (
                k.strip_prefix("module.").map(str::to_string).unwrap_or(k),
                t,
            )
        })
        .collect())
}

/// A VarBuilder backend that hands out zero-cost broadcast zeros, to list a model's parameters
/// without allocating them.
struct ShapeOnly;

impl SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("ShapeOnly has no tensor `{name}`")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The parameter names and shapes of a model with configuration `cfg`, in MONAI's naming.
pub fn expected_parameters(cfg: &SwinUnetrConfig) -> Result<BTreeMap<String, Vec<usize>>, Error> {
    let vb = VarBuilder::from_backend(Box::new(ShapeOnly), DType::F32, Device::Cpu);
    let model = SwinUnetr::new(cfg, vb)?;
    Ok(model
        .named_parameters()
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect())
}

/// Checks `tensors` against `cfg`'s parameters: returns one line per missing key, unexpected key
/// and shape mismatch (empty when they fit).
pub fn check_state_dict(
    cfg: &SwinUnetrConfig,
    tensors: &HashMap<String, Tensor>,
) -> Result<Vec<String>, Error> {
    let expected = expected_parameters(cfg)?;
    let mut problems = Vec::new();
    for (k, shape) in &expected {
        match tensors.get(k) {
            None => problems.push(format!("missing key `{k}` {shape:?}")),
            Some(t) if t.dims() != shape.as_slice() => problems.push(format!(
                "shape mismatch for `{k}`: model {shape:?}, checkpoint {:?}",
                t.dims()
            )),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.contains_key(*k) && !k.ends_with("relative_position_index"))
        .collect();
    unexpected.sort();
    problems.extend(
        unexpected
            .into_iter()
            .map(|k| format!("unexpected key `{k}`")),
    );
    Ok(problems)
}

impl SwinUnetr {
    /// Loads a checkpoint (`.safetensors`, or a PyTorch `.pt`/`.pth` zip) onto `device` as f32.
    /// Fails listing every missing/unexpected key and shape mismatch.
    pub fn load(
        path: impl AsRef<Path>,
        cfg: &SwinUnetrConfig,
        device: &Device,
    ) -> Result<Self, Error> {
        let path = path.as_ref();
        let tensors = read_state_dict(path)?;
        Self::from_state_dict(tensors, cfg, device).map_err(|e| match e {
            Error::Mismatch { problems, .. } => Error::Mismatch {
                path: path.into(),
                problems,
            },
            e => e,
        })
    }

    /// Builds a model from named tensors (MONAI names, no `module.` prefix).
    pub fn from_state_dict(
        tensors: HashMap<String, Tensor>,
        cfg: &SwinUnetrConfig,
        device: &Device,
    ) -> Result<Self, Error> {
        let problems = check_state_dict(cfg, &tensors)?;
        if !problems.is_empty() {
            return Err(Error::Mismatch {
                path: PathBuf::new(),
                problems,
            });
        }
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        Self::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, device))
    }

    /// Loads a checkpoint as trainable `Var`s (for fine-tuning): returns the model and the
    /// `VarMap` holding its parameters (pass `varmap.all_vars()` to the optimiser).
    pub fn load_trainable(
        path: impl AsRef<Path>,
        cfg: &SwinUnetrConfig,
        device: &Device,
    ) -> Result<(Self, VarMap), Error> {
        let path = path.as_ref();
        let tensors = read_state_dict(path)?;
        Self::trainable_from_state_dict(tensors, cfg, device, DType::F32).map_err(|e| match e {
            Error::Mismatch { problems, .. } => Error::Mismatch {
                path: path.into(),
                problems,
            },
            e => e,
        })
    }

    /// [`SwinUnetr::from_state_dict`] with the parameters as `Var`s of `dtype` in a fresh
    /// `VarMap`.
    pub fn trainable_from_state_dict(
        tensors: HashMap<String, Tensor>,
        cfg: &SwinUnetrConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, VarMap), Error> {
        let problems = check_state_dict(cfg, &tensors)?;
        if !problems.is_empty() {
            return Err(Error::Mismatch {
                path: PathBuf::new(),
                problems,
            });
        }
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (k, t) in tensors {
                if k.ends_with("relative_position_index") {
                    continue;
                }
                let t = t.to_dtype(dtype)?.to_device(device)?;
                data.insert(k, Var::from_tensor(&t)?);
            }
        }
        let model = Self::new(cfg, VarBuilder::from_varmap(&varmap, dtype, device))?;
        Ok((model, varmap))
    }

    /// Writes the parameters to `path` (safetensors, MONAI names) and the config to `path` with
    /// the extension `json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let map: HashMap<String, Tensor> = self
            .named_parameters()
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).map_err(|e| io_err(path, e))?;
        let json_path = path.with_extension("json");
        let json = serde_json::to_string_pretty(self.config()).expect("config serialises");
        fs_err::write(&json_path, json).map_err(|e| io_err(&json_path, e))?;
        Ok(())
    }

    /// Loads a model saved by [`SwinUnetr::save`], reading the config beside it.
    pub fn load_saved(path: impl AsRef<Path>, device: &Device) -> Result<Self, Error> {
        let path = path.as_ref();
        let json_path = path.with_extension("json");
        let text = fs_err::read_to_string(&json_path).map_err(|e| io_err(&json_path, e))?;
        let cfg: SwinUnetrConfig =
            serde_json::from_str(&text).map_err(|e| io_err(&json_path, e))?;
        Self::load(path, &cfg, device)
    }
}
