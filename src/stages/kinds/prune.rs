//! `prune`: magnitude pruning of the projection weights.
//!
//! `rule = "exact"`: to a total sparsity, globally, per tensor or per row. Cumulative: positions
//! already pruned (the input's mask) stay pruned and count towards the level. Ties are broken
//! deterministically (tensor name order, then position).
//!
//! `rule = "notebook"` (the RPT notebooks): the threshold is the `sparsity` percentile of the
//! current NONZERO magnitudes of all targets (so chained levels compound), estimated from a seeded
//! random sample of at most `sample` magnitudes per tensor (exact when a tensor has fewer), and
//! every weight with |w| ≤ threshold is pruned; the achieved sparsity is reported.
//!
//! The selection maths is `analysis::magnitude`; this file reads the targets, applies the keep
//! flags and writes the model and its mask.

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value as Json};

use crate::analysis::glob::glob_match;
use crate::analysis::magnitude::{
    notebook_percentile, notebook_sample, prune_groups, prune_row, target_zeros, GlobalCut,
};
use crate::exec::{
    typed_params, ArtifactType, InputDef, KindSchema, MetricDef, ParamDefault, ParamType, ReportContract, Role, Stage,
    StageContext,
};
use crate::stages::common::mask::Mask;
use crate::stages::common::model_artifact as artifact;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "prune",
    version: 3,
    help: "Magnitude pruning of the targeted projections: to an exact total sparsity (cumulative over earlier pruning), or the notebooks' percentile of the remaining nonzeros; writes the model and its mask (bits) as mask.safetensors.",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model to prune (latent weights)" }],
    params: Params::PARAMS,
    output: ArtifactType::Model,
};

crate::stage_params! {
    struct Params {
        sparsity: f64 {
            ty: ParamType::FRACTION,
            default: ParamDefault::Required,
            help: "exact: fraction of the targeted weights that are zero afterwards; notebook: the percentile (as a fraction) of the current nonzero magnitudes taken as the threshold",
        },
        rule: String {
            ty: ParamType::Enum(&["exact", "notebook"]),
            default: ParamDefault::Json("\"exact\""),
            help: "exact = the smallest magnitudes until the total sparsity is reached; notebook = prune |w| ≤ a sampled percentile of the remaining nonzeros (compounds over levels)",
        },
        sample: usize {
            ty: ParamType::Int { min: Some(1), max: None },
            default: ParamDefault::Json("50000"),
            help: "notebook rule: magnitudes sampled per tensor for the threshold (all of them when a tensor has fewer nonzeros)",
        },
        seed: u64 {
            ty: ParamType::UINT,
            default: ParamDefault::Json("0"),
            help: "notebook rule: sampling seed (not the pipeline seed, so exact prunes stay shared across seeds)",
        },
        scope: String {
            ty: ParamType::Enum(&["global", "per-tensor", "per-row"]),
            default: ParamDefault::Json("\"global\""),
            help: "where the sparsity is measured: over all targets, each tensor, or each output row",
        },
        targets: Vec<String> {
            ty: ParamType::List(&ParamType::Str),
            default: ParamDefault::Json("[\"model.layers.*_proj.weight\"]"),
            help: "glob patterns (* and ?) over projection names; default: the seven projections of every layer",
        },
    }
}

