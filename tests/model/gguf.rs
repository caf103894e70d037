//! GGUF export (`rpt_flow::export::gguf`): write a small ternary BitNet, parse the file back with
//! our own reader, and check the header, metadata, tensor infos, offsets, and that each ternary
//! tensor dequantises to exactly the codes × scale the model multiplies by; shape errors; atomic
//! writing. Comparing logits with llama.cpp needs Python: scripts/check_gguf.py (docs/gguf.md).

use candle_core::{DType, Device, Tensor};
use rpt_flow::export::gguf::format::{GgmlType, GgufFile, Value};
use rpt_flow::export::gguf::{ternary, write_gguf, GgufType, PROJECTIONS as PROJ};
use rpt_flow::model::config::{Arch, ModelConfig};
use rpt_flow::model::{quant, LoadOptions, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/tiny-bitnet")
}

/// A random BitNet with llama.cpp-compatible sizes (hidden 256, intermediate 512) and the tiny
/// model's tokenizer (1024 tokens), saved latent in f32.
fn random_bitnet(dir: &Path) -> Model {
    let mut raw = ModelConfig::tiny(Arch::Bitnet, 1024, 256, 512, 2, 4, 2).raw;
    (raw["bos_token_id"], raw["eos_token_id"]) = (0.into(), 1.into()); // the tokenizer's <s>, </s>
    let cfg = ModelConfig::from_json(raw).unwrap();
    let m = Model::random(&cfg, 7, &LoadOptions::default()).unwrap();
    m.save_with_aux(dir, Some(&assets())).unwrap();
    m
}

