//! The causal LM: embedding → blocks → final norm → LM head (tied or not).
//!
//! [`Model::build`] is the top of the load tree: it names the top-level tensors (`model.*`,
//! `lm_head`) and hands each layer its prefix. Loading, random initialisation and the expected
//! checkpoint layout (io.rs) all come from it.

use super::bitlinear::{ProjOpts, ProjWeight, Projection};
use super::block::{Block, BlockCtx};
use super::config::{ModelConfig, Quantization, WeightFormat};
use super::embedding::Embedding;
use super::holographic::HoloConfig;
use super::hooks::{apply, HookPoint, Hooks};
use super::kv_cache::KvCache;
use super::mode::Mode;
use super::norm::RmsNorm;
use super::pack::pack_tensor;
use super::rope::Rope;
use super::train_ops;
use super::vb::{Source, Vb};
use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// transformers' inner model (`BitNetModel` / `LlamaModel`: embedding, layers, final norm), the
/// prefix of every tensor but the LM head.
const BODY: &str = "model";

/// A BitNet b1.58 or Llama causal language model.
#[derive(Debug, Clone)]
pub struct Model {
    pub(crate) cfg: ModelConfig,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) quant: Quantization,
    pub(crate) embed: Embedding,
    /// `None` = tied to the embedding.
    pub(crate) lm_head: Option<Embedding>,
    pub(crate) layers: Vec<Block>,
    pub(crate) norm: RmsNorm,
    pub(crate) rope: Rope,
    /// Whether inference may cache quantised weights (off once parameters were handed out).
    pub(crate) weight_cache: Arc<AtomicBool>,
    /// Whether ternary inference on CPU runs the int8 × 2-bit kernel (default; see bitlinear.rs).
    pub(crate) ternary_kernel: Arc<AtomicBool>,
    /// Directory the model was loaded from (tokenizer files are copied from there on save).
    pub(crate) source_dir: Option<PathBuf>,
}

