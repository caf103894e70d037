//! The `[executor.slurm]` table: what each Slurm job asks for when a pipeline runs with
//! `--executor slurm`. It sits in the pipeline file or in a config file of its own
//! (`--executor-config`), and is never part of a key: where a stage ran does not change its result.
//!
//! ```toml
//! [executor.slurm]
//! partition = "gpu"
//! time = "2:00:00"
//! gres = "gpu:1"
//! [executor.slurm.kinds.finetune]
//! time = "12:00:00"
//! mem = "128G"
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use super::diag::{Diagnostic, Source, Span, SpecErrors};
use super::node::{Node, Val};
use super::schema::Catalog;

/// What one job asks of Slurm; `None` leaves the cluster's default. Values were checked when read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobResources {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// `--time`: minutes, `H:MM:SS`, `D-HH:MM`…
    pub time: Option<String>,
    /// `--gres`, e.g. `gpu:1`; `""` asks for none (a kind overriding the table's default).
    pub gres: Option<String>,
    pub cpus: Option<u32>,
    /// `--mem`, e.g. `64G`.
    pub mem: Option<String>,
    /// More sbatch options, appended as given.
    pub extra: Vec<String>,
}

impl JobResources {
    /// `self` with every value `over` sets replacing its own (`extra` is appended).
    pub fn overlaid(&self, over: &JobResources) -> JobResources {
        let pick = |a: &Option<String>, b: &Option<String>| b.clone().or_else(|| a.clone());
        JobResources {
            partition: pick(&self.partition, &over.partition),
            account: pick(&self.account, &over.account),
            qos: pick(&self.qos, &over.qos),
            time: pick(&self.time, &over.time),
            gres: pick(&self.gres, &over.gres),
            cpus: over.cpus.or(self.cpus),
            mem: pick(&self.mem, &over.mem),
            extra: self.extra.iter().chain(&over.extra).cloned().collect(),
        }
    }
}

/// The whole `[executor.slurm]` table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlurmSettings {
    /// For every job.
    pub all: JobResources,
    /// Per stage kind, over `all`.
    pub kinds: BTreeMap<String, JobResources>,
    /// How often the queue is read (seconds).
    pub poll_seconds: Option<f64>,
    /// The rpt-flow binary the jobs run (default: the one submitting them). It must be the same
    /// version: keys are checked in each job.
    pub program: Option<String>,
}

impl SlurmSettings {
    /// `self` with what `over` sets replacing its values (kind tables merge per kind).
    pub fn overlaid(&self, over: &SlurmSettings) -> SlurmSettings {
        let mut kinds = self.kinds.clone();
        for (k, r) in &over.kinds {
            let merged = kinds.get(k).cloned().unwrap_or_default().overlaid(r);
            kinds.insert(k.clone(), merged);
        }
        SlurmSettings {
            all: self.all.overlaid(&over.all),
            kinds,
            poll_seconds: over.poll_seconds.or(self.poll_seconds),
            program: over.program.clone().or_else(|| self.program.clone()),
        }
    }

    /// What a job of this kind asks for.
    pub fn for_kind(&self, kind: &str) -> JobResources {
        match self.kinds.get(kind) {
            Some(k) => self.all.overlaid(k),
            None => self.all.clone(),
        }
    }
}

const EXECUTORS: [&str; 1] = ["slurm"];
const RESOURCE_KEYS: [&str; 8] = ["partition", "account", "qos", "time", "gres", "cpus", "mem", "extra"];
const SLURM_ONLY_KEYS: [&str; 3] = ["kinds", "poll_seconds", "program"];

/// Reads the `executor` entry of a pipeline (or config file) root; problems go to `d`.
pub fn read(root: &Node, catalog: &Catalog, d: &mut Vec<Diagnostic>) -> Option<SlurmSettings> {
    let exec = root.get("executor")?;
    let table = exec.value.as_table()?; // a non-table is reported with the other top-level tables
    let mut out = None;
    for e in table {
        if e.key != "slurm" {
            d.push(
                Diagnostic::at(&e.key_span, format!("unknown executor `{}`", e.key))
                    .help("the executors with settings are: [executor.slurm]")
                    .suggest(&e.key, EXECUTORS),
            );
            continue;
        }
        let Some(entries) = e.value.as_table() else {
            d.push(Diagnostic::at(
                &e.value.span,
                format!("`executor.slurm` must be a table, found {}", e.value.type_name()),
            ));
            continue;
        };
        let mut s = SlurmSettings { all: resources(entries, "executor.slurm", true, d), ..SlurmSettings::default() };
        for x in entries {
            match x.key.as_str() {
                "poll_seconds" => s.poll_seconds = poll_seconds(&x.value, d),
                "program" => s.program = text(&x.value, "program", d),
                "kinds" => s.kinds = kind_tables(&x.value, catalog, d),
                _ => {}
            }
        }
        out = Some(s);
    }
    out
}

