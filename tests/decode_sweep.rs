//! Sweeps: hypervolume and MIP against cases computed by hand and by brute force, the weight grid, and the CSV
//! schema of `cage sweep` on the tiny fixture model.

use cage::decode::sweep::{MethodCurve, hypervolume, mip, pareto_png, reference_point, simplex_grid};

#[test]
fn hypervolume_by_hand() {
    // Staircase (1,3), (2,2), (3,1) above (0,0): 3*1 + 2*1 + 1*1 = 6 (the union of three boxes).
    let p = vec![vec![1.0, 3.0], vec![2.0, 2.0], vec![3.0, 1.0]];
    assert!((hypervolume(&p, &[0.0, 0.0]).unwrap() - 6.0).abs() < 1e-12);
    // A dominated point adds nothing; a point below the reference adds nothing.
    let mut q = p.clone();
    q.push(vec![1.0, 1.0]);
    q.push(vec![-1.0, 10.0]);
    assert!((hypervolume(&q, &[0.0, 0.0]).unwrap() - 6.0).abs() < 1e-12);
    // 3-D: boxes 2x1x1 and 1x2x1 overlap in 1x1x1: 2 + 2 - 1 = 3; add 1x1x2: + 2 - 1 = 4.
    let r = vec![vec![2.0, 1.0, 1.0], vec![1.0, 2.0, 1.0]];
    assert!((hypervolume(&r, &[0.0; 3]).unwrap() - 3.0).abs() < 1e-12);
    let mut s = r.clone();
    s.push(vec![1.0, 1.0, 2.0]);
    assert!((hypervolume(&s, &[0.0; 3]).unwrap() - 4.0).abs() < 1e-12);
}

#[test]
fn hypervolume_matches_cell_counting() {
    // Integer points: the hypervolume is the number of unit cells whose far corner some point dominates.
    let mut seed = 12345u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) % 6 + 1) as f64
    };
    for trial in 0..30 {
        let d = 2 + trial % 2;
        let pts: Vec<Vec<f64>> = (0..1 + trial % 7).map(|_| (0..d).map(|_| next()).collect()).collect();
        let mut count = 0;
        let cells = 6usize.pow(d as u32);
        for c in 0..cells {
            let corner: Vec<f64> = (0..d).map(|a| ((c / 6usize.pow(a as u32)) % 6 + 1) as f64).collect();
            if pts.iter().any(|p| p.iter().zip(&corner).all(|(x, y)| x >= y)) {
                count += 1;
            }
        }
        let hv = hypervolume(&pts, &vec![0.0; d]).unwrap();
        assert!((hv - count as f64).abs() < 1e-9, "trial {trial}: {pts:?} hv {hv} cells {count}");
    }
}

#[test]
fn reference_point_and_mip_by_hand() {
    let all = vec![vec![2.0, 0.0], vec![0.0, 4.0], vec![1.0, 1.0]];
    assert_eq!(reference_point(&all).unwrap(), vec![-1.0, -1.0]);
    // Normalised scores (1,0) at w=(1,0) and (0,1) at w=(0,1): both inner products are 1.
    let w = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    let s = vec![vec![2.0, 0.0], vec![0.0, 4.0]];
    assert!((mip(&w, &s, &[0.0, 0.0], &[2.0, 4.0]).unwrap() - 1.0).abs() < 1e-12);
    // Swapped: both 0. Half-way (1, 2) at w = (0.5, 0.5): 0.5 * 0.5 + 0.5 * 0.5 = 0.5.
    let s2 = vec![vec![0.0, 4.0], vec![2.0, 0.0]];
    assert!(mip(&w, &s2, &[0.0, 0.0], &[2.0, 4.0]).unwrap().abs() < 1e-12);
    let m = mip(&[vec![0.5, 0.5]], &[vec![1.0, 2.0]], &[0.0, 0.0], &[2.0, 4.0]).unwrap();
    assert!((m - 0.5).abs() < 1e-12);
}

#[test]
fn simplex_grids() {
    let g = simplex_grid(2, 4).unwrap();
    assert_eq!(g.len(), 5);
    assert_eq!(g[0], vec![1.0, 0.0]);
    assert_eq!(g[4], vec![0.0, 1.0]);
    let g3 = simplex_grid(3, 4).unwrap();
    assert_eq!(g3.len(), 15);
    assert!(g3.iter().all(|w| (w.iter().sum::<f64>() - 1.0).abs() < 1e-12 && w.iter().all(|x| *x >= 0.0)));
    assert!(simplex_grid(2, 0).is_err());
}

