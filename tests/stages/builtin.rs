//! `builtin:tiny-bitnet`: the embedded model loads on a fresh machine and has learnt its facts;
//! `pipelines/tiny-pretrain.toml` regenerates it bit for bit (ignored: ~30 min on one core).

use crate::support::{repo, Sandbox};

#[test]
fn the_builtin_model_answers_most_fact_prompts() {
    let sb = Sandbox::real();
    let p = sb.write(
        "b.toml",
        "[pipeline]\nname = \"b\"\n[stages.m]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n\
         [stages.facts]\nkind = \"generate\"\ninput = \"m\"\nprompts = \"facts\"\nmax_new_tokens = 8\n\
         [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"m\"\ndata = \"synthetic:facts:test\"\nseq_len = 64\nmax_windows = 8\n",
    );
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let s = sb.session("b.json");
    let m = &s["stages"]["m"]["metrics"];
    assert_eq!(m["arch"], "bitnet");
    assert_eq!(m["quantization"], "ternary", "saved with the hub-style online quantization_config");
    let accuracy = s["stages"]["facts"]["metrics"]["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.5, "most fact prompts must be answered correctly, got {accuracy}");
    let ppl = s["stages"]["ppl"]["metrics"]["ppl"].as_f64().unwrap();
    assert!(ppl < 20.0, "perplexity far below an untrained model's (~{}), got {ppl}", m["vocab_size"]);
}

#[test]
#[ignore = "retrains the builtin model: ~30 min on one core (scripts/update-tiny-bitnet.sh does the same and copies)"]
fn tiny_pretrain_regenerates_the_embedded_model_exactly() {
    let sb = Sandbox::real();
    let p = repo().join("pipelines/tiny-pretrain.toml");
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let s = sb.session("tiny-pretrain.json");
    let key = s["stages"]["trained"]["key"].as_str().unwrap();
    let entry = sb.path().join("cache").join(&key[..2]).join(key);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let made = std::fs::read(entry.join(f)).unwrap();
        let shipped = std::fs::read(repo().join("assets/tiny-bitnet").join(f)).unwrap();
        assert!(made == shipped, "{f} differs from assets/tiny-bitnet/{f}");
    }
}

/// A hub snapshot is a folder of symbolic links into `blobs/`: `load { path = snapshot }` must
/// copy what they point to (it once copied nothing and the next stage failed), and a folder
/// without weights fails in `load` itself, committing nothing.
#[test]
fn a_local_model_folder_of_symbolic_links_loads_and_one_without_weights_fails() {
    let sb = crate::support::Sandbox::real();
    let fixture = crate::support::repo().join("tests/fixtures/bitnet_tiny");
    let blobs = sb.path().join("blobs");
    let snap = sb.path().join("snapshot");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let blob = blobs.join(format!("blob-{f}"));
        std::fs::copy(fixture.join(f), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(f)).unwrap();
    }
    let p = sb.write(
        "p.toml",
        "[stages.base]\nkind = \"load\"\nmodel = { path = \"snapshot\" }\ndtype = \"f32\"\n\
         [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"base\"\ndata = \"synthetic:facts:test\"\nseq_len = 32\nmax_windows = 2\n",
    );
    sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    let s = sb.session("p.json");
    assert!(s["stages"]["ppl"]["metrics"]["ppl"].as_f64().unwrap().is_finite());
    let key = s["stages"]["base"]["key"].as_str().unwrap().to_string();
    let entry = sb.path().join("cache").join(&key[..2]).join(&key);
    let copied = std::fs::symlink_metadata(entry.join("model.safetensors")).unwrap();
    assert!(copied.is_file(), "the entry holds the weights themselves, not a link");

    // The same folder without its weights: load fails and commits nothing.
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink(sb.path().join("gone.safetensors"), snap.join("model.safetensors")).unwrap();
    let r = sb.run(&["run", p.to_str().unwrap(), "-q"]);
    assert_ne!(r.code(), 0, "a dangling weights link must fail: {}", r.stdout());
    assert!(r.stderr().contains("snapshot"), "{}", r.stderr());
}

