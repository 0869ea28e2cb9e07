//! Weights kept in their stored format (bf16, f16 safetensors; Q8_0 / Q4_0 / Q4_1 blocks of a GGUF imported with
//! `--keep-quantized`) against the reference: the same model with every matrix expanded to f32, whose values are
//! exactly the stored ones (bf16 / f16 rounding and the block dequantization are exact in f32). The kernels
//! expand each weight to that same f32 value and accumulate in f32, so logits may differ by the summation order
//! only (stated tolerance 1e-4 on logits of size ~1), and greedy tokens must be equal.

use cage::decode::{Engine, RunConfig};
use cage::model::forward::{CpuDecoder, Decoder, LogitsAt, Seq};
use cage::model::gguf::GgmlType;
use cage::model::weight::{Weight, WeightStorage};
use cage::model::weights::{GGML_TYPE_KEY, TensorStore};
use cage::model::{Adapter, Model};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;
use common::fixtures::{cage, fixture, ran, scratch};
use common::gguf::{Q, write_gguf};

/// Tolerance on logits between a stored format and its f32 expansion: f32 summation order over k <= 96 terms.
const TOL: f32 = 1e-4;

/// tiny-llama with its matrices (2-D tensors) in `dtype` (F16 or BF16) and its vectors in f32, in `dir`.
fn convert(dir: &Path, dtype: Dtype) -> PathBuf {
    let src = fixture("tiny-llama");
    let st = TensorStore::open(&src).unwrap();
    let mut data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![];
    for name in st.names() {
        let shape = st.shape(&name).unwrap();
        let v = st.get(&name, &shape).unwrap();
        let (d, bytes): (Dtype, Vec<u8>) = match (shape.len(), dtype) {
            (2, Dtype::BF16) => (dtype, v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()),
            (2, _) => (dtype, v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()),
            _ => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        data.push((name, d, shape, bytes));
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let views = data.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()));
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// Logits of every position of a 20-token prompt (one prefill of 20 rows: the GEMM path), then greedy decode
/// for 8 steps (one row: the decode kernels), with the logits of each step.
fn run(m: Model) -> (Vec<f32>, Vec<u32>) {
    let mut dec = CpuDecoder::new(Arc::new(m), 1, 64, 32);
    let ids: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 128).collect();
    let mut logits = dec.forward(&[Seq { slot: 0, tokens: &ids, adapter: None }], LogitsAt::All).unwrap().to_vec();
    let mut tokens = vec![];
    let mut next = cage::model::forward::argmax(&logits[logits.len() - 128..]);
    for _ in 0..8 {
        tokens.push(next);
        let l = dec.forward(&[Seq { slot: 0, tokens: &[next], adapter: None }], LogitsAt::Last).unwrap();
        logits.extend_from_slice(l);
        next = cage::model::forward::argmax(l);
    }
    (logits, tokens)
}

fn assert_same_model(stored: Model, reference: Model, what: &str) {
    let (a, ta) = run(stored);
    let (b, tb) = run(reference);
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d <= TOL, "{what}: logits differ from the f32 expansion by {d}");
    assert_eq!(ta, tb, "{what}: greedy tokens");
}

/// The ggml formats of a model's matrices (these fixtures hold no GPTQ / AWQ int4, which has none).
fn formats(m: &Model) -> Vec<GgmlType> {
    let ggml = |w: &Weight| w.format().expect("a ggml format");
    let mut f: Vec<GgmlType> = m.layers.iter().flat_map(|l| l.linears().map(|x| ggml(&x.w))).collect();
    f.extend(m.lm_head.as_ref().map(|l| ggml(&l.w)));
    f.push(ggml(&m.embed));
    f.sort_by_key(|t| format!("{t:?}"));
    f.dedup();
    f
}

#[test]
fn bf16_and_f16_safetensors_stay_half_and_match_f32() {
    for (dtype, ty) in [(Dtype::BF16, GgmlType::Bf16), (Dtype::F16, GgmlType::F16)] {
        let dir = convert(&scratch(&format!("weights-{dtype:?}")), dtype);
        let m = Model::load(&dir).unwrap();
        assert_eq!(formats(&m), [ty], "{dtype:?}");
        // Half the bytes of the f32 model for the matrices; vectors stay f32.
        let f = Model::load_as(&dir, WeightStorage::F32).unwrap();
        assert_eq!(formats(&f), [GgmlType::F32]);
        let vectors = 4 * (f.norm.len() + f.layers.iter().map(|l| l.ln1.len() + l.ln2.len()).sum::<usize>());
        assert_eq!(m.weight_bytes() - vectors, (f.weight_bytes() - vectors) / 2, "{dtype:?}");
        assert_same_model(m, f, &format!("{dtype:?}"));
    }
}

/// Each quantized type on some matrices: the attention in Q8_0, gate and up in Q4_0, down and the head in
/// Q4_1, the embedding in F16.
fn mixed(gg: &str) -> Q {
    if gg.contains("attn") {
        Q::Q8_0
    } else if gg.contains("ffn_gate") || gg.contains("ffn_up") {
        Q::Q4_0
    } else if gg.contains("ffn_down") || gg.contains("output") {
        Q::Q4_1
    } else if gg.contains("token_embd") {
        Q::F16
    } else {
        Q::F32
    }
}

