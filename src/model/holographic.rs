//! Holographic attention: a causal, O(n·(w + R)) stand-in for a layer's softmax attention.
//!
//! The sequence is cut into regions of `window` (w) tokens. A query sees, exactly, the keys of its
//! own region up to itself, and one *summary* per completed earlier region, for the `regions` (R)
//! most recent of them. A summary stands for the region's w keys in the softmax by the second-order
//! cumulant of their logits: `log Σ_i exp(s_i) ≈ ln w + mean(s) + ½·var(s)`, with the mean and the
//! (diagonal) variance taken over the region's post-RoPE keys projected to a boundary space of
//! `boundary_dim` (r) dimensions, and carries the region's mean value. docs/holographic.md has the
//! maths and why the initialisation starts close to the pretrained attention.
//!
//! New parameters per layer, always f32: `boundary` `[kv_heads, head_dim, r]` (B), and per query
//! head `variance_scale` (γ, the cumulant's ½ is multiplied by it) and `bias` (b, added to every
//! summary logit).

use super::mode::Mode;
use super::vb::{Param, Role, Vb};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use serde_json::{json, Value};

/// The key in config.json that records a swapped model's holographic layers.
pub const CONFIG_KEY: &str = "rpt_holographic";

/// Which layers use holographic attention, and its sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoloConfig {
    /// Layer indices, ascending, without repeats.
    pub layers: Vec<usize>,
    /// Region length w: the exact local window.
    pub window: usize,
    /// Summaries a query sees: the R most recent completed regions.
    pub regions: usize,
    /// Boundary dimension r (even, ≤ head_dim).
    pub boundary_dim: usize,
}

impl HoloConfig {
    /// Checks the sizes against the model's.
    pub fn validate(&self, num_layers: usize, head_dim: usize) -> Result<()> {
        if self.layers.is_empty() {
            bail!("holographic attention needs at least one layer");
        }
        if let Some(&l) = self.layers.iter().find(|&&l| l >= num_layers) {
            bail!("layer {l} does not exist: the model has layers 0..{}", num_layers.saturating_sub(1));
        }
        if self.layers.windows(2).any(|p| p[0] >= p[1]) {
            bail!("layers {:?} must be ascending without repeats", self.layers);
        }
        if self.window == 0 || self.regions == 0 {
            bail!("window ({}) and regions ({}) must be at least 1", self.window, self.regions);
        }
        if self.boundary_dim < 2 || !self.boundary_dim.is_multiple_of(2) || self.boundary_dim > head_dim {
            bail!(
                "boundary_dim {} must be even and between 2 and head_dim {head_dim} (it keeps whole RoPE planes)",
                self.boundary_dim
            );
        }
        Ok(())
    }

    pub fn to_json(&self) -> Value {
        json!({ "layers": self.layers, "window": self.window, "regions": self.regions, "boundary_dim": self.boundary_dim })
    }

    /// The `rpt_holographic` block of a config.json, if present.
    pub fn from_json(v: &Value) -> Result<Self> {
        let field = |k: &str| -> Result<&Value> {
            v.get(k).ok_or_else(|| anyhow::anyhow!("{CONFIG_KEY}.{k} is missing (written by swap-attention)"))
        };
        let uint = |k: &str| -> Result<usize> {
            field(k)?.as_u64().map(|n| n as usize).ok_or_else(|| anyhow::anyhow!("{CONFIG_KEY}.{k} is not an integer"))
        };
        let layers = field("layers")?
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| anyhow::anyhow!("{CONFIG_KEY}.layers is not a list of layer indices"))?;
        Ok(Self { layers, window: uint("window")?, regions: uint("regions")?, boundary_dim: uint("boundary_dim")? })
    }
}

/// One layer's holographic parameters.
#[derive(Debug, Clone)]
pub struct Holo {
    /// B `[kv_heads, head_dim, r]`.
    pub(crate) boundary: Param,
    /// γ `[heads]`.
    pub(crate) variance_scale: Param,
    /// b `[heads]`.
    pub(crate) bias: Param,
    pub(crate) window: usize,
    pub(crate) regions: usize,
}

