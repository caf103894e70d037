//! Running the engine's CLI as a user does: the `toy-flow` binary (rpt-flow's CLI with toy
//! stages) in a fresh temporary directory, reading the files it writes.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>/examples/toy-flow`, brought up to date once per test process (`cargo test
/// --test engine` alone would not rebuild examples, and a stale harness gives stale answers).
pub fn toy_flow() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "--example", "toy-flow"]).current_dir(repo());
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().expect("cargo runs").success(), "building the toy-flow example failed");
        profile_dir.join("examples").join("toy-flow")
    })
    .clone()
}

/// A path in the shared folder beside the checkout (`../shared`: WikiText-2, stories260K), which
/// CI has and a user's clone does not. `None` when it is absent: the calling test returns early
/// after this prints that it was skipped and why. With `RPT_REQUIRE_SHARED=1` (set by `.ci/run`)
/// its absence fails the test instead, so CI cannot pass by skipping.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = repo().join("../shared").join(rel);
    if p.exists() {
        return Some(p);
    }
    let why = format!(
        "{} is missing (the shared data folder beside the checkout, see shared/data/README.md; never committed here)",
        p.display()
    );
    if std::env::var_os("RPT_REQUIRE_SHARED").is_some_and(|v| v == "1") {
        panic!("{why}, and RPT_REQUIRE_SHARED=1 requires it");
    }
    eprintln!("skipped: {why}");
    None
}

/// stories260K (a real pretrained Llama in ../shared, never committed) converted into `dir` by
/// scripts/convert_llama2c.py: the converted folder, or `None` (after saying why) when the shared
/// files or python3 are missing.
pub fn stories260k_converted(dir: &Path) -> Option<PathBuf> {
    let (bin, tok) = (shared("models/stories260K/stories260K.bin")?, shared("models/stories260K/tok512.bin")?);
    let converted = dir.join("stories260K");
    let status =
        Command::new("python3").arg(repo().join("scripts/convert_llama2c.py")).args([&bin, &tok, &converted]).status();
    match status {
        Ok(s) if s.success() => Some(converted),
        Ok(s) => panic!("scripts/convert_llama2c.py failed ({s})"),
        Err(e) => {
            eprintln!("skipped: python3 is not available to convert stories260K ({e})");
            None
        }
    }
}

/// The shipped binary (with the real stage kinds).
pub fn rpt_flow() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rpt-flow"))
}

/// A temporary working directory to run the CLI in.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Sandbox {
    /// Runs the toy-stage harness.
    pub fn new() -> Sandbox {
        Sandbox { dir: tempfile::tempdir().expect("temp dir"), bin: toy_flow() }
    }

    /// Runs the shipped `rpt-flow` binary.
    pub fn real() -> Sandbox {
        Sandbox { dir: tempfile::tempdir().expect("temp dir"), bin: rpt_flow() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file (relative to the sandbox) and returns its path.
    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, content).unwrap();
        p
    }

    /// Copies a file of the repository into the sandbox under the same name.
    pub fn copy(&self, repo_path: &str) -> PathBuf {
        let content = std::fs::read_to_string(repo().join(repo_path)).unwrap();
        self.write(Path::new(repo_path).file_name().unwrap().to_str().unwrap(), &content)
    }

    /// The CLI with the sandbox as working directory and no cache/session overrides.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .current_dir(self.path())
            .env_remove("RPT_CACHE")
            .env_remove("RPT_SESSIONS")
            .env_remove("TOY_EVAL_VERSION")
            .env("RAYON_NUM_THREADS", "1")
            .env("CANDLE_NUM_THREADS", "1")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run(self.cmd(args).output().expect("toy-flow runs"))
    }

    pub fn spawn(&self, args: &[&str], envs: &[(&str, &str)]) -> Child {
        let mut c = self.cmd(args);
        for (k, v) in envs {
            c.env(k, v);
        }
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("toy-flow starts")
    }

    /// The session file written today for this pipeline file name.
    pub fn session(&self, file: &str) -> Json {
        let today = time::OffsetDateTime::now_utc().date().to_string();
        let p = self.path().join("sessions").join(today).join(file);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
        serde_json::from_str(&text).unwrap()
    }

    /// Lines of the TOY_LOG computation log (instance and key of every computation).
    pub fn log_lines(&self, log: &str) -> Vec<String> {
        std::fs::read_to_string(self.path().join(log))
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

/// A finished command.
pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// Asserts the exit code, showing both streams when it differs.
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(self.code(), code, "exit code\n--- stdout\n{}\n--- stderr\n{}", self.stdout(), self.stderr());
        self
    }
    pub fn json(&self) -> Json {
        serde_json::from_str(&self.stdout()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout()))
    }
}

