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
