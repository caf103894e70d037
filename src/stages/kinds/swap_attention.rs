//! `swap-attention`: replaces the attention of chosen layers by holographic attention
//! (src/model/holographic.rs, docs/holographic.md), initialised from each layer's own query and
//! key weights. The rest of the model, its mask and its fine-tune count are carried over.

use anyhow::Result;
use serde_json::{json, Map, Value as Json};

use crate::exec::{
    typed_params, ArtifactType, InputDef, KindSchema, MetricDef, ParamDefault, ParamType, ReportContract, Role, Stage,
    StageContext,
};
use crate::model::HoloConfig;
use crate::stages::common::model_artifact as artifact;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "swap-attention",
    version: 1,
    help: "Replaces the attention of the chosen layers by causal holographic attention: exact attention over the token's own region of `window` tokens plus moment summaries of the `regions` most recent completed regions (O(n·(w+R))), initialised from the layer's pretrained query/key weights; the new tensors train in f32 (finetune trainable = \"holographic\" trains only them).",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model whose attention is swapped (standard attention)" }],
    params: Params::PARAMS,
    output: ArtifactType::Model,
};

crate::stage_params! {
    struct Params {
        layers: Json {
            ty: ParamType::Either(&[ParamType::Enum(&["all"]), ParamType::List(&ParamType::UINT)]),
            default: ParamDefault::Json("\"all\""),
            help: "layers whose attention is swapped: \"all\" or a list of indices",
        },
        window: usize {
            ty: ParamType::Int { min: Some(1), max: Some(1_000_000) },
            default: ParamDefault::Required,
            help: "region length w: a token attends exactly to its own region so far",
        },
        regions: usize {
            ty: ParamType::Int { min: Some(1), max: Some(1_000_000) },
            default: ParamDefault::Required,
            help: "R: how many of the most recent completed regions a token sees as summaries (it reaches back at most R·w tokens before its region)",
        },
        boundary_dim: Option<usize> {
            ty: ParamType::Int { min: Some(2), max: Some(1_000_000) },
            default: ParamDefault::Optional,
            help: "r: the summaries' boundary dimension per head (even, ≤ head_dim; whole RoPE planes are kept); default head_dim",
        },
    }
}

pub static REPORT: ReportContract = ReportContract {
    roles: &[Role::Swap],
    metrics: &[
        MetricDef {
            name: "attention",
            always: true,
            help: "the attention now in the model, e.g. \"holographic w=64 R=16\"",
        },
        MetricDef { name: "window", always: true, help: "region length w" },
        MetricDef { name: "regions", always: true, help: "summaries per query R" },
        MetricDef { name: "boundary_dim", always: true, help: "boundary dimension r per head" },
        MetricDef { name: "layers", always: true, help: "the swapped layers" },
        MetricDef {
            name: "reach",
            always: true,
            help: "tokens a query can reach: its region and R regions before it, (R+1)·w",
        },
        MetricDef { name: "new_parameters", always: true, help: "number of new (f32) parameters" },
    ],
};

pub struct SwapAttention;

/// `"all"` or a list → layer indices.
fn layer_list(v: &Json, num_layers: Option<usize>) -> Result<Option<Vec<usize>>, String> {
    match v {
        Json::String(s) if s == "all" => Ok(num_layers.map(|n| (0..n).collect())),
        Json::Array(a) => {
            let mut out: Vec<usize> = a
                .iter()
                .map(|x| x.as_u64().map(|n| n as usize).ok_or("layers: a list of layer indices (integers ≥ 0)"))
                .collect::<Result<_, _>>()?;
            if out.is_empty() {
                return Err("layers: an empty list (use \"all\" or name at least one layer)".into());
            }
            out.sort_unstable();
            if out.windows(2).any(|p| p[0] == p[1]) {
                return Err(format!("layers: {:?} names a layer twice", a));
            }
            Ok(Some(out))
        }
        _ => Err("layers: \"all\" or a list of layer indices".into()),
    }
}

impl Stage for SwapAttention {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        layer_list(&p.layers, None)?;
        if let Some(r) = p.boundary_dim {
            if r % 2 != 0 {
                return Err(format!(
                    "boundary_dim: {r} is odd; it must be even, since it keeps whole RoPE planes (pairs of dimensions)"
                ));
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let input = ctx.input("input")?;
        let device = artifact::device(ctx.device)?;
        let mut open = artifact::open(input, &device)?;
        let cfg = open.model.config().clone();
        let layers = layer_list(&p.layers, Some(cfg.num_layers)).map_err(anyhow::Error::msg)?.unwrap_or_default();
        let hc = HoloConfig {
            layers: layers.clone(),
            window: p.window,
            regions: p.regions,
            boundary_dim: p.boundary_dim.unwrap_or(cfg.head_dim),
        };
        open.model.swap_attention(hc.clone())?;
        tracing::info!(
            instance = %ctx.instance,
            layers = hc.layers.len(),
            window = hc.window,
            regions = hc.regions,
            boundary_dim = hc.boundary_dim,
            "attention swapped"
        );
        // Per layer: B [kv_heads, head_dim, r], γ and b [heads].
        let new_parameters = layers.len() * (cfg.num_kv_heads * cfg.head_dim * hc.boundary_dim + 2 * cfg.num_heads);
        ctx.check_cancelled()?;
        let mut settings = open.settings.clone();
        settings.source = None;
        artifact::save(&open.model, ctx.out_dir, Some(&open.dir), &settings)?;
        if let Some(masks) = artifact::read_mask(&input.dir)? {
            artifact::write_mask(ctx.out_dir, &masks)?;
        }
        Ok(json!({
            "attention": format!("holographic w={} R={}", hc.window, hc.regions),
            "window": hc.window,
            "regions": hc.regions,
            "boundary_dim": hc.boundary_dim,
            "layers": layers,
            "reach": (hc.regions + 1) * hc.window,
            "new_parameters": new_parameters,
        }))
    }
}
