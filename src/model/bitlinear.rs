//! A projection (q/k/v/o/gate/up/down): a plain linear map for Llama, a BitLinear for BitNet.
//!
//! Weight storage:
//! - [`ProjWeight::Dense`]: a full-precision `[out, in]` matrix. With ternary quantisation it is the
//!   latent weight, fake-quantised on every forward (transformers' online `AutoBitLinear`).
//! - [`ProjWeight::Packed`]: the unpacked ternary codes `T ∈ {-1,0,1}` `[out, in]` and the
//!   per-tensor `weight_scale`; `y = (x̂ · Tᵀ) · weight_scale` (offline `AutoBitLinear`).
//! - [`ProjWeight::Kernel`]: only the kernel's packed form (2 bits a weight) of either, for a
//!   model opened for CPU inference (`LoadOptions::pack_for_inference`): the f32 matrix is
//!   dropped at load, so the 2B model runs in ~3 GB instead of ~10. Such a projection runs the
//!   kernel and nothing else: its weights cannot be read, changed, saved or trained.
//!
//! Ternary inference of an f32 model on CPU runs the int8 × 2-bit kernel (`ternary_kernel.rs`): the activation is
//! quantised to int8 once per shared input, the weight packed once (kept while the weights do
//! not change), the sums exact in integers. Training on CPU in f32 runs the same kernel for the
//! forward product of a latent ternary weight (`train_ops::ternary_linear`, packed every step)
//! and float products for the straight-through backward. Other devices, other dtypes and
//! unquantised models use the f32 fake-quant path.

use super::config::Quantization;
use super::cpu_values::with_f32;
use super::mode::Mode;
use super::quant::{act_fake_quant, ste, weight_fake_quant, weight_inv_scale};
use super::ternary_kernel::{self as kernel, OutScale, PackedTernary, QuantRows};
use super::train_ops;
use super::vb::{Param, Role, Vb};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::sync::{Arc, RwLock};

/// The stored weight of a projection.
#[derive(Debug, Clone)]
pub(crate) enum ProjWeight {
    Dense(Param),
    Packed {
        codes: Param,
        scale: Param,
    },
    /// `checkpoint_packed`: the checkpoint held packed codes + `weight_scale` (not a latent matrix).
    Kernel {
        name: String,
        packed: Arc<PackedTernary>,
        checkpoint_packed: bool,
    },
}

/// One projection layer.
#[derive(Debug, Clone)]
pub struct Projection {
    pub(crate) weight: ProjWeight,
    pub(crate) quant: Quantization,
    /// Inference-only cache of the effective (fake-quantised) weight; cleared on every write.
    cache: Arc<RwLock<Option<Tensor>>>,
    /// Inference-only cache of the packed ternary weight for the CPU kernel; cleared likewise.
    packed: Arc<RwLock<Option<Arc<PackedTernary>>>>,
}

/// How the inference forward may treat the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjOpts {
    /// Reuse the quantised / packed weight between calls (off while the weights are trained).
    pub cache: bool,
    /// Ternary projections on CPU use the int8 × 2-bit kernel.
    pub kernel: bool,
}

impl ProjOpts {
    /// Neither cache nor kernel: the f32 fake-quant path on freshly quantised weights.
    pub const PLAIN: ProjOpts = ProjOpts { cache: false, kernel: false };
}

/// A projection input as [`Projection::prepare_input`] leaves it: the (fake-quantised) tensor,
/// or int8 rows for the kernel.
#[derive(Debug)]
pub enum Prepared {
    Float(Tensor),
    /// The raw input of a ternary projection trained on CPU: `train_ops::ternary_linear`
    /// quantises it inside its kernel product.
    Raw(Tensor),
    Int8 {
        rows: QuantRows,
        dims: Vec<usize>,
        dtype: DType,
        device: Device,
    },
}