/// Reads a config file holding an `[executor.slurm]` table (and nothing else).
pub fn load_config(path: &Path, catalog: &Catalog) -> Result<SlurmSettings, SpecErrors> {
    let display = path.display().to_string();
    let fail = |message: String, help: &str| SpecErrors {
        sources: vec![],
        diagnostics: vec![Diagnostic::new(message, None).help(help.to_string())],
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(format!("cannot read executor config `{display}`: {e}"), "check the --executor-config path")
    })?;
    let sources = vec![Source::new(display.clone(), text.clone())];
    let doc = toml::de::DeTable::parse(&text).map_err(|e| SpecErrors {
        sources: sources.clone(),
        diagnostics: vec![Diagnostic::new(
            format!("invalid TOML: {}", e.message().trim()),
            e.span().map(|r| Span::new(0, r)),
        )],
    })?;
    let root = Node::from_toml(&doc, 0);
    let mut d = Vec::new();
    for e in root.as_table().unwrap_or_default() {
        if e.key != "executor" {
            d.push(
                Diagnostic::at(&e.key_span, format!("unknown table `{}` in an executor config", e.key))
                    .help("an executor config holds one [executor.slurm] table"),
            );
        } else if e.value.as_table().is_none() {
            d.push(Diagnostic::at(&e.value.span, format!("`executor` must be a table, found {}", e.value.type_name())));
        }
    }
    let settings = read(&root, catalog, &mut d);
    if !d.is_empty() {
        return Err(SpecErrors { sources, diagnostics: d });
    }
    settings.ok_or_else(|| {
        fail(
            format!("executor config `{display}` has no [executor.slurm] table"),
            "add [executor.slurm] with its settings",
        )
    })
}

fn kind_tables(node: &Node, catalog: &Catalog, d: &mut Vec<Diagnostic>) -> BTreeMap<String, JobResources> {
    let mut out = BTreeMap::new();
    let Some(kinds) = node.as_table() else {
        d.push(Diagnostic::at(
            &node.span,
            format!("`kinds` must be a table of stage kinds, found {}", node.type_name()),
        ));
        return out;
    };
    let known: Vec<&str> = catalog.kinds.iter().map(|k| k.kind).collect();
    for k in kinds {
        if !known.contains(&k.key.as_str()) {
            d.push(
                Diagnostic::at(&k.key_span, format!("unknown stage kind `{}`", k.key))
                    .help("`rpt-flow stages` lists the kinds")
                    .suggest(&k.key, known.iter().copied()),
            );
            continue;
        }
        match k.value.as_table() {
            Some(entries) => {
                out.insert(k.key.clone(), resources(entries, &format!("kinds.{}", k.key), false, d));
            }
            None => d.push(Diagnostic::at(
                &k.value.span,
                format!("`kinds.{}` must be a table, found {}", k.key, k.value.type_name()),
            )),
        }
    }
    out
}

