//! Preference sweeps: weight grids on the simplex, hypervolume and MIP the way the CAGE paper computes them,
//! the CSV files, and a Pareto plot in SVG.

use crate::error::{CageError, Result};
use std::fmt::Write as _;

/// Weight vectors on the simplex for `j` principals with step 1 / `steps`: every (i_1, ..., i_j) / steps with
/// sum i = steps, the first weight descending.
pub fn simplex_grid(j: usize, steps: usize) -> Result<Vec<Vec<f64>>> {
    if j == 0 || steps == 0 {
        return Err(CageError::InvalidArgument("a weight grid needs >= 1 principal and >= 1 step".into()));
    }
    fn rec(j: usize, left: usize, steps: usize, cur: &mut Vec<f64>, out: &mut Vec<Vec<f64>>) {
        if j == 1 {
            cur.push(left as f64 / steps as f64);
            out.push(cur.clone());
            cur.pop();
            return;
        }
        for i in (0..=left).rev() {
            cur.push(i as f64 / steps as f64);
            rec(j - 1, left - i, steps, cur, out);
            cur.pop();
        }
    }
    let mut out = vec![];
    rec(j, steps, steps, &mut vec![], &mut out);
    Ok(out)
}

/// The reference point of the paper: per axis, the minimum over every point of every method, minus 1.
pub fn reference_point(all_points: &[Vec<f64>]) -> Result<Vec<f64>> {
    let d = all_points.first().map(Vec::len).ok_or_else(|| CageError::InvalidArgument("no points".into()))?;
    if all_points.iter().any(|p| p.len() != d || p.iter().any(|x| !x.is_finite())) {
        return Err(CageError::InvalidArgument("points must all have the same dimension and be finite".into()));
    }
    Ok((0..d).map(|a| all_points.iter().map(|p| p[a]).fold(f64::INFINITY, f64::min) - 1.0).collect())
}

/// Exact hypervolume (maximisation) of `points` above `reference`: the volume of the union of the boxes
/// [reference, p]. Points not strictly above the reference on every axis add nothing. Slices along the last
/// axis recursively, which is exact in any dimension and fast enough for sweep-sized sets.
pub fn hypervolume(points: &[Vec<f64>], reference: &[f64]) -> Result<f64> {
    let d = reference.len();
    if d == 0 || points.iter().any(|p| p.len() != d) {
        return Err(CageError::InvalidArgument("hypervolume: points and reference differ in dimension".into()));
    }
    let pts: Vec<&[f64]> =
        points.iter().filter(|p| p.iter().zip(reference).all(|(x, r)| x > r)).map(Vec::as_slice).collect();
    Ok(hv_rec(&pts, reference))
}

fn hv_rec(pts: &[&[f64]], r: &[f64]) -> f64 {
    let d = r.len();
    if pts.is_empty() {
        return 0.0;
    }
    if d == 1 {
        return pts.iter().map(|p| p[0]).fold(f64::NEG_INFINITY, f64::max) - r[0];
    }
    let mut sorted: Vec<&[f64]> = pts.to_vec();
    sorted.sort_by(|a, b| b[d - 1].total_cmp(&a[d - 1]));
    let mut vol = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        let z = sorted[i][d - 1];
        while i < sorted.len() && sorted[i][d - 1] == z {
            i += 1;
        }
        let next = if i < sorted.len() { sorted[i][d - 1] } else { r[d - 1] };
        // The slab between `next` and `z` is covered by the projections of every point at height >= z.
        let proj: Vec<&[f64]> = sorted[..i].iter().map(|p| &p[..d - 1]).collect();
        vol += hv_rec(&proj, &r[..d - 1]) * (z - next);
    }
    vol
}

/// MIP of one method: the mean over preference vectors w of w . s(w), where s(w) is the method's score vector
/// at w after min-max normalisation per axis with `lo` and `hi` (taken over every method).
pub fn mip(weights: &[Vec<f64>], scores: &[Vec<f64>], lo: &[f64], hi: &[f64]) -> Result<f64> {
    if weights.len() != scores.len() || weights.is_empty() {
        return Err(CageError::InvalidArgument("MIP needs one score vector per weight vector".into()));
    }
    let mut total = 0.0;
    for (w, s) in weights.iter().zip(scores) {
        if w.len() != s.len() || s.len() != lo.len() || lo.len() != hi.len() {
            return Err(CageError::InvalidArgument("MIP: weights, scores and bounds differ in dimension".into()));
        }
        total += w
            .iter()
            .zip(s)
            .zip(lo.iter().zip(hi))
            .map(|((w, x), (l, h))| w * if h > l { (x - l) / (h - l) } else { 0.0 })
            .sum::<f64>();
    }
    Ok(total / weights.len() as f64)
}

