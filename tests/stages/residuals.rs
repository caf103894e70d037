//! `hook-residuals`: ratios against transformers' hidden states, interventions that must change
//! nothing (threshold 0, percentile 0) or everything (percentile 100 = embeddings → final norm),
//! layer selection, and `pipelines/predictive_coding.toml` under its tiny profile.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use rpt_flow::analysis::residual::LayerAccumulator;
use rpt_flow::data::{self, Source, WindowOptions};
use rpt_flow::model::{HookPoint, Hooks, LoadOptions, Model, TextTokenizer};
use rpt_flow::stages::model_artifact;
use serde_json::{json, Value as Json};

use crate::support::{repo, Sandbox};

pub const MODEL: &str = r#"{ random = { vocab_size = 300, hidden_size = 32, intermediate_size = 88, num_hidden_layers = 3, num_attention_heads = 4, num_key_value_heads = 2 }, seed = 3, tokenizer = "synthetic:facts:train" }"#;

/// The cache entry directory of an instance of the session `p.json`.
pub fn entry(sb: &Sandbox, name: &str) -> PathBuf {
    let s = sb.session("p.json");
    let key = s["stages"][name]["key"].as_str().unwrap().to_string();
    sb.path().join("cache").join(&key[..2]).join(key)
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

#[test]
fn ratios_match_transformers_hidden_states() {
    let dir = repo().join("tests/fixtures/bitnet_tiny");
    let reference: Json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let prompts: Vec<&str> = reference["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    let ids: Vec<Vec<u32>> = reference["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect();
    let seq_len = ids[0].len();

    // The stage reads text: the reference sequences are the first 12 tokens (BOS + 11) of each
    // prompt, so the text is the decoded 11 tokens of each, back to back; each window = BOS + the
    // next 11 tokens. First check that this text tokenises to exactly the reference ids.
    assert_eq!(prompts.len(), 2);
    let sb = Sandbox::real();
    let model = Model::from_dir(&dir, &LoadOptions::default()).unwrap();
    let tok = TextTokenizer::from_dir(&dir, model.config()).unwrap();
    let decoded: String = ids.iter().map(|s| tok.decode(&s[1..], false).unwrap()).collect();
    let text = sb.write("ref.txt", &decoded);
    let data = json!({ "path": text.to_str().unwrap(), "rows": "file", "join": "" });
    let stream = data::tokens(&Source::from_value(&data).unwrap(), tok.inner(), "bitnet_tiny", false).unwrap();
    let opts = WindowOptions { seq_len, bos: data::Bos::WindowStart, bos_id: tok.bos_id, max_windows: None };
    let windows = data::chunks(&stream, &opts).unwrap();
    let got: Vec<&Vec<u32>> = windows.iter().map(|w| &w.input_ids).collect();
    assert_eq!(got, ids.iter().collect::<Vec<_>>(), "the stage's windows are the reference sequences");

    let p = sb.write(
        "p.toml",
        &format!(
            "[pipeline]\nname = \"p\"\n[stages.base]\nkind = \"load\"\nmodel = {{ path = {:?} }}\ndtype = \"f32\"\n\
             [stages.res]\nkind = \"hook-residuals\"\ninput = \"base\"\ndata = {}\nseq_len = {seq_len}\nbos = \"window-start\"\n",
            dir.to_str().unwrap(),
            toml_inline(&data),
        ),
    );
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let s = sb.session("p.json");
    let m = &s["stages"]["res"]["metrics"];
    assert_eq!(m["windows"], 2);
    assert_eq!(m["positions"], 2 * seq_len);

    // The same statistics from transformers' hidden states (hidden_states[l] = input of layer l,
    // resid_post.l = output of layer l), through the analysis functions.
    let r: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    let flat = |k: String| r[&k].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), model.num_layers());
    for (l, row) in layers.iter().enumerate() {
        assert_eq!(row["layer"], l);
        // Two windows, two texts: each window's ratios of means, averaged.
        let mut acc = LayerAccumulator::new(model.config().hidden_size, 0.001);
        let (h_in, h_out) = (flat(format!("ternary.f32.hidden.{l}")), flat(format!("ternary.f32.resid_post.{l}")));
        let half = h_in.len() / 2;
        acc.add(&h_in[..half], &h_out[..half]);
        acc.end_text();
        acc.add(&h_in[half..], &h_out[half..]);
        let want = serde_json::to_value(acc.finish()).unwrap();
        assert_eq!(row["tokens"], want["tokens"]);
        for k in [
            "correction_ratio",
            "branching_ratio",
            "correction_ratio_token_mean",
            "branching_ratio_token_mean",
            "correction_ratio_of_means",
            "branching_ratio_of_means",
            "mean_norm_in",
            "mean_norm_out",
            "mean_abs_c",
        ] {
            let (g, w) = (row[k].as_f64().unwrap(), want[k].as_f64().unwrap());
            assert!(rel(g, w) <= 1e-5, "layer {l} {k}: stage {g} vs transformers {w}");
        }
    }
    // The same numbers in the entry's tensor file.
    let file = entry(&sb, "res").join("layer_stats.safetensors");
    let t: BTreeMap<String, Tensor> = candle_core::safetensors::load(file, &Device::Cpu).unwrap().into_iter().collect();
    let br = t["branching_ratio"].to_vec1::<f64>().unwrap();
    assert_eq!(br, layers.iter().map(|r| r["branching_ratio"].as_f64().unwrap()).collect::<Vec<_>>());
    // Not vacuous: the layers differ from each other and from the identity.
    let b0 = layers[0]["branching_ratio"].as_f64().unwrap();
    assert!((b0 - 1.0).abs() > 1e-3 && (b0 - layers[1]["branching_ratio"].as_f64().unwrap()).abs() > 1e-6);
}