/// The resource keys of a table; other keys are errors unless `top` allows the table-only ones.
fn resources(entries: &[super::node::Entry], table: &str, top: bool, d: &mut Vec<Diagnostic>) -> JobResources {
    let mut r = JobResources::default();
    for e in entries {
        let v = &e.value;
        let checked = |check: fn(&str) -> Result<(), String>, d: &mut Vec<Diagnostic>| {
            let s = text(v, &e.key, d)?;
            match check(&s) {
                Ok(()) => Some(s),
                Err(why) => {
                    d.push(Diagnostic::at(&v.span, format!("`{}`: {why}", e.key)));
                    None
                }
            }
        };
        match e.key.as_str() {
            "partition" | "account" | "qos" => {
                let value = checked(check_name, d);
                match e.key.as_str() {
                    "partition" => r.partition = value,
                    "account" => r.account = value,
                    _ => r.qos = value,
                }
            }
            // Whole minutes may be written as a number, as sbatch reads `--time=90`.
            "time" if matches!(v.val, Val::Int(m) if m >= 1) => r.time = Some(v.display()),
            "time" => r.time = checked(check_time, d),
            "gres" => r.gres = checked(check_gres, d),
            "mem" => r.mem = checked(check_mem, d),
            "cpus" => match v.val {
                Val::Int(n) if (1..=100_000).contains(&n) => r.cpus = Some(n as u32),
                _ => d.push(
                    Diagnostic::at(
                        &v.span,
                        format!("`cpus` must be an integer from 1 to 100000, found {}", v.display()),
                    )
                    .help("cpus is sbatch's --cpus-per-task"),
                ),
            },
            "extra" => match &v.val {
                Val::Array(items) => {
                    for item in items {
                        match item.as_str().map(check_extra) {
                            Some(Ok(())) => r.extra.push(item.as_str().unwrap_or_default().to_string()),
                            Some(Err(why)) => d.push(Diagnostic::at(&item.span, why)),
                            None => d.push(Diagnostic::at(
                                &item.span,
                                format!("`extra` holds sbatch options as strings, found {}", item.type_name()),
                            )),
                        }
                    }
                }
                _ => d.push(
                    Diagnostic::at(&v.span, format!("`extra` must be an array of strings, found {}", v.type_name()))
                        .help("e.g. extra = [\"--constraint=h100\"]"),
                ),
            },
            k if top && SLURM_ONLY_KEYS.contains(&k) => {}
            _ => {
                let allowed: Vec<&str> =
                    RESOURCE_KEYS.iter().chain(if top { &SLURM_ONLY_KEYS[..] } else { &[] }).copied().collect();
                d.push(
                    Diagnostic::at(&e.key_span, format!("unknown setting `{}` in [{table}]", e.key))
                        .help(format!("expected one of {}", allowed.join(", ")))
                        .suggest(&e.key, allowed.iter().copied()),
                );
            }
        }
    }
    r
}

fn text(v: &Node, key: &str, d: &mut Vec<Diagnostic>) -> Option<String> {
    match v.as_str() {
        Some(s) => Some(s.to_string()),
        None => {
            d.push(Diagnostic::at(&v.span, format!("`{key}` must be a string, found {}", v.type_name())));
            None
        }
    }
}

fn poll_seconds(v: &Node, d: &mut Vec<Diagnostic>) -> Option<f64> {
    let x = match v.val {
        Val::Int(n) => n as f64,
        Val::Float(f) => f,
        _ => f64::NAN,
    };
    if (0.1..=3600.0).contains(&x) {
        Some(x)
    } else {
        d.push(Diagnostic::at(
            &v.span,
            format!("`poll_seconds` must be a number from 0.1 to 3600, found {}", v.display()),
        ));
        None
    }
}

/// A partition, account or QOS name: what Slurm accepts, nothing a shell would read specially.
pub fn check_name(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.,".contains(c)) {
        Ok(())
    } else {
        Err(format!("`{s}` is not a Slurm name (letters, digits, `_-.,`)"))
    }
}

/// sbatch's `--time` formats: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`, `UNLIMITED`.
pub fn check_time(s: &str) -> Result<(), String> {
    let numbers = |part: &str, most: usize| {
        let fields: Vec<&str> = part.split(':').collect();
        fields.len() <= most
            && fields.iter().all(|f| !f.is_empty() && f.len() <= 6 && f.bytes().all(|b| b.is_ascii_digit()))
    };
    let ok = match s.split_once('-') {
        _ if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("infinite") => true,
        Some((days, rest)) => numbers(days, 1) && numbers(rest, 3),
        None => numbers(s, 3),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("`{s}` is not a Slurm time limit (minutes, H:MM:SS, D-HH:MM:SS or UNLIMITED)"))
    }
}

/// `--gres` lists: `gpu:1`, `gpu:a100:2,tmpdisk:10G`; empty asks for none.
pub fn check_gres(s: &str) -> Result<(), String> {
    let ok = s.split(',').all(|g| {
        let fields: Vec<&str> = g.split(':').collect();
        fields.len() <= 3
            && fields.iter().all(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)))
    });
    if s.is_empty() || ok {
        Ok(())
    } else {
        Err(format!("`{s}` is not a gres list (e.g. `gpu:1`, `gpu:a100:2`; \"\" for none)"))
    }
}