impl Projection {
    /// `weight [out, in]` under `vb`, or for a packed checkpoint its ternary codes and
    /// `weight_scale`.
    /// With `vb.packs_for_inference()` (ternary f32 CPU models opened for inference) only the
    /// kernel's packed weight is kept ([`ProjWeight::Kernel`]): the same bits the kernel packs
    /// from the full weight on a first forward, so the same outputs.
    pub(crate) fn load(mut vb: Vb<'_>, shape: [usize; 2], packed: bool, quant: Quantization) -> anyhow::Result<Self> {
        let w = vb.param(&shape, "weight", if packed { Role::Codes } else { Role::Projection })?;
        let weight = if packed {
            ProjWeight::Packed { codes: w, scale: vb.param(&[1], "weight_scale", Role::Scale)? }
        } else {
            ProjWeight::Dense(w)
        };
        let mut p = Self { weight, quant, cache: Arc::new(RwLock::new(None)), packed: Arc::new(RwLock::new(None)) };
        if vb.packs_for_inference() && quant == Quantization::Ternary {
            p.weight = ProjWeight::Kernel {
                name: p.name().to_string(),
                packed: p.packed_weight(false)?,
                checkpoint_packed: packed,
            };
        }
        Ok(p)
    }

    /// The checkpoint name of the weight (`….weight`).
    pub(crate) fn name(&self) -> &str {
        match &self.weight {
            ProjWeight::Dense(p) => &p.name,
            ProjWeight::Packed { codes, .. } => &codes.name,
            ProjWeight::Kernel { name, .. } => name,
        }
    }

    /// The tensor that holds this projection's weight (latent matrix or ternary codes); an error
    /// for a model opened for inference with packed weights only.
    pub fn var(&self) -> Result<&Var> {
        match &self.weight {
            ProjWeight::Dense(p) => Ok(&p.var),
            ProjWeight::Packed { codes, .. } => Ok(&codes.var),
            ProjWeight::Kernel { name, .. } => Err(self.kernel_only(name)),
        }
    }

    /// Whether only the kernel's packed weight is kept ([`ProjWeight::Kernel`]).
    pub(crate) fn is_kernel_only(&self) -> bool {
        matches!(self.weight, ProjWeight::Kernel { .. })
    }

    /// How many values the checkpoint holds for this projection (what `Model::state_dict` writes:
    /// the latent matrix, or `u8 [out/4, in]` packed codes and a `weight_scale`).
    pub(crate) fn checkpoint_elems(&self) -> usize {
        let packed_elems = |out: usize, k: usize| out / 4 * k + 1;
        match &self.weight {
            ProjWeight::Dense(p) => p.var.elem_count(),
            ProjWeight::Packed { codes, .. } => {
                let d = codes.var.dims();
                packed_elems(d[0], d[1])
            }
            ProjWeight::Kernel { packed, checkpoint_packed: true, .. } => packed_elems(packed.out, packed.k),
            ProjWeight::Kernel { packed, .. } => packed.out * packed.k,
        }
    }

    /// For a projection kept only in the kernel's form: how many of its `out × in` weights are 0
    /// (the ternary codes the kernel holds), and that total.
    pub(crate) fn kernel_zeros(&self) -> Option<(u64, u64)> {
        match &self.weight {
            ProjWeight::Kernel { packed, .. } => Some((packed.zeros(), (packed.out * packed.k) as u64)),
            _ => None,
        }
    }

    /// Bytes held by the stored weight (not counting the inference caches).
    pub(crate) fn weight_bytes(&self) -> usize {
        let bytes = |p: &Param| p.var.elem_count() * p.var.dtype().size_in_bytes();
        match &self.weight {
            ProjWeight::Dense(p) => bytes(p),
            ProjWeight::Packed { codes, scale } => bytes(codes) + bytes(scale),
            ProjWeight::Kernel { packed, .. } => packed.bytes(),
        }
    }