fn u32_of(g: &GgufFile, k: &str) -> u32 {
    g.get(k).and_then(Value::as_u32).unwrap_or_else(|| panic!("no u32 {k}"))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Parse `gguf` and check it against the latent checkpoint in `model_dir`: every projection
/// dequantises to exactly `weight_fake_quant(W)` (the f32 weight the model multiplies by).
fn check_against_latent(gguf: &Path, model_dir: &Path, ty: GgmlType) {
    let bytes = std::fs::read(gguf).unwrap();
    let g = GgufFile::parse(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.data_offset % 32, 0);
    assert_eq!(g.get("general.architecture").and_then(Value::as_str), Some("bitnet"));
    assert_eq!(u32_of(&g, "bitnet.block_count"), 2);
    assert_eq!(u32_of(&g, "bitnet.embedding_length"), 256);
    assert_eq!(u32_of(&g, "bitnet.feed_forward_length"), 512);
    assert_eq!(u32_of(&g, "bitnet.attention.head_count"), 4);
    assert_eq!(u32_of(&g, "bitnet.attention.head_count_kv"), 2);
    assert_eq!(u32_of(&g, "bitnet.rope.dimension_count"), 64);
    assert_eq!(g.get("bitnet.rope.freq_base"), Some(&Value::F32(500000.0)));
    assert_eq!(g.get("bitnet.hidden_activation").and_then(Value::as_str), Some("relu2"));
    assert_eq!(u32_of(&g, "general.file_type"), if ty == GgmlType::TQ2_0 { 37 } else { 36 });
    // Tokenizer: the tiny byte-level BPE, 1024 tokens, GPT-2 pre-tokenizer.
    assert_eq!(g.get("tokenizer.ggml.model").and_then(Value::as_str), Some("gpt2"));
    assert_eq!(g.get("tokenizer.ggml.pre").and_then(Value::as_str), Some("gpt-2"));
    let Some(Value::Array(8, tokens)) = g.get("tokenizer.ggml.tokens") else { panic!("tokens") };
    assert_eq!(tokens.len(), 1024);
    assert_eq!(tokens[0], Value::Str("<s>".into()));
    let Some(Value::Array(5, types)) = g.get("tokenizer.ggml.token_type") else { panic!("token_type") };
    assert_eq!((types[0].clone(), types[5].clone()), (Value::I32(3), Value::I32(1)));
    let Some(Value::Array(8, merges)) = g.get("tokenizer.ggml.merges") else { panic!("merges") };
    assert_eq!(merges.len(), 766);
    assert_eq!(u32_of(&g, "tokenizer.ggml.bos_token_id"), 0);
    assert_eq!(u32_of(&g, "tokenizer.ggml.eos_token_id"), 1);

    // 2 global tensors + per layer 4 norms + 7 × (codes + scale).
    assert_eq!(g.tensors.len(), 2 + 2 * (4 + 14));
    let mut end = 0;
    for t in &g.tensors {
        assert!(t.offset >= end, "{} overlaps the previous tensor", t.name);
        end = t.offset + t.nbytes().unwrap();
    }
    assert_eq!(bytes.len() as u64, g.data_offset + end, "file ends with the last tensor");

    let st = candle_core::safetensors::load(model_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!((embd.ne.clone(), embd.ty), (vec![256, 1024], GgmlType::F32));
    let want = st["model.embed_tokens.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(f32s(g.tensor_data(&bytes, "token_embd.weight").unwrap()), want);
    let norm = g.tensor("blk.1.ffn_sub_norm.weight").unwrap();
    assert_eq!((norm.ne.clone(), norm.ty), (vec![512], GgmlType::F32));
    for l in 0..2 {
        for (gname, hf) in PROJ {
            let w = &st[&format!("model.layers.{l}.{hf}.weight")];
            let (out, inp) = w.dims2().unwrap();
            let name = format!("blk.{l}.{gname}.weight");
            let info = g.tensor(&name).unwrap();
            assert_eq!((info.ne.clone(), info.ty), (vec![inp as u64, out as u64], ty), "{name}");
            let data = g.tensor_data(&bytes, &name).unwrap();
            let (codes, d) = match ty {
                GgmlType::TQ2_0 => ternary::decode_tq2_0(data, out * inp).unwrap(),
                _ => ternary::decode_tq1_0(data, out * inp).unwrap(),
            };
            assert!(d.iter().all(|d| d.to_f32() == 1.0), "{name}: block scales are 1");
            let scale_name = format!("blk.{l}.{gname}.scale");
            let s = g.tensor(&scale_name).unwrap();
            assert_eq!((s.ne.clone(), s.ty), (vec![1], GgmlType::F32));
            let scale = f32s(g.tensor_data(&bytes, &scale_name).unwrap())[0];
            let deq: Vec<f32> = codes.iter().map(|&c| c as f32 * scale).collect();
            let want = quant::weight_fake_quant(w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(deq, want, "{name}: codes × scale = the model's quantised weight");
            let (t, _) = quant::ternarize(w).unwrap();
            let t: Vec<i8> = t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as i8).collect();
            assert_eq!(codes, t, "{name}: codes");
        }
    }
}

#[test]
fn writes_tq2_0_and_tq1_0_that_dequantise_to_the_models_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    random_bitnet(&dir);
    for (ty, g) in [(GgufType::TQ2_0, GgmlType::TQ2_0), (GgufType::TQ1_0, GgmlType::TQ1_0)] {
        let out = tmp.path().join(format!("m-{}.gguf", ty.name()));
        let s = write_gguf(&dir, &out, ty).unwrap();
        assert_eq!(s.bytes, std::fs::metadata(&out).unwrap().len());
        assert_eq!((s.tensors, s.ternary_tensors), (38, 14));
        assert_eq!(s.warnings.len(), 1, "relu² is flagged: {:?}", s.warnings);
        check_against_latent(&out, &dir, g);
    }
    // TQ1_0 is smaller: 54 vs 66 bytes per 256 weights.
    let size = |t: &str| std::fs::metadata(tmp.path().join(format!("m-{t}.gguf"))).unwrap().len();
    assert!(size("TQ1_0") < size("TQ2_0"));
}

/// The latent model in `latent` packed (offline) into `packed`: codes from the weight quantiser,
/// bf16 `weight_scale` = β. Returns β (as stored) per projection. `corrupt` writes the unused
/// code 3 into the last projection.
fn make_packed(latent: &Path, packed: &Path, corrupt: bool) -> HashMap<String, f32> {
    std::fs::create_dir_all(packed).unwrap();
    let st = candle_core::safetensors::load(latent.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut scales = HashMap::new();
    for (name, t) in &st {
        if PROJ.iter().any(|(_, hf)| name.contains(hf)) {
            let (codes, s) = quant::ternarize(t).unwrap();
            let beta = 1.0 / s.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
            let (o, i) = codes.dims2().unwrap();
            let vals = codes.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut bytes = rpt_flow::model::pack::pack(&vals, o, i).unwrap();
            if corrupt && name == "model.layers.1.mlp.down_proj.weight" {
                bytes[0] = 0xff;
            }
            out.insert(name.clone(), Tensor::from_vec(bytes, (o / 4, i), &Device::Cpu).unwrap());
            let sname = name.replace(".weight", ".weight_scale");
            out.insert(sname, Tensor::new(&[beta], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap());
            scales.insert(name.clone(), half::bf16::from_f32(beta).to_f32());
        } else {
            out.insert(name.clone(), t.clone());
        }
    }
    candle_core::safetensors::save(&out, packed.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(latent.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"]["quantization_mode"] = "offline".into();
    std::fs::write(packed.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(latent.join("tokenizer.json"), packed.join("tokenizer.json")).unwrap();
    scales
}

#[test]
fn a_packed_checkpoint_exports_its_codes_and_weight_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let latent = tmp.path().join("latent");
    random_bitnet(&latent);
    let packed = tmp.path().join("packed");
    let scales = make_packed(&latent, &packed, false);

    let a = tmp.path().join("latent.gguf");
    let b = tmp.path().join("packed.gguf");
    write_gguf(&latent, &a, GgufType::TQ2_0).unwrap();
    write_gguf(&packed, &b, GgufType::TQ2_0).unwrap();
    let (ab, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let (ga, gb) = (GgufFile::parse(&ab).unwrap(), GgufFile::parse(&bb).unwrap());
    assert_eq!(ga.tensors, gb.tensors, "same layout");
    for l in 0..2 {
        for (gname, hf) in PROJ {
            let w = format!("blk.{l}.{gname}.weight");
            assert_eq!(ga.tensor_data(&ab, &w).unwrap(), gb.tensor_data(&bb, &w).unwrap(), "{w}: same codes");
            let s = f32s(gb.tensor_data(&bb, &format!("blk.{l}.{gname}.scale")).unwrap())[0];
            assert_eq!(s, scales[&format!("model.layers.{l}.{hf}.weight")], "{w}: scale = weight_scale");
        }
    }
}

#[test]
fn shapes_that_do_not_fill_256_blocks_are_refused_naming_the_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny.gguf");
    // builtin:tiny-bitnet: hidden 128, intermediate 344.
    let err = write_gguf(&assets(), &out, GgufType::TQ2_0).unwrap_err();
    let msg = format!("{err:#}");
    for want in [
        "multiple of 256",
        "blk.0.attn_q.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "blk.0.ffn_down.weight",
        "same in layers 1–3",
    ] {
        assert!(msg.contains(want), "{want:?} missing from: {msg}");
    }
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing written");
}

#[test]
fn writing_is_atomic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    random_bitnet(&dir);
    let out = tmp.path().join("out").join("m.gguf");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, b"old").unwrap();
    // A failure part-way through the data (a packed code 3 in the last projection) leaves the old
    // file and no temporary file.
    let bad = tmp.path().join("bad");
    make_packed(&dir, &bad, true);
    let err = format!("{:#}", write_gguf(&bad, &out, GgufType::TQ2_0).unwrap_err());
    assert!(err.contains("unused code 3"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    // Success replaces it; no temporary file is left beside it.
    write_gguf(&dir, &out, GgufType::TQ2_0).unwrap();
    assert_eq!(&std::fs::read(&out).unwrap()[..4], b"GGUF");
    let names: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("m.gguf")]);
}

#[test]
fn unsupported_models_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("llama");
    let cfg = ModelConfig::tiny(Arch::Llama, 1024, 256, 512, 1, 4, 2);
    Model::random(&cfg, 1, &LoadOptions::default()).unwrap().save_with_aux(&dir, Some(&assets())).unwrap();
    let err = format!("{:#}", write_gguf(&dir, &tmp.path().join("x.gguf"), GgufType::TQ1_0).unwrap_err());
    assert!(err.contains("BitNet"), "{err}");
    assert!(GgufType::parse("i2_s").is_err());
    assert_eq!(GgufType::parse("TQ1_0").unwrap(), GgufType::TQ1_0);
}