/// A JSON object as a TOML inline table (strings and numbers only).
fn toml_inline(v: &Json) -> String {
    let parts: Vec<String> = v.as_object().unwrap().iter().map(|(k, v)| format!("{k} = {v}")).collect();
    format!("{{ {} }}", parts.join(", "))
}

const DATA: &str = "data = \"synthetic:facts:test\"\nseq_len = 32\nmax_windows = 4\n";

#[test]
fn interventions_change_nothing_at_zero_and_everything_at_100() {
    let sb = Sandbox::real();
    let p = sb.write(
        "p.toml",
        &format!(
            "[pipeline]\nname = \"p\"\n[defaults.hook-residuals]\n{DATA}[defaults.eval-ppl]\n{DATA}\
             [stages.base]\nkind = \"load\"\nmodel = {MODEL}\n\
             [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"base\"\n\
             [stages.clean]\nkind = \"hook-residuals\"\ninput = \"base\"\n\
             [stages.t0]\nkind = \"hook-residuals\"\ninput = \"base\"\nthreshold = 0\n\
             [stages.p0]\nkind = \"hook-residuals\"\ninput = \"base\"\npercentile = 0\n\
             [stages.p100]\nkind = \"hook-residuals\"\ninput = \"base\"\npercentile = 100\n\
             [stages.l1]\nkind = \"hook-residuals\"\ninput = \"base\"\nthreshold = 0.05\nlayers = [1]\n"
        ),
    );
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let s = sb.session("p.json");
    let m = |n: &str| s["stages"][n]["metrics"].clone();
    let (ppl, clean, t0, p0, p100, l1) = (m("ppl"), m("clean"), m("t0"), m("p0"), m("p100"), m("l1"));

    // Same windows and scored positions as eval-ppl's chunks, same NLL to the last bit.
    assert_eq!(clean["nll"], ppl["nll"], "hook-residuals without intervention = eval-ppl");
    assert_eq!(clean["tokens"], ppl["tokens"]);
    assert_eq!(clean["protocol"]["name"], "chunks");
    assert_eq!(clean["bits_per_byte"], ppl["bits_per_byte"]);
    assert!(clean.get("intervention").is_none());
    for (name, x) in [("threshold 0", &t0), ("percentile 0", &p0)] {
        assert_eq!(x["nll"], clean["nll"], "{name}: nll must be bit-identical");
        assert_eq!(x["layers"], clean["layers"], "{name}: same stream");
        assert_eq!(x["intervention"]["zeroed_fraction"], 0.0, "{name}");
        assert_eq!(x["intervention"]["layers"], "all");
    }
    assert_eq!(t0["intervention"]["mode"], "threshold");
    assert_eq!(p0["intervention"]["mode"], "percentile");

    // Percentile 100: every correction zeroed at every layer.
    let iv = &p100["intervention"];
    let (hidden, layers, positions) = (32u64, 3u64, clean["positions"].as_u64().unwrap());
    assert_eq!(iv["entries"].as_u64().unwrap(), hidden * layers * positions);
    let zf = iv["zeroed_fraction"].as_f64().unwrap();
    assert!(zf > 0.99 && zf <= 1.0, "zeroed fraction {zf}");
    for row in p100["layers"].as_array().unwrap() {
        assert_eq!(row["zero_fraction"], 1.0, "layer {}: c = 0 everywhere", row["layer"]);
        assert_eq!(row["correction_ratio"], 0.0);
        assert_eq!(row["branching_ratio"], 1.0);
    }
    // ... which is the forward embeddings → final norm → head, computed here with hooks that hand
    // every layer's input through unchanged.
    let skipped = skip_all_layers_nll(&entry(&sb, "base"));
    let got = p100["nll"].as_f64().unwrap();
    assert!(rel(got, skipped) < 1e-9, "percentile 100: nll {got} vs all layers skipped {skipped}");
    let clean_nll = clean["nll"].as_f64().unwrap();
    assert!(rel(clean_nll, skipped) > 1e-6, "the layers matter: {clean_nll} vs {skipped}");

    // Selected layers: layer 0 untouched (same statistics as clean), layer 1 pruned.
    let iv = &l1["intervention"];
    assert_eq!(iv["layers"], json!([1]));
    assert_eq!(iv["per_layer"].as_array().unwrap().len(), 1);
    assert_eq!(iv["per_layer"][0]["layer"], 1);
    assert_eq!(iv["entries"].as_u64().unwrap(), hidden * positions);
    assert!(iv["zeroed"].as_u64().unwrap() > 0);
    assert_eq!(l1["layers"][0], clean["layers"][0]);
    let (z1, zc) =
        (l1["layers"][1]["zero_fraction"].as_f64().unwrap(), clean["layers"][1]["zero_fraction"].as_f64().unwrap());
    assert!((z1 - zc - iv["zeroed_fraction"].as_f64().unwrap()).abs() < 1e-12, "zeroed = new exact zeros of c");
    assert_ne!(l1["nll"], clean["nll"]);
}

