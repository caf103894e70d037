//! `rpt-flow export`: a cached model out as a Hugging Face folder, through the shipped binary on
//! the embedded tiny BitNet — from a pipeline and from a session, loaded back by rpt-flow with the
//! same perplexity, the recipe planning to the same key, and every refusal (unknown instance, not
//! a model, not cached, non-empty folder, holographic attention, a damaged entry).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::support::{plan_keys, Sandbox};

/// load → prune (a sweep point, for the bracketed instance syntax) → finetune → eval-ppl.
const PIPELINE: &str = r#"
[pipeline]
name = "exp"

[stages.base]
kind = "load"
model = "builtin:tiny-bitnet"

[sweeps.level]
over = { sparsity = [0.3] }

[sweeps.level.stages.pruned]
kind = "prune"
input = "base"
sparsity = "$sparsity"

[sweeps.level.stages.tuned]
kind = "finetune"
input = "pruned"
data = "synthetic:facts:train"
steps = 2
batch = 4
seq_len = 32

[sweeps.level.stages.after]
kind = "eval-ppl"
input = "tuned"
data = "synthetic:facts:test"
seq_len = 64
max_windows = 4
"#;

const TUNED: &str = "level[sparsity=0.3].tuned";

fn setup() -> (Sandbox, PathBuf, Json) {
    let sb = Sandbox::real();
    let p = sb.write("exp.toml", PIPELINE);
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let session = sb.session("exp.json");
    (sb, p, session)
}

fn entry(sb: &Sandbox, key: &str) -> PathBuf {
    sb.path().join("cache").join(&key[..2]).join(key)
}

fn read_json(p: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())))
        .unwrap()
}

/// Hidden `.<name>.rpt-export.*` folders left beside `dir`.
fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".rpt-export."))
        .collect()
}

#[test]
fn export_from_a_pipeline_and_a_session_gives_the_cached_model_with_its_provenance() {
    let (sb, p, session) = setup();
    let key = session["stages"][TUNED]["key"].as_str().unwrap().to_string();
    sb.run(&["export", p.to_str().unwrap(), TUNED, "out"]).expect(0);
    let out = sb.path().join("out");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "README.md",
        "rpt_flow.json",
        "recipe.toml",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the export");
    }
    assert!(!out.join("rpt_flow_logits.safetensors").exists(), "logits only with --with-logits");
    assert!(
        !out.join("mask.safetensors").exists() && !out.join("rpt-model.json").exists(),
        "rpt-flow's own files stay in the cache"
    );
    let weights = std::fs::read(out.join("model.safetensors")).unwrap();
    assert!(
        weights == std::fs::read(entry(&sb, &key).join("model.safetensors")).unwrap(),
        "weights copied as the entry holds them"
    );
    assert!(leftovers(sb.path()).is_empty(), "no temporary folder left: {:?}", leftovers(sb.path()));

    let tc = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!((tc["bos_token"].as_str(), tc["eos_token"].as_str()), (Some("<s>"), Some("</s>")));

    let prov = read_json(&out.join("rpt_flow.json"));
    assert_eq!(prov["key"], key.as_str());
    assert_eq!(prov["kind"], "finetune");
    let lineage: Vec<&str> = prov["lineage"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(lineage, ["base", "level[sparsity=0.3].pruned", TUNED]);
    let pruned_key = session["stages"]["level[sparsity=0.3].pruned"]["key"].as_str().unwrap();
    assert_eq!(prov["lineage"][1]["key"], pruned_key);
    let after = &session["stages"]["level[sparsity=0.3].after"]["metrics"];
    assert_eq!(prov["measured_by"][0]["name"], "level[sparsity=0.3].after");
    assert_eq!(prov["measured_by"][0]["metrics"]["ppl"], after["ppl"], "the reader's ppl, from the cache");
    assert_eq!(prov["metrics"]["steps"], 2);

    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: transformers\n"), "front matter first:\n{card}");
    for want in [
        "- pruned",
        "- fine-tuned",
        TUNED,
        &key,
        "## Lineage",
        "## Recipe",
        "```toml",
        "[stages.level-sparsity-0_3-tuned]",
    ] {
        assert!(card.contains(want), "the card lacks {want:?}:\n{card}");
    }
    assert!(card.contains(&format!("| `level[sparsity=0.3].after` | eval-ppl | ppl | {} |", after["ppl"])), "{card}");

    // The recipe is a pipeline whose stage plans to the exported key.
    let keys = plan_keys(&sb, &[out.join("recipe.toml").to_str().unwrap()]);
    let recipe_key = keys.iter().find(|(n, _)| n == "level-sparsity-0_3-tuned").map(|(_, k)| k.clone());
    assert_eq!(recipe_key.as_deref(), Some(key.as_str()), "recipe keys: {keys:?}");

    // From the session file: the same model, provenance naming the session.
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let sess = format!("sessions/{today}/exp.json");
    sb.run(&["export", &sess, TUNED, "from-session"]).expect(0);
    let s_out = sb.path().join("from-session");
    assert!(std::fs::read(s_out.join("model.safetensors")).unwrap() == weights);
    let s_prov = read_json(&s_out.join("rpt_flow.json"));
    assert_eq!(s_prov["key"], key.as_str());
    assert_eq!(s_prov["session"], sess.as_str());
    assert_eq!(s_prov["measured_by"][0]["metrics"]["ppl"], after["ppl"]);

    // rpt-flow loads the export back as a local model and measures the same perplexity.
    let back = sb.write(
        "back.toml",
        "[stages.m]\nkind = \"load\"\nmodel = { path = \"out\" }\n\
         [stages.after]\nkind = \"eval-ppl\"\ninput = \"m\"\ndata = \"synthetic:facts:test\"\nseq_len = 64\nmax_windows = 4\n",
    );
    sb.run(&["run", back.to_str().unwrap(), "-q"]).expect(0);
    let b = sb.session("back.json");
    assert_eq!(b["stages"]["m"]["metrics"]["quantization"], "ternary");
    assert_eq!(b["stages"]["after"]["metrics"]["ppl"], after["ppl"], "identical perplexity from the exported folder");
    assert_eq!(b["stages"]["after"]["metrics"]["nll"], after["nll"]);
}

