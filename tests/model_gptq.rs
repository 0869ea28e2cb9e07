//! GPTQ and AWQ int4 model folders loaded as stored (src/model/gptq.rs): tiny-llama's projections quantized and
//! packed by scripts/make_fixtures.py `int4` (GPTQ by its plain-torch packer, AWQ by autoawq's own
//! `WQLinear_GEMM.from_linear`).
//!
//! References, none computed by the code under test:
//! - golden-int4.safetensors: each projection's integer `q - zero` and f16 scales as the packers' side unpacks
//!   them (AWQ by autoawq's `unpack_awq` / `reverse_awq_order`); `scale * (q - zero)` is exact in f32, so the
//!   loaded weights must equal it bit for bit.
//! - golden-int4.json: transformers' f32 logits and greedy tokens of each model with those dequantized weights.
//!   The int4 kernels multiply exactly the dequantized values in f32, so only the summation order separates
//!   the logits: [`TOL`], as for the f32 fixtures (tests/model_tiny.rs).
//! - On the GPU (emulation, and CUDA when present): `gpu_weights int4` on the stored codes against `bf16` on
//!   the same model, whose upload dequantizes and rounds to bf16 exactly what the int4 prefill path multiplies
//!   (tests/model_gpu_quant.rs explains its two tolerances, reused here).

use cage::model::Model;
use cage::model::devquant::{GpuWeights, Int4Matrix, QuantMatrix};
use cage::model::forward::{CpuDecoder, Decoder, LogitsAt, Seq, greedy};
use cage::model::gptq::{Int4Config, held_bytes, stack};
use cage::model::gpu::GpuDecoder;
use cage::model::weight::{Weight, WeightStorage};
use cage::model::weight_kernels::int4_matmul_t;
use cage::model::weights::TensorStore;
use safetensors::SafeTensors;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[path = "common/skip.rs"]
mod support;
use support::on_every_device;
#[path = "common/decode_pair.rs"]
mod pair;
use pair::{max_diff, run_pair};

/// Logits against transformers on the dequantized weights: f32 summation order only (as tests/model_tiny.rs).
const TOL: f32 = 1e-4;
/// GPU int4 prefill against the bf16 decoder on the same codes: the same bf16 GEMM on the same values.
const PREFILL_TOL: f32 = 1e-4;
/// GPU decoding steps (the GEMV on unrounded weights) against the bf16 reference: its rounding of the
/// weights (see tests/model_gpu_quant.rs `STEP_TOL`).
const STEP_TOL: f32 = 0.1;

const FOLDERS: [&str; 3] = ["tiny-gptq", "tiny-gptq-actorder", "tiny-awq"];
const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(name: &str) -> Model {
    Model::load(&fixtures().join(name)).unwrap()
}

fn linear<'m>(m: &'m Model, l: usize, name: &str) -> &'m cage::model::llama::Linear {
    m.layers[l].module(name.rsplit('.').next().unwrap()).unwrap()
}

/// The reference's dequantized `[out, inp]` weight of `layer` in folder `name`: `scale[g(i)][o] * diff[o][i]`.
fn reference_weight(golden: &SafeTensors, name: &str, layer: &str) -> Vec<f32> {
    let t = |s: &str| golden.tensor(&format!("{name}.{layer}.{s}")).ok();
    let diff = t("diff").unwrap();
    let (out, inp) = (diff.shape()[0], diff.shape()[1]);
    let scales: Vec<f32> =
        t("scales").unwrap().data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    let g_idx: Vec<usize> = match t("g_idx") {
        Some(g) => g.data().chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize).collect(),
        None => (0..inp).map(|i| i / 32).collect(),
    };
    let d = diff.data();
    (0..out * inp).map(|k| scales[g_idx[k % inp] * out + k / inp] * (d[k] as i8) as f32).collect()
}

fn golden_bytes() -> Vec<u8> {
    std::fs::read(fixtures().join("golden-int4.safetensors")).unwrap()
}

