//! `rpt-flow export`: an instance's model out of the cache as a Hugging Face directory, with a
//! model card and its provenance, from a pipeline (planned now) or a session file.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Map, Value as Json};

use super::{load_plan, open_cache, CliError, CliResult, PipelineArgs};
use crate::cache::{Cache, EntryState, Key};
use crate::exec::{ArtifactType, Registry};
use crate::export::hf::{self, ExportError, LOGITS_FILE};
use crate::export::provenance::{Node, Origin, Provenance};
use crate::session::{SessionRecord, StageStatus};
use crate::spec::diag::nearest;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Hf,
    Gguf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The pipeline TOML file, or a session file (`sessions/DATE/<name>.json`) written by `run`.
    pub source: PathBuf,
    /// A model-producing instance (load, prune, finetune, …), e.g. `level[sparsity=0.1].tuned`.
    pub instance: String,
    /// The directory to write: absent or empty (or any directory with --force).
    pub dir: PathBuf,
    /// For a pipeline: apply a `[profiles.<name>]` table (repeatable).
    #[arg(long = "profile", short = 'p')]
    pub profiles: Vec<String>,
    /// For a pipeline: override a value (repeatable).
    #[arg(long = "set", short = 's', value_name = "PATH=VALUE")]
    pub sets: Vec<String>,
    /// For a pipeline: the device class the run used (part of every key).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Replace the contents of a non-empty DIR.
    #[arg(long)]
    pub force: bool,
    /// What to write: a Hugging Face directory (`hf`), or one GGUF file at DIR for llama.cpp
    /// (`gguf`: ternary BitNet models whose projection inputs are multiples of 256; docs/gguf.md).
    #[arg(long, value_enum, default_value = "hf")]
    pub format: ExportFormat,
    /// With `--format gguf`: the ternary type of the projections, `tq2_0` or `tq1_0`.
    #[arg(long, default_value = "tq2_0")]
    pub gguf_type: String,
    /// Also write rpt_flow_logits.safetensors: rpt-flow's logits for a few fixed prompts (f32,
    /// CPU), which scripts/check_export.py compares with transformers'.
    #[arg(long)]
    pub with_logits: bool,
}

pub fn run(args: &ExportArgs, registry: &Registry, cache_root: &Path) -> CliResult {
    let is_session = args.source.extension().is_some_and(|e| e == "json");
    let cache = open_cache(cache_root)?;
    let (prov, run_hint, recorded_cache) =
        if is_session { from_session(args, registry)? } else { from_pipeline(args, registry, &cache)? };
    let target = prov.target();
    let key = Key::from_hex(&target.key);
    if let Some(key) = key.filter(|k| matches!(cache.inspect(k), EntryState::Missing)) {
        let mut msg = format!(
            "`{}` ({} {}) is not in the cache at {}: run the pipeline first: {run_hint}",
            target.name,
            target.kind,
            key.short(),
            cache_root.display()
        );
        if let Some(other) = recorded_cache.filter(|c| Path::new(c) != cache_root) {
            if Cache::open(&other).contains(&key) {
                msg.push_str(&format!(" (that run used the cache {other}: pass --cache {other})"));
            }
        }
        return Err(CliError::Usage(msg));
    }
    if args.format == ExportFormat::Gguf {
        return export_gguf(args, &cache, &prov, run_hint);
    }
    let req = hf::Request {
        cache: &cache,
        provenance: &prov,
        dir: &args.dir,
        force: args.force,
        with_logits: args.with_logits,
        run_hint,
    };
    let done = match hf::export(&req) {
        Ok(d) => d,
        Err(ExportError::Refused(m)) => return Err(CliError::Usage(m)),
        Err(ExportError::Damaged(m)) => return Err(CliError::Failed(m)),
        Err(ExportError::Other(e)) => return Err(CliError::Failed(format!("exporting `{}`: {e:#}", target.name))),
    };
    println!(
        "exported `{}` ({} {}) to {}",
        target.name,
        target.kind,
        &target.key[..12.min(target.key.len())],
        args.dir.display()
    );
    for (name, size) in &done.files {
        println!("  {name:<30} {}", human(*size));
    }
    for n in &done.notes {
        println!("note: {n}");
    }
    if args.with_logits {
        println!(
            "check it with transformers: .venv/bin/python scripts/check_export.py {}  ({LOGITS_FILE} holds rpt-flow's logits)",
            args.dir.display()
        );
    }
    Ok(())
}

