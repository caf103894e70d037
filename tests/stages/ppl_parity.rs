//! `eval-ppl` against transformers: tests/fixtures/make_ppl_reference.py builds the windows of
//! every protocol in Python from the protocol definitions, runs the fixture models with
//! transformers (eager, f32) and records windows, scored tokens and the mean NLL
//! (tests/fixtures/ppl/reference.json). Here the `rpt-flow` binary runs the same cases as
//! pipelines and must agree: counts exactly, mean NLL to 1e-5 relative.
//!
//! WikiText-2 (../shared/data, never committed): the stream length of the file source and the
//! window counts of the protocols equal the reference's, computed in Python by the HF dataset
//! script's row rule.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use rpt_flow::data::{chunks, llama_cpp, token_stream, Bos, HubOptions, Source, WindowOptions};
use serde_json::Value as Json;

/// Relative tolerance on the mean NLL (issue #4).
const NLL_RTOL: f64 = 1e-5;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> Json {
    let p = repo().join("tests/fixtures/ppl/reference.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn wikitext_raw() -> Option<PathBuf> {
    crate::support::shared("data/wikitext-2-raw/wiki.test.raw")
}

/// A TOML literal string (the paths here hold no `'`).
pub fn lit(p: &Path) -> String {
    let s = p.to_str().expect("UTF-8 path");
    assert!(!s.contains('\'') && !s.contains('\n'), "path unusable in a TOML literal string: {s}");
    format!("'{s}'")
}

/// Runs `pipeline` (named `name`) with `rpt-flow run` in a fresh temporary directory and returns
/// the session's `stages` object.
pub fn run_pipeline(name: &str, pipeline: &str) -> serde_json::Map<String, Json> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.toml");
    std::fs::write(&file, pipeline).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rpt-flow"))
        .args(["run", "-q"])
        .arg(&file)
        .current_dir(dir.path())
        .env_remove("RPT_CACHE")
        .env_remove("RPT_SESSIONS")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("rpt-flow runs");
    assert!(
        out.status.success(),
        "rpt-flow run failed:\n{pipeline}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // sessions/<UTC date>/<name>.json: look in every date folder (a run may cross midnight).
    let mut found = Vec::new();
    for day in std::fs::read_dir(dir.path().join("sessions")).expect("a sessions folder") {
        let p = day.unwrap().path().join(format!("{name}.json"));
        if p.is_file() {
            found.push(p);
        }
    }
    assert_eq!(found.len(), 1, "expected one session file {name}.json, found {found:?}");
    let session: Json = serde_json::from_str(&std::fs::read_to_string(&found[0]).unwrap()).unwrap();
    assert_eq!(session["status"], "complete", "{session:#}");
    session["stages"].as_object().expect("stages").clone()
}

pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// One pipeline per model: a `load` of the fixture directory and one `eval-ppl` stage per
/// reference case; every case is compared and all mismatches are reported together.
fn check_model(model: &str) {
    let reference = reference();
    let cases: Vec<&Json> = reference["cases"].as_array().unwrap().iter().filter(|c| c["model"] == model).collect();
    assert!(cases.len() >= 5, "reference.json has {} cases for {model}", cases.len());
    let text = repo().join("tests/fixtures/ppl/text.txt");
    let mut toml = format!(
        "[pipeline]\nname = \"ppl-parity-{model}\"\n\n[stages.model]\nkind = \"load\"\nmodel = {{ path = {} }}\n\
         dtype = \"f32\"\n",
        lit(&repo().join("tests/fixtures").join(model))
    );
    for (i, c) in cases.iter().enumerate() {
        write!(
            toml,
            "\n[stages.case{i}]\nkind = \"eval-ppl\"\ninput = \"model\"\ndata = {{ path = {}, rows = \"file\" }}\n\
             protocol = {}\nseq_len = {}\nbos = {}\nbatch = {}\n",
            lit(&text),
            c["protocol"],
            c["seq_len"],
            c["bos"],
            c["batch"]
        )
        .unwrap();
        if !c["stride"].is_null() {
            writeln!(toml, "stride = {}", c["stride"]).unwrap();
        }
        if !c["max_windows"].is_null() {
            writeln!(toml, "max_windows = {}", c["max_windows"]).unwrap();
        }
    }
    let stages = run_pipeline(&format!("ppl-parity-{model}"), &toml);

    let mut failures = Vec::new();
    let mut worst: f64 = 0.0;
    for (i, c) in cases.iter().enumerate() {
        let what = format!(
            "{model} {} seq_len={} stride={} bos={} max_windows={} batch={}",
            c["protocol"], c["seq_len"], c["stride"], c["bos"], c["max_windows"], c["batch"]
        );
        let m = &stages[&format!("case{i}")]["metrics"];
        let mut fail = |msg: String| failures.push(format!("{what}: {msg}"));
        for key in ["windows", "tokens"] {
            if m[key] != c[key] {
                fail(format!("{key} {} != reference {}", m[key], c[key]));
            }
        }
        let p = &m["protocol"];
        for (got, want) in [
            (&p["name"], &c["protocol"]),
            (&p["seq_len"], &c["seq_len"]),
            (&p["stride"], &c["stride"]),
            (&p["bos"], &c["bos"]),
            (&p["max_windows"], &c["max_windows"]),
            (&p["stream_tokens"], &c["stream_tokens"]),
            (&p["text_bytes"], &c["text_bytes"]),
        ] {
            if got != want {
                fail(format!("protocol echo {got} != reference {want}"));
            }
        }
        let (nll, ppl) = (m["nll"].as_f64().unwrap(), m["ppl"].as_f64().unwrap());
        let want = c["nll"].as_f64().unwrap();
        let r = rel(nll, want);
        worst = worst.max(r);
        eprintln!("{what}: nll {nll:.10} reference {want:.10} relative difference {r:.3e}");
        if r > NLL_RTOL {
            fail(format!("nll {nll} vs reference {want}: relative difference {r:.3e} > {NLL_RTOL:e}"));
        }
        if rel(ppl, nll.exp()) > 1e-12 {
            fail(format!("ppl {ppl} != exp(nll {nll})"));
        }
        // ppl = exp(nll), so its relative error is the absolute error of nll.
        if rel(ppl, c["ppl"].as_f64().unwrap()) > NLL_RTOL * want * 1.01 {
            fail(format!("ppl {ppl} vs reference {}", c["ppl"]));
        }
        let bpb = m["bits_per_byte"].as_f64().expect("a byte-level tokenizer gives bits_per_byte");
        let want_bpb = c["bits_per_byte"].as_f64().unwrap();
        if rel(bpb, want_bpb) > NLL_RTOL {
            fail(format!("bits_per_byte {bpb} vs reference {want_bpb}"));
        }
    }
    eprintln!("{model}: largest relative NLL difference {worst:.3e} over {} cases", cases.len());
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn eval_ppl_matches_transformers_on_bitnet_tiny() {
    check_model("bitnet_tiny");
}

#[test]
fn eval_ppl_matches_transformers_on_llama_tiny() {
    check_model("llama_tiny");
}

#[test]
fn reference_covers_every_protocol_and_bos_policy() {
    let reference = reference();
    let cases = reference["cases"].as_array().unwrap();
    for (protocol, bos) in [
        ("chunks", "stream-start"),
        ("chunks", "none"),
        ("chunks", "window-start"),
        ("llama-cpp", "window-start"),
        ("rolling", "stream-start"),
        ("rolling", "window-start"),
    ] {
        for model in ["bitnet_tiny", "llama_tiny"] {
            assert!(
                cases.iter().any(|c| c["model"] == model
                    && c["protocol"] == protocol
                    && c["bos"] == bos
                    && c["max_windows"].is_null()),
                "no full {protocol}/{bos} case for {model}"
            );
        }
    }
    assert!(cases.iter().any(|c| !c["max_windows"].is_null()), "no max_windows case");
}

/// The file source through the binary: the stream that eval-ppl tokenises has the reference's
/// length and byte count (`stream_tokens` counts the text's tokens, before any BOS).
#[test]
fn wikitext_file_stream_matches_the_reference() {
    let Some(raw) = wikitext_raw() else { return };
    let wt = &reference()["wikitext"];
    let fixture_tok = std::fs::read(repo().join("tests/fixtures/tokenizer/tokenizer.json")).unwrap();
    let model_tok = std::fs::read(repo().join("tests/fixtures/bitnet_tiny/tokenizer.json")).unwrap();
    assert!(fixture_tok == model_tok, "bitnet_tiny's tokenizer.json is not tests/fixtures/tokenizer's");
    let toml = format!(
        "[pipeline]\nname = \"ppl-wikitext\"\n\n[stages.model]\nkind = \"load\"\nmodel = {{ path = {} }}\n\n\
         [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"model\"\ndata = {{ path = {} }}\nprotocol = \"chunks\"\n\
         seq_len = 128\nbos = \"stream-start\"\nmax_windows = 2\nbatch = 2\n",
        lit(&repo().join("tests/fixtures/bitnet_tiny")),
        lit(&raw)
    );
    let stages = run_pipeline("ppl-wikitext", &toml);
    let m = &stages["ppl"]["metrics"];
    assert_eq!(m["protocol"]["stream_tokens"], wt["stream_tokens"], "tokens of the joined WikiText test text");
    assert_eq!(m["protocol"]["text_bytes"], wt["text_bytes"], "bytes of the joined WikiText test text");
    assert_eq!(m["windows"], 2, "max_windows");
    assert_eq!(m["tokens"], 2 * 127);
    assert!(m["nll"].as_f64().unwrap().is_finite());
}

/// The reference's fingerprint of a token stream: `h = (h * 1000003 + id + 1) mod (2^61 - 1)`.
fn checksum(ids: &[u32]) -> u64 {
    const M: u128 = (1 << 61) - 1;
    ids.iter().fold(0u128, |h, &t| (h * 1_000_003 + t as u128 + 1) % M) as u64
}

/// Window counts over the whole WikiText test stream (too many windows to run the model on):
/// the library's stream and windows against the reference's.
#[test]
fn wikitext_window_counts_match_the_reference() {
    let Some(raw) = wikitext_raw() else { return };
    let wt = &reference()["wikitext"];
    let tok = tokenizers::Tokenizer::from_file(repo().join("tests/fixtures/tokenizer/tokenizer.json")).unwrap();
    let source = Source::from_value(&serde_json::json!({ "path": raw.to_str().unwrap() })).unwrap();
    let text = source.text().unwrap();
    assert_eq!(text.rows as u64, wt["rows"].as_u64().unwrap(), "rows");
    let stream =
        token_stream(&source, &HubOptions::offline_at("/nonexistent"), &tok, "fixture-tokenizer", false).unwrap();
    assert_eq!(stream.ids.len() as u64, wt["stream_tokens"].as_u64().unwrap(), "stream tokens");
    assert_eq!(stream.bytes as u64, wt["text_bytes"].as_u64().unwrap(), "text bytes");
    assert_eq!(checksum(&stream.ids), wt["stream_checksum"].as_u64().unwrap(), "token ids differ");
    let bos_id = tok.token_to_id("<|begin_of_text|>");
    for c in wt["counts"].as_array().unwrap() {
        let bos = Bos::parse(c["bos"].as_str().unwrap()).unwrap();
        let opts = WindowOptions { seq_len: c["seq_len"].as_u64().unwrap() as usize, bos, bos_id, max_windows: None };
        let w = match c["protocol"].as_str().unwrap() {
            "chunks" => chunks(&stream.ids, &opts).unwrap(),
            "llama-cpp" => llama_cpp(&stream.ids, &opts).unwrap(),
            other => panic!("unexpected protocol {other}"),
        };
        let scored: usize = w.iter().map(|w| w.scored()).sum();
        assert_eq!(
            (w.len() as u64, scored as u64),
            (c["windows"].as_u64().unwrap(), c["tokens"].as_u64().unwrap()),
            "{c}"
        );
    }
}