#[test]
fn export_refuses_what_it_cannot_do_and_says_how_to_fix_it() {
    let (sb, p, session) = setup();
    let p = p.to_str().unwrap();

    let r = sb.run(&["export", p, "level[sparsity=0.3].tunde", "o"]).expect(2);
    assert!(r.stderr().contains("did you mean `level[sparsity=0.3].tuned`?"), "{}", r.stderr());
    assert!(r.stderr().contains("model-producing instances: `base`, `level[sparsity=0.3].pruned`"), "{}", r.stderr());

    let r = sb.run(&["export", p, "level[sparsity=0.3].after", "o"]).expect(2);
    assert!(r.stderr().contains("not a model") && r.stderr().contains("`level[sparsity=0.3].tuned`"), "{}", r.stderr());

    // Another fine-tune length: another key, never run.
    let r = sb.run(&["export", p, TUNED, "o", "--set", "sweeps.level.stages.tuned.steps=3"]).expect(2);
    assert!(r.stderr().contains("is not in the cache"), "{}", r.stderr());
    assert!(
        r.stderr().contains("rpt-flow run") && r.stderr().contains("--set sweeps.level.stages.tuned.steps=3"),
        "{}",
        r.stderr()
    );
    assert!(!sb.path().join("o").exists(), "nothing written for a refusal");

    // A non-empty folder is kept unless --force, which replaces its contents.
    sb.write("busy/notes.txt", "mine");
    let r = sb.run(&["export", p, TUNED, "busy"]).expect(2);
    assert!(r.stderr().contains("busy is not empty") && r.stderr().contains("--force"), "{}", r.stderr());
    assert_eq!(std::fs::read_to_string(sb.path().join("busy/notes.txt")).unwrap(), "mine");
    sb.run(&["export", p, TUNED, "busy", "--force"]).expect(0);
    assert!(!sb.path().join("busy/notes.txt").exists() && sb.path().join("busy/model.safetensors").is_file());
    // An empty folder is fine without --force.
    std::fs::create_dir(sb.path().join("empty")).unwrap();
    sb.run(&["export", p, "base", "empty"]).expect(0);
    assert!(sb.path().join("empty/config.json").is_file());

    let r = sb.run(&["export", p, TUNED, "cache/inside"]).expect(2);
    assert!(r.stderr().contains("inside the cache"), "{}", r.stderr());

    // A session's profiles are its own.
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let sess = format!("sessions/{today}/exp.json");
    let r = sb.run(&["export", &sess, TUNED, "o", "--profile", "tiny"]).expect(2);
    assert!(r.stderr().contains("apply to a pipeline file"), "{}", r.stderr());

    // A damaged entry: one flipped byte in its weights, and nothing is exported.
    let key = session["stages"][TUNED]["key"].as_str().unwrap();
    let weights = entry(&sb, key).join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    let r = sb.run(&["export", p, TUNED, "damaged"]).expect(1);
    let err = r.stderr();
    assert!(err.contains("is damaged") && err.contains("hash mismatch for model.safetensors"), "{err}");
    assert!(err.contains("cache verify --fix"), "{err}");
    assert!(!sb.path().join("damaged").exists(), "nothing written from damaged bytes");
    assert!(leftovers(sb.path()).is_empty(), "{:?}", leftovers(sb.path()));
    assert!(weights.exists(), "export leaves the cache as it found it (verify --fix moves it)");
}

#[test]
fn a_model_with_holographic_attention_is_refused_with_the_reason() {
    let sb = Sandbox::real();
    let p = sb.write(
        "holo.toml",
        "[stages.base]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n\
         [stages.swapped]\nkind = \"swap-attention\"\ninput = \"base\"\nlayers = \"all\"\nwindow = 16\nregions = 4\n",
    );
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let r = sb.run(&["export", p.to_str().unwrap(), "swapped", "out"]).expect(2);
    let err = r.stderr();
    assert!(err.contains("holographic attention") && err.contains("rpt_holographic"), "{err}");
    assert!(err.contains("transformers") && err.contains("`base`"), "names what to export instead: {err}");
    assert!(!sb.path().join("out").exists());
    sb.run(&["export", p.to_str().unwrap(), "base", "out"]).expect(0);
}

