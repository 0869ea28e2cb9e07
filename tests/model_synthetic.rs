//! Synthetic models (`cage bench forward --synthetic`): the generator is deterministic per seed, its blocks
//! are valid llama.cpp blocks drawn as `scripts/synthetic_model.py` draws them, its formats describe one model,
//! and a shape that cannot fit is refused, naming both sizes, before it is generated. Also the parallel int4
//! quantization of the GPU upload against the serial reference it replaced.

mod common;

use cage::model::Model;
use cage::model::devquant::Int4Matrix;
use cage::model::forward::{CpuDecoder, Decoder, LogitsAt, Seq};
use cage::model::gguf::GgmlType;
use cage::model::memory::parameters;
use cage::model::synthetic::{SyntheticFormat, SyntheticShape, SyntheticSpec};
use cage::model::weight::Weight;
use common::fixtures::{cage, ran};
use half::f16;
use std::sync::Arc;

fn spec(format: SyntheticFormat, seed: u64) -> SyntheticSpec {
    SyntheticSpec { shape: SyntheticShape::Tiny, format, arms: 0, seed }
}

fn matrices(m: &Model) -> Vec<&Weight> {
    let mut v = vec![&m.embed];
    for l in &m.layers {
        v.extend(l.linears().map(|l| &l.w));
    }
    v.extend(m.lm_head.as_ref().map(|l| &l.w));
    v
}

fn raw(w: &Weight) -> &[u8] {
    match w {
        Weight::Quant { raw, .. } => raw,
        _ => panic!("not blocks"),
    }
}

#[test]
fn the_same_seed_gives_the_same_model_and_another_seed_another() {
    for format in [SyntheticFormat::Q4K, SyntheticFormat::Q8_0] {
        let (a, b, c) = (
            spec(format, 7).generate().unwrap(),
            spec(format, 7).generate().unwrap(),
            spec(format, 8).generate().unwrap(),
        );
        for ((x, y), z) in matrices(&a).into_iter().zip(matrices(&b)).zip(matrices(&c)) {
            assert_eq!(raw(x), raw(y), "{format}");
            // Different seeds: most bytes differ (nibbles are uniform).
            let same = raw(x).iter().zip(raw(z)).filter(|(p, q)| p == q).count();
            assert!(same < raw(x).len() / 4, "{format}: {same} of {} bytes equal", raw(x).len());
        }
    }
    // Matrices of one model are drawn independently of each other (no two share a stream).
    let m = spec(SyntheticFormat::Q4K, 7).generate().unwrap();
    let (q, o) = (raw(&m.layers[0].q.w), raw(&m.layers[0].o.w));
    assert_ne!(q, o);
}

/// Q4_K's scale and minimum of sub-block `j`, as llama.cpp's `get_scale_min_k4` reads them.
fn scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

#[test]
fn q4_k_blocks_follow_the_scripts_recipe_and_dequantize_in_range() {
    let m = spec(SyntheticFormat::Q4K, 7).generate().unwrap();
    // The largest d: 1.2 x 0.02 / (6 x 4.6), rounded up to f16; |sc q - mn| <= 64 (sc <= 8, mn = round(7.5 sc)).
    let d_max = f16::from_f32(1.2 * 0.02 / 27.6).to_f32() * 1.001;
    let mut seen = [0usize; 9];
    let (mut sum, mut sq, mut n) = (0f64, 0f64, 0usize);
    for w in matrices(&m) {
        assert_eq!(w.format(), Some(GgmlType::Q4K));
        for b in raw(w).chunks_exact(144) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            assert_eq!(b[0..2], b[2..4], "d = dmin");
            assert!(d > 0.8 * 0.02 / 27.6 * 0.999 && d <= d_max, "d {d}");
            for j in 0..8 {
                let (sc, mn) = scale_min(&b[4..16], j);
                assert!((4..=8).contains(&sc), "scale {sc}");
                // numpy's rint: half to even.
                let want = (7.5 * sc as f64).round_ties_even() as u8;
                assert_eq!(mn, want, "minimum of scale {sc}");
                seen[sc as usize] += 1;
            }
        }
        for x in w.to_f32() {
            assert!(x.is_finite() && x.abs() <= d_max * 64.0, "{x}");
            sum += x as f64;
            sq += (x as f64).powi(2);
            n += 1;
        }
    }
    // Every scale 4..=8 occurs about equally often; the weights centre on zero with std ~0.02.
    let total: usize = seen.iter().sum();
    for (sc, &k) in seen.iter().enumerate().skip(4) {
        assert!((k as f64 / total as f64 - 0.2).abs() < 0.02, "scale {sc}: {k} of {total}");
    }
    let (mean, std) = (sum / n as f64, (sq / n as f64 - (sum / n as f64).powi(2)).sqrt());
    assert!(mean.abs() < 2e-4 && (0.012..0.025).contains(&std), "mean {mean} std {std}");
}

