//! The sbatch command line of one instance's job, as submitted and as `plan --executor slurm`
//! prints it.

use std::path::Path;

use crate::spec::executor::JobResources;

/// One job to submit.
pub struct JobSpec<'a> {
    pub pipeline: &'a str,
    pub instance: &'a str,
    /// Job ids (or, in a dry run, shell variables) of the inputs' jobs.
    pub after: &'a [String],
    pub resources: &'a JobResources,
    pub log: &'a Path,
    /// What the job runs: rpt-flow on this one instance.
    pub command: &'a [String],
}

/// sbatch's arguments (without `--parsable`, which the submitter adds).
pub fn args(job: &JobSpec) -> Vec<String> {
    let mut a =
        vec![format!("--job-name={}", job_name(job.pipeline, job.instance)), format!("--output={}", job.log.display())];
    if !job.after.is_empty() {
        // A failed input cancels the job instead of leaving it pending for ever.
        a.push(format!("--dependency=afterok:{}", job.after.join(":")));
        a.push("--kill-on-invalid-dep=yes".into());
    }
    let r = job.resources;
    let flags = [
        ("partition", &r.partition),
        ("account", &r.account),
        ("qos", &r.qos),
        ("time", &r.time),
        ("gres", &r.gres),
        ("mem", &r.mem),
    ];
    for (flag, value) in flags {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            a.push(format!("--{flag}={v}"));
        }
    }
    if let Some(n) = r.cpus {
        a.push(format!("--cpus-per-task={n}"));
    }
    a.extend(r.extra.iter().cloned());
    a.push(format!("--wrap=exec {}", job.command.iter().map(|s| shell_quote(s)).collect::<Vec<_>>().join(" ")));
    a
}

/// `rpt-flow:<pipeline>:<instance>`, for people reading `squeue` (never used to find a job).
pub fn job_name(pipeline: &str, instance: &str) -> String {
    let name: String = format!("rpt-flow:{pipeline}:{instance}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-=:[],".contains(c) { c } else { '_' })
        .collect();
    name.chars().take(200).collect()
}

/// `s` as one POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_runs_its_command_after_its_inputs_jobs() {
        let resources = JobResources {
            partition: Some("gpu".into()),
            gres: Some(String::new()),
            cpus: Some(4),
            extra: vec!["--exclusive".into()],
            ..Default::default()
        };
        let command = ["/bin/rpt-flow".to_string(), "--set".into(), "stages.x.text=it's".into()];
        let a = args(&JobSpec {
            pipeline: "prog",
            instance: "level[sparsity=0.1].tuned",
            after: &["12".into(), "13".into()],
            resources: &resources,
            log: Path::new("/c/jobs/k/slurm-%j.log"),
            command: &command,
        });
        assert_eq!(
            a,
            [
                "--job-name=rpt-flow:prog:level[sparsity=0.1].tuned",
                "--output=/c/jobs/k/slurm-%j.log",
                "--dependency=afterok:12:13",
                "--kill-on-invalid-dep=yes",
                "--partition=gpu",
                "--cpus-per-task=4",
                "--exclusive",
                r"--wrap=exec /bin/rpt-flow --set 'stages.x.text=it'\''s'",
            ]
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(job_name("p", "a b;c"), "rpt-flow:p:a_b_c");
    }
}
