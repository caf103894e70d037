//! `rpt-flow cache ls | verify | gc`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;

use super::{open_cache, plan_for_class, CliError, CliResult, PipelineArgs};
use crate::cache::{GcOptions, Key};
use crate::exec::Registry;

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List entries: key, kind, size, age, the pipeline that last used it.
    Ls {
        /// Output format.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Re-hash every file against its manifest; exit 1 if any entry is damaged.
    Verify {
        /// Move damaged entries, and every entry computed from them, to <cache>/quarantine/; the
        /// next run recomputes them.
        #[arg(long)]
        fix: bool,
    },
    /// Remove entries not reachable from the given pipelines and/or older than an age, partial
    /// states of finished keys, and leftovers of killed runs. Never touches an entry in use.
    Gc {
        /// Keep every entry these pipelines use: with every combination of their profiles, on
        /// every device class, and every entry a recorded run of them used (its session files,
        /// whatever its --set overrides).
        #[arg(long = "keep", value_name = "PIPELINE.toml")]
        keep: Vec<PathBuf>,
        /// Where the session files of recorded runs are (for --keep).
        #[arg(long, env = "RPT_SESSIONS", default_value = "sessions")]
        sessions: PathBuf,
        /// Remove entries not used for at least this long: 30d, 12h, 90m, 45s (0s: all).
        #[arg(long, value_name = "AGE")]
        older_than: Option<String>,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(cmd: &CacheCommand, registry: &Registry, root: &Path) -> CliResult {
    let cache = open_cache(root)?;
    match cmd {
        CacheCommand::Ls { format } if format == "json" => ls_json(&cache),
        CacheCommand::Ls { .. } => ls(&cache),
        CacheCommand::Verify { fix } => {
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
            if *fix {
                return quarantine_damaged(&cache, &problems);
            }
            Err(CliError::Failed(format!(
                "{} problem(s) in {} entries; `rpt-flow cache verify --fix` moves the damaged entries and those computed from them to {}, and the next run recomputes them",
                problems.len(),
                entries.len(),
                root.join("quarantine").display()
            )))
        }
        CacheCommand::Gc { keep, sessions, older_than, dry_run } => {
            let older_than = older_than.as_deref().map(parse_age).transpose()?;
            let keep = if keep.is_empty() { None } else { Some(reachable(keep, sessions, registry, root)?) };
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

/// `verify --fix`: moves every damaged entry and every entry computed from one to quarantine.
fn quarantine_damaged(cache: &crate::cache::Cache, problems: &[crate::cache::VerifyProblem]) -> CliResult {
    let mut damaged: Vec<Key> = problems.iter().filter_map(|p| p.key).collect();
    damaged.dedup();
    let descendants = cache.descendants(&damaged)?;
    let mut moved = 0;
    let mut busy = Vec::new();
    for (key, why) in damaged
        .iter()
        .map(|k| (k, "damaged (see `rpt-flow cache verify`)".to_string()))
        .chain(descendants.iter().map(|k| (k, "computed from a damaged entry".to_string())))
    {
        if !cache.entry_dir(key).exists() {
            continue;
        }
        let Some(_lock) = cache.try_lock(key)? else {
            busy.push(key.short());
            continue;
        };
        let to = cache.quarantine(key, &why)?;
        println!("moved {} to {} ({why})", key.short(), to.display());
        moved += 1;
    }
    println!(
        "{moved} entries moved to quarantine ({} damaged, {} computed from them); run the pipelines again to recompute them",
        damaged.len(),
        descendants.len()
    );
    if !busy.is_empty() {
        return Err(CliError::Failed(format!("entries in use by another process were left: {}", busy.join(", "))));
    }
    Ok(())
}

fn ls(cache: &crate::cache::Cache) -> CliResult {
    let entries = cache.entries()?;
    if entries.is_empty() {
        println!("cache {} is empty", cache.root().display());
        return Ok(());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    println!("{:<12}  {:<14} {:>10}  {:>8}  {:<24} instance", "key", "kind", "size", "age", "last used by");
    for e in &entries {
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
    let listed: u64 = entries.iter().map(|e| e.bytes).sum();
    let disk = crate::cache::disk_bytes(&entries);
    let shared = if disk < listed {
        format!(" ({} of the listed sizes are files shared between entries by hard links)", human_bytes(listed - disk))
    } else {
        String::new()
    };
    println!("{} entries, {} on disk{shared}", entries.len(), human_bytes(disk));
    Ok(())
}

/// `cache ls --format json`: `{cache, entries: [...], count, bytes_listed, bytes_on_disk}`, entries
/// in the text listing's order.
fn ls_json(cache: &crate::cache::Cache) -> CliResult {
    let entries = cache.entries()?;
    let list: Vec<_> = entries
        .iter()
        .map(|e| {
            let m = &e.manifest;
            serde_json::json!({
                "key": m.key.to_hex(),
                "kind": m.kind,
                "version": m.version,
                "bytes": e.bytes,
                "created": m.created,
                "last_used": e.last_used,
                "last_pipeline": e.last_pipeline,
                "pipeline": m.pipeline,
                "instance": m.instance,
                "seconds": m.seconds,
                "rpt_flow_version": m.rpt_flow_version,
                "files": m.files.len(),
                "inputs": m.inputs.iter().map(|i| i.key.to_hex()).collect::<Vec<_>>(),
                "entry": cache.entry_dir(&m.key).display().to_string(),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "cache": cache.root().display().to_string(),
        "count": entries.len(),
        "bytes_listed": entries.iter().map(|e| e.bytes).sum::<u64>(),
        "bytes_on_disk": crate::cache::disk_bytes(&entries),
        "entries": list,
    });
    println!("{}", serde_json::to_string_pretty(&doc).map_err(anyhow::Error::from)?);
    Ok(())
}

/// Keys of every instance of these pipelines: with no profile and every combination of the
/// profiles they define, on each device class (a key includes it: planning on the CPU alone
/// would drop every GPU result), and every key their recorded runs used (session files under
/// `sessions` naming the same pipeline and file name — runs with `--set` overrides included).
fn reachable(files: &[PathBuf], sessions: &Path, registry: &Registry, root: &Path) -> Result<HashSet<Key>, CliError> {
    let mut keys = HashSet::new();
    for f in files {
        let base = PipelineArgs { pipeline: f.clone(), profiles: vec![], sets: vec![], device: "cpu".into() };
        // Local identities only: gc must work offline, and what was downloaded here has its
        // local refs (entries of an older commit are in the session files below).
        let plan = plan_for_class(&base, "cpu", registry, Some(root), false)?;
        // Every combination of the pipeline's profiles (e.g. `tiny` with `rigorous`); past six
        // profiles, each alone.
        let profiles = plan.pipeline.profiles.clone();
        let mut combos: Vec<Vec<String>> = vec![vec![]];
        if profiles.len() <= 6 {
            combos.extend((1u32..1 << profiles.len()).map(|m| {
                profiles.iter().enumerate().filter(|(i, _)| m & (1 << i) != 0).map(|(_, p)| p.clone()).collect()
            }));
        } else {
            combos.extend(profiles.iter().map(|p| vec![p.clone()]));
        }
        for class in ["cpu", "cuda"] {
            for combo in &combos {
                let args = PipelineArgs { profiles: combo.clone(), ..base.clone() };
                keys.extend(plan_for_class(&args, class, registry, Some(root), false)?.keys);
            }
        }
        keys.extend(recorded_keys(sessions, &plan.pipeline.name, f)?);
    }
    Ok(keys)
}

/// The keys in every recorded run of the pipeline `name` from a file named like `file`.
fn recorded_keys(dir: &Path, name: &str, file: &Path) -> Result<Vec<Key>, CliError> {
    let mut keys = Vec::new();
    for record in crate::session::recorded_sessions(dir, name, file) {
        keys.extend(record.instances.iter().filter_map(|s| Key::from_hex(&s.key)));
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