/// `plan --format json` → (instance name, key) in execution order.
pub fn plan_keys(sb: &Sandbox, args: &[&str]) -> Vec<(String, String)> {
    let mut a = vec!["plan", "--format", "json"];
    a.extend_from_slice(args);
    instance_keys(&sb.run(&a).expect(0).json())
}

/// (name, key) of each instance of a `plan --format json` document.
pub fn instance_keys(doc: &Json) -> Vec<(String, String)> {
    doc["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_string(), i["key"].as_str().unwrap().to_string()))
        .collect()
}

/// Polls until `f` is true or the timeout passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Any checkpoint directory under cache/partial?
pub fn has_checkpoint(cache: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(cache.join("partial")) else { return false };
    rd.flatten().any(|k| {
        std::fs::read_dir(k.path())
            .map(|r| r.flatten().any(|c| c.file_name().to_string_lossy().starts_with("ckpt-")))
            .unwrap_or(false)
    })
}

/// A session's per-instance results without the fields that legitimately differ between runs.
pub fn results(session: &Json) -> Json {
    let mut stages = session["stages"].clone();
    for (_, s) in stages.as_object_mut().unwrap() {
        let o = s.as_object_mut().unwrap();
        o.remove("seconds");
        o.remove("peak_rss_mb");
        o.remove("cached");
        o.remove("status");
    }
    stages
}

/// The local Slurm cluster (scripts/slurm-local/start.sh), held by one test at a time: its two
/// CPUs are shared, and a test that watches concurrency needs them free. `None` when no cluster
/// answers: the test returns early after this prints why. With `RPT_REQUIRE_SLURM=1` (set by
/// `.ci/run`, which starts one) a missing cluster fails the test instead.
/// `RPT_REQUIRE_SLURM=1`: a missing cluster is a failure, not a skip.
fn slurm_expected() -> bool {
    std::env::var_os("RPT_REQUIRE_SLURM").is_some_and(|v| v == "1")
}

pub fn slurm_cluster() -> Option<std::sync::MutexGuard<'static, ()>> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A node still finishing the previous test's job reads "completing" (longer on a busy
    // machine), and a busy slurmctld can miss a query: ask again for up to 30 s.
    let answers = || {
        Command::new("sinfo").args(["--noheader", "--format=%T"]).output().is_ok_and(|o| {
            o.status.success()
                && ["idle", "mixed", "allocated", "completing"]
                    .iter()
                    .any(|s| String::from_utf8_lossy(&o.stdout).contains(s))
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let up = loop {
        if answers() {
            break true;
        }
        if !slurm_expected() || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    if !up {
        let why = "no Slurm cluster answers `sinfo` (start one with scripts/slurm-local/start.sh, as root)";
        if slurm_expected() {
            panic!("{why}, and RPT_REQUIRE_SLURM=1 requires it");
        }
        eprintln!("skipped: {why}");
        return None;
    }
    Some(LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Our jobs in the queue whose name starts with `prefix`, with their states.
pub fn queued_jobs(prefix: &str) -> Vec<(String, String)> {
    let out = Command::new("squeue").args(["--noheader", "--states=all", "--format=%i|%T|%j"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split('|').collect();
            (f.len() == 3 && f[2].starts_with(prefix)).then(|| (f[0].to_string(), f[1].to_string()))
        })
        .collect()
}