#[test]
fn loaded_int4_weights_equal_the_reference_dequantization() {
    let bytes = golden_bytes();
    let golden = SafeTensors::deserialize(&bytes).unwrap();
    for name in FOLDERS {
        let m = load(name);
        let as_f32 = Model::load_as(&fixtures().join(name), WeightStorage::F32).unwrap();
        for l in 0..m.layers.len() {
            for p in LINEARS {
                let layer = format!("model.layers.{l}.{p}");
                let lin = linear(&m, l, p);
                let Weight::Int4(w) = &lin.w else { panic!("{name} {layer}: not held as int4") };
                assert_eq!(w.g_idx.is_some(), name == "tiny-gptq-actorder", "{name} {layer}: act-order groups");
                let want = reference_weight(&golden, name, &layer);
                assert_eq!(lin.w.to_f32(), want, "{name} {layer}: to_f32");
                assert_eq!(linear(&as_f32, l, p).w.as_f32().unwrap(), want.as_slice(), "{name} {layer}: load as f32");
                let mut row = vec![0f32; lin.inp];
                for o in [0, lin.out / 2, lin.out - 1] {
                    lin.w.row_into(o, lin.inp, &mut row);
                    assert_eq!(row, want[o * lin.inp..(o + 1) * lin.inp], "{name} {layer}: row {o}");
                }
                let bf: Vec<f32> = lin.w.to_bf16(lin.inp).iter().map(|v| v.to_f32()).collect();
                let want_bf: Vec<f32> = want.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
                assert_eq!(bf, want_bf, "{name} {layer}: to_bf16");
            }
        }
        // Embedding, norms and head stay as stored (f16).
        assert!(matches!(m.embed, Weight::F16(_)), "{name}: embedding");
        assert!(matches!(m.lm_head.as_ref().unwrap().w, Weight::F16(_)), "{name}: lm_head");
    }
}