/// `--format gguf`: the verified Hugging Face export into a scratch directory beside the output
/// file, converted by `export::gguf::write_gguf` (which writes atomically), scratch removed.
fn export_gguf(args: &ExportArgs, cache: &Cache, prov: &Provenance, run_hint: String) -> CliResult {
    let ty = crate::export::gguf::GgufType::parse(&args.gguf_type).map_err(|e| CliError::Usage(format!("{e:#}")))?;
    if args.with_logits {
        return Err(CliError::Usage(
            "--with-logits is for --format hf (scripts/check_export.py); a GGUF is checked with scripts/check_gguf.py \
             (docs/gguf.md)"
                .into(),
        ));
    }
    let out = &args.dir;
    if out.is_dir() {
        return Err(CliError::Usage(format!(
            "{} is a directory: with --format gguf, give the file to write (e.g. {}/model.gguf)",
            out.display(),
            out.display()
        )));
    }
    if out.exists() && !args.force {
        return Err(CliError::Usage(format!("{} exists: pass --force to replace it", out.display())));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(CliError::Usage(format!("the folder {} does not exist: create it first", parent.display())));
    }
    // A killed earlier export may have left its scratch folder (or the folder's own hidden
    // sibling) here.
    for prefix in [".rpt-flow-gguf-", "..rpt-flow-gguf-"] {
        crate::export::outdir::remove_abandoned(&parent, prefix);
    }
    let scratch = parent.join(format!(".rpt-flow-gguf-{}", std::process::id()));
    let req = hf::Request { cache, provenance: prov, dir: &scratch, force: false, with_logits: false, run_hint };
    let target = prov.target();
    let result = match hf::export(&req) {
        Ok(_) => crate::export::gguf::write_gguf(&scratch, out, ty)
            .map_err(|e| CliError::Usage(format!("cannot write `{}` as GGUF: {e:#}", target.name))),
        Err(ExportError::Refused(m)) => Err(CliError::Usage(m)),
        Err(ExportError::Damaged(m)) => Err(CliError::Failed(m)),
        Err(ExportError::Other(e)) => Err(CliError::Failed(format!("exporting `{}`: {e:#}", target.name))),
    };
    let _ = std::fs::remove_dir_all(&scratch);
    let summary = result?;
    println!(
        "exported `{}` ({} {}) to {} ({:?}, {} tensors, {} ternary, {})",
        target.name,
        target.kind,
        &target.key[..12.min(target.key.len())],
        out.display(),
        summary.ty,
        summary.tensors,
        summary.ternary_tensors,
        human(summary.bytes)
    );
    for w in &summary.warnings {
        println!("warning: {w}");
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn produces_model(registry: &Registry, kind: &str) -> bool {
    registry.get(kind).is_some_and(|s| s.schema().output == ArtifactType::Model)
}

/// The instance `name` among `nodes`, or the error naming the model-producing instances (with a
/// did-you-mean), or saying that the instance makes no model.
fn find_target(nodes: &[Node], name: &str, registry: &Registry, pipeline: &str) -> Result<usize, CliError> {
    let models: Vec<&str> =
        nodes.iter().filter(|n| produces_model(registry, &n.kind)).map(|n| n.name.as_str()).collect();
    let Some(i) = nodes.iter().position(|n| n.name == name) else {
        let mut msg = format!("no instance `{name}` in pipeline `{pipeline}`");
        if let Some(n) = nearest(name, models.iter().copied()) {
            msg.push_str(&format!("; did you mean `{n}`?"));
        }
        msg.push_str(&format!("\nhelp: model-producing instances: {}", listing(&models)));
        return Err(CliError::Usage(msg));
    };
    let n = &nodes[i];
    if !produces_model(registry, &n.kind) {
        let what = registry.get(&n.kind).map(|s| s.schema().output.noun()).unwrap_or("no model");
        let above = n.inputs.iter().map(|(_, from)| from.as_str()).find(|from| models.contains(from));
        let mut msg =
            format!("`{name}` (kind `{}`) produces {what}, not a model, so there is nothing to export", n.kind);
        match above {
            Some(m) => msg.push_str(&format!("; the model it reads is `{m}`")),
            None => msg.push_str(&format!("\nhelp: model-producing instances: {}", listing(&models))),
        }
        return Err(CliError::Usage(msg));
    }
    Ok(i)
}

fn listing(names: &[&str]) -> String {
    const SHOWN: usize = 16;
    if names.is_empty() {
        return "none".into();
    }
    let mut s = names.iter().take(SHOWN).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", … ({} more; `rpt-flow plan` lists them all)", names.len() - SHOWN));
    }
    s
}

/// `rpt-flow run FILE --profile … --set … [--device …]`, quoted for a shell where needed.
fn run_command(file: &str, profiles: &[String], sets: &[String], device: &str) -> String {
    let mut parts = vec!["rpt-flow".to_string(), "run".into(), quote(file)];
    for p in profiles {
        parts.push(format!("--profile {}", quote(p)));
    }
    for s in sets {
        parts.push(format!("--set {}", quote(s)));
    }
    if device != "cpu" {
        parts.push(format!("--device {}", quote(device)));
    }
    parts.join(" ")
}

