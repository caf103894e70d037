//! The gated MLP: `down(sub_norm(act(gate(x)) ⊙ up(x)))`; relu² + `ffn_sub_norm` for BitNet,
//! SiLU without sub-norm for Llama.

use super::bitlinear::{ProjOpts, Projection};
use super::config::{Activation, ModelConfig, Quantization, WeightFormat};
use super::cpu_values::with_f32;
use super::mlp_kernel::{self, MlpWeights};
use super::mode::Mode;
use super::norm::RmsNorm;
use super::train_ops;
use super::vb::Vb;
use candle_core::{DType, Result, Tensor};

/// The MLP of one layer.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate_proj: Projection,
    pub(crate) up_proj: Projection,
    pub(crate) down_proj: Projection,
    pub(crate) sub_norm: Option<RmsNorm>,
    pub(crate) activation: Activation,
}

impl Mlp {
    /// `{gate,up,down}_proj` and (BitNet) `ffn_sub_norm` under `vb` (`model.layers.{l}.mlp`), in
    /// this order (random initialisation draws them in load order).
    pub(crate) fn load(mut vb: Vb<'_>, cfg: &ModelConfig, quant: Quantization) -> anyhow::Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let packed = cfg.weight_format == WeightFormat::Packed;
        let mut proj = |name: &str, shape| Projection::load(vb.pp(name), shape, packed, quant);
        let (gate_proj, up_proj, down_proj) =
            (proj("gate_proj", [f, h])?, proj("up_proj", [f, h])?, proj("down_proj", [h, f])?);
        let sub_norm =
            if cfg.is_bitnet() { Some(RmsNorm::load(vb.pp("ffn_sub_norm"), f, cfg.rms_norm_eps)?) } else { None };
        Ok(Self { gate_proj, up_proj, down_proj, sub_norm, activation: cfg.activation })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode, proj: ProjOpts) -> Result<Tensor> {
        match self.forward_by_blocks(x, mode, proj)? {
            Some(y) => Ok(y),
            None => self.forward_ops(x, mode, proj),
        }
    }

    /// The MLP op by op.
    fn forward_ops(&self, x: &Tensor, mode: Mode, proj: ProjOpts) -> Result<Tensor> {
        let xq = self.gate_proj.prepare_input(x, mode, proj)?; // shared by gate and up
        let g = self.gate_proj.apply(&xq, mode, proj)?;
        let u = self.up_proj.apply(&xq, mode, proj)?;
        if self.activation == Activation::Relu2 && train_ops::fused(&g) && train_ops::fused(&u) {
            // One pass instead of three, the same values.
            let h = train_ops::relu2_mul(&g, &u)?;
            return self.down(h, mode, proj);
        }
        let g = match self.activation {
            Activation::Relu2 => g.relu()?.sqr()?,
            // torch evaluates SiLU of bf16 in f32 and rounds once.
            Activation::Silu => candle_nn::ops::silu(&g.to_dtype(DType::F32)?)?.to_dtype(g.dtype())?,
        };
        self.down((g * u)?, mode, proj)
    }

    /// BitNet's MLP on CPU with the ternary kernel, token block by token block
    /// (`mlp_kernel.rs`: the same bits, its intermediates kept in cache); `None` where it does
    /// not apply: another model, device, dtype or mode, or too few tokens to give every thread
    /// a block (generation keeps the op-by-op path, whose kernel splits the weight rows).
    fn forward_by_blocks(&self, x: &Tensor, mode: Mode, proj: ProjOpts) -> Result<Option<Tensor>> {
        let Some(norm) = &self.sub_norm else { return Ok(None) };
        let dims = x.dims().to_vec();
        let hidden = *dims.last().unwrap_or(&0);
        let m = x.elem_count() / hidden.max(1);
        if self.activation != Activation::Relu2
            || !train_ops::fused(x)
            || m < mlp_kernel::BLOCK_TOKENS * rayon::current_num_threads()
        {
            return Ok(None);
        }
        let weight = |p: &Projection| p.kernel_weight(x, mode, proj);
        let (Some(gate), Some(up), Some(down)) =
            (weight(&self.gate_proj)?, weight(&self.up_proj)?, weight(&self.down_proj)?)
        else {
            return Ok(None);
        };
        let gain = norm.weight.value(mode);
        let y = with_f32(x, |x| {
            with_f32(&gain, |gain| {
                let w = MlpWeights { gate: &gate, up: &up, down: &down, norm: gain, eps: norm.eps as f32 };
                mlp_kernel::forward(x, m, hidden, &w)
            })
        });
        let Some(Some(y)) = y else { return Ok(None) };
        let mut shape = dims;
        *shape.last_mut().expect("non-scalar input") = down.out;
        Tensor::from_vec(y, shape, x.device()).map(Some)
    }

    /// `down(sub_norm(h))`.
    fn down(&self, h: Tensor, mode: Mode, proj: ProjOpts) -> Result<Tensor> {
        let h = match &self.sub_norm {
            Some(n) => n.forward(&h, mode)?,
            None => h,
        };
        self.down_proj.forward(&h, mode, proj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::causal_lm::Model;
    use crate::model::config::{Arch, WeightFormat};
    use crate::model::io::LoadOptions;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    /// The block-by-block MLP gives the op-by-op MLP's bits: latent weights (absmean scales), a
    /// packed checkpoint (weight_scale), packed-only inference weights; a whole block, a
    /// partial last block, several threads; ffn 160 pads the down projection's last block.
    #[test]
    fn blocks_give_the_op_by_op_bits() {
        let mut packed_cfg = ModelConfig::tiny(Arch::Bitnet, 40, 64, 160, 1, 4, 2);
        packed_cfg.weight_format = WeightFormat::Packed;
        let latent_cfg = ModelConfig::tiny(Arch::Bitnet, 40, 64, 160, 1, 4, 2);
        let opts = |pack| LoadOptions { pack_for_inference: pack, ..LoadOptions::default() };
        let models = [
            ("latent", Model::random(&latent_cfg, 3, &opts(false)).unwrap()),
            ("packed checkpoint", Model::random(&packed_cfg, 4, &opts(false)).unwrap()),
            ("packed for inference", Model::random(&latent_cfg, 3, &opts(true)).unwrap()),
        ];
        let proj = ProjOpts { cache: true, kernel: true };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (name, model) in &models {
            let mlp = &model.layers[0].mlp;
            for (threads, m) in [(1, 32), (1, 70), (3, 100)] {
                let mut rng = crate::rng::SplitMix64::new(m as u64);
                let x: Vec<f32> = (0..m * 64).map(|_| rng.normal() as f32).collect();
                let x = Tensor::from_vec(x, (1, m, 64), &Device::Cpu).unwrap();
                let run = || (mlp.forward_by_blocks(&x, Mode::Infer, proj), mlp.forward_ops(&x, Mode::Infer, proj));
                let (blocks, ops) = if threads == 1 { run() } else { pool.install(run) };
                let blocks = blocks.unwrap().unwrap_or_else(|| panic!("{name}, {m} tokens: blocks did not run"));
                let ops = ops.unwrap();
                assert_eq!(blocks.dims(), ops.dims());
                assert_eq!(bits(&blocks), bits(&ops), "{name}, {m} tokens on {threads} threads");
            }
            // Fewer tokens than a block per thread (generation): the op-by-op path.
            let one = Tensor::ones((1, 1, 64), DType::F32, &Device::Cpu).unwrap();
            assert!(mlp.forward_by_blocks(&one, Mode::Infer, proj).unwrap().is_none());
        }
    }
}