/// The scores of one method at every weight vector of a sweep.
#[derive(Clone, Debug)]
pub struct MethodCurve {
    /// Method name.
    pub method: String,
    /// Weight vectors.
    pub weights: Vec<Vec<f64>>,
    /// Mean score per objective at each weight vector.
    pub scores: Vec<Vec<f64>>,
}

/// HV and MIP of one method within a sweep.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    /// Method name.
    pub method: String,
    /// Hypervolume with the shared reference point.
    pub hv: f64,
    /// Mean inner product of weights and normalised scores.
    pub mip: f64,
}

/// HV and MIP of every method, with the paper's shared reference point and normalisation bounds.
pub fn summarize(curves: &[MethodCurve]) -> Result<(Vec<Summary>, Vec<f64>)> {
    let all: Vec<Vec<f64>> = curves.iter().flat_map(|c| c.scores.iter().cloned()).collect();
    let r = reference_point(&all)?;
    let d = r.len();
    let lo: Vec<f64> = (0..d).map(|a| all.iter().map(|p| p[a]).fold(f64::INFINITY, f64::min)).collect();
    let hi: Vec<f64> = (0..d).map(|a| all.iter().map(|p| p[a]).fold(f64::NEG_INFINITY, f64::max)).collect();
    let out = curves
        .iter()
        .map(|c| {
            Ok(Summary {
                method: c.method.clone(),
                hv: hypervolume(&c.scores, &r)?,
                mip: mip(&c.weights, &c.scores, &lo, &hi)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok((out, r))
}

/// CSV of a sweep: `method, w_<principal>..., <score>...`, one line per method and weight vector.
pub fn points_csv(principals: &[String], score_names: &[String], curves: &[MethodCurve]) -> String {
    let mut s = String::from("method");
    for n in principals {
        let _ = write!(s, ",w_{n}");
    }
    for n in score_names {
        let _ = write!(s, ",{n}");
    }
    s.push('\n');
    for c in curves {
        for (w, sc) in c.weights.iter().zip(&c.scores) {
            s.push_str(&c.method);
            for x in w.iter().chain(sc) {
                let _ = write!(s, ",{x}");
            }
            s.push('\n');
        }
    }
    s
}

/// CSV of the summary: `method,hv,mip`.
pub fn summary_csv(sums: &[Summary]) -> String {
    let mut s = String::from("method,hv,mip\n");
    for x in sums {
        let _ = writeln!(s, "{},{},{}", x.method, x.hv, x.mip);
    }
    s
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

fn xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A Pareto plot of the first two objectives: one coloured polyline per method through its weight vectors,
/// with axes, ticks and a legend, as a standalone SVG document.
pub fn pareto_svg(names: &[String], curves: &[MethodCurve], title: &str) -> String {
    let (w, h, ml, mr, mt, mb) = (640.0, 480.0, 70.0, 150.0, 40.0, 55.0);
    let (x0, x1, y0, y1) = plot_bounds(curves);
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        ml + pw / 2.0,
        xml(title)
    );
    let _ = writeln!(s, "<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>");
    for t in 0..=4 {
        let f = t as f64 / 4.0;
        let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{xv:.3}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{yv:.3}</text>",
            sx(xv),
            mt + ph + 16.0,
            ml - 6.0,
            sy(yv) + 4.0
        );
    }
    let xn = names.first().map(String::as_str).unwrap_or("objective 1");
    let yn = names.get(1).map(String::as_str).unwrap_or("objective 2");
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text><text transform=\"translate(16,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        ml + pw / 2.0,
        h - 12.0,
        xml(xn),
        mt + ph / 2.0,
        xml(yn)
    );
    for (i, c) in curves.iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let line: Vec<String> =
            c.scores.iter().filter(|p| p.len() >= 2).map(|p| format!("{:.2},{:.2}", sx(p[0]), sy(p[1]))).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{col}\" stroke-width=\"1.5\" points=\"{}\"/>",
            line.join(" ")
        );
        for p in c.scores.iter().filter(|p| p.len() >= 2) {
            let _ = writeln!(s, "<circle cx=\"{:.2}\" cy=\"{:.2}\" r=\"3.5\" fill=\"{col}\"/>", sx(p[0]), sy(p[1]));
        }
        let ly = mt + 10.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{ly:.1}\" r=\"5\" fill=\"{col}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            w - mr + 15.0,
            w - mr + 25.0,
            ly + 4.0,
            xml(&c.method)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The plot's data bounds with a 5% margin (a unit box when there are no points).
fn plot_bounds(curves: &[MethodCurve]) -> (f64, f64, f64, f64) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for p in curves.iter().flat_map(|c| c.scores.iter()).filter(|p| p.len() >= 2) {
        (x0, x1, y0, y1) = (x0.min(p[0]), x1.max(p[0]), y0.min(p[1]), y1.max(p[1]));
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let pad = |a: f64, b: f64| if b - a < 1e-9 { (a - 0.5, b + 0.5) } else { (a - 0.05 * (b - a), b + 0.05 * (b - a)) };
    let ((x0, x1), (y0, y1)) = (pad(x0, x1), pad(y0, y1));
    (x0, x1, y0, y1)
}

/// 3x5 glyphs (rows top to bottom, 3 bits each, left bit first); letters are drawn as capitals.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        ':' => [0, 2, 0, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 2],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'q' => [2, 5, 5, 6, 3],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        _ => [0; 5],
    }
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn dot(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = ((x0 + t * (x1 - x0)).round() as i64, (y0 + t * (y1 - y0)).round() as i64);
            for d in 0..thick {
                self.dot(x + d / 2, y + (d + 1) / 2 - thick / 2, c);
                self.dot(x, y + d - thick / 2, c);
            }
        }
    }
    fn disc(&mut self, cx: f64, cy: f64, r: f64, c: [u8; 3]) {
        let ri = r.ceil() as i64;
        for dy in -ri..=ri {
            for dx in -ri..=ri {
                if (dx * dx + dy * dy) as f64 <= r * r {
                    self.dot(cx.round() as i64 + dx, cy.round() as i64 + dy, c);
                }
            }
        }
    }
    /// Text at scale 2 (6 x 10 pixels per glyph); `anchor` 0 = left, 1 = centre, 2 = right.
    fn text(&mut self, x: f64, y: f64, s: &str, anchor: u8) {
        let width = 8.0 * s.chars().count() as f64;
        let x = x - width * anchor as f64 / 2.0;
        for (k, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            let px = x as i64 + 8 * k as i64 + 2 * col + dx;
                            self.dot(px, y as i64 - 10 + 2 * row as i64 + dy, [0x22; 3]);
                        }
                    }
                }
            }
        }
    }
}

