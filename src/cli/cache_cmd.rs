//! `rpt-flow cache ls | verify | gc`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;

use super::{load_plan, open_cache, CliError, CliResult, PipelineArgs};
use crate::cache::{GcOptions, Key};
use crate::exec::Registry;

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List entries: key, kind, size, age, the pipeline that last used it.
    Ls,
    /// Re-hash every file against its manifest; exit 1 if any entry is damaged.
    Verify,
    /// Remove entries not reachable from the given pipelines and/or older than an age, partial
    /// states of finished keys, and leftovers of killed runs. Never touches an entry in use.
    Gc {
        /// Keep every entry these pipelines (with and without each of their profiles) use.
        #[arg(long = "keep", value_name = "PIPELINE.toml")]
        keep: Vec<PathBuf>,
        /// Remove entries not used for at least this long: 30d, 12h, 90m, 45s (0s: all).
        #[arg(long, value_name = "AGE")]
        older_than: Option<String>,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(cmd: &CacheCommand, registry: &Registry, root: &Path) -> CliResult {
    let cache = open_cache(root);
    match cmd {
        CacheCommand::Ls => ls(&cache),
        CacheCommand::Verify => {
            let entries = cache.entries()?;
            let problems = cache.verify()?;
            if problems.is_empty() {
                println!("{} entries verified in {}: all intact", entries.len(), root.display());
                return Ok(());
            }
            for p in &problems {
                let key = p.key.map(|k| k.short()).unwrap_or_else(|| "?".into());
                println!("DAMAGED {key}  {}: {}", p.dir.display(), p.problem);
            }
            Err(CliError::Failed(format!(
                "{} problem(s) in {} entries; remove damaged entries with `rpt-flow cache gc` after deleting them, or rerun the pipeline to recompute",
                problems.len(),
                entries.len()
            )))
        }
        CacheCommand::Gc { keep, older_than, dry_run } => {
            let older_than = older_than.as_deref().map(parse_age).transpose()?;
            let keep = if keep.is_empty() { None } else { Some(reachable(keep, registry, root)?) };
            let report = cache.gc(&GcOptions { keep, older_than, dry_run: *dry_run })?;
            let verb = if *dry_run { "would remove" } else { "removed" };
            for (k, bytes) in &report.removed_entries {
                println!("{verb} entry {} ({})", k.short(), human_bytes(*bytes));
            }
            for k in &report.removed_partials {
                println!("{verb} partial state {}", k.short());
            }
            for p in &report.removed_tmp {
                println!("{verb} leftover {}", p.display());
            }
            for k in &report.skipped_locked {
                println!("kept {} (in use by a running process)", k.short());
            }
            println!(
                "{verb} {} entries, {} partial states, {} leftovers: {}",
                report.removed_entries.len(),
                report.removed_partials.len(),
                report.removed_tmp.len(),
                human_bytes(report.bytes_freed)
            );
            Ok(())
        }
    }
}

fn ls(cache: &crate::cache::Cache) -> CliResult {
    let entries = cache.entries()?;
    if entries.is_empty() {
        println!("cache {} is empty", cache.root().display());
        return Ok(());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    println!("{:<12}  {:<14} {:>10}  {:>8}  {:<24} instance", "key", "kind", "size", "age", "last used by");
    let mut total = 0;
    for e in &entries {
        total += e.bytes;
        let m = &e.manifest;
        println!(
            "{:<12}  {:<14} {:>10}  {:>8}  {:<24} {}",
            m.key.short(),
            m.kind,
            human_bytes(e.bytes),
            human_age(now.saturating_sub(m.created)),
            e.last_pipeline,
            m.instance
        );
    }
    println!("{} entries, {}", entries.len(), human_bytes(total));
    Ok(())
}

/// Keys of every instance of these pipelines, with no profile and with each profile they define.
fn reachable(files: &[PathBuf], registry: &Registry, root: &Path) -> Result<HashSet<Key>, CliError> {
    let mut keys = HashSet::new();
    for f in files {
        let base = PipelineArgs { pipeline: f.clone(), profiles: vec![], sets: vec![], device: "cpu".into() };
        let plan = load_plan(&base, registry, Some(root))?;
        keys.extend(plan.keys.iter().copied());
        // Every combination of the pipeline's profiles (e.g. `tiny` with `rigorous`); past six
        // profiles, each alone.
        let profiles = plan.pipeline.profiles.clone();
        let combos: Vec<Vec<String>> = if profiles.len() <= 6 {
            (1u32..1 << profiles.len())
                .map(|m| {
                    profiles.iter().enumerate().filter(|(i, _)| m & (1 << i) != 0).map(|(_, p)| p.clone()).collect()
                })
                .collect()
        } else {
            profiles.iter().map(|p| vec![p.clone()]).collect()
        };
        for combo in combos {
            let args = PipelineArgs { profiles: combo, ..base.clone() };
            keys.extend(load_plan(&args, registry, Some(root))?.keys);
        }
    }
    Ok(keys)
}

fn parse_age(s: &str) -> Result<Duration, CliError> {
    let bad = || CliError::Usage(format!("--older-than `{s}`: write a number and a unit, e.g. 30d, 12h, 90m, 45s"));
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(n * secs))
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u < UNITS.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}
