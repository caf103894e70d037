//! `generate`: continuations of prompts (inline, or a named set with expected answers), each
//! labelled correct / wrong / repetitive — the "text" column of the researcher's tables.

use anyhow::Result;
use serde_json::{Map, Value as Json};

use crate::exec::{
    typed_params, ArtifactType, InputDef, KindSchema, ParamDefault, ParamType, ReportContract, Role, Stage,
    StageContext,
};
use crate::model::{Bos, GenerateOptions, Sampling};
use crate::stages::common::generation::{self, generate_labelled, prompts_of};
use crate::stages::common::model_artifact as artifact;

pub static SCHEMA: KindSchema = KindSchema {
    kind: "generate",
    version: 1,
    help: "Generates continuations of prompts and labels each correct / wrong / repetitive (or unscored without an expected answer).",
    inputs: &[InputDef { name: "input", ty: ArtifactType::Model, required: true, help: "the model" }],
    params: Params::PARAMS,
    output: ArtifactType::Text,
};

crate::stage_params! {
    struct Params {
        prompts: Json {
            ty: ParamType::Either(&[ParamType::Str, ParamType::List(&ParamType::Any)]),
            default: ParamDefault::Json("\"facts\""),
            help: "a named prompt set (\"facts\") or a list of strings / { prompt, expected } tables",
        },
        max_new_tokens: usize {
            ty: ParamType::Int { min: Some(1), max: Some(1_000_000) },
            default: ParamDefault::Json("16"),
            help: "tokens to generate per prompt",
        },
        temperature: f64 {
            ty: ParamType::Float { min: Some(0.0), max: None },
            default: ParamDefault::Json("0.0"),
            help: "0 = greedy",
        },
        top_p: f64 {
            ty: ParamType::Float { min: Some(0.0), max: Some(1.0) },
            default: ParamDefault::Json("1.0"),
            help: "nucleus sampling (with temperature > 0)",
        },
        seed: u64 {
            ty: ParamType::UINT,
            default: ParamDefault::PipelineSeed,
            help: "sampling seed",
        },
        bos: String {
            ty: ParamType::Enum(&["add", "none"]),
            default: ParamDefault::Json("\"add\""),
            help: "start each prompt with BOS",
        },
        repetition_threshold: f64 {
            ty: ParamType::FRACTION,
            default: ParamDefault::Json("0.5"),
            help: "a continuation whose distinct-bigram ratio is below this is labelled repetitive",
        },
    }
}

/// Its role for reports and every top-level metric `run` writes.
pub static REPORT: ReportContract = ReportContract { roles: &[Role::Generation], metrics: &generation::METRICS };

pub struct Generate;

impl Stage for Generate {
    fn schema(&self) -> &'static KindSchema {
        &SCHEMA
    }

    fn report(&self) -> &'static ReportContract {
        &REPORT
    }

    fn check(&self, params: &Map<String, Json>) -> Result<(), String> {
        let p: Params = typed_params(params)?;
        if prompts_of(&p.prompts)?.is_empty() {
            return Err("prompts is empty".into());
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let p: Params = ctx.params()?;
        let prompts = prompts_of(&p.prompts).map_err(anyhow::Error::msg)?;
        let device = artifact::device(ctx.device)?;
        let open = artifact::open_for_inference(ctx.input("input")?, &device)?;
        let tok = open.tokenizer()?;
        let sampling = if p.temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample { temperature: p.temperature, top_p: p.top_p, seed: p.seed }
        };
        let opts = GenerateOptions { max_new_tokens: p.max_new_tokens, sampling, stop_tokens: tok.stop_ids() };
        let bos = if p.bos == "add" { Bos::Add } else { Bos::None };
        ctx.progress.set_length(prompts.len() as u64);
        tracing::info!(
            instance = %ctx.instance,
            prompts = prompts.len(),
            max_new_tokens = p.max_new_tokens,
            temperature = p.temperature,
            "generating"
        );
        let labelled = generate_labelled(
            &open,
            &prompts,
            &opts,
            bos,
            p.repetition_threshold,
            || None,
            |i| {
                ctx.check_cancelled()?;
                ctx.progress.set_position(i as u64);
                tracing::debug!(instance = %ctx.instance, prompt = i, of = prompts.len(), "generating: prompt");
                Ok(())
            },
        )?;
        tracing::info!(
            instance = %ctx.instance, counts = %labelled["counts"], accuracy = %labelled["accuracy"],
            label = %labelled["label"].as_str().unwrap_or_default(), "generated"
        );
        std::fs::write(ctx.out_dir.join("generations.json"), serde_json::to_string_pretty(&labelled["outputs"])?)?;
        Ok(labelled)
    }
}