#[test]
fn gguf_blocks_kept_quantized_match_the_f32_import() {
    let d = scratch("weights-gguf");
    write_gguf(&d.join("m.gguf"), &mixed);
    cage::model::import::import_gguf_as(&d.join("m.gguf"), &d.join("q"), true, &mut |_, _| {}).unwrap();
    cage::model::import::import_gguf(&d.join("m.gguf"), &d.join("f")).unwrap();
    let q = Model::load(&d.join("q")).unwrap();
    let f = Model::load(&d.join("f")).unwrap().to_f32_weights();
    assert_eq!(q.layers[0].q.w.format(), Some(GgmlType::Q8_0));
    assert_eq!(q.layers[1].up.w.format(), Some(GgmlType::Q4_0));
    assert_eq!(q.layers[1].down.w.format(), Some(GgmlType::Q4_1));
    assert_eq!(q.lm_head.as_ref().unwrap().w.format(), Some(GgmlType::Q4_1));
    assert_eq!(q.embed.format(), Some(GgmlType::F16));
    // The blocks as the GGUF file holds them (34 / 18 / 20 bytes per 32 values), q/k rows un-permuted whole.
    let (hq, hf) = (&q.layers[1].q, &f.layers[1].q);
    assert_eq!(hq.w.bytes(), hq.out * hq.inp / 32 * 34);
    assert_eq!(q.layers[1].up.w.bytes(), 96 * 64 / 32 * 18);
    assert_eq!(hq.w.to_f32(), hf.w.to_f32(), "un-permuted blocks dequantize to the f32 import's rows");
    // The same model, read again as f32 from the kept blocks, is the f32 import.
    let q32 = Model::load_as(&d.join("q"), WeightStorage::F32).unwrap();
    assert_eq!(q32.layers[1].down.w.to_f32(), f.layers[1].down.w.to_f32());
    // Quantization error against the original f32 fixture, for the record (not the kernels' error).
    let (orig, _) = run(Model::load(&fixture("tiny-llama")).unwrap());
    let (quant, _) = run(q.clone());
    let err = orig.iter().zip(&quant).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("mixed Q8_0 / Q4_0 / Q4_1 tiny-llama: max |logit - f32 fixture| = {err:.4}");
    assert_same_model(q, f, "Q8_0 / Q4_0 / Q4_1");
}

#[test]
fn every_block_type_alone_matches_its_f32_import() {
    for ty in [Q::Q8_0, Q::Q4_0, Q::Q4_1] {
        let d = scratch("weights-one-type");
        write_gguf(&d.join("m.gguf"), &|gg: &str| if gg.ends_with("norm") { Q::F32 } else { ty });
        cage::model::import::import_gguf_as(&d.join("m.gguf"), &d.join("q"), true, &mut |_, _| {}).unwrap();
        cage::model::import::import_gguf(&d.join("m.gguf"), &d.join("f")).unwrap();
        let q = Model::load(&d.join("q")).unwrap();
        assert_eq!(formats(&q).len(), 1);
        assert!(!matches!(formats(&q)[0], GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16));
        let what = format!("{:?}", formats(&q)[0]);
        assert_same_model(q, Model::load(&d.join("f")).unwrap().to_f32_weights(), &what);
    }
}

#[test]
fn an_unknown_block_type_is_an_error_naming_tensor_and_type() {
    let d = scratch("weights-badtype");
    let dir = convert(&d.join("m"), Dtype::BF16);
    // Replace q_proj of layer 0 by 64 rows of 34 bytes tagged with ggml type 99.
    let st = TensorStore::open(&dir).unwrap();
    let mut keep: Vec<(String, Vec<usize>, Vec<f32>)> = vec![];
    for n in st.names() {
        let s = st.shape(&n).unwrap();
        keep.push((n.clone(), s.clone(), st.get(&n, &s).unwrap()));
    }
    drop(st);
    let bytes: Vec<Vec<u8>> = keep.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let bad = "model.layers.0.self_attn.q_proj.weight";
    let raw = vec![0u8; 64 * 68];
    let views = keep.iter().zip(&bytes).map(|((n, s, _), b)| {
        let v = if n == bad {
            TensorView::new(Dtype::U8, vec![64, 68], &raw).unwrap()
        } else {
            TensorView::new(Dtype::F32, s.clone(), b).unwrap()
        };
        (n.clone(), v)
    });
    let views: Vec<_> = views.collect();
    // An id llama.cpp does not define, and types it defines that cage does not run: refused from the header by
    // the loader's size check, whatever storage is asked for.
    for (id, name) in [("99", "ggml type 99, which llama.cpp does not define"), ("6", "Q5_0 blocks (ggml type 6)")]
        .into_iter()
        .chain([("11", "Q3_K blocks (ggml type 11)"), ("23", "IQ4_XS blocks (ggml type 23)")])
    {
        let md = HashMap::from([(format!("{GGML_TYPE_KEY}{bad}"), id.to_string())]);
        safetensors::serialize_to_file(views.clone(), Some(md), &dir.join("model.safetensors")).unwrap();
        for storage in [WeightStorage::Stored, WeightStorage::F32] {
            let e = Model::load_as(&dir, storage).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(name) && e.contains("cannot run"), "{e}");
        }
        let r = ran(cage().args(["logits", "--model", dir.to_str().unwrap(), "--ids", "1,2"]));
        assert!(r.code == Some(1) && r.stderr.contains(name) && !r.stderr.contains("panicked"), "{}", r.stderr);
    }
}