/// `--mem`: a number with an optional unit K, M, G or T.
pub fn check_mem(s: &str) -> Result<(), String> {
    let digits = s.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    if !digits.is_empty()
        && digits.len() <= 12
        && digits.bytes().all(|b| b.is_ascii_digit())
        && s.len() - digits.len() <= 1
    {
        Ok(())
    } else {
        Err(format!("`{s}` is not a memory size (e.g. `64G`, `500M`)"))
    }
}

/// Options rpt-flow sets itself on every job: a user's copy would break dependencies or logs.
const OWN_OPTIONS: [&str; 14] = [
    "--dependency",
    "-d",
    "--output",
    "-o",
    "--error",
    "-e",
    "--job-name",
    "-J",
    "--wrap",
    "--parsable",
    "--kill-on-invalid-dep",
    "--array",
    "-a",
    "--wait",
];

/// One extra sbatch option: starts with `-`, is not one rpt-flow sets itself.
pub fn check_extra(s: &str) -> Result<(), String> {
    if !s.starts_with('-') {
        return Err(format!("`{s}` is not an sbatch option (they start with `-`, e.g. `--constraint=h100`)"));
    }
    let name = s.split_once('=').map_or(s, |(n, _)| n);
    let short = name.len() > 2 && !name.starts_with("--");
    let name = if short { &name[..2] } else { name };
    if OWN_OPTIONS.contains(&name) {
        return Err(format!("`{s}`: rpt-flow sets {name} itself on every job (dependencies, logs, names)"));
    }
    Ok(())
}

/// A value check: why the value is wrong.
type Check = fn(&str) -> Result<(), String>;

/// Checks settings given on the command line like the table's (errors name the flag).
pub fn check_flags(r: &JobResources) -> Result<(), String> {
    let checks: [(&str, &Option<String>, Check); 6] = [
        ("partition", &r.partition, check_name),
        ("account", &r.account, check_name),
        ("qos", &r.qos, check_name),
        ("time", &r.time, check_time),
        ("gres", &r.gres, check_gres),
        ("mem", &r.mem, check_mem),
    ];
    for (flag, value, check) in checks {
        if let Some(v) = value {
            check(v).map_err(|why| format!("--{flag}: {why}"))?;
        }
    }
    for x in &r.extra {
        check_extra(x).map_err(|why| format!("--sbatch-arg: {why}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_like_sbatch_reads_them() {
        for ok in ["30", "1:00", "2:00:00", "1-12", "1-12:30", "2-00:00:00", "UNLIMITED"] {
            assert!(check_time(ok).is_ok(), "{ok}");
        }
        for bad in ["", "two hours", "1:2:3:4", "1-", "-5", "1h", "1;rm"] {
            assert!(check_time(bad).is_err(), "{bad}");
        }
        assert!(check_gres("gpu:1").is_ok() && check_gres("gpu:a100:2,tmp:10G").is_ok() && check_gres("").is_ok());
        assert!(check_gres("gpu 1").is_err() && check_gres("gpu:1:2:3").is_err() && check_gres(",").is_err());
        assert!(check_mem("64G").is_ok() && check_mem("500").is_ok());
        assert!(check_mem("64GB").is_err() && check_mem("G").is_err() && check_mem("-1").is_err());
        assert!(check_name("gpu-h100").is_ok() && check_name("a b").is_err() && check_name("x;y").is_err());
        assert!(check_extra("--constraint=h100").is_ok() && check_extra("--exclusive").is_ok());
        for own in ["--dependency=afterok:1", "-d", "--output=x", "-ox", "--wrap=ls", "-Jname"] {
            assert!(check_extra(own).unwrap_err().contains("itself"), "{own}");
        }
        assert!(check_extra("constraint").is_err());
    }

    #[test]
    fn kind_settings_overlay_the_table() {
        let all = JobResources {
            time: Some("1:00:00".into()),
            gres: Some("gpu:1".into()),
            extra: vec!["--a".into()],
            ..Default::default()
        };
        let ft = JobResources { time: Some("12:00:00".into()), extra: vec!["--b".into()], ..Default::default() };
        let s =
            SlurmSettings { all, kinds: [("finetune".to_string(), ft)].into_iter().collect(), ..Default::default() };
        let r = s.for_kind("finetune");
        assert_eq!((r.time.as_deref(), r.gres.as_deref()), (Some("12:00:00"), Some("gpu:1")));
        assert_eq!(r.extra, vec!["--a", "--b"]);
        assert_eq!(s.for_kind("prune").time.as_deref(), Some("1:00:00"));
    }
}