#[test]
fn sweep_writes_csv_summary_and_plot() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("cage-decode-sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A word-level tokenizer for the 128-token fixture.
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for i in 3..128 {
        vocab.insert(format!("t{i}"), i.into());
    }
    let tok = serde_json::json!({"version": "1.0", "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = serde_json::json!({
        "base": root.join("tests/fixtures/tiny-llama"), "tokenizer": dir,
        "principals": [{"name": "arm", "kind": "arm", "adapter": root.join("tests/fixtures/tiny-lora-a")},
                       {"name": "style", "kind": "prompted", "instruction": "t9 t10"}],
        "tau": 0.2, "k": 16, "max_new_tokens": 6
    });
    let cfg_path = dir.join("run.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let out = dir.join("out");
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"t3 t4 t5\"}\n\"t20 t21\"\n").unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_cage"))
        .args(["sweep", "--config"])
        .arg(&cfg_path)
        .arg("--prompts")
        .arg(&prompts)
        .args(["--methods", "cage,genarm", "--steps", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "method,w_arm,w_style,arm,style");
    assert_eq!(lines.len(), 1 + 2 * 3);
    for l in &lines[1..] {
        let f: Vec<&str> = l.split(',').collect();
        assert_eq!(f.len(), 5);
        assert!(["cage", "genarm"].contains(&f[0]));
        let w: Vec<f64> = f[1..3].iter().map(|x| x.parse().unwrap()).collect();
        assert!((w[0] + w[1] - 1.0).abs() < 1e-12);
        assert!(f[3..].iter().all(|x| x.parse::<f64>().unwrap().is_finite()));
    }
    // The summary's HV recomputed from the CSV with the paper's reference point.
    let pts: Vec<(String, Vec<f64>)> = lines[1..]
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[3..].iter().map(|x| x.parse().unwrap()).collect())
        })
        .collect();
    let all: Vec<Vec<f64>> = pts.iter().map(|p| p.1.clone()).collect();
    let r = reference_point(&all).unwrap();
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let sl: Vec<&str> = summary.lines().collect();
    assert_eq!(sl[0], "method,hv,mip");
    for l in &sl[1..] {
        let f: Vec<&str> = l.split(',').collect();
        let mine: Vec<Vec<f64>> = pts.iter().filter(|p| p.0 == f[0]).map(|p| p.1.clone()).collect();
        let hv: f64 = f[1].parse().unwrap();
        assert!((hv - hypervolume(&mine, &r).unwrap()).abs() < 1e-9 * hv.abs().max(1.0));
        let m: f64 = f[2].parse().unwrap();
        assert!((0.0..=1.0).contains(&m));
    }
    let svg = std::fs::read_to_string(out.join("pareto.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("genarm") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(std::fs::read_to_string(out.join("results.jsonl")).unwrap().lines().count(), 2 * 3 * 2);
    assert!(std::fs::read(out.join("pareto.png")).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
}

/// Walks a PNG's chunks, checking each CRC (bitwise, independent of the writer's), and inflates its stored
/// deflate blocks into the raw scanlines.
fn png_scanlines(png: &[u8]) -> (u32, u32, Vec<u8>) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let crc = |bytes: &[u8]| {
        let mut c = !0u32;
        for &b in bytes {
            for k in 0..8 {
                let bit = (c ^ (b as u32 >> k)) & 1;
                c = (c >> 1) ^ if bit == 1 { 0xEDB8_8320 } else { 0 };
            }
        }
        !c
    };
    let (mut at, mut dims, mut idat) = (8, (0, 0), vec![]);
    loop {
        let n = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let body = &png[at + 4..at + 8 + n];
        assert_eq!(u32::from_be_bytes(png[at + 8 + n..at + 12 + n].try_into().unwrap()), crc(body));
        match &body[..4] {
            b"IHDR" => {
                dims = (
                    u32::from_be_bytes(body[4..8].try_into().unwrap()),
                    u32::from_be_bytes(body[8..12].try_into().unwrap()),
                )
            }
            b"IDAT" => idat.extend_from_slice(&body[4..]),
            b"IEND" => break,
            _ => {}
        }
        at += 12 + n;
    }
    let (mut raw, mut i) = (vec![], 2);
    loop {
        let last = idat[i] & 1 == 1;
        assert_eq!(idat[i] >> 1, 0, "stored blocks only");
        let n = u16::from_le_bytes([idat[i + 1], idat[i + 2]]) as usize;
        raw.extend_from_slice(&idat[i + 5..i + 5 + n]);
        i += 5 + n;
        if last {
            break;
        }
    }
    (dims.0, dims.1, raw)
}

#[test]
fn png_plot_is_a_valid_rgb_image_with_the_methods_colours() {
    let curves = vec![
        MethodCurve {
            method: "cage".into(),
            weights: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
            scores: vec![vec![3.0, 1.0], vec![1.0, 3.0]],
        },
        MethodCurve {
            method: "genarm".into(),
            weights: vec![vec![1.0, 0.0], vec![0.0, 1.0]],
            scores: vec![vec![2.0, 0.5], vec![0.5, 2.0]],
        },
    ];
    let png = pareto_png(&["a".into(), "b".into()], &curves, "test");
    let (w, h, raw) = png_scanlines(&png);
    assert_eq!(raw.len(), h as usize * (1 + 3 * w as usize));
    let has = |rgb: [u8; 3]| raw.chunks(1 + 3 * w as usize).any(|l| l[1..].chunks(3).any(|p| p == rgb));
    assert!(has([0x1f, 0x77, 0xb4]) && has([0xd6, 0x27, 0x28]) && has([255, 255, 255]));
}
