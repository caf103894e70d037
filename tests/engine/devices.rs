//! `--device cuda:0,cuda:1`: one instance per device at a time. No GPU is needed to test the
//! scheduling: probe stages record the device string their context names, and when. Runs the
//! executor as a library (the CLI refuses cuda in a build without the `cuda` feature).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;
use rpt_flow::exec::{
    ArtifactType, CancelFlag, KindSchema, ParamDef, ParamDefault, ParamType, Registry, RunOptions, Stage, StageContext,
};
use serde_json::{json, Value as Json};

/// (instance, device, start, end) of every probe that ran, in this test process.
static SPANS: Mutex<Vec<(String, String, Instant, Instant)>> = Mutex::new(Vec::new());

static PARAMS: [ParamDef; 1] =
    [ParamDef { name: "tag", ty: ParamType::UINT, default: ParamDefault::Required, help: "makes keys distinct" }];

static PROBE: KindSchema = KindSchema {
    kind: "probe",
    version: 1,
    help: "Sleeps 250 ms and records its device.",
    inputs: &[],
    params: &PARAMS,
    output: ArtifactType::Metrics,
};

static HEAVY: KindSchema = KindSchema { kind: "heavy-probe", help: "A probe that needs its device alone.", ..PROBE };

struct Probe(&'static KindSchema, bool);

impl Stage for Probe {
    fn schema(&self) -> &'static KindSchema {
        self.0
    }
    fn runs_alone(&self) -> bool {
        self.1
    }
    fn run(&self, ctx: &StageContext) -> Result<Json> {
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(250));
        SPANS.lock().unwrap().push((ctx.instance.to_string(), ctx.device.to_string(), start, Instant::now()));
        Ok(json!({}))
    }
}

#[test]
fn a_device_list_runs_one_instance_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut toml = String::from("[pipeline]\nname = \"devices\"\n");
    for t in 0..5 {
        toml.push_str(&format!("[stages.p{t}]\nkind = \"probe\"\ntag = {t}\n"));
    }
    toml.push_str("[stages.heavy]\nkind = \"heavy-probe\"\ntag = 9\n");
    let pipeline = dir.path().join("devices.toml");
    std::fs::write(&pipeline, toml).unwrap();
    let mut registry = Registry::new();
    registry.register(Probe(&PROBE, false)).register(Probe(&HEAVY, true));
    let args = rpt_flow::cli::PipelineArgs { pipeline, profiles: vec![], sets: vec![], device: "cuda:0,cuda:1".into() };
    let cache_root = dir.path().join("cache");
    let Ok(plan) = rpt_flow::cli::plan_for_class(&args, "cuda", &registry, Some(&cache_root), false) else {
        panic!("the pipeline plans")
    };
    let session = dir.path().join("session.json");
    let opts = RunOptions {
        keep_going: false,
        quiet: true,
        device: "cuda:0,cuda:1".into(),
        session_path: session.clone(),
        cancel: CancelFlag::default(),
        jobs: 1,
    };
    let outcome = rpt_flow::exec::run(&plan, &registry, &rpt_flow::cache::Cache::open(&cache_root), &opts).unwrap();
    assert!(outcome.ok() && outcome.computed == 6);

    let spans = SPANS.lock().unwrap().clone();
    assert_eq!(spans.len(), 6);
    let mut overlapped = false;
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            let together = a.2 < b.3 && b.2 < a.3;
            assert!(!(together && a.1 == b.1), "{} and {} shared {} at once", a.0, b.0, a.1);
            overlapped |= together;
        }
    }
    assert!(overlapped, "instances ran at once on different devices: {spans:?}");
    for d in ["cuda:0", "cuda:1"] {
        assert!(spans.iter().any(|s| s.1 == d), "{d} was used: {spans:?}");
    }
    let record: Json = serde_json::from_str(&std::fs::read_to_string(session).unwrap()).unwrap();
    assert_eq!(record["device"], "cuda:0,cuda:1");
    for (name, device, ..) in &spans {
        assert_eq!(record["stages"][name]["device"], json!(device), "the session says where {name} ran");
    }
}

#[test]
fn device_lists_are_checked() {
    let sb = crate::support::Sandbox::new();
    let p = crate::support::repo().join("tests/pipelines/chain.toml");
    let p = p.to_str().unwrap();
    let err = sb.run(&["plan", p, "--device", "cuda:0,cuda:0"]).expect(2).stderr();
    assert!(err.contains("`cuda:0` is listed twice"), "{err}");
    let err = sb.run(&["plan", p, "--device", "cuda:0,cpu"]).expect(2).stderr();
    assert!(err.contains("`cpu` is not cuda:N"), "{err}");
    let cuda = sb.run(&["plan", p, "--device", "cuda", "--format", "json"]).expect(0).json();
    let list = sb.run(&["plan", p, "--device", "cuda:1,cuda:0", "--format", "json"]).expect(0).json();
    assert_eq!(cuda["instances"], list["instances"], "a list plans the keys of its class");
    let err = sb.run(&["run", p, "--device", "cuda:0,cuda:1", "--jobs", "2"]).expect(2).stderr();
    assert!(err.contains("leave out --jobs"), "{err}");
    let err = sb.run(&["run", p, "--device", "cuda:0,cuda:1", "--executor", "slurm"]).expect(2).stderr();
    assert!(err.contains("a device list is for local runs"), "{err}");
}
