//! Shared helpers for the model tests: fixture paths, reference tensors, tolerance checks.

use candle_core::{DType, Device, Tensor};
use rpt_flow::model::{HookPoint, Hooks, LoadOptions, Model, Quantization};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// `tests/fixtures/<name>` of the checkout: the one the binary was built in, or `RPT_TEST_ROOT`
/// (a test binary carried to another machine, as scripts/device-check.sh runs it).
pub fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("RPT_TEST_ROOT").map_or(PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    root.join("tests/fixtures").join(name)
}

pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load(name: &str) -> Reference {
        let dir = fixture(name);
        let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        Reference { tensors, json }
    }
    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("reference has no {key}"))
    }
    /// The fixture's token ids on the test device (`RPT_TEST_DEVICE`), where the models are.
    pub fn input_ids(&self) -> Tensor {
        self.get("input_ids").to_dtype(DType::U32).unwrap().to_device(&test_device()).unwrap()
    }
    pub fn nll(&self, key: &str) -> f64 {
        self.json["nll"][key].as_f64().unwrap()
    }
    pub fn greedy(&self, key: &str) -> Vec<u32> {
        self.json["greedy"][key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    }
    pub fn greedy_prompt(&self) -> Vec<u32> {
        self.json["greedy_prompt"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    }
}

/// The device the model tests run on: cpu, or `RPT_TEST_DEVICE=cuda` (scripts/device-check.sh
/// runs the transformers parity on a GPU that way; needs `--features cuda`).
pub fn test_device() -> Device {
    match std::env::var("RPT_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("RPT_TEST_DEVICE=cuda: no CUDA device (built with --features cuda?)"),
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => panic!("RPT_TEST_DEVICE={other}: use cpu or cuda"),
    }
}

pub fn opts(dtype: DType, quantization: Option<Quantization>) -> LoadOptions {
    LoadOptions { dtype, device: test_device(), quantization, pack_for_inference: false }
}

pub fn load(name: &str, dtype: DType, q: Option<Quantization>) -> Model {
    Model::load(fixture(name).to_str().unwrap(), &opts(dtype, q)).unwrap()
}

/// Largest `|got − want| / max(1, |want|)`.
pub fn max_rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let g: Vec<f32> = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    g.iter().zip(&w).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max)
}

/// Fails when `got` is beyond `tol` of `want`. With `RPT_PARITY_TRACE=1` every comparison's
/// error is printed (shown with a failing test's output): where a device first departs.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let e = max_rel_err(got, want);
    if std::env::var_os("RPT_PARITY_TRACE").is_some() {
        eprintln!("{what}: {e:e}");
    }
    assert!(e <= tol, "{what}: max |err|/max(1,|ref|) = {e:e} > {tol:e}");
}

/// Mean next-token NLL from f32 logits, in f64.
pub fn mean_nll(logits: &Tensor, ids: &Tensor) -> f64 {
    let l: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
    let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let (mut sum, mut n) = (0f64, 0usize);
    for (seq, row) in l.iter().zip(&ids) {
        for t in 0..row.len() - 1 {
            let x = &seq[t];
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            sum += lse - x[row[t + 1] as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

/// Forward with an observer on every residual point; returns logits and the captured tensors.
pub fn forward_capture(model: &Model, ids: &Tensor) -> (Tensor, BTreeMap<HookPoint, Tensor>) {
    let seen = RefCell::new(BTreeMap::new());
    let logits = {
        let mut hooks = Hooks::new();
        hooks.observe(None, |p, t| {
            seen.borrow_mut().insert(p, t.clone());
            Ok(())
        });
        model.forward_with_hooks(&ids.to_device(model.device()).unwrap(), &mut hooks).unwrap()
    };
    (logits, seen.into_inner())
}