#[test]
fn the_run_config_says_how_the_matrices_are_held() {
    let dir = convert(&scratch("weights-config"), Dtype::BF16);
    let config = |v: &str| {
        common::fixtures::tiny_config(serde_json::json!({
            "base": dir, "cpu_weights": v, "weights": [1.0],
            "principals": [{"name": "words", "kind": "lexicon", "words": {"t5": 2.0}}],
        }))
        .to_string()
    };
    for (v, want) in [("stored", GgmlType::Bf16), ("f32", GgmlType::F32)] {
        let cfg = RunConfig::parse(&config(v)).unwrap();
        assert_eq!(cfg.cpu_weights.to_string(), v);
        let e = Engine::from_config(&cfg).unwrap();
        let m = e.model(0).unwrap();
        let f: Vec<Option<GgmlType>> = m.layers.iter().flat_map(|l| l.linears().map(|x| x.w.format())).collect();
        assert!(!f.is_empty() && f.iter().all(|t| *t == Some(want)), "cpu_weights {v}: {f:?}");
    }
    // The default is stored.
    let cfg = RunConfig::parse(&config("stored").replace(r#""cpu_weights":"stored","#, "")).unwrap();
    assert_eq!(cfg.cpu_weights, WeightStorage::Stored);
    let e = RunConfig::parse(&config("f16")).unwrap_err().to_string();
    assert!(e.contains("cpu_weights") && e.contains("\"f16\"") && e.contains("stored, f32"), "{e}");
    // The command line overrides the config, and names the flag's values when one is wrong.
    let r = ran(cage().args(["generate", "-c", "/nonexistent.json", "--prompt", "t1", "--cpu-weights", "bf16"]));
    assert!(r.code == Some(2) && r.stderr.contains("cpu_weights") && r.stderr.contains("stored, f32"), "{}", r.stderr);
}

#[test]
fn merging_an_adapter_into_bf16_weights_equals_merging_into_their_f32_values() {
    let dir = convert(&scratch("weights-merge"), Dtype::BF16);
    let mut m = Model::load(&dir).unwrap();
    let mut f = m.to_f32_weights();
    let ad = Adapter::load(&fixture("tiny-lora-a"), &m).unwrap();
    m.merge_adapter(&ad).unwrap();
    f.merge_adapter(&ad).unwrap();
    // Targeted matrices became f32 (the update is not representable in bf16); the others stay bf16.
    assert!(formats(&m).contains(&GgmlType::F32) && formats(&m).contains(&GgmlType::Bf16), "{:?}", formats(&m));
    let (a, _) = run(m);
    let (b, _) = run(f);
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d <= TOL, "{d}");
}

#[test]
fn the_gpu_upload_of_blocks_is_the_upload_of_their_values() {
    // The (emulated) GPU decoder converts every format to bf16 row by row; from blocks and from their f32
    // values it must upload the same bf16 matrices, so the logits are equal bit for bit.
    let d = scratch("weights-gpu");
    write_gguf(&d.join("m.gguf"), &mixed);
    cage::model::import::import_gguf_as(&d.join("m.gguf"), &d.join("q"), true, &mut |_, _| {}).unwrap();
    let q = Arc::new(Model::load(&d.join("q")).unwrap());
    let f = Arc::new(q.to_f32_weights());
    let ids: Vec<u32> = (0..12).map(|i| (i * 11 + 3) % 128).collect();
    let mut out = vec![];
    for m in [q, f] {
        let mut dec = cage::model::gpu::new_decoder(cage::Backend::Emulation, m, 1, 32, 16).unwrap();
        out.push(dec.forward(&[Seq { slot: 0, tokens: &ids, adapter: None }], LogitsAt::All).unwrap().to_vec());
    }
    assert_eq!(out[0], out[1]);
}

#[test]
fn weight_rows_and_bf16_copies_agree_with_the_whole_expansion() {
    let w = Weight::F16((0..6 * 40).map(|i| half::f16::from_f32(i as f32 * 0.25 - 7.0)).collect());
    let all = w.to_f32();
    let mut row = vec![0f32; 40];
    for i in 0..6 {
        w.row_into(i, 40, &mut row);
        assert_eq!(row, all[i * 40..(i + 1) * 40]);
    }
    let b = w.to_bf16(40);
    assert!(b.iter().zip(&all).all(|(b, a)| *b == half::bf16::from_f32(*a)));
}