#[test]
fn q8_0_and_bf16_round_the_q4_k_values() {
    let q4 = spec(SyntheticFormat::Q4K, 7).generate().unwrap();
    let q8 = spec(SyntheticFormat::Q8_0, 7).generate().unwrap();
    let b16 = spec(SyntheticFormat::Bf16, 7).generate().unwrap();
    for ((a, b), c) in matrices(&q4).into_iter().zip(matrices(&q8)).zip(matrices(&b16)) {
        assert_eq!((b.format(), c.format()), (Some(GgmlType::Q8_0), Some(GgmlType::Bf16)));
        let (x, y, z) = (a.to_f32(), b.to_f32(), c.to_f32());
        for (blk, (xs, ys)) in x.chunks_exact(32).zip(y.chunks_exact(32)).enumerate() {
            // Q8_0: d = max |x| / 127 (stored as f16), so each value within half a step (and d's rounding).
            let d = xs.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) / 127.0;
            for (p, q) in xs.iter().zip(ys) {
                assert!(((*p as f64) - (*q as f64)).abs() <= d * (0.5 + 127.0 * 1e-3), "block {blk}: {p} vs {q}");
            }
        }
        for (p, q) in x.iter().zip(&z) {
            assert!((p - q).abs() <= p.abs() / 256.0, "{p} vs bf16 {q}");
        }
    }
}