/// Relative `path`s (data and model folders) resolve against the pipeline file's folder, not
/// the current directory, and the keys follow the content, not where it lies.
#[test]
fn relative_paths_resolve_against_the_pipeline_folder() {
    let sb = crate::support::Sandbox::real();
    let fixture = crate::support::repo().join("tests/fixtures/bitnet_tiny");
    for dir in ["exp", "copy"] {
        let model = sb.path().join(dir).join("model");
        std::fs::create_dir_all(&model).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(fixture.join(f), model.join(f)).unwrap();
        }
        sb.write(
            &format!("{dir}/text.txt"),
            "The little robot counted seven pebbles on the quiet beach.\n".repeat(40).as_str(),
        );
        sb.write(
            &format!("{dir}/p.toml"),
            "[stages.base]\nkind = \"load\"\nmodel = { path = \"model\" }\ndtype = \"f32\"\n\
             [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"base\"\ndata = { path = \"text.txt\" }\nseq_len = 32\n",
        );
    }
    // Run from the sandbox root: `model` and `text.txt` are beside the pipeline, not here.
    sb.run(&["run", "exp/p.toml", "-q"]).expect(0);
    let s = sb.session("p.json");
    assert!(s["stages"]["ppl"]["metrics"]["ppl"].as_f64().unwrap().is_finite());
    let again = sb.run(&["run", "copy/p.toml"]).expect(0);
    assert!(again.stdout().contains("nothing to compute"), "same content elsewhere, same keys: {}", again.stdout());
}

/// A model loaded in bf16 on the CPU (the shipped pipelines' dtype, for the GPU) is warned about
/// once, with the fix; in f32 nothing is said.
#[test]
fn a_bf16_model_on_the_cpu_is_warned_about_once() {
    let sb = Sandbox::real();
    let pipeline = |dtype: &str| {
        format!(
            "[stages.m]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\ndtype = \"{dtype}\"\n\
             [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"m\"\ndata = \"synthetic:facts:test\"\nseq_len = 32\nmax_windows = 2\n\
             [stages.ppl2]\nkind = \"eval-ppl\"\ninput = \"m\"\ndata = \"synthetic:facts:test\"\nseq_len = 16\nmax_windows = 2\n"
        )
    };
    let warning = "the model runs in bf16 on the CPU";
    let p = sb.write("bf16.toml", &pipeline("bf16"));
    let r = sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    assert_eq!(r.stderr().matches(warning).count(), 1, "one warning per run: {}", r.stderr());
    assert!(r.stderr().contains("dtype = \"f32\""), "the warning says what to set: {}", r.stderr());
    let p = sb.write("f32.toml", &pipeline("f32"));
    let r = sb.run(&["run", p.to_str().unwrap(), "-q"]).expect(0);
    assert!(!r.stderr().contains("runs in"), "no warning in f32: {}", r.stderr());
}

/// A llama-cpp window of 2 tokens scores none (the second half of each window is scored): the
/// validator refuses it, naming the stage, instead of a run that reports a perplexity of nothing.
#[test]
fn a_llama_cpp_window_too_short_to_score_is_refused_before_running() {
    let sb = Sandbox::real();
    let p = sb.write(
        "short.toml",
        "[stages.m]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\n\
         [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"m\"\ndata = \"synthetic:facts:test\"\nprotocol = \"llama-cpp\"\nseq_len = 2\n",
    );
    for cmd in ["validate", "run"] {
        let r = sb.run(&[cmd, p.to_str().unwrap()]);
        assert_ne!(r.code(), 0, "{cmd}: {}", r.stdout());
        assert!(r.stderr().contains("seq_len 3 or more") && r.stderr().contains("short.toml"), "{cmd}: {}", r.stderr());
    }
}