/// scripts/check_export.py: transformers loads the export and computes rpt-flow's logits (1e-4).
/// Needs the repository's Python environment (.venv with torch and transformers); skipped without.
#[test]
fn transformers_loads_the_export_and_agrees_with_rpt_flows_logits() {
    let python = crate::support::repo().join(".venv/bin/python");
    if !python.exists() {
        eprintln!(
            "skipped: {} is missing (python -m venv .venv && .venv/bin/pip install -r tests/fixtures/requirements.txt)",
            python.display()
        );
        return;
    }
    let (sb, p, _) = setup();
    for inst in [TUNED, "level[sparsity=0.3].pruned"] {
        sb.run(&["export", p.to_str().unwrap(), inst, "hf", "--with-logits", "--force"]).expect(0);
        let out = std::process::Command::new(&python)
            .arg(crate::support::repo().join("scripts/check_export.py"))
            .arg(sb.path().join("hf"))
            .env("TORCH_COMPILE_DISABLE", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{inst}: check_export.py failed\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("BitNetForCausalLM") && stdout.contains(": ok"), "{stdout}");
    }
}

/// `--format gguf`: the verified export converted to one GGUF file (docs/gguf.md); the tiny
/// BitNet's 128-wide rows cannot be stored in 256-value ternary blocks and are refused by name.
#[test]
fn gguf_export_writes_one_file_or_names_the_tensors_it_cannot_store() {
    let sb = Sandbox::real();
    let p = sb.write(
        "g.toml",
        "[stages.base]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n\
         [stages.wide]\nkind = \"load\"\nmodel = { random = { vocab_size = 512, hidden_size = 256, \
         intermediate_size = 512, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2 }, \
         seed = 1, tokenizer = \"synthetic:facts:train\" }\n",
    );
    let p = p.to_str().unwrap();
    sb.run(&["run", p, "-q"]).expect(0);
    let r = sb.run(&["export", p, "base", "tiny.gguf", "--format", "gguf"]).expect(2);
    assert!(r.stderr().contains("256"), "names the block-size requirement: {}", r.stderr());
    assert!(!sb.path().join("tiny.gguf").exists());

    let r = sb.run(&["export", p, "wide", "wide.gguf", "--format", "gguf"]).expect(0);
    assert!(r.stdout().contains("TQ2_0"), "{}", r.stdout());
    let bytes = std::fs::read(sb.path().join("wide.gguf")).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    let names: Vec<String> =
        std::fs::read_dir(sb.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.starts_with(".rpt-flow-gguf")), "scratch folder left behind: {names:?}");

    let r = sb.run(&["export", p, "wide", "wide.gguf", "--format", "gguf", "--gguf-type", "tq1_0"]).expect(2);
    assert!(r.stderr().contains("--force"), "{}", r.stderr());
    sb.run(&["export", p, "wide", "wide.gguf", "--format", "gguf", "--gguf-type", "tq1_0", "--force"]).expect(0);
    let r = sb.run(&["export", p, "wide", "w.gguf", "--format", "gguf", "--gguf-type", "q4_0"]).expect(2);
    assert!(r.stderr().contains("tq2_0"), "{}", r.stderr());
}

/// A killed export leaves only its hidden scratch folder beside DIR (never a half-written DIR);
/// the next export there removes the scratch folders of processes that are gone, and leaves a
/// live process's (and anything else) alone.
#[test]
fn a_killed_exports_scratch_folder_is_removed_by_the_next_export() {
    let (sb, p, _) = setup();
    let p = p.to_str().unwrap();
    // pid 0 is never a process that /proc lists; this test's own pid is alive.
    let dead = sb.path().join(".out.rpt-export.0.123");
    let live = sb.path().join(format!(".out.rpt-export.{}.123", std::process::id()));
    let gguf_dead = sb.path().join(".rpt-flow-gguf-0");
    for d in [&dead, &live, &gguf_dead] {
        std::fs::create_dir_all(d.join("partial")).unwrap();
    }
    sb.write(".out.notes", "mine");
    sb.run(&["export", p, "base", "out"]).expect(0);
    assert!(sb.path().join("out/config.json").is_file());
    assert!(!dead.exists(), "the dead process's scratch folder was removed");
    assert!(live.exists(), "a live process's scratch folder is kept");
    assert!(sb.path().join(".out.notes").exists());
    // The GGUF path cleans its own scratch name (the tiny model is then refused: 128-wide rows).
    sb.run(&["export", p, "base", "m.gguf", "--format", "gguf"]).expect(2);
    assert!(!gguf_dead.exists(), "the dead GGUF scratch folder was removed");
}
