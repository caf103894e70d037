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

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value as Json};

use crate::exec::{typed_params, ArtifactType, InputDef, KindSchema, ParamDefault, ParamType, Stage, StageContext};
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

pub struct Prune;

impl Stage for Prune {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
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
            cut = Some(GlobalCut::find(need, |visit| {
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

/// `*` matches any run of characters, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The notebook rule's threshold: the `fraction` percentile of the nonzero magnitudes of all
/// groups, each group contributing all its nonzero |w| or, when it has more than `sample`, a
/// uniform random subset of `sample` of them (Floyd's algorithm, seeded per group index).
/// Returns the threshold and N; with no nonzero weight at all, 0 (the zeros are pruned, nothing
/// else).
#[cfg(test)]
fn notebook_threshold(groups: &[&[f32]], fraction: f64, sample: usize, seed: u64) -> (f32, usize) {
    let pool = groups.iter().enumerate().flat_map(|(g, v)| notebook_sample(v, g, sample, seed)).collect();
    notebook_percentile(pool, fraction)
}

/// Group `g`'s contribution to the notebook threshold: its nonzero magnitudes, or a seeded
/// uniform subset of `sample` of them, in position order.
fn notebook_sample(values: &[f32], g: usize, sample: usize, seed: u64) -> Vec<f32> {
    let nonzero: Vec<f32> = values.iter().filter(|x| **x != 0.0).map(|x| x.abs()).collect();
    if nonzero.len() <= sample {
        return nonzero;
    }
    let mut rng = crate::data::SplitMix64::keyed(seed, &[g as u64]);
    let n = nonzero.len();
    let mut chosen = std::collections::HashSet::with_capacity(sample);
    for j in n - sample..n {
        let t = rng.index(j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut idx: Vec<usize> = chosen.into_iter().collect();
    idx.sort_unstable();
    idx.into_iter().map(|i| nonzero[i]).collect()
}

/// Index `min(⌊N·p/100⌋, N − 1)` of the sorted pool, as the notebooks take it (an integral
/// percentage is computed in integers, so 10% of 4,096 is exactly 409), and N.
fn notebook_percentile(mut pool: Vec<f32>, fraction: f64) -> (f32, usize) {
    if pool.is_empty() {
        return (0.0, 0);
    }
    pool.sort_by(f32::total_cmp);
    let n = pool.len();
    let percent = fraction * 100.0;
    let k = if (percent - percent.round()).abs() < 1e-9 {
        n * percent.round() as usize / 100
    } else {
        (n as f64 * fraction).floor() as usize
    };
    (pool[k.min(n - 1)], n)
}

/// Sort key of a magnitude: the bits of |x| order like the values (NaN sorts last).
fn key(x: f32) -> u32 {
    x.abs().to_bits()
}

/// Number of zeros a group of `n` weights must have at `sparsity` (nearest integer).
fn target_zeros(n: usize, sparsity: f64) -> u64 {
    (sparsity * n as f64).round() as u64
}

/// The exact global selection of the `need` smallest kept magnitudes over groups visited in a
/// fixed order: a threshold key found by radix selection on the magnitude bits (two histogram
/// passes, 65,536 buckets each, no copy of the values) and how many entries equal to it to take,
/// which [`GlobalCut::apply`] takes in visiting order.
struct GlobalCut {
    threshold: u32,
    take_equal: u64,
    /// Nothing to prune (`need` = 0).
    none: bool,
}

impl GlobalCut {
    /// `each` calls its visitor with every group's values and keep flags, in order.
    fn find(need: u64, mut each: impl FnMut(&mut dyn FnMut(&[f32], &[u8])) -> Result<()>) -> Result<GlobalCut> {
        if need == 0 {
            return Ok(GlobalCut { threshold: 0, take_equal: 0, none: true });
        }
        let mut high = vec![0u64; 1 << 16];
        each(&mut |v, k| kept_keys(v, k).for_each(|x| high[(x >> 16) as usize] += 1))?;
        let (bucket, below_bucket) = find_bucket(&high, need);
        let mut low = vec![0u64; 1 << 16];
        each(&mut |v, k| {
            kept_keys(v, k).filter(|x| x >> 16 == bucket as u32).for_each(|x| low[(x & 0xffff) as usize] += 1)
        })?;
        let (lo, below_lo) = find_bucket(&low, need - below_bucket);
        Ok(GlobalCut {
            threshold: ((bucket as u32) << 16) | lo as u32,
            take_equal: need - below_bucket - below_lo,
            none: false,
        })
    }

    /// Prunes one group (the next in visiting order).
    fn apply(&mut self, values: &[f32], keep: &mut [u8]) {
        if self.none {
            return;
        }
        for (x, m) in values.iter().zip(keep.iter_mut()) {
            if *m == 0 {
                continue;
            }
            let kx = key(*x);
            if kx < self.threshold {
                *m = 0;
            } else if kx == self.threshold && self.take_equal > 0 {
                *m = 0;
                self.take_equal -= 1;
            }
        }
    }
}

fn kept_keys<'a>(values: &'a [f32], keep: &'a [u8]) -> impl Iterator<Item = u32> + 'a {
    values.iter().zip(keep).filter(|(_, &m)| m == 1).map(|(x, _)| key(*x))
}

/// Prunes the smallest kept magnitudes across all groups together until `sparsity` of all their
/// weights are pruned (in-memory groups: per-tensor scope and the tests).
fn prune_groups(values: &[&[f32]], keep: &mut [Vec<u8>], sparsity: f64) {
    let n: usize = values.iter().map(|v| v.len()).sum();
    let pruned: u64 = keep.iter().map(|k| k.iter().filter(|&&x| x == 0).count() as u64).sum();
    let need = target_zeros(n, sparsity).saturating_sub(pruned);
    let mut cut = GlobalCut::find(need, |visit| {
        values.iter().zip(keep.iter()).for_each(|(v, k)| visit(v, k));
        Ok(())
    })
    .expect("in-memory groups cannot fail");
    for (v, k) in values.iter().zip(keep.iter_mut()) {
        cut.apply(v, k);
    }
}

/// The bucket in which the `need`-th smallest element (1-based) lies, and the count below it.
fn find_bucket(hist: &[u64], need: u64) -> (usize, u64) {
    let mut below = 0;
    for (b, &c) in hist.iter().enumerate() {
        if below + c >= need {
            return (b, below);
        }
        below += c;
    }
    (hist.len() - 1, below)
}

/// Per-row pruning: sorting is cheap for one row; ties go to the lower column.
fn prune_row(row: &[f32], keep: &mut [u8], sparsity: f64) {
    let pruned = keep.iter().filter(|&&x| x == 0).count() as u64;
    let need = target_zeros(row.len(), sparsity).saturating_sub(pruned) as usize;
    if need == 0 {
        return;
    }
    let mut order: Vec<(u32, usize)> =
        row.iter().enumerate().filter(|(i, _)| keep[*i] == 1).map(|(i, x)| (key(*x), i)).collect();
    order.select_nth_unstable(need - 1);
    for &(_, i) in &order[..need] {
        keep[i] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("model.layers.*_proj.weight", "model.layers.3.mlp.up_proj.weight"));
        assert!(glob_match("*.mlp.*", "model.layers.0.mlp.down_proj.weight"));
        assert!(!glob_match("*.self_attn.*", "model.layers.0.mlp.down_proj.weight"));
        assert!(glob_match("model.layers.?.mlp.up_proj.weight", "model.layers.7.mlp.up_proj.weight"));
        assert!(!glob_match("model.layers.?.mlp.up_proj.weight", "model.layers.17.mlp.up_proj.weight"));
    }

    #[test]
    fn global_selection_is_exact_with_ties_in_order() {
        let a = [0.5f32, -0.1, 0.1, 2.0];
        let b = [0.1f32, -3.0, 0.0, 0.2];
        let mut keep = vec![vec![1u8; 4], vec![1u8; 4]];
        prune_groups(&[&a, &b], &mut keep, 0.5); // 4 of 8: 0.0, then three of the 0.1 ties, in order
        assert_eq!(keep, vec![vec![1, 0, 0, 1], vec![0, 1, 0, 1]]);
        prune_groups(&[&a, &b], &mut keep, 0.75); // 2 more: 0.2 then 0.5
        assert_eq!(keep, vec![vec![0, 0, 0, 1], vec![0, 1, 0, 0]]);
        prune_groups(&[&a, &b], &mut keep, 0.25); // lower than achieved: nothing comes back
        assert_eq!(keep.iter().flatten().filter(|&&x| x == 0).count(), 6);
    }

    #[test]
    fn global_selection_matches_a_sort_on_random_data() {
        let mut s = crate::data::SplitMix64::new(5);
        let vals: Vec<f32> = (0..10_000).map(|_| (s.next_u64() % 2001) as f32 / 1000.0 - 1.0).collect();
        for sparsity in [0.0, 0.013, 0.5, 0.9999, 1.0] {
            let mut keep = vec![vec![1u8; vals.len()]];
            prune_groups(&[&vals], &mut keep, sparsity);
            let mut order: Vec<(u32, usize)> = vals.iter().enumerate().map(|(i, x)| (key(*x), i)).collect();
            order.sort();
            let k = target_zeros(vals.len(), sparsity) as usize;
            let mut expect = vec![1u8; vals.len()];
            order[..k].iter().for_each(|&(_, i)| expect[i] = 0);
            assert_eq!(keep[0], expect, "sparsity {sparsity}");
        }
    }

    #[test]
    fn notebook_threshold_is_a_percentile_of_the_nonzeros() {
        // Nonzero magnitudes 1..=10 (the zeros are not counted): 30% → index 3 → 4.0.
        let a = [0.0f32, -1.0, 2.0, 3.0, 0.0];
        let b = [-4.0f32, 5.0, 6.0, 7.0, 8.0, 9.0, -10.0];
        assert_eq!(notebook_threshold(&[&a, &b], 0.3, 100, 0), (4.0, 10));
        // 100% → index min(10, 9) → the largest.
        assert_eq!(notebook_threshold(&[&a, &b], 1.0, 100, 0), (10.0, 10));
        // 0% → the smallest nonzero: the notebook prunes it too (|w| ≤ threshold).
        assert_eq!(notebook_threshold(&[&a, &b], 0.0, 100, 0).0, 1.0);
        assert_eq!(notebook_threshold(&[&[0.0f32][..]], 0.5, 100, 0), (0.0, 0));
    }

    #[test]
    fn notebook_sample_is_seeded_uniform_and_without_repeats() {
        let v: Vec<f32> = (1..=1000).map(|x| x as f32).collect();
        let (t1, n) = notebook_threshold(&[&v], 0.5, 200, 7);
        assert_eq!(n, 200);
        assert_eq!(notebook_threshold(&[&v], 0.5, 200, 7).0, t1, "seeded");
        assert!((350.0..650.0).contains(&t1), "a median estimate of 1..1000, got {t1}");
        assert_ne!(notebook_threshold(&[&v], 0.5, 200, 8).0, t1, "another seed, another sample");
    }

    #[test]
    fn rows_prune_independently() {
        let row = [3.0f32, -1.0, 0.5, 2.0];
        let mut keep = vec![1u8; 4];
        prune_row(&row, &mut keep, 0.5);
        assert_eq!(keep, [1, 0, 0, 1]);
    }
}