fn last_logits(m: Model, ids: &[u32]) -> Vec<f32> {
    let mut dec = CpuDecoder::new(Arc::new(m), 1, ids.len(), ids.len());
    dec.forward(&[Seq { slot: 0, tokens: ids, adapter: None }], LogitsAt::All).unwrap().to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn every_format_describes_the_same_model() {
    let ids = [1u32, 500, 49_000, 17, 3];
    let q4 = last_logits(spec(SyntheticFormat::Q4K, 7).generate().unwrap(), &ids);
    let q8 = last_logits(spec(SyntheticFormat::Q8_0, 7).generate().unwrap(), &ids);
    let b16 = last_logits(spec(SyntheticFormat::Bf16, 7).generate().unwrap(), &ids);
    let other = last_logits(spec(SyntheticFormat::Q4K, 8).generate().unwrap(), &ids);
    assert!(q4.iter().all(|x| x.is_finite()));
    let spread = max_diff(&q4, &other);
    // The formats differ by their rounding of the same weights (bf16: 2^-9 relative, Q8_0: half a step of
    // max / 127), far less than another model differs.
    let (d8, d16) = (max_diff(&q4, &q8), max_diff(&q4, &b16));
    eprintln!("largest logit difference to q4_k: q8_0 {d8}, bf16 {d16}, seed 8 {spread}");
    assert!(spread > 0.2, "another seed moved the logits by only {spread}");
    assert!(d16 < 0.02 && d8 < 0.04, "q8_0 {d8}, bf16 {d16} (another model: {spread})");
}

#[test]
fn arms_are_deterministic_and_move_only_their_rows() {
    let s = SyntheticSpec { arms: 2, ..spec(SyntheticFormat::Q4K, 7) };
    let (a, b) = (s.generate().unwrap(), s.generate().unwrap());
    assert_eq!(a.adapters, ["arm-0", "arm-1"]);
    assert_eq!(a.lora_parameters() as u128, s.arm_parameters());
    for (x, y) in a.layers.iter().zip(&b.layers) {
        for (p, q) in [(&x.q, &y.q), (&x.v, &y.v)] {
            let (p0, q0) = (p.lora[0].as_ref().unwrap(), q.lora[0].as_ref().unwrap());
            assert_eq!((&p0.a, &p0.b), (&q0.a, &q0.b));
            assert_ne!(p0.a, p.lora[1].as_ref().unwrap().a);
        }
        assert!(x.k.lora.iter().all(Option::is_none) && x.k.lora.len() == 2);
    }
    // Same backbone: the base rows match the model without ARMs; an ARM's row differs.
    let ids = [3u32, 1000, 7];
    let base = last_logits(spec(SyntheticFormat::Q4K, 7).generate().unwrap(), &ids);
    let mut dec = CpuDecoder::new(Arc::new(a), 2, 3, 6);
    let seqs = [Seq { slot: 0, tokens: &ids, adapter: None }, Seq { slot: 1, tokens: &ids, adapter: Some(1) }];
    let out = dec.forward(&seqs, LogitsAt::All).unwrap();
    let v = base.len();
    assert!(max_diff(&out[..v], &base) < 1e-4);
    assert!(max_diff(&out[v..], &base) > 1e-3);
}

#[test]
fn host_bytes_are_what_the_generated_model_holds() {
    for format in [SyntheticFormat::Q4K, SyntheticFormat::Q8_0, SyntheticFormat::Bf16] {
        let s = SyntheticSpec { arms: 1, ..spec(format, 7) };
        let m = s.generate().unwrap();
        assert_eq!(s.host_bytes(), (m.weight_bytes() + 4 * m.lora_parameters()) as u128, "{format}");
    }
}

/// Independently of the generator: the 65B shape's Q4_K bytes from its dimensions.
fn llama65b_q4k_bytes() -> u128 {
    let (h, f, v, l) = (8192u128, 22016u128, 49152u128, 80u128);
    let matrices = 2 * v * h + l * (4 * h * h + 3 * h * f);
    matrices / 256 * 144 + 4 * h * (2 * l + 1)
}

#[test]
fn a_shape_too_big_for_the_host_is_refused_before_it_is_generated() {
    assert_eq!(
        parameters(&SyntheticShape::Llama65b.config()),
        2 * 49152 * 8192 + 80 * (4 * 8192 * 8192 + 3 * 8192 * 22016 + 2 * 8192) + 8192
    );
    let need = llama65b_q4k_bytes();
    let t0 = std::time::Instant::now();
    let r = ran(cage().env("CAGE_MEMORY_LIMIT", "2000000000").args([
        "bench",
        "forward",
        "--synthetic",
        "llama-65b",
        "--device",
        "cpu",
        "--batches",
        "1",
    ]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let want = format!("{:.2} GB", need as f64 / 1e9);
    assert!(
        r.stderr.contains("synthetic llama-65b q4_k")
            && r.stderr.contains(&want)
            && r.stderr.contains("2.00 GB free in host memory")
            && r.stderr.contains("smaller --synthetic shape"),
        "want {want}: {}",
        r.stderr
    );
    // Refused before generating 37 GB (which would take minutes here, or fail).
    assert!(t0.elapsed().as_secs() < 20);
    // bf16 points at the smaller format.
    let r = ran(cage().env("CAGE_MEMORY_LIMIT", "2000000000").args([
        "bench",
        "forward",
        "--synthetic",
        "llama-1b",
        "--synthetic-format",
        "bf16",
        "--device",
        "cpu",
    ]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("--synthetic-format q4_k"), "{}", r.stderr);
}

#[test]
fn a_shape_too_big_for_the_device_is_refused_before_it_is_generated() {
    // The emulation's device memory is the host's: llama-1b in Q4_K (0.66 GB) fits a 1.5 GB host, but not its
    // bf16 weights on the device (2.3 GB).
    let r = ran(cage().env("CAGE_MEMORY_LIMIT", "1500000000").args([
        "bench",
        "forward",
        "--synthetic",
        "llama-1b",
        "--device",
        "emulation",
        "--batches",
        "1",
    ]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("gpu_weights bf16") && r.stderr.contains("--gpu-weights int4"), "{}", r.stderr);
    // Its Q4_K blocks uploaded as stored are counted as blocks (0.56 bytes a weight), not bf16: they fit.
    let s = SyntheticSpec { shape: SyntheticShape::Llama1b, format: SyntheticFormat::Q4K, arms: 0, seed: 7 };
    let kv = cage::gpu::KvCacheType::F32;
    let stored = cage::model::synthetic::device_bytes(&s, cage::model::devquant::GpuWeights::Stored, kv, 1, 8);
    let bf16 = cage::model::synthetic::device_bytes(&s, cage::model::devquant::GpuWeights::Bf16, kv, 1, 8);
    let d = SyntheticShape::Llama1b.dims();
    let (h, f, kvd) = (d.hidden as u128, d.ffn as u128, (d.hidden / d.heads * d.kv_heads) as u128);
    let projections = d.layers as u128 * (2 * h * h + 2 * kvd * h + 3 * f * h);
    assert_eq!(bf16 - stored, projections * 2 - projections / 256 * 144);
}

#[test]
fn synthetic_flags_are_checked() {
    let r = ran(cage().args(["bench", "forward", "--synthetic", "llama-99b"]));
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("llama-99b") && r.stderr.contains("llama-65b"), "{}", r.stderr);
    let r = ran(cage().args(["bench", "forward", "--synthetic", "tiny", "--model", "x", "--device", "cpu"]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("--model and --synthetic"), "{}", r.stderr);
    let r = ran(cage().args(["bench", "forward", "--synthetic-arms", "2"]));
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    // Refused before a 65B model is generated: no packed copies exist.
    let r =
        ran(cage().args(["bench", "forward", "--synthetic", "llama-65b", "--weights", "packed", "--device", "cpu"]));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("--weights f32"), "{}", r.stderr);
}

#[test]
fn bench_forward_reports_the_synthetic_model() {
    let r = ran(cage().args([
        "bench",
        "forward",
        "--synthetic",
        "tiny",
        "--synthetic-arms",
        "2",
        "--device",
        "emulation",
        "--gpu-weights",
        "int4",
        "--batches",
        "1,3",
        "--prompt-len",
        "4",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--json",
    ]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    let s = &v["synthetic"];
    assert_eq!((s["shape"].as_str(), s["format"].as_str(), s["arms"].as_u64()), (Some("tiny"), Some("q4_k"), Some(2)));
    assert_eq!(s["parameters"].as_u64(), Some(parameters(&SyntheticShape::Tiny.config()) as u64));
    let rows = v["gpu"]["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["decode_tok_s"].as_f64().unwrap() > 0.0 && r["load_s"].as_f64().is_some()));
}

/// The serial int4 quantization the upload used before it ran in parallel (round to nearest, asymmetric,
/// groups along a row), written out here as the reference.
fn int4_serial(w: &[f32], out: usize, inp: usize, group: usize) -> (Vec<u32>, Vec<u16>, Vec<u8>) {
    let groups = inp.div_ceil(group);
    let (mut scales, mut zeros, mut qweight) =
        (vec![0u16; groups * out], vec![0u8; groups * out], vec![0u32; inp / 8 * out]);
    for o in 0..out {
        let row = &w[o * inp..(o + 1) * inp];
        for (g, chunk) in row.chunks(group).enumerate() {
            let lo = chunk.iter().fold(0f32, |a, &x| a.min(x));
            let hi = chunk.iter().fold(0f32, |a, &x| a.max(x));
            let bits = f16::from_f32(if hi > lo { (hi - lo) / 15.0 } else { 1.0 }).to_bits().max(1);
            let s = f16::from_bits(bits).to_f32();
            let z = (-lo / s).round().clamp(0.0, 15.0);
            scales[g * out + o] = bits;
            zeros[g * out + o] = z as u8;
            for (j, &x) in chunk.iter().enumerate() {
                let i = g * group + j;
                let q = ((x / s).round() + z).clamp(0.0, 15.0) as u32;
                qweight[(i / 8) * out + o] |= q << (4 * (i % 8));
            }
        }
    }
    (qweight, scales, zeros)
}

#[test]
fn parallel_int4_quantization_matches_the_serial_reference() {
    // A partial last group (272 = 2 x 128 + 16) and rows that are not a multiple of the thread count.
    let (out, inp, group) = (40, 272, 128);
    let m = SyntheticSpec { shape: SyntheticShape::Tiny, format: SyntheticFormat::Bf16, arms: 0, seed: 3 }
        .generate()
        .unwrap();
    let mut w: Vec<f32> = m.embed.to_f32()[..out * inp].to_vec();
    // Rows whose values fall exactly between two codes: 0, 0.5, ..., 15 (scale exactly 1), and a constant row.
    for (i, x) in w[..inp].iter_mut().enumerate() {
        *x = (i % 31) as f32 * 0.5;
    }
    w[inp..2 * inp].fill(0.25);
    let q = Int4Matrix::quantize(&w, out, inp, group, "test").unwrap();
    let (qweight, scales, zeros) = int4_serial(&w, out, inp, group);
    assert_eq!(q.qweight, qweight);
    assert_eq!(q.scales, scales);
    for g in 0..inp.div_ceil(group) {
        for o in 0..out {
            assert_eq!((q.qzeros[g * out / 8 + o / 8] >> (4 * (o % 8))) & 15, zeros[g * out + o] as u32);
        }
    }
}

#[test]
fn parallel_conversions_match_whole_copies() {
    for format in [SyntheticFormat::Q4K, SyntheticFormat::Q8_0, SyntheticFormat::Bf16] {
        let m = spec(format, 7).generate().unwrap();
        let w = &m.layers[1].gate.w;
        let mut out = vec![0f32; w.numel()];
        w.to_f32_into(&mut out);
        let whole = w.to_f32();
        assert_eq!(out, whole, "{format}");
        let b: Vec<f32> = w.to_bf16(m.config.hidden_size).iter().map(|x| x.to_f32()).collect();
        let want: Vec<f32> = whole.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        assert_eq!(b, want, "{format}");
    }
}

/// The GPU upload's host work at the llama-1b shape (`cargo test --release --test model_synthetic -- --ignored
/// --nocapture upload_conversion`, with RAYON_NUM_THREADS=1 for one core): the fused projections of every layer
/// dequantized from Q4_K into one stacked f32 matrix and quantized to int4, as `upload_linear` does, and the
/// embedding rounded to bf16. Prints weights per second.
#[test]
#[ignore]
fn upload_conversion_throughput() {
    use cage::model::devquant::{GpuWeights, QuantMatrix};
    let m = SyntheticSpec { shape: SyntheticShape::Llama1b, format: SyntheticFormat::Q4K, arms: 0, seed: 7 }
        .generate()
        .unwrap();
    let t0 = std::time::Instant::now();
    let (mut n, mut deq) = (0usize, 0f64);
    for l in &m.layers {
        for parts in [&[&l.q, &l.k, &l.v][..], &[&l.o], &[&l.gate, &l.up], &[&l.down]] {
            let (out, inp) = (parts.iter().map(|p| p.out).sum::<usize>(), parts[0].inp);
            let t = std::time::Instant::now();
            let mut f = vec![0f32; out * inp];
            let mut at = 0;
            for p in parts {
                p.w.to_f32_into(&mut f[at..at + p.out * inp]);
                at += p.out * inp;
            }
            deq += t.elapsed().as_secs_f64();
            let q = QuantMatrix::quantize(GpuWeights::Int4, &f, out, inp, "bench").unwrap().unwrap();
            n += q.out() * q.inp();
        }
    }
    let int4 = t0.elapsed().as_secs_f64();
    // The serial code this replaced (whole copies, then the serial quantization) on the first four layers.
    let t2 = std::time::Instant::now();
    let mut n_serial = 0usize;
    for l in &m.layers[..4] {
        for parts in [&[&l.q, &l.k, &l.v][..], &[&l.o], &[&l.gate, &l.up], &[&l.down]] {
            let (out, inp) = (parts.iter().map(|p| p.out).sum::<usize>(), parts[0].inp);
            let f: Vec<f32> = parts.iter().flat_map(|l| l.w.to_f32()).collect();
            n_serial += int4_serial(&f, out, inp, 128).0.len() * 8;
        }
    }
    eprintln!("serial reference: {:.0} M weights/s", n_serial as f64 / t2.elapsed().as_secs_f64() / 1e6);
    let t1 = std::time::Instant::now();
    let e = m.embed.to_bf16(m.config.hidden_size);
    let bf16 = t1.elapsed().as_secs_f64();
    eprintln!(
        "{} threads: Q4_K -> int4 {:.0} M weights/s ({n} in {int4:.2} s, {deq:.2} s of it dequantizing); Q4_K -> \
         bf16 {:.0} M weights/s",
        rayon::current_num_threads(),
        n as f64 / int4 / 1e6,
        e.len() as f64 / bf16 / 1e6
    );
}

#[test]
fn shapes_have_their_published_parameter_counts() {
    // The published counts (vocabulary 32000, except Llama-3.1's 128256), plus the embedding and head rows of
    // the script's 49152-token vocabulary.
    let more = |hidden: u128| 2 * (49_152 - 32_000) * hidden;
    for (shape, published) in [
        (SyntheticShape::Llama1b, 1_100_048_384 + more(2048)),
        (SyntheticShape::Llama7b, 6_738_415_616 + more(4096)),
        (SyntheticShape::Llama13b, 13_015_864_320 + more(5120)),
        (SyntheticShape::Llama31_8b, 8_030_261_248),
    ] {
        assert_eq!(parameters(&shape.config()), published, "{shape}");
    }
    // Every width is whole Q4_K blocks and every head fits the GPU attention kernel.
    for shape in [SyntheticShape::Tiny, SyntheticShape::Llama65b, SyntheticShape::Llama31_8b] {
        let c = shape.config();
        assert!([c.hidden_size, c.intermediate_size].iter().all(|d| d % 256 == 0), "{shape}");
        assert!(c.head_dim <= 256 && c.head_dim % 2 == 0, "{shape}");
    }
}