impl Holo {
    /// The three tensors under `vb` (`model.layers.{l}.self_attn.holographic`).
    pub(crate) fn load(
        mut vb: Vb<'_>,
        cfg: &HoloConfig,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            boundary: vb.param(&[kv_heads, head_dim, cfg.boundary_dim], "boundary", Role::Holographic)?,
            variance_scale: vb.param(&[heads], "variance_scale", Role::Holographic)?,
            bias: vb.param(&[heads], "bias", Role::Holographic)?,
            window: cfg.window,
            regions: cfg.regions,
        })
    }

    pub(crate) fn params(&self) -> [&Param; 3] {
        [&self.boundary, &self.variance_scale, &self.bias]
    }

    /// Attention output `[b, heads, t, d]` (f32) for queries `q [b, heads, t, d]` at the last `t`
    /// of `T` positions and keys/values `k, v [b, kv_heads, T, d]`, all after RoPE.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let (b, nh, t, d) = q.dims4()?;
        let (_, nkv, total, _) = k.dims4()?;
        let rep = nh / nkv;
        let (w, nsum) = (self.window, self.regions);
        let nr = total.div_ceil(w);
        let padded = nr * w;
        let dev = q.device();
        let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
        // Queries sit at positions T−t..T: rows before them are zeros whose outputs are dropped.
        let q = q.pad_with_zeros(2, total - t, padded - total)?;
        let k = k.pad_with_zeros(2, 0, padded - total)?;
        let v = v.pad_with_zeros(2, 0, padded - total)?;
        let scale = (d as f64).powf(-0.5);
        let boundary = self.boundary.value(mode); // [nkv, d, r]
        let r = boundary.dim(2)?;
        let boundary = boundary.unsqueeze(0)?.broadcast_as((b, nkv, d, r))?;

        // Exact attention within each region (causal inside it).
        let qb = q.reshape((b, nh, nr, w, d))?;
        let kb = repeat_heads(&k.reshape((b, nkv, nr, w, d))?, rep)?;
        let vb = repeat_heads(&v.reshape((b, nkv, nr, w, d))?, rep)?;
        let local = (bmm(&qb, &kb.transpose(3, 4)?)? * scale)?;
        let local = local.broadcast_add(&local_mask(w, dev)?)?;

        // Region summaries in the boundary space: mean and variance of the projected keys, mean
        // value. The last region may be partial (zero padding); no query ever sees it.
        let kp = bmm(&k, &boundary)?;
        let kp = kp.reshape((b, nkv, nr, w, r))?;
        let mean = kp.mean_keepdim(3)?;
        let var = kp.broadcast_sub(&mean)?.sqr()?.mean(3)?; // [b, nkv, nr, r]
        let mean = mean.squeeze(3)?;
        let vmean = v.reshape((b, nkv, nr, w, d))?.mean(3)?; // [b, nkv, nr, d]
                                                             // For query region k, slots s = 0..R hold regions k−R+s (front-padded: slot invalid < 0).
        let idx: Vec<u32> = (0..nr).flat_map(|k| (0..nsum).map(move |s| (k + s) as u32)).collect();
        let idx = Tensor::from_vec(idx, nr * nsum, dev)?;
        let unfold = |x: &Tensor| -> candle_core::Result<Tensor> {
            let last = x.dim(3)?;
            let x = x.pad_with_zeros(2, nsum, 0)?.index_select(&idx, 2)?;
            repeat_heads(&x.reshape((b, nkv, nr, nsum, last))?, rep)
        };
        let (mean, var, vmean) = (unfold(&mean)?, unfold(&var)?, unfold(&vmean)?);

        // Query in the boundary space, per kv group: [b, nh, nr, w, r].
        let qp = bmm(&q.reshape((b, nkv, rep * padded, d))?, &boundary)?;
        let qp = qp.reshape((b, nh, nr, w, r))?;
        let s_mean = bmm(&qp, &mean.transpose(3, 4)?)?;
        let s_var = bmm(&qp.sqr()?, &var.transpose(3, 4)?)?;
        let per_head = |p: &Tensor| p.reshape((1, nh, 1, 1, 1));
        let gamma = per_head(&self.variance_scale.value(mode))?;
        let bias = per_head(&self.bias.value(mode))?;
        let summary = ((s_mean * scale)? + (s_var * (0.5 * scale * scale))?.broadcast_mul(&gamma)?)?;
        let summary = (summary + (w as f64).ln())?.broadcast_add(&bias)?;
        let summary = summary.broadcast_add(&summary_mask(nr, nsum, dev)?)?;

        // One softmax over [own region | summaries].
        let scores = Tensor::cat(&[&local, &summary], 4)?;
        let p = match mode {
            Mode::Infer => candle_nn::ops::softmax_last_dim(&scores)?,
            Mode::Train => candle_nn::ops::softmax(&scores, D::Minus1)?,
        };
        let out = bmm(&p.narrow(4, 0, w)?, &vb)?;
        let out = (out + bmm(&p.narrow(4, w, nsum)?, &vmean)?)?;
        out.reshape((b, nh, padded, d))?.narrow(2, total - t, t)
    }
}

/// Batched matmul over any number of leading dims (candle's kernels take at most two), as one
/// 3-d product.
fn bmm(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    let n = ad.len();
    let batch: usize = ad[..n - 2].iter().product();
    let (m, k, p) = (ad[n - 2], ad[n - 1], bd[n - 1]);
    let out = a.contiguous()?.reshape((batch, m, k))?.matmul(&b.contiguous()?.reshape((batch, k, p))?)?;
    let mut shape = ad[..n - 2].to_vec();
    shape.extend([m, p]);
    out.reshape(shape)
}