/// Mean NLL of the base model's chunks windows (as in `DATA`) with every layer skipped.
fn skip_all_layers_nll(base: &std::path::Path) -> f64 {
    let open = model_artifact::open_dir(base, &Device::Cpu, false).unwrap();
    let tok = open.tokenizer().unwrap();
    let src = Source::from_value(&json!("synthetic:facts:test")).unwrap();
    let stream = data::tokens(&src, tok.inner(), &open.tokenizer_id, false).unwrap();
    let opts = WindowOptions { seq_len: 32, bos: data::Bos::StreamStart, bos_id: tok.bos_id, max_windows: Some(4) };
    let (mut sum, mut n) = (0.0f64, 0usize);
    for w in data::chunks(&stream, &opts).unwrap() {
        let input = RefCell::new(None::<Tensor>);
        let mut hooks = Hooks::new();
        hooks.intervene(None, |p, x| match p {
            HookPoint::ResidPre(_) => {
                *input.borrow_mut() = Some(x.clone());
                Ok(x.clone())
            }
            HookPoint::ResidPost(_) => Ok(input.borrow_mut().take().unwrap()),
            _ => Ok(x.clone()),
        });
        let ids = Tensor::new(w.input_ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = open.model.forward_with_hooks(&ids, &mut hooks).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().squeeze(0).unwrap();
        let logp = logp.to_vec2::<f32>().unwrap();
        for (pos, &t) in w.logit_positions().zip(w.target_ids()) {
            sum -= logp[pos][t as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn bad_intervention_parameters_are_clear_errors() {
    let sb = Sandbox::real();
    let body = |extra: &str| {
        format!(
            "[pipeline]\nname = \"p\"\n[stages.base]\nkind = \"load\"\nmodel = {MODEL}\n\
             [stages.x]\nkind = \"hook-residuals\"\ninput = \"base\"\n{DATA}{extra}\n"
        )
    };
    let both = sb.write("both.toml", &body("threshold = 0.1\npercentile = 50"));
    let r = sb.run(&["validate", both.to_str().unwrap()]).expect(2);
    assert!(r.stderr().contains("either `threshold` or `percentile`"), "{}", r.stderr());
    let p = sb.write("pct.toml", &body("percentile = 101"));
    sb.run(&["validate", p.to_str().unwrap()]).expect(2);
    let lonely = sb.write("lonely.toml", &body("layers = [0]"));
    let r = sb.run(&["validate", lonely.to_str().unwrap()]).expect(2);
    assert!(r.stderr().contains("give `threshold` or `percentile`"), "{}", r.stderr());
    let far = sb.write("p.toml", &body("threshold = 0.1\nlayers = [7]"));
    let r = sb.run(&["run", far.to_str().unwrap(), "-q"]).expect(1);
    assert!(r.stderr().contains("layer 7 does not exist"), "{}", r.stderr());
}

#[test]
fn predictive_coding_tiny_runs_both_sweeps_with_text() {
    let sb = Sandbox::real();
    let file = repo().join("pipelines/predictive_coding.toml");
    let path = file.to_str().unwrap();
    let first = sb.run(&["run", path, "--profile", "tiny"]).expect(0);
    assert!(first.stdout().contains("computed"), "{}", first.stdout());
    let s = sb.session("predictive-coding.tiny.json");
    assert_eq!(s["status"], "complete");
    let st = &s["stages"];
    let clean = &st["clean"]["metrics"];
    let n_layers = clean["layers"].as_array().unwrap().len();
    assert!(n_layers >= 2);
    assert!(clean["ppl"].as_f64().unwrap().is_finite());
    let mut last = -1.0;
    for t in ["0", "0.001", "0.01", "0.1", "0.5"] {
        let m = &st[format!("absolute[threshold={t}].pruned")]["metrics"];
        assert_eq!(m["intervention"]["mode"], "threshold", "{t}");
        assert_eq!(m["tokens"], clean["tokens"], "same windows at every point");
        let zf = m["intervention"]["zeroed_fraction"].as_f64().unwrap();
        assert!(zf >= last, "zeroed fraction grows with the threshold: {zf} after {last}");
        last = zf;
        assert!(m["ppl"].as_f64().unwrap().is_finite());
        assert!(m["outputs"].as_array().unwrap().len() == 3 && m["label"].is_string(), "{t}: generations");
    }
    assert_eq!(st["absolute[threshold=0].pruned"]["metrics"]["nll"], clean["nll"]);
    for q in ["50", "70", "90"] {
        let m = &st[format!("percentile[percentile={q}].pruned")]["metrics"];
        let masked = m["intervention"]["masked_fraction"].as_f64().unwrap();
        let want = q.parse::<f64>().unwrap() / 100.0;
        assert!((masked - want).abs() < 0.05, "P{q}: masked {masked}");
        assert!(m["counts"].is_object() && m["outputs"][0]["text"].is_string());
    }
    let again = sb.run(&["run", path, "--profile", "tiny"]).expect(0);
    assert!(again.stdout().contains("nothing to compute"), "second run: {}", again.stdout());
}