/// Its role for reports and every top-level metric `run` writes.
pub static REPORT: ReportContract = ReportContract {
    roles: &[Role::Prune],
    metrics: &[
        MetricDef { name: "sparsity", always: true, help: "fraction of targeted weights that are zero after pruning" },
        MetricDef { name: "target_sparsity", always: true, help: "the sparsity asked for" },
        MetricDef { name: "sparsity_before", always: true, help: "fraction of targeted weights already zero before" },
        MetricDef {
            name: "rule",
            always: true,
            help: "the threshold rule (exact global, per-tensor or the notebook's sampled percentile)",
        },
        MetricDef { name: "scope", always: true, help: "global or per-tensor selection" },
        MetricDef { name: "targets", always: true, help: "number of tensors targeted" },
        MetricDef { name: "weights", always: true, help: "number of targeted weights" },
        MetricDef { name: "zeros", always: true, help: "number of them that are zero after pruning" },
        MetricDef { name: "already_pruned", always: true, help: "zeros kept from the input's mask" },
        MetricDef { name: "pruned_now", always: true, help: "weights this stage zeroed" },
        MetricDef {
            name: "ternary_zero_before",
            always: false,
            help: "ternary models: fraction of targeted weights quantizing to 0 before",
        },
        MetricDef { name: "ternary_zero_after", always: false, help: "ternary models: the same after pruning" },
        MetricDef {
            name: "notebook",
            always: false,
            help: "notebook rule: the sampled threshold and how many non-zeros it considered",
        },
        MetricDef { name: "per_tensor", always: true, help: "per projection: sparsity (and ternary zeros)" },
    ],
};

pub struct Prune;