/// `[b, kv, a, c, e] → [b, kv·rep, a, c, e]`, kv head `j` serving query heads `j·rep .. j·rep+rep`.
fn repeat_heads(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return x.contiguous();
    }
    let (b, kv, a, c, e) = x.dims5()?;
    x.unsqueeze(2)?.expand((b, kv, rep, a, c, e))?.reshape((b, kv * rep, a, c, e))
}

/// `[w, w]`: 0 where key ≤ query inside a region, −inf after.
fn local_mask(w: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..w).flat_map(|i| (0..w).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(m, (w, w), dev)
}

/// `[nr, 1, R]`: slot s of region k is region k−R+s, −inf where that is before the sequence.
fn summary_mask(nr: usize, nsum: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> =
        (0..nr).flat_map(|k| (0..nsum).map(move |s| if k + s < nsum { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(m, (nr, 1, nsum), dev)
}

/// The initial boundary projection of one kv head: the r/2 RoPE planes (dims p and p + d/2 in
/// the rotate-half layout) whose query and key weight rows carry the most energy, as a 0/1
/// selection `[d, r]`. Selecting whole planes commutes with RoPE, so the boundary space keeps the
/// exact logit contribution of the planes kept. `wq [heads_in_group·d, hidden]`, `wk [d, hidden]`.
pub fn init_boundary(wq: &[Vec<f32>], wk: &[Vec<f32>], d: usize, r: usize) -> Vec<f32> {
    let half = d / 2;
    let energy = |rows: &[Vec<f32>], dim: usize| -> f64 {
        rows.iter().skip(dim).step_by(d).map(|row| row.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).sum()
    };
    let mut planes: Vec<(usize, f64)> = (0..half)
        .map(|p| {
            let q = energy(wq, p) + energy(wq, p + half);
            let k = energy(wk, p) + energy(wk, p + half);
            (p, (q * k).sqrt())
        })
        .collect();
    // Most energy first; ties by plane index (deterministic).
    planes.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept: Vec<usize> = planes.iter().take(r / 2).map(|p| p.0).collect();
    kept.sort_unstable();
    let mut out = vec![0f32; d * r];
    for (i, &p) in kept.iter().enumerate() {
        out[p * r + i] = 1.0;
        out[(p + half) * r + r / 2 + i] = 1.0;
    }
    out
}

/// Hands out one layer's initial holographic tensors by name.
struct InitSource {
    boundary: Option<Tensor>,
    heads: usize,
}

impl super::vb::Source for InitSource {
    fn get(&mut self, name: &str, shape: &[usize], _: Role) -> Result<Tensor> {
        let dev = Device::Cpu;
        Ok(match name.rsplit('.').next() {
            Some("boundary") => self.boundary.take().ok_or_else(|| anyhow::anyhow!("{name} asked twice"))?,
            Some("variance_scale") => Tensor::ones(self.heads, DType::F32, &dev)?,
            Some("bias") => Tensor::zeros(self.heads, DType::F32, &dev)?,
            _ => bail!("{name}: not a holographic tensor"),
        }
        .reshape(shape)?)
    }
}

/// A layer's holographic parameters initialised from its effective query and key weights
/// (`wq [heads·d, hidden]`, `wk [kv_heads·d, hidden]`): B selects each kv group's most energetic
/// RoPE planes, γ = 1 (the cumulant's ½ exactly), b = 0. Named under `prefix`.
pub(crate) fn init_layer(
    prefix: &str,
    hc: &HoloConfig,
    wq: &Tensor,
    wk: &Tensor,
    heads: usize,
    kv_heads: usize,
    device: &Device,
) -> Result<Holo> {
    let d = wq.dim(0)? / heads;
    let rep = heads / kv_heads;
    let (wq, wk) = (wq.to_dtype(DType::F32)?.to_vec2::<f32>()?, wk.to_dtype(DType::F32)?.to_vec2::<f32>()?);
    let mut boundary = Vec::with_capacity(kv_heads * d * hc.boundary_dim);
    for g in 0..kv_heads {
        let q_rows = &wq[g * rep * d..(g + 1) * rep * d];
        let k_rows = &wk[g * d..(g + 1) * d];
        boundary.extend(init_boundary(q_rows, k_rows, d, hc.boundary_dim));
    }
    let boundary = Tensor::from_vec(boundary, (kv_heads, d, hc.boundary_dim), &Device::Cpu)?;
    let mut src = InitSource { boundary: Some(boundary), heads };
    let mut root = Vb::root(&mut src);
    let mut holo = Holo::load(root.pp(prefix), hc, heads, kv_heads, d)?;
    for p in [&mut holo.boundary, &mut holo.variance_scale, &mut holo.bias] {
        p.var = candle_core::Var::from_tensor(&p.var.as_tensor().to_device(device)?)?;
    }
    Ok(holo)
}
