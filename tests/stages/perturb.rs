//! `perturb`: eps = 0 gives δ = 0 without NaN, runs are reproducible, the seed matters, δ_0 ≈ eps
//! for relative noise, branching ratios agree with `hook-residuals`; and
//! `pipelines/criticality.toml` under its tiny profile.

use serde_json::Value as Json;

use crate::residuals::MODEL;
use crate::support::{repo, Sandbox};

const DATA: &str = "data = \"synthetic:facts:test\"\nseq_len = 32\nmax_windows = 3\n";

fn run(sb: &Sandbox) -> Json {
    let p = sb.write(
        "p.toml",
        &format!(
            "[pipeline]\nname = \"p\"\n[defaults.perturb]\n{DATA}[defaults.hook-residuals]\n{DATA}\
             [stages.base]\nkind = \"load\"\nmodel = {MODEL}\n\
             [stages.e0]\nkind = \"perturb\"\ninput = \"base\"\neps = 0\n\
             [stages.e1]\nkind = \"perturb\"\ninput = \"base\"\neps = 0.01\nscale = \"relative\"\n\
             [stages.e1s]\nkind = \"perturb\"\ninput = \"base\"\neps = 0.01\nseed = 5\nscale = \"relative\"\n\
             [stages.abs]\nkind = \"perturb\"\ninput = \"base\"\neps = 0.001\n\
             [stages.res]\nkind = \"hook-residuals\"\ninput = \"base\"\n"
        ),
    );
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    sb.session("p.json")["stages"].clone()
}

fn floats(v: &Json) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()
}

#[test]
fn perturbation_growth_is_zero_at_eps_zero_seeded_and_reproducible() {
    let sb = Sandbox::real();
    let st = run(&sb);
    let m = |n: &str| st[n]["metrics"].clone();
    let n_layers = 3;

    let e0 = m("e0");
    let d0 = floats(&e0["delta"]);
    assert_eq!(d0.len(), n_layers + 1);
    assert!(d0.iter().all(|d| *d == 0.0), "eps = 0: δ = {d0:?}");
    assert_eq!(e0["amplification"], 1.0);
    assert_eq!(e0["lyapunov"], 0.0);
    assert!(floats(&e0["local_exponents"]).iter().all(|x| *x == 0.0));
    assert_eq!(e0["peak_layer"], 0);

    let e1 = m("e1");
    let d = floats(&e1["delta"]);
    assert!(d.iter().all(|x| x.is_finite() && *x > 0.0), "{d:?}");
    assert!((d[0] - 0.01).abs() < 0.05 * 0.01, "relative eps: δ at the embedding = {} ≈ 0.01", d[0]);
    // The notebook's convention: from layer 0's output (d[1]) to the last layer's.
    let amp = e1["amplification"].as_f64().unwrap();
    assert!((amp - d[n_layers] / d[1]).abs() <= 1e-12 * amp);
    let lyap = e1["lyapunov"].as_f64().unwrap();
    assert!((lyap - amp.ln() / (n_layers - 1) as f64).abs() < 1e-12);
    let amp_e = e1["amplification_from_embedding"].as_f64().unwrap();
    assert!((amp_e - d[n_layers] / d[0]).abs() <= 1e-12 * amp_e);
    assert!((e1["lyapunov_from_embedding"].as_f64().unwrap() - amp_e.ln() / n_layers as f64).abs() < 1e-12);
    let local = floats(&e1["local_exponents"]);
    assert!((local.iter().sum::<f64>() - amp_e.ln()).abs() < 1e-9, "local exponents add up to ln amplification");
    // δ is over the whole output; the mean of per-token ratios is kept beside it.
    let per_token = floats(&e1["delta_token_mean"]);
    assert_eq!(per_token.len(), d.len());
    assert!(per_token.iter().zip(&d).all(|(a, b)| (a / b - 1.0).abs() < 0.5), "{per_token:?} vs {d:?}");
    assert_eq!(e1["scale"], "relative");
    assert_eq!(e1["eps"], 0.01);
    assert_eq!(e1["windows"], 3);
    assert_eq!(e1["tokens"], 3 * 32);

    // The seed matters; another scale gives another δ_0.
    assert_ne!(m("e1s")["delta"], e1["delta"]);
    let abs0 = floats(&m("abs")["delta"])[0];
    assert!(abs0.is_finite() && abs0 > 0.0 && (abs0 - d[0]).abs() > 1e-4, "absolute: δ_0 = {abs0}");
    assert_eq!(m("abs")["scale"], "absolute", "the notebook's absolute noise is the default");

    // Branching ratios are the clean stream's, as hook-residuals reports them.
    let res = m("res");
    let per = floats(&e1["branching"]["per_layer"]);
    for (l, row) in res["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(per[l], row["branching_ratio"].as_f64().unwrap(), "layer {l}");
    }
    let mean = per.iter().sum::<f64>() / per.len() as f64;
    assert!((e1["branching"]["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
    assert_eq!(e1["branching"], e0["branching"], "the clean run does not depend on eps");

    // A second run in a fresh cache gives the same numbers.
    let again = run(&Sandbox::real());
    for n in ["e0", "e1", "e1s", "abs"] {
        assert_eq!(again[n]["metrics"], st[n]["metrics"], "{n} rerun");
    }
}

#[test]
fn criticality_tiny_reports_growth_and_ratios_and_reuses_pruned_levels() {
    let sb = Sandbox::real();
    // The sparsity pipeline's pruned levels are the same instances (same keys) as criticality's.
    let sparsity = repo().join("pipelines/sparsity.toml");
    sb.run(&["run", sparsity.to_str().unwrap(), "--profile", "tiny", "-q"]).expect(0);
    let file = repo().join("pipelines/criticality.toml");
    let path = file.to_str().unwrap();
    sb.run(&["run", path, "--profile", "tiny"]).expect(0);
    let s = sb.session("criticality.tiny.json");
    assert_eq!(s["status"], "complete");
    let st = &s["stages"];
    assert_eq!(st["base"]["cached"], true, "base shared with sparsity.toml");
    for level in ["0.1", "0.2", "0.3"] {
        assert_eq!(st[format!("level[sparsity={level}].pruned")]["cached"], true, "level {level} reused");
        assert!(st[format!("level[sparsity={level}].growth")]["metrics"]["lyapunov"].as_f64().unwrap().is_finite());
    }
    let res = &st["residuals"]["metrics"];
    let layers = res["layers"].as_array().unwrap();
    assert!(layers.len() >= 2);
    for row in layers {
        assert!(row["correction_ratio"].as_f64().unwrap() > 0.0 && row["branching_ratio"].as_f64().unwrap() > 0.0);
    }
    let g = &st["growth"]["metrics"];
    assert_eq!(g["eps"], 0.01);
    assert_eq!(g["delta"].as_array().unwrap().len(), layers.len() + 1);
    assert!(g["amplification"].as_f64().unwrap() > 0.0 && g["lyapunov"].as_f64().unwrap().is_finite());
    assert_eq!(g["branching"]["per_layer"].as_array().unwrap().len(), layers.len());
    assert!(g["branching"]["near_critical_layers"].as_u64().is_some());
    let again = sb.run(&["run", path, "--profile", "tiny"]).expect(0);
    assert!(again.stdout().contains("nothing to compute"), "second run: {}", again.stdout());
}
