//! Sweeps: hypervolume and MIP against cases computed by hand and by brute force, the weight grid, and the CSV
//! schema of `cage sweep` on the tiny fixture model.

use cage::decode::plot::{PNG_SCALE, pareto_png, pareto_svg};
use cage::decode::sweep::{MethodCurve, hypervolume, mip, reference_point, simplex_grid};

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
fn a_curve_is_the_mean_over_the_prompts_at_each_weight_vector() {
    let grid = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    // Rows weight-vector-major: (w0, p0), (w0, p1), (w1, p0), (w1, p1).
    let rows = vec![vec![1.0, 2.0], vec![3.0, 6.0], vec![-1.0, 0.5], vec![0.0, 1.5]];
    let c = MethodCurve::from_rows("cage", &grid, &rows).unwrap();
    assert_eq!(c.scores, vec![vec![2.0, 4.0], vec![-0.5, 1.0]]);
    assert_eq!((c.method.as_str(), &c.weights), ("cage", &grid));
    let short = MethodCurve::from_rows("cage", &grid, &rows[..3]).unwrap_err().to_string();
    assert!(short.contains("3 rows of scores for 2 weight vectors"), "{short}");
    let ragged = MethodCurve::from_rows("cage", &grid, &[vec![1.0], vec![1.0, 2.0]]).unwrap_err().to_string();
    assert!(ragged.contains("same number"), "{ragged}");
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
    // The PNG is the SVG rendered at PNG_SCALE.
    let (w, h, _) = decode_png(&std::fs::read(out.join("pareto.png")).unwrap());
    let root = &svg[..svg.find('>').unwrap()];
    assert_eq!(w as f32, attr(root, "width").parse::<f32>().unwrap() * PNG_SCALE);
    assert_eq!(h as f32, attr(root, "height").parse::<f32>().unwrap() * PNG_SCALE);
}

/// Decodes a PNG with the `png` crate (independent of the renderer's encoder) into width, height and 8-bit
/// RGB pixels; every pixel must be opaque.
fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<[u8; 3]>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let px = match info.color_type {
        png::ColorType::Rgb => buf[..info.buffer_size()].chunks(3).map(|p| [p[0], p[1], p[2]]).collect(),
        png::ColorType::Rgba => buf[..info.buffer_size()]
            .chunks(4)
            .map(|p| {
                assert_eq!(p[3], 255, "the plot has an opaque white background");
                [p[0], p[1], p[2]]
            })
            .collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    (info.width, info.height, px)
}

/// The value of attribute `name` in one SVG element's text.
fn attr<'a>(element: &'a str, name: &str) -> &'a str {
    let at = element.find(&format!(" {name}=\"")).unwrap_or_else(|| panic!("no {name} in {element}")) + name.len() + 3;
    &element[at..at + element[at..].find('"').unwrap()]
}

#[test]
fn png_plot_is_the_svg_rendered_with_its_markers_and_text() {
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
    let names = ["a".to_string(), "b".to_string()];
    let svg = pareto_svg(&names, &curves, "test");
    let (w, h, px) = decode_png(&pareto_png(&names, &curves, "test").unwrap());
    let s = PNG_SCALE;
    let root = &svg[..svg.find('>').unwrap()];
    assert_eq!(w as f32, attr(root, "width").parse::<f32>().unwrap() * s);
    assert_eq!(h as f32, attr(root, "height").parse::<f32>().unwrap() * s);
    assert_eq!(px.len(), (w * h) as usize);
    let at = |x: f32, y: f32| px[(y * s) as usize * w as usize + (x * s) as usize];
    // Every marker of the SVG (2 points and 1 legend dot per method) is its method's colour at its centre in
    // the PNG: the two files are the same picture.
    let circles: Vec<&str> = svg.split("<circle").skip(1).map(|c| &c[..c.find("/>").unwrap()]).collect();
    assert_eq!(circles.len(), 6);
    for c in circles {
        let fill = u32::from_str_radix(attr(c, "fill").trim_start_matches('#'), 16).unwrap();
        let (cx, cy) = (attr(c, "cx").parse().unwrap(), attr(c, "cy").parse().unwrap());
        assert_eq!(at(cx, cy), [(fill >> 16) as u8, (fill >> 8) as u8, fill as u8], "marker {c}");
    }
    assert_eq!(at(2.0, 2.0), [255; 3], "white background");
    // Text is drawn with the embedded font: the title adds dark pixels in the title band above the frame
    // (y < 40 in SVG units) and nowhere else.
    let (_, _, untitled) = decode_png(&pareto_png(&names, &curves, "").unwrap());
    let changed: Vec<usize> = (0..px.len()).filter(|&i| px[i] != untitled[i]).collect();
    assert!(changed.len() > 50, "the title changed only {} pixels", changed.len());
    assert!(changed.iter().all(|&i| (i / w as usize) < (40.0 * s) as usize));
    assert!(changed.iter().any(|&i| px[i].iter().all(|&c| c < 80)), "no dark title pixels");
    // No points at all still gives a picture (a unit box).
    let (w0, h0, _) = decode_png(&pareto_png(&names, &[], "empty").unwrap());
    assert_eq!((w0, h0), (w, h));
}