impl Model {
    /// A model whose tensors come from `src`, named as the checkpoint names them. The load order
    /// is the order random initialisation draws in: embedding, (final norm), LM head, then the
    /// layers — keep it, or seeded models change.
    pub(crate) fn build(
        src: &mut dyn Source,
        cfg: ModelConfig,
        quant: Quantization,
        dtype: DType,
        device: &Device,
        pack_for_inference: bool,
    ) -> anyhow::Result<Self> {
        let mut vb = Vb::root_packing(src, pack_for_inference);
        let (v, h, eps) = (cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps);
        let embed = Embedding::load(vb.pp(BODY).pp("embed_tokens"), v, h)?;
        let norm = RmsNorm::load(vb.pp(BODY).pp("norm"), h, eps)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(Embedding::load(vb.pp("lm_head"), v, h)?) };
        let mut body = vb.pp(BODY);
        let mut layers_vb = body.pp("layers");
        let layers =
            (0..cfg.num_layers).map(|l| Block::load(layers_vb.pp(l), l, &cfg, quant)).collect::<anyhow::Result<_>>()?;
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, dtype, device)?;
        Ok(Model {
            cfg,
            dtype,
            device: device.clone(),
            quant,
            embed,
            lm_head,
            layers,
            norm,
            rope,
            weight_cache: Arc::new(AtomicBool::new(true)),
            ternary_kernel: Arc::new(AtomicBool::new(true)),
            source_dir: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn quantization(&self) -> Quantization {
        self.quant
    }
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
    pub fn weight_format(&self) -> WeightFormat {
        self.cfg.weight_format
    }
    /// Directory the model was loaded from, if any.
    pub fn source_dir(&self) -> Option<&std::path::Path> {
        self.source_dir.as_deref()
    }

    /// All-position logits `[b, t, vocab]` (f32) for token ids `[b, t]` (u32), inference path.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.run(ids, Mode::Infer, None, None)
    }

    /// As [`Model::forward`], running `hooks` at every residual point.
    pub fn forward_with_hooks(&self, ids: &Tensor, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        self.run(ids, Mode::Infer, None, Some(hooks))
    }

    /// Incremental forward: appends `ids [b, t]` to `cache` and returns their logits.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache, hooks: Option<&mut Hooks<'_>>) -> Result<Tensor> {
        self.run(ids, Mode::Infer, Some(cache), hooks)
    }

    /// Training forward: only ops with a backward, straight-through estimators for both
    /// quantisers. Same logits as [`Model::forward`].
    pub fn forward_train(&self, ids: &Tensor) -> Result<Tensor> {
        self.run(ids, Mode::Train, None, None)
    }

    /// The training loss of `ids [b, t]` against `targets [b, t]` (u32; `train_ops::IGNORE`
    /// skips a position; next-token targets: `loss::next_token_targets`): the mean negative
    /// log-likelihood, differentiable. On CPU in f32 the LM head and the loss are one op
    /// (`train_ops::head_cross_entropy`), so the `[b·t, V]` logits never become a graph node;
    /// the value is that of `cross_entropy(forward_train(ids), targets)`.
    pub fn train_loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let h = self.hidden(ids, Mode::Train, None, None)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).matrix(Mode::Train);
        if train_ops::fused(&h) && train_ops::fused(&head) {
            return train_ops::head_cross_entropy(&h, &head, targets);
        }
        super::loss::cross_entropy(&self.head(&h, Mode::Train)?, targets)
    }

    /// Training forward with hooks (interventions are part of the graph).
    pub fn forward_train_with_hooks(&self, ids: &Tensor, hooks: &mut Hooks<'_>) -> Result<Tensor> {
        self.run(ids, Mode::Train, None, Some(hooks))
    }

    /// The final-norm hidden states `[b, t, hidden]` (model dtype), without the LM head: for
    /// callers that project onto the vocabulary in chunks (long sequences × large vocabularies).
    pub fn forward_hidden(&self, ids: &Tensor, hooks: Option<&mut Hooks<'_>>) -> Result<Tensor> {
        self.hidden(ids, Mode::Infer, None, hooks)
    }

    /// Logits (f32) for final-norm hidden states `[.., hidden]`, e.g. a slice of
    /// [`Model::forward_hidden`]'s output.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.head(h, Mode::Infer)
    }

    pub(crate) fn run(
        &self,
        ids: &Tensor,
        mode: Mode,
        cache: Option<&mut KvCache>,
        hooks: Option<&mut Hooks<'_>>,
    ) -> Result<Tensor> {
        let generating = cache.is_some();
        let h = self.hidden(ids, mode, cache, hooks)?;
        self.head_of(&h, mode, generating)
    }

    fn hidden(
        &self,
        ids: &Tensor,
        mode: Mode,
        mut cache: Option<&mut KvCache>,
        hooks: Option<&mut Hooks<'_>>,
    ) -> Result<Tensor> {
        let mut hooks = hooks;
        let (b, t) = ids.dims2()?;
        let ids = ids.to_dtype(DType::U32)?;
        let h = self.embed.matrix(mode).index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        let mut h = apply(&mut hooks, HookPoint::Embed, h)?;
        let offset = cache.as_ref().map_or(0, |c| c.seq_len());
        let ctx = BlockCtx {
            rope: &self.rope,
            offset,
            mode,
            proj: ProjOpts {
                cache: mode == Mode::Infer && self.weight_cache.load(Ordering::Relaxed),
                kernel: self.ternary_kernel.load(Ordering::Relaxed),
            },
        };
        for (l, block) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| c.slot(l));
            h = block.forward(l, h, &ctx, slot, &mut hooks)?;
        }
        if let Some(c) = cache.as_mut() {
            c.advance(t);
        }
        let h = self.norm.forward(&h, mode)?;
        apply(&mut hooks, HookPoint::FinalNorm, h)
    }

    fn head(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        self.head_of(h, mode, false)
    }

    /// The LM head. `generating` (a KV-cache step): an f32 model on CPU whose head matrix is
    /// exactly bf16 streams the bf16 copy (half the bytes per token; the same products, summed in
    /// another order), with the inference weight cache on.
    fn head_of(&self, h: &Tensor, mode: Mode, generating: bool) -> Result<Tensor> {
        let matrix = self.lm_head.as_ref().unwrap_or(&self.embed);
        let head = matrix.matrix(mode);
        let mut dims = h.dims().to_vec();
        let hidden = dims.pop().unwrap_or(0);
        let rows: usize = dims.iter().product();
        let h = h.reshape((rows, hidden))?;
        let bf16_head = mode == Mode::Infer
            && generating
            && rows <= super::head_kernel::MAX_ROWS
            && h.dtype() == DType::F32
            && h.device().is_cpu()
            && self.weight_cache.load(Ordering::Relaxed);
        let logits = if mode == Mode::Infer && super::head_kernel::applies(&h, rows) {
            super::head_kernel::logits(&h, &head)?
        } else if let Some(e16) = if bf16_head { matrix.exact_bf16()? } else { None } {
            super::head_kernel::logits(&h, &e16)?
        } else if let Some(logits) = if mode == Mode::Infer { super::head_tiles::logits(&h, &head)? } else { None } {
            // AVX-512, hidden ≤ 512: candle's matmul's bits, faster.
            logits
        } else if mode == Mode::Infer {
            // No graph to record: candle's gemm call without its zero fill of the logits (the
            // same bits; ~6 % of the head at vocab 32k).
            super::cpu_values::matmul(&h, &head.t()?)?
        } else {
            h.matmul(&head.t()?)?
        };
        dims.push(self.cfg.vocab_size);
        logits.reshape(dims)?.to_dtype(DType::F32)
    }

    /// Replaces the attention of `hc.layers` by holographic attention (`holographic.rs`),
    /// initialised from each layer's own query and key weights. Refused on a model that already
    /// has holographic layers. Saving writes the new tensors and `rpt_holographic` in config.json.
    pub fn swap_attention(&mut self, hc: HoloConfig) -> anyhow::Result<()> {
        if let Some(old) = &self.cfg.holographic {
            anyhow::bail!(
                "this model already has holographic attention in layers {:?}: swap a model with standard attention",
                old.layers
            );
        }
        hc.validate(self.cfg.num_layers, self.cfg.head_dim)?;
        let (nh, nkv) = (self.cfg.num_heads, self.cfg.num_kv_heads);
        for &l in &hc.layers {
            let attn = &mut self.layers[l].self_attn;
            let (wq, wk) = (attn.q_proj.effective_weight()?, attn.k_proj.effective_weight()?);
            let prefix = format!("{BODY}.layers.{l}.self_attn.holographic");
            attn.holo = Some(super::holographic::init_layer(&prefix, &hc, &wq, &wk, nh, nkv, &self.device)?);
        }
        if let Some(obj) = self.cfg.raw.as_object_mut() {
            obj.insert(super::holographic::CONFIG_KEY.into(), hc.to_json());
        }
        self.cfg.holographic = Some(hc);
        Ok(())
    }

    /// Extends the RoPE tables to `n` positions (beyond `max_position_embeddings`: for speed
    /// measurements; the model was not trained there).
    pub fn extend_positions(&mut self, n: usize) -> Result<()> {
        if n > self.rope.max_positions() {
            self.rope = Rope::new(self.cfg.head_dim, self.cfg.rope_theta, n, self.dtype, &self.device)?;
        }
        Ok(())
    }

    fn projection_ref(&self, name: &str) -> anyhow::Result<&Projection> {
        self.layers
            .iter()
            .flat_map(|b| b.projections())
            .find(|p| p.name() == name)
            .with_context(|| format!("{name:?} is not a projection weight name of this model"))
    }

    /// Names of all projection weights (`model.layers.{l}.{self_attn|mlp}.{x}_proj.weight`), layer
    /// by layer in checkpoint order.
    pub fn projection_names(&self) -> Vec<String> {
        self.layers.iter().flat_map(|b| b.projections()).map(|p| p.name().to_string()).collect()
    }

    /// Names of the vocabulary matrices: the embedding and, if untied, the LM head.
    pub fn embedding_names(&self) -> Vec<String> {
        std::iter::once(&self.embed).chain(&self.lm_head).map(|e| e.weight.name.clone()).collect()
    }

    /// A projection's stored weight `[out, in]`: the latent matrix, or for a packed checkpoint the
    /// ternary codes `T` (the effective weight is `T · weight_scale`).
    pub fn projection(&self, name: &str) -> anyhow::Result<Tensor> {
        Ok(self.projection_ref(name)?.var()?.as_detached_tensor())
    }

    /// Bytes held by the projection weights as stored (f32/bf16 matrices, or the kernel's 2-bit
    /// form for a model opened with `LoadOptions::pack_for_inference`).
    pub fn projection_bytes(&self) -> usize {
        self.layers.iter().flat_map(|b| b.projections()).map(|p| p.weight_bytes()).sum()
    }

    /// How many values [`Model::state_dict`] holds (the parameter count a checkpoint stores:
    /// packed projections count their `u8` codes and scale), without materialising it — so also
    /// for a model packed for inference.
    pub fn stored_parameter_count(&self) -> usize {
        let vars: usize = self.collect_parameters().iter().map(|(_, v)| v.elem_count()).sum();
        let projections = self.layers.iter().flat_map(|b| b.projections());
        vars + projections
            .filter(|p| !matches!(p.weight, ProjWeight::Dense(_)))
            .map(|p| p.checkpoint_elems())
            .sum::<usize>()
    }

    /// For a model packed for inference: projection `name`'s zero weights and its size, from the
    /// kernel's codes; `None` when the projection holds its full weight (read it instead).
    pub fn kernel_zeros(&self, name: &str) -> anyhow::Result<Option<(u64, u64)>> {
        Ok(self.projection_ref(name)?.kernel_zeros())
    }

    /// Whether the projections are kept only in the CPU kernel's packed form (opened with
    /// `LoadOptions::pack_for_inference` as a ternary f32 CPU model): inference only.
    pub fn packed_for_inference(&self) -> bool {
        self.layers.iter().flat_map(|b| b.projections()).any(|p| p.is_kernel_only())
    }

    /// All projections, name → stored weight.
    pub fn projections(&self) -> anyhow::Result<BTreeMap<String, Tensor>> {
        self.projection_names().into_iter().map(|n| Ok((n.clone(), self.projection(&n)?))).collect()
    }

    /// Overwrite a projection's stored weight (same shape; converted to the model dtype). For a
    /// packed model the values must stay ternary to be saved.
    pub fn set_projection(&self, name: &str, w: &Tensor) -> anyhow::Result<()> {
        let p = self.projection_ref(name)?;
        let var = p.var()?;
        if w.dims() != var.dims() {
            anyhow::bail!("set_projection({name}): shape {:?}, expected {:?}", w.dims(), var.dims());
        }
        var.set(&w.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        p.invalidate();
        Ok(())
    }

    /// The trainable parameters by checkpoint name (the tied LM head appears once, as the
    /// embedding). Handing them out turns the inference weight cache off, since an optimizer
    /// changes them in place; call [`Model::refresh`] after training to turn it back on.
    pub fn named_parameters(&self) -> Vec<(String, Var)> {
        self.weight_cache.store(false, Ordering::Relaxed);
        self.invalidate_all();
        self.collect_parameters()
    }

    fn collect_parameters(&self) -> Vec<(String, Var)> {
        let named = |e: &Embedding| (e.weight.name.clone(), e.weight.var.clone());
        let mut v = vec![named(&self.embed)];
        for b in &self.layers {
            b.parameters(&mut v);
        }
        v.push((self.norm.weight.name.clone(), self.norm.weight.var.clone()));
        v.extend(self.lm_head.as_ref().map(named));
        v
    }

    /// The trainable parameters as a list (for `candle_nn::AdamW::new`). See
    /// [`Model::named_parameters`]; packed projections are frozen and not included.
    pub fn parameters(&self) -> Vec<Var> {
        self.named_parameters().into_iter().map(|(_, v)| v).collect()
    }

    /// Turn the inference weight cache on or off. It holds one fake-quantised copy of every latent
    /// ternary projection (so it doubles projection memory: ~9.7 GB extra for the 2B model in f32)
    /// and saves re-quantising the weights on every call, which matters for token-by-token
    /// generation, hardly for all-position forwards over many tokens. On by default.
    pub fn set_weight_cache(&self, enabled: bool) {
        self.invalidate_all();
        self.weight_cache.store(enabled, Ordering::Relaxed);
    }

    /// Turn the CPU int8 × 2-bit kernel for ternary inference on (the default) or off (the f32
    /// fake-quant path, as on other devices). The two agree to float rounding: the kernel's
    /// integer sums are exact and it rounds once, when scaling.
    pub fn set_ternary_kernel(&self, enabled: bool) {
        self.ternary_kernel.store(enabled, Ordering::Relaxed);
    }

    /// Re-enable the inference weight cache after parameters were changed behind the model's back.
    pub fn refresh(&self) {
        self.invalidate_all();
        self.weight_cache.store(true, Ordering::Relaxed);
    }

    fn invalidate_all(&self) {
        self.embed.invalidate();
        if let Some(h) = &self.lm_head {
            h.invalidate();
        }
        for b in &self.layers {
            for p in b.projections() {
                p.invalidate();
            }
        }
    }

    /// Every stored tensor by checkpoint name, in the checkpoint layout of [`Model::weight_format`]
    /// (packed projections as `u8` codes + `weight_scale`).
    pub fn state_dict(&self) -> anyhow::Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, var) in self.collect_parameters() {
            out.insert(name, var.as_detached_tensor());
        }
        for p in self.layers.iter().flat_map(|b| b.projections()) {
            match &p.weight {
                ProjWeight::Packed { codes, scale } => {
                    let packed = pack_tensor(codes.var.as_tensor()).with_context(|| codes.name.clone())?;
                    out.insert(codes.name.clone(), packed);
                    out.insert(scale.name.clone(), scale.var.as_detached_tensor());
                }
                // Only the kernel's packed form is here: `var()` is the error that says so.
                ProjWeight::Kernel { .. } => {
                    p.var()?;
                }
                ProjWeight::Dense(_) => {}
            }
        }
        Ok(out)
    }
}