impl Stage for Prune {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        if p.targets.is_empty() {
            return Err("targets is empty: name at least one pattern".into());
        }
        if p.rule == "notebook" && p.scope != "global" {
            return Err(format!(
                "rule = \"notebook\" takes one threshold over all targets: scope must be \"global\", not \"{}\"",
                p.scope
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let input = ctx.input("input")?;
        let device = artifact::device(ctx.device)?;
        let open = artifact::open(input, &device)?;
        let model = &open.model;
        let names: Vec<String> =
            model.projection_names().into_iter().filter(|n| p.targets.iter().any(|t| glob_match(t, n))).collect();
        if names.is_empty() {
            bail!("no projection matches targets {:?} (names look like model.layers.0.mlp.up_proj.weight)", p.targets);
        }
        let mut masks = artifact::read_mask(&input.dir)?.unwrap_or_default();
        // One target at a time, as f32 magnitudes with its keep flags: the only extra memory is
        // one tensor's worth (the 2B model's weights never exist twice).
        let target = |i: usize| -> Result<Target> {
            ctx.check_cancelled()?;
            let name = &names[i];
            let w = model.projection(name)?;
            if w.dtype() == DType::U8 {
                bail!("`{name}` is packed (2-bit codes): prune a latent checkpoint (e.g. the -bf16 repo)");
            }
            let (rows, cols) = w.dims2()?;
            let keep = match masks.get(name) {
                Some(m) if m.shape() == (rows, cols) => m.to_keep(),
                Some(m) => bail!("the input's mask of `{name}` is {:?}, the weight [{rows}, {cols}]", m.shape()),
                None => vec![1u8; rows * cols],
            };
            Ok(Target { values: w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, keep, rows, cols })
        };
        let already: u64 = names.iter().filter_map(|n| masks.get(n)).map(Mask::pruned).sum();
        tracing::info!(
            instance = %ctx.instance, target = p.sparsity, rule = %p.rule, scope = %p.scope, tensors = names.len(),
            already_pruned = already, "pruning"
        );

        // What decides each weight: one global cut, the notebook's threshold, or per tensor/row.
        let mut notebook = None;
        let mut cut = None;
        if p.rule == "notebook" {
            let mut pool = Vec::new();
            for i in 0..names.len() {
                pool.extend(notebook_sample(&target(i)?.values, i, p.sample, p.seed));
            }
            let (threshold, considered) = notebook_percentile(pool, p.sparsity);
            notebook = Some((threshold, considered));
        } else if p.scope == "global" {
            let total: usize =
                (0..names.len()).map(|i| model.projection(&names[i]).map(|w| w.elem_count())).sum::<Result<_>>()?;
            let need = target_zeros(total, p.sparsity).saturating_sub(already);
            cut = Some(GlobalCut::find::<anyhow::Error>(need, |visit| {
                for i in 0..names.len() {
                    let t = target(i)?;
                    visit(&t.values, &t.keep);
                }
                Ok(())
            })?);
        }

        // Apply, target by target: pruned positions become exact zeros in the stored dtype.
        let mut per_tensor = Map::new();
        let (mut zeros, mut total, mut zeros_before) = (0u64, 0u64, 0u64);
        let (mut ternary_before, mut ternary_after) = (0u64, 0u64);
        let bitnet = model.config().is_bitnet();
        let mut pruned_masks = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let Target { values, mut keep, rows, cols } = target(i)?;
            zeros_before += values.iter().filter(|&&x| x == 0.0).count() as u64;
            if let Some((threshold, _)) = notebook {
                for (x, m) in values.iter().zip(keep.iter_mut()) {
                    *m = u8::from(x.abs() > threshold);
                }
            } else if let Some(cut) = cut.as_mut() {
                cut.apply(&values, &mut keep);
            } else if p.scope == "per-tensor" {
                prune_groups(&[values.as_slice()], std::slice::from_mut(&mut keep), p.sparsity);
            } else {
                for (row, krow) in values.chunks(cols).zip(keep.chunks_mut(cols)) {
                    prune_row(row, krow, p.sparsity);
                }
            }
            drop(values);
            let w = model.projection(name)?;
            let before = if bitnet { artifact::ternary_zeros(&w)? } else { None };
            let m = Tensor::from_slice(&keep, (rows, cols), &Device::Cpu)?;
            model.set_projection(name, &w.broadcast_mul(&m.to_dtype(w.dtype())?.to_device(w.device())?)?)?;
            drop((w, m));
            let z = keep.iter().filter(|&&x| x == 0).count() as u64;
            zeros += z;
            total += (rows * cols) as u64;
            let mut t = Map::new();
            t.insert("sparsity".into(), json!(z as f64 / (rows * cols) as f64));
            if let Some(before) = before {
                let after = artifact::ternary_zeros(&model.projection(name)?)?.unwrap_or(0);
                t.insert("ternary_zero_before".into(), json!(before as f64 / (rows * cols) as f64));
                t.insert("ternary_zero_after".into(), json!(after as f64 / (rows * cols) as f64));
                ternary_before += before;
                ternary_after += after;
            }
            per_tensor.insert(name.clone(), Json::Object(t));
            pruned_masks.push((name.clone(), Mask::from_keep(&keep, rows, cols)?));
        }
        // Earlier masks of tensors outside this level's targets stay as they were.
        masks.extend(pruned_masks);
        let mut metrics = json!({
            "sparsity": zeros as f64 / total as f64,
            "target_sparsity": p.sparsity,
            "rule": p.rule,
            "sparsity_before": zeros_before as f64 / total as f64,
            "scope": p.scope,
            "targets": names.len(),
            "weights": total,
            "zeros": zeros,
            "already_pruned": already,
            "pruned_now": zeros.saturating_sub(already),
        });
        if bitnet {
            metrics["ternary_zero_before"] = json!(ternary_before as f64 / total as f64);
            metrics["ternary_zero_after"] = json!(ternary_after as f64 / total as f64);
        }
        if let Some((threshold, considered)) = notebook {
            metrics["notebook"] = json!({ "threshold": threshold, "nonzeros_considered": considered });
        }
        tracing::info!(
            instance = %ctx.instance,
            target = p.sparsity,
            achieved = zeros as f64 / total as f64,
            pruned_now = zeros.saturating_sub(already),
            weights = total,
            "pruned"
        );
        metrics["per_tensor"] = Json::Object(per_tensor);

        ctx.check_cancelled()?;
        let mut settings = open.settings.clone();
        settings.source = None;
        artifact::save(model, ctx.out_dir, Some(&open.dir), &settings)?;
        artifact::write_mask(ctx.out_dir, &masks).context("writing the mask")?;
        Ok(metrics)
    }
}

/// One target's magnitudes (f32, row-major) and keep flags (1 = kept).
struct Target {
    values: Vec<f32>,
    keep: Vec<u8>,
    rows: usize,
    cols: usize,
}
