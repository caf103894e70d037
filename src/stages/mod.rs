//! The concrete stage kinds: the only module that knows both the engine and the model.
//! `kinds/` holds one file (or folder) per kind; `common/` the helpers several kinds share.
//! A new kind is one file in `kinds/` plus one line in [`registry`].

mod common;
mod kinds;

pub use common::{mask, model_artifact};

use crate::exec::Registry;

/// Every stage kind the shipped binary offers.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(kinds::load::Load)
        .register(kinds::prune::Prune)
        .register(kinds::eval_ppl::EvalPpl)
        .register(kinds::finetune::Finetune)
        .register(kinds::generate::Generate)
        .register(kinds::hook_residuals::HookResiduals)
        .register(kinds::perturb::Perturb)
        .register(kinds::eval_tasks::EvalTasks)
        .register(kinds::swap_attention::SwapAttention)
        .register(kinds::bench_forward::BenchForward)
        .register(kinds::train_ep::TrainEp);
    r
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value as Json};

    use crate::exec::{ParamDefault, ParamType};

    /// A value of type `ty` (the first alternative of an `Either`).
    fn sample(ty: &ParamType) -> Json {
        match ty {
            ParamType::Bool => json!(false),
            ParamType::Int { min, .. } => json!(min.unwrap_or(0)),
            ParamType::Float { min, .. } => json!(min.unwrap_or(0.0)),
            ParamType::Str => json!("x"),
            ParamType::Enum(options) => json!(options[0]),
            ParamType::List(_) => json!([]),
            ParamType::Table => json!({}),
            ParamType::Either(options) => sample(&options[0]),
            ParamType::Any => Json::Null,
        }
    }

    /// Whether `check` refused the parameters at the typed struct (not in the stage's own checks
    /// that follow, which these samples may well fail).
    fn typed_error(r: Result<(), String>) -> Option<String> {
        r.err().filter(|e| e.starts_with("invalid parameters:"))
    }

    /// For every kind, the parameters its schema lists are exactly those its typed struct takes:
    /// all of them together deserialize; each that is always present (required or defaulted) is
    /// missed when absent; each optional one is read (a value of no parameter's type is refused);
    /// an unknown name is refused.
    #[test]
    fn every_kinds_schema_names_its_typed_fields() {
        let registry = super::registry();
        for stage in registry.iter() {
            let schema = stage.schema();
            let kind = schema.kind;
            let full: Map<String, Json> = schema
                .params
                .iter()
                .map(|p| {
                    let v = match p.default {
                        ParamDefault::Json(_) | ParamDefault::PipelineSeed => p.default.value(0).unwrap(),
                        ParamDefault::Required | ParamDefault::Optional => sample(&p.ty),
                    };
                    (p.name.to_string(), v)
                })
                .collect();
            assert_eq!(typed_error(stage.check(&full)), None, "{kind}: every parameter");
            for p in schema.params {
                let mut without = full.clone();
                without.remove(p.name);
                let e = typed_error(stage.check(&without));
                if let ParamDefault::Optional = p.default {
                    assert_eq!(e, None, "{kind}: optional `{}` absent", p.name);
                    let mut odd = full.clone();
                    odd.insert(p.name.to_string(), json!([[["no parameter's type"]]]));
                    assert!(typed_error(stage.check(&odd)).is_some(), "{kind}: `{}` is not read", p.name);
                } else {
                    let e = e.unwrap_or_default();
                    assert!(e.contains(&format!("missing field `{}`", p.name)), "{kind}: `{}` absent: {e}", p.name);
                }
            }
            let mut unknown = full.clone();
            unknown.insert("no_such_parameter".into(), json!(1));
            let e = typed_error(stage.check(&unknown)).unwrap_or_default();
            assert!(e.contains("unknown field `no_such_parameter`"), "{kind}: an unknown parameter: {e}");
        }
    }

    /// Each kind's report contract covers what the report reads for its roles, names each
    /// metric once with help, and every shipped kind has one. (The executor checks each run's
    /// metrics against it, so the tiny pipelines in tests/stages check the other direction.)
    #[test]
    fn every_kind_declares_what_its_report_roles_read() {
        for stage in super::registry().iter() {
            let kind = stage.schema().kind;
            let c = stage.report();
            assert!(!c.roles.is_empty(), "{kind}: declares no report role");
            let mut names: Vec<&str> = c.metrics.iter().map(|m| m.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), c.metrics.len(), "{kind}: a metric is declared twice");
            assert!(c.metrics.iter().all(|m| !m.help.is_empty()), "{kind}: a metric without help");
            for role in c.roles {
                for read in role.reads() {
                    assert!(
                        c.metric(read).is_some(),
                        "{kind}: role {role:?} reads `{read}`, which it does not declare"
                    );
                }
            }
        }
    }
}