#[test]
fn int4_cpu_logits_match_transformers_on_the_dequantized_weights() {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden-int4.json")).unwrap()).unwrap();
    for name in FOLDERS {
        let g = &golden["models"][name];
        let ids: Vec<u32> = g["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let want: Vec<Vec<f32>> = g["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
            .collect();
        let m = Arc::new(load(name));
        let v = m.config.vocab_size;
        // The whole prompt at once (9 rows: the dequantize-then-GEMM path) ...
        let mut dec = CpuDecoder::new(m.clone(), 2, 64, 16);
        let all = dec.forward(&[Seq { slot: 0, tokens: &ids, adapter: None }], LogitsAt::All).unwrap().to_vec();
        let mut worst = 0f32;
        for (p, row) in want.iter().enumerate() {
            worst = worst.max(max_diff(&all[p * v..(p + 1) * v], row));
        }
        // ... and token by token (1 row: the decode kernel).
        for (p, &t) in ids.iter().enumerate() {
            let got = dec.forward(&[Seq { slot: 1, tokens: &[t], adapter: None }], LogitsAt::Last).unwrap();
            worst = worst.max(max_diff(got, &want[p]));
        }
        eprintln!("{name}: max logit difference from transformers {worst:.2e}");
        assert!(worst <= TOL, "{name}: logits differ from transformers by {worst}");
        let n = g["greedy"].as_array().unwrap().len();
        let out = greedy(&mut CpuDecoder::new(m.clone(), 1, 64, 16), &[&ids], &[None], n, &[]).unwrap();
        let want_greedy: Vec<u32> =
            g["greedy"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(out[0], want_greedy, "{name}: greedy continuation");
    }
}

/// A deterministic pseudo-random stream in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn int4_kernel_matches_an_f64_product_at_odd_shapes() {
    // Outputs not a multiple of the 64-column tile, groups that end mid-tile, rows of x on both sides of the
    // decode / GEMM switch, with and without act-order groups (a permutation of i / group).
    for &(n, k, group) in &[(8, 8, 8), (72, 48, 16), (136, 96, 32), (200, 64, 64)] {
        let w = noise(n * k, (n * k) as u64);
        let q = Int4Matrix::quantize(&w, n, k, group, "test").unwrap();
        let base = QuantMatrix::Int4(q.clone()).dequantize();
        let perm: Vec<u32> = {
            let r = noise(k, 7);
            let mut idx: Vec<usize> = (0..k).collect();
            idx.sort_by(|&a, &b| r[a].total_cmp(&r[b]));
            let mut g = vec![0u32; k];
            for (rank, &i) in idx.iter().enumerate() {
                g[i] = (rank / group) as u32;
            }
            g
        };
        for g_idx in [None, Some(perm.as_slice())] {
            // Act-order: input i takes group g_idx[i]'s scale and zero.
            let deq: Vec<f64> = match g_idx {
                None => base.clone(),
                Some(gi) => (0..n * k)
                    .map(|e| {
                        let (o, i) = (e / k, e % k);
                        let (code, _, _) = q.code(o, i);
                        let (_, s, z) = q.code(o, gi[i] as usize * group);
                        s as f64 * (code as f64 - z as f64)
                    })
                    .collect(),
            };
            for m in [1, 3, 8, 9, 17] {
                let x = noise(m * k, m as u64 + 3);
                let start = noise(m * n, 99);
                for (accumulate, alpha) in [(false, 1.0f32), (true, 0.5)] {
                    let mut got = start.clone();
                    int4_matmul_t(&q, g_idx, &x, m, k, n, &mut got, accumulate, alpha);
                    for r in 0..m {
                        for o in 0..n {
                            let dot: f64 = (0..k).map(|i| x[r * k + i] as f64 * deq[o * k + i]).sum();
                            let want = alpha as f64 * dot + if accumulate { start[r * n + o] as f64 } else { 0.0 };
                            let got = got[r * n + o] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{n}x{k}/{group} m {m} act-order {}: [{r}][{o}] {got} vs {want}",
                                g_idx.is_some()
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn fused_projections_stack_losslessly() {
    for name in ["tiny-gptq", "tiny-awq"] {
        let m = load(name);
        let l = &m.layers[1];
        let s = stack(&[&l.q.w, &l.k.w, &l.v.w], "qkv").unwrap().expect("all int4");
        let got: Vec<f32> = QuantMatrix::Int4(s).dequantize().iter().map(|&x| x as f32).collect();
        let want: Vec<f32> = [&l.q, &l.k, &l.v].iter().flat_map(|p| p.w.to_f32()).collect();
        assert_eq!(got, want, "{name}: stacked q/k/v");
    }
    let m = load("tiny-gptq-actorder");
    let e = stack(&[&m.layers[0].gate.w], "gate").unwrap_err().to_string();
    assert!(e.contains("act-order") && e.contains("gpu_weights bf16"), "{e}");
}

#[test]
fn the_memory_check_counts_the_int4_bytes() {
    for name in FOLDERS {
        let dir = fixtures().join(name);
        let m = load(name);
        let st = TensorStore::open(&dir).unwrap();
        let q = Int4Config::load(&dir).unwrap().unwrap();
        let held = held_bytes(&st, &st.names(), WeightStorage::Stored, &q, name).unwrap();
        // A GPTQ g_idx that is i / group is counted but not kept.
        let dropped: u128 = m
            .layers
            .iter()
            .flat_map(|l| l.linears())
            .filter(|l| matches!(&l.w, Weight::Int4(w) if w.g_idx.is_none()) && name != "tiny-awq")
            .map(|l| l.inp as u128 * 4)
            .sum();
        assert_eq!(held, m.weight_bytes() as u128 + dropped, "{name}: stored bytes");
        let f32_bytes = held_bytes(&st, &st.names(), WeightStorage::F32, &q, name).unwrap();
        let want = Model::load_as(&dir, WeightStorage::F32).unwrap().weight_bytes() as u128;
        assert_eq!(f32_bytes, want, "{name}: f32 bytes");
        assert!(held * 3 < f32_bytes, "{name}: {held} int4 bytes against {f32_bytes} as f32");
    }
}

/// A copy of `name` in a fresh temporary folder `tag` with its quantization_config patched by `patch`, and with
/// or without its weights.
fn patched(name: &str, tag: usize, with_weights: bool, patch: impl Fn(&mut Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cage-int4-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join(name);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    patch(&mut cfg["quantization_config"]);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    if with_weights {
        std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    Model::load(dir).expect_err("an error").to_string()
}

#[test]
fn unsupported_quantization_settings_are_errors_before_any_tensor_is_read() {
    // Without model.safetensors: the error must come from config.json alone.
    for (i, base, patch, words) in [
        ("tiny-gptq", json!({"bits": 8}), vec!["bits 8", "4-bit"]),
        ("tiny-gptq", json!({"checkpoint_format": "marlin"}), vec!["checkpoint_format Marlin", "gptq_v2"]),
        ("tiny-gptq", json!({"group_size": 100}), vec!["group_size 100"]),
        ("tiny-gptq", json!({"quant_method": "bitsandbytes"}), vec!["quant_method \"bitsandbytes\""]),
        ("tiny-awq", json!({"version": "gemv"}), vec!["awq version Gemv", "GEMM"]),
        ("tiny-awq", json!({"version": "exllama"}), vec!["Exllama"]),
        ("tiny-awq", json!({"zero_point": false}), vec!["zero_point false"]),
        ("tiny-awq", json!({"bits": 3}), vec!["bits 3"]),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, c)| (i, c.0, c.1, c.2))
    {
        let dir = patched(base, i, false, |q| {
            for (k, v) in patch.as_object().unwrap() {
                q[k] = v.clone();
            }
        });
        let e = load_err(&dir);
        assert!(e.contains("quantization_config") && e.contains(&dir.display().to_string()), "{patch}: {e}");
        for w in words {
            assert!(e.contains(w), "{patch}: {e} (wanted \"{w}\")");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // group_size -1 (one group over each layer's whole input) is a setting, not an error.
    let q = json!({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1}});
    assert_eq!(Int4Config::from_json(&q, "m").unwrap().unwrap().group, None);
    // A group size the tensors do not have: the error names the tensor and both shapes.
    let dir = patched("tiny-gptq", 100, true, |q| q["group_size"] = json!(64));
    let e = load_err(&dir);
    assert!(e.contains("model.layers.0.self_attn.q_proj.qzeros") && e.contains("group size 64"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_packers_own_config_files_stand_in_for_quantization_config() {
    // auto-gptq and autoawq save quantize_config.json / quant_config.json (their own key names) beside a
    // config.json without quantization_config.
    for (name, file, cfg) in [
        ("tiny-gptq", "quantize_config.json", json!({"bits": 4, "group_size": 32, "desc_act": false, "sym": true})),
        (
            "tiny-awq",
            "quant_config.json",
            json!({"zero_point": true, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}),
        ),
    ] {
        let dir = patched(name, 200, true, |_| {});
        let mut c: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        c.as_object_mut().unwrap().remove("quantization_config");
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        // Without any of them, the packed tensors are an error naming the first.
        let e = load_err(&dir);
        assert!(e.contains("model.layers.0.self_attn.q_proj.qweight") && e.contains("quantization_config"), "{e}");
        std::fs::write(dir.join(file), cfg.to_string()).unwrap();
        let got = Model::load(&dir).unwrap();
        let want = load(name);
        assert_eq!(got.layers[1].down.w.to_f32(), want.layers[1].down.w.to_f32(), "{name} via {file}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn auto_gptq_weights_under_their_own_file_name_load() {
    // auto-gptq saves `<model_file_base_name>.safetensors` instead of model.safetensors.
    let dir = patched("tiny-gptq", 201, true, |_| {});
    let cfg = |base: &str| {
        let q = json!({"bits": 4, "group_size": 32, "desc_act": false, "sym": true, "model_file_base_name": base});
        std::fs::write(dir.join("quantize_config.json"), q.to_string()).unwrap();
    };
    std::fs::rename(dir.join("model.safetensors"), dir.join("gptq_model-4bit-32g.safetensors")).unwrap();
    // Without the setting, the folder has no weights file cage knows.
    let e = load_err(&dir);
    assert!(e.contains("no model.safetensors"), "{e}");
    cfg("gptq_model-4bit-32g");
    let got = Model::load(&dir).unwrap();
    assert_eq!(got.layers[1].down.w.to_f32(), load("tiny-gptq").layers[1].down.w.to_f32());
    for (base, words) in [("other", "no other.safetensors"), ("../x", "is not a file name")] {
        cfg(base);
        let e = load_err(&dir);
        assert!(e.contains(words) && e.contains("model_file_base_name"), "{base}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpu_int4_runs_the_stored_codes() {
    on_every_device("gpu_int4_runs_the_stored_codes", |gpu, dev| {
        for name in ["tiny-gptq", "tiny-awq"] {
            let m = Arc::new(load(name));
            let v = m.config.vocab_size;
            let mut q = GpuDecoder::with_weights(gpu(), m.clone(), 3, 64, 48, GpuWeights::Int4).unwrap();
            let mut r = GpuDecoder::new(gpu(), m.clone(), 3, 64, 48).unwrap();
            let (prefill, steps) = run_pair(&mut q, &mut r, v);
            eprintln!("{dev} {name}: int4 against bf16 of the same codes: prefill {prefill:.2e}, steps {steps:.2e}");
            assert!(prefill <= PREFILL_TOL, "{dev} {name}: prefill logits differ by {prefill}");
            assert!(steps <= STEP_TOL, "{dev} {name}: decoding-step logits differ by {steps}");
            // `stored` keeps the same codes as `int4`: the same kernels on the same bytes.
            let mut s = GpuDecoder::with_weights(gpu(), m.clone(), 3, 64, 48, GpuWeights::Stored).unwrap();
            let mut q = GpuDecoder::with_weights(gpu(), m.clone(), 3, 64, 48, GpuWeights::Int4).unwrap();
            assert_eq!(run_pair(&mut s, &mut q, v), (0.0, 0.0), "{dev} {name}: stored against int4");
        }
        // Act-order groups: refused under int4 and stored naming the layer, dequantized under bf16.
        let m = Arc::new(load("tiny-gptq-actorder"));
        for w in [GpuWeights::Int4, GpuWeights::Stored] {
            let e = GpuDecoder::with_weights(gpu(), m.clone(), 1, 16, 16, w).err().expect("act-order");
            let e = e.to_string();
            assert!(e.contains("model.layers.0.self_attn.q_proj") && e.contains("act-order"), "{dev} {w:?}: {e}");
        }
        GpuDecoder::new(gpu(), m, 1, 16, 16).unwrap();
    });
}