    fn kernel_only(&self, name: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{name}: this model was opened for CPU inference with packed ternary weights only (the \
             eval-ppl, generate and analysis stages do that); its weights cannot be read, changed, saved \
             or trained — open it without LoadOptions::pack_for_inference"
        ))
    }

    /// Drop the cached quantised weight (call after the weight was changed).
    pub fn invalidate(&self) {
        *self.cache.write().expect("projection cache lock") = None;
        *self.packed.write().expect("projection cache lock") = None;
    }

    /// The weight in the kernel's packed layout with its output scaling (cached if `cache`).
    fn packed_weight(&self, cache: bool) -> anyhow::Result<Arc<PackedTernary>> {
        if cache {
            if let Some(w) = self.packed.read().expect("projection cache lock").as_ref() {
                return Ok(w.clone());
            }
        }
        let f32_values = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let w = Arc::new(match &self.weight {
            ProjWeight::Kernel { packed, .. } => return Ok(packed.clone()),
            ProjWeight::Dense(p) => {
                let w = p.var.as_tensor();
                let (out, k) = w.dims2()?;
                PackedTernary::from_latent(&f32_values(w)?, out, k, f32_values(&weight_inv_scale(w)?)?[0])?
            }
            ProjWeight::Packed { codes, scale } => {
                let (out, k) = codes.var.dims2()?;
                let ws = f32_values(scale.var.as_tensor())?[0];
                PackedTernary::pack(&f32_values(codes.var.as_tensor())?, out, k, OutScale::MulBy(ws))?
            }
        });
        if cache {
            *self.packed.write().expect("projection cache lock") = Some(w.clone());
        }
        Ok(w)
    }

    /// Whether the inference forward of `x` runs the int8 kernel: ternary, CPU, f32. A bf16
    /// model keeps transformers' bf16 numerics (`bf16(q/s) · bf16(T/s_w)` does not factor into
    /// an integer sum), so its parity with transformers in bf16 holds; load in f32 on CPU.
    fn uses_kernel(&self, x: &Tensor, mode: Mode, opts: ProjOpts) -> bool {
        (opts.kernel || matches!(self.weight, ProjWeight::Kernel { .. }))
            && mode == Mode::Infer
            && self.quant == Quantization::Ternary
            && x.device().is_cpu()
            && x.dtype() == DType::F32
    }

    /// The packed weight the inference kernel multiplies `x` by, when it runs (`uses_kernel`).
    pub(crate) fn kernel_weight(&self, x: &Tensor, mode: Mode, opts: ProjOpts) -> Result<Option<Arc<PackedTernary>>> {
        if !self.uses_kernel(x, mode, opts) {
            return Ok(None);
        }
        self.packed_weight(opts.cache).map(Some).map_err(candle_core::Error::wrap)
    }

    /// Whether the training forward of `x` runs the int8 kernel (`train_ops::ternary_linear`):
    /// a latent ternary weight, f32 on CPU, the kernel on.
    fn trains_with_kernel(&self, x: &Tensor, mode: Mode, opts: ProjOpts) -> bool {
        opts.kernel
            && mode == Mode::Train
            && self.quant == Quantization::Ternary
            && matches!(&self.weight, ProjWeight::Dense(p) if train_ops::fused(p.var.as_tensor()))
            && train_ops::fused(x)
    }

    /// The weight the inference forward multiplies by (quantised if ternary; a packed
    /// projection's codes without its per-tensor scale).
    pub(crate) fn effective_weight(&self) -> Result<Tensor> {
        self.infer_weight(false)
    }

    fn infer_weight(&self, cache: bool) -> Result<Tensor> {
        if cache {
            if let Some(w) = self.cache.read().expect("projection cache lock").as_ref() {
                return Ok(w.clone());
            }
        }
        let w = match (&self.weight, self.quant) {
            (ProjWeight::Dense(p), Quantization::Ternary) => weight_fake_quant(p.var.as_tensor())?,
            (ProjWeight::Dense(p), Quantization::None) => p.var.as_detached_tensor(),
            (ProjWeight::Packed { codes, .. }, _) => codes.var.as_detached_tensor(),
            (ProjWeight::Kernel { name, .. }, _) => return Err(self.kernel_only(name)),
        };
        let w = w.detach();
        if cache {
            *self.cache.write().expect("projection cache lock") = Some(w.clone());
        }
        Ok(w)
    }

    /// The input as this projection multiplies it: activation fake-quant for ternary (under a
    /// straight-through estimator in training), int8 rows for the CPU kernel, unchanged
    /// otherwise. Projections that read the same tensor (q/k/v, gate/up) share one call.
    pub fn prepare_input(&self, x: &Tensor, mode: Mode, opts: ProjOpts) -> Result<Prepared> {
        if self.uses_kernel(x, mode, opts) {
            let dims = x.dims().to_vec();
            let k = *dims.last().unwrap_or(&1);
            let quantise = |v: &[f32]| QuantRows::new(v, v.len() / k.max(1), k);
            // In place when the input is already contiguous f32 (the usual case), else a copy.
            let rows = match with_f32(x, quantise) {
                Some(rows) => rows,
                None => quantise(&x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            };
            return Ok(Prepared::Int8 { rows, dims, dtype: x.dtype(), device: x.device().clone() });
        }
        if self.trains_with_kernel(x, mode, opts) {
            return Ok(Prepared::Raw(x.clone()));
        }
        if let ProjWeight::Kernel { name, .. } = &self.weight {
            // Training, another device or dtype: only the packed weight is here.
            return Err(self.kernel_only(name));
        }
        Ok(Prepared::Float(match (self.quant, mode) {
            (Quantization::None, _) => x.clone(),
            (Quantization::Ternary, Mode::Infer) => act_fake_quant(x)?,
            (Quantization::Ternary, Mode::Train) if train_ops::fused(x) => train_ops::act_quant_ste(x)?,
            (Quantization::Ternary, Mode::Train) => ste(x, &act_fake_quant(x)?)?,
        }))
    }

    /// `x [.., in] → [.., out]`.
    pub fn forward(&self, x: &Tensor, mode: Mode, opts: ProjOpts) -> Result<Tensor> {
        self.apply(&self.prepare_input(x, mode, opts)?, mode, opts)
    }

    /// Multiply an input prepared by [`Projection::prepare_input`].
    pub fn apply(&self, x: &Prepared, mode: Mode, opts: ProjOpts) -> Result<Tensor> {
        match x {
            Prepared::Float(x) => self.apply_float(x, mode, opts.cache),
            Prepared::Raw(x) => match &self.weight {
                ProjWeight::Dense(p) => {
                    let w = p.var.as_tensor();
                    let s = weight_inv_scale(&w.detach())?.flatten_all()?.to_vec1::<f32>()?[0];
                    train_ops::ternary_linear(x, w, s)
                }
                ProjWeight::Packed { .. } => self.apply_float(&train_ops::act_quant_ste(x)?, mode, opts.cache),
                ProjWeight::Kernel { name, .. } => Err(self.kernel_only(name)),
            },
            Prepared::Int8 { rows, dims, dtype, device } => {
                let w = self.packed_weight(opts.cache).map_err(candle_core::Error::wrap)?;
                let y = kernel::matmul(rows, &w);
                let mut shape = dims.clone();
                *shape.last_mut().expect("non-scalar input") = w.out;
                Tensor::from_vec(y, shape, device)?.to_dtype(*dtype)
            }
        }
    }

    fn apply_float(&self, x: &Tensor, mode: Mode, cache: bool) -> Result<Tensor> {
        let ternary = self.quant == Quantization::Ternary;
        let w = match mode {
            Mode::Infer => self.infer_weight(cache)?,
            Mode::Train => match &self.weight {
                ProjWeight::Dense(p) if ternary && train_ops::fused(p.var.as_tensor()) => {
                    let s = weight_inv_scale(&p.var.as_detached_tensor())?.flatten_all()?.to_vec1::<f32>()?[0];
                    train_ops::weight_quant_ste(p.var.as_tensor(), s)?
                }
                ProjWeight::Dense(p) if ternary => ste(p.var.as_tensor(), &weight_fake_quant(p.var.as_tensor())?)?,
                ProjWeight::Dense(p) => p.var.as_tensor().clone(),
                ProjWeight::Packed { codes, .. } => codes.var.as_detached_tensor(),
                ProjWeight::Kernel { name, .. } => return Err(self.kernel_only(name)),
            },
        };
        let dims = x.dims().to_vec();
        let (out, inp) = w.dims2()?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
        let y = match &self.weight {
            ProjWeight::Packed { scale, .. } => y.broadcast_mul(&scale.var.as_detached_tensor())?,
            ProjWeight::Dense(_) | ProjWeight::Kernel { .. } => y,
        };
        let mut shape = dims;
        *shape.last_mut().expect("non-scalar input") = out;
        y.reshape(shape)
    }
}