fn hex(c: &str) -> [u8; 3] {
    let v = u32::from_str_radix(c.trim_start_matches('#'), 16).unwrap_or(0);
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

/// CRC-32 (ISO-HDLC), as PNG chunks need.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// The same plot as [`pareto_svg`] as a PNG (RGB, uncompressed deflate blocks: no image library needed).
pub fn pareto_png(names: &[String], curves: &[MethodCurve], title: &str) -> Vec<u8> {
    let (w, h, ml, mr, mt, mb) = (640usize, 480usize, 80.0, 150.0, 40.0, 55.0);
    let mut cv = Canvas { w, h, px: vec![[255; 3]; w * h] };
    let (x0, x1, y0, y1) = plot_bounds(curves);
    let (pw, ph) = (w as f64 - ml - mr, h as f64 - mt - mb);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + ph - (y - y0) / (y1 - y0) * ph;
    let dark = [0x33; 3];
    for (a, b) in [((ml, mt), (ml + pw, mt)), ((ml, mt + ph), (ml + pw, mt + ph)), ((ml, mt), (ml, mt + ph))] {
        cv.line(a, b, dark, 1);
    }
    cv.line((ml + pw, mt), (ml + pw, mt + ph), dark, 1);
    for t in 0..=4 {
        let f = t as f64 / 4.0;
        let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        cv.text(sx(xv), mt + ph + 20.0, &format!("{xv:.2}"), 1);
        cv.text(ml - 6.0, sy(yv) + 5.0, &format!("{yv:.2}"), 2);
    }
    cv.text(ml + pw / 2.0, 22.0, title, 1);
    let xn = names.first().map(String::as_str).unwrap_or("objective 1");
    let yn = names.get(1).map(String::as_str).unwrap_or("objective 2");
    cv.text(ml + pw / 2.0, h as f64 - 10.0, xn, 1);
    cv.text(4.0, mt - 8.0, yn, 0);
    for (i, c) in curves.iter().enumerate() {
        let col = hex(COLORS[i % COLORS.len()]);
        let pts: Vec<(f64, f64)> = c.scores.iter().filter(|p| p.len() >= 2).map(|p| (sx(p[0]), sy(p[1]))).collect();
        for pair in pts.windows(2) {
            cv.line(pair[0], pair[1], col, 2);
        }
        for &(x, y) in &pts {
            cv.disc(x, y, 3.5, col);
        }
        let ly = mt + 10.0 + 20.0 * i as f64;
        cv.disc(w as f64 - mr + 15.0, ly, 5.0, col);
        cv.text(w as f64 - mr + 25.0, ly + 5.0, &c.method, 0);
    }
    // Scanlines with filter byte 0, stored in deflate blocks of at most 65535 bytes.
    let mut raw = Vec::with_capacity(h * (1 + 3 * w));
    for y in 0..h {
        raw.push(0);
        for p in &cv.px[y * w..(y + 1) * w] {
            raw.extend_from_slice(p);
        }
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let n = b.len() as u16;
        z.extend_from_slice(&n.to_le_bytes());
        z.extend_from_slice(&(!n).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = vec![];
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    png
}