fn quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

type Loaded = (Provenance, String, Option<String>);

fn from_pipeline(args: &ExportArgs, registry: &Registry, cache: &Cache) -> Result<Loaded, CliError> {
    let pargs = PipelineArgs {
        pipeline: args.source.clone(),
        profiles: args.profiles.clone(),
        sets: args.sets.clone(),
        device: args.device.clone(),
    };
    let plan = load_plan(&pargs, registry, Some(cache.root()))?;
    let p = &plan.pipeline;
    let nodes: Vec<Node> = p
        .instances
        .iter()
        .enumerate()
        .map(|(i, inst)| Node {
            name: inst.name.clone(),
            kind: inst.kind.clone(),
            key: plan.keys[i].to_hex(),
            params: inst.params.clone(),
            inputs: inst.inputs.iter().map(|r| (r.slot.clone(), p.instances[r.target].name.clone())).collect(),
            metrics: None,
            model: produces_model(registry, &inst.kind),
            sweep: inst.sweep.as_ref().map(|s| {
                json!({
                    "name": s.sweep, "stage": s.template, "index": s.index,
                    "values": s.values.iter().cloned().collect::<Map<String, Json>>(),
                })
            }),
        })
        .collect();
    let target = find_target(&nodes, &args.instance, registry, &p.name)?;
    let mut prov = Provenance {
        pipeline: p.name.clone(),
        description: p.description.clone(),
        file: args.source.display().to_string(),
        origin: Origin::Pipeline,
        profiles: args.profiles.clone(),
        overrides: args.sets.clone(),
        seed: json!(p.seed),
        device: super::device_class(&args.device)?,
        nodes,
        target,
    };
    // Metrics of the lineage and of the readers, from intact manifests only.
    let wanted: Vec<usize> = prov.lineage().into_iter().chain(prov.readers()).collect();
    for i in wanted {
        if let EntryState::Intact(m) = cache.inspect(&plan.keys[i]) {
            prov.nodes[i].metrics = Some(match m.metrics {
                Json::Object(o) => o,
                Json::Null => Map::new(),
                other => [("value".to_string(), other)].into_iter().collect(),
            });
        }
    }
    let hint = run_command(&args.source.display().to_string(), &args.profiles, &args.sets, &args.device);
    Ok((prov, hint, None))
}

fn from_session(args: &ExportArgs, registry: &Registry) -> Result<Loaded, CliError> {
    if !args.profiles.is_empty() || !args.sets.is_empty() || args.device != "cpu" {
        return Err(CliError::Usage(format!(
            "--profile, --set and --device apply to a pipeline file; the session {} records the ones its run used",
            args.source.display()
        )));
    }
    let s = SessionRecord::read(&args.source).map_err(|e| CliError::Usage(format!("{e:#}")))?;
    let nodes: Vec<Node> = s
        .instances
        .iter()
        .map(|st| Node {
            name: st.name.clone(),
            kind: st.kind.clone(),
            key: st.key.clone(),
            params: st.params.clone(),
            inputs: st.inputs.clone(),
            metrics: matches!(st.status, StageStatus::Done | StageStatus::Cached).then(|| st.metrics.clone()),
            model: produces_model(registry, &st.kind),
            sweep: st.sweep.as_ref().and_then(|sw| serde_json::to_value(sw).ok()),
        })
        .collect();
    let target = find_target(&nodes, &args.instance, registry, &s.pipeline)?;
    let device = if s.device.is_empty() { "cpu".to_string() } else { s.device.clone() };
    let hint = run_command(&s.file, &s.profiles, &s.overrides, &device);
    let st = &s.instances[target];
    if !matches!(st.status, StageStatus::Done | StageStatus::Cached) {
        let why = st.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
        return Err(CliError::Usage(format!(
            "`{}` was not computed in the run of {} (status {}{why}): run the pipeline first: {hint}",
            st.name,
            args.source.display(),
            st.status
        )));
    }
    let prov = Provenance {
        pipeline: s.pipeline.clone(),
        description: s.description.clone(),
        file: s.file.clone(),
        origin: Origin::Session(args.source.display().to_string()),
        profiles: s.profiles.clone(),
        overrides: s.overrides.clone(),
        seed: s.seed.clone(),
        device,
        nodes,
        target,
    };
    let recorded = (!s.cache.is_empty()).then(|| s.cache.clone());
    Ok((prov, hint, recorded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_hint_quotes_what_a_shell_would_split() {
        let h = run_command("pipelines/p.toml", &["tiny".into()], &["stages.a.b=x y".into()], "cpu");
        assert_eq!(h, "rpt-flow run pipelines/p.toml --profile tiny --set 'stages.a.b=x y'");
    }
}
