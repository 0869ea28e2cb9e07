//! Preference sweeps: weight grids on the simplex, hypervolume and MIP the way the CAGE paper computes them,
//! and the CSV files. The Pareto plot of a sweep is in [`super::plot`].

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

/// An explicit list of weight vectors, `"0.1,0.9;0.2,0.8"` on the command line: the authors' sweeps list their
/// preference vectors rather than a regular grid.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightsList(pub Vec<Vec<f64>>);

/// Parses a [`WeightsList`]: vectors separated by `;`, weights by `,`. The arity is checked against the
/// principals later, before any model loads.
pub fn parse_weights_list(s: &str) -> std::result::Result<WeightsList, String> {
    let out: Vec<Vec<f64>> = s
        .split(';')
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            v.split(',')
                .map(|x| x.trim().parse::<f64>().map_err(|e| format!("weight {:?} in {:?}: {e}", x.trim(), v.trim())))
                .collect()
        })
        .collect::<std::result::Result<_, _>>()?;
    if out.is_empty() {
        return Err("a weights list needs at least one vector (\"0.2,0.8;0.5,0.5\")".into());
    }
    Ok(WeightsList(out))
}

/// The reference point of the paper: per axis, the minimum over every point of every method, minus 1.
pub fn reference_point(all_points: &[Vec<f64>]) -> Result<Vec<f64>> {
    reference_point_with(all_points, &[1.0])
}

/// The reference point with a margin per axis: the minimum over every point of every method minus `margin[a]`
/// (one margin serves every axis).
pub fn reference_point_with(all_points: &[Vec<f64>], margin: &[f64]) -> Result<Vec<f64>> {
    let d = all_points.first().map(Vec::len).ok_or_else(|| CageError::InvalidArgument("no points".into()))?;
    if all_points.iter().any(|p| p.len() != d || p.iter().any(|x| !x.is_finite())) {
        return Err(CageError::InvalidArgument("points must all have the same dimension and be finite".into()));
    }
    if !(margin.len() == 1 || margin.len() == d) || margin.iter().any(|m| !(m.is_finite() && *m >= 0.0)) {
        return Err(CageError::InvalidArgument(format!(
            "margin {margin:?}: give one finite margin >= 0, or one per score axis ({d})"
        )));
    }
    let m = |a: usize| if margin.len() == 1 { margin[0] } else { margin[a] };
    Ok((0..d).map(|a| all_points.iter().map(|p| p[a]).fold(f64::INFINITY, f64::min) - m(a)).collect())
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

impl MethodCurve {
    /// The curve of one method from its per-row scores, rows in the order of a sweep (weight vector g, prompt p
    /// at row g * prompts + p): the mean over the prompts at each weight vector.
    pub fn from_rows(method: &str, grid: &[Vec<f64>], per_row: &[Vec<f64>]) -> Result<Self> {
        let bad = |m: String| Err(CageError::InvalidArgument(format!("method {method}: {m}")));
        if grid.is_empty() || per_row.is_empty() || !per_row.len().is_multiple_of(grid.len()) {
            return bad(format!("{} rows of scores for {} weight vectors", per_row.len(), grid.len()));
        }
        let d = per_row[0].len();
        if d == 0 || per_row.iter().any(|s| s.len() != d) {
            return bad("every row needs the same number (>= 1) of scores".into());
        }
        let np = per_row.len() / grid.len();
        let scores = per_row
            .chunks(np)
            .map(|rows| (0..d).map(|k| rows.iter().map(|s| s[k]).sum::<f64>() / np as f64).collect())
            .collect();
        Ok(MethodCurve { method: method.to_string(), weights: grid.to_vec(), scores })
    }
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

/// The score axes the hypervolume is measured in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ScoreScale {
    /// The scores as they are (the paper's tables): an axis with a wider range weighs more.
    #[default]
    None,
    /// Each axis mapped to [0, 1] by its minimum and maximum over every method (the authors' normalised HV,
    /// which takes margin 0: the reference point is the origin).
    Minmax,
}

crate::spelled!(ScoreScale, "normalisation");

/// HV and MIP of every method, with the paper's shared reference point (margin 1) on the raw scores.
pub fn summarize(curves: &[MethodCurve]) -> Result<(Vec<Summary>, Vec<f64>)> {
    summarize_with(curves, &[1.0], ScoreScale::None)
}

/// HV and MIP of every method with one shared reference point: per axis the minimum over every method's points
/// minus `margin` (one, or one per axis), in the axes `scale` gives. MIP always normalises by every method's
/// per-axis minimum and maximum. Returns the reference point in the scaled axes.
pub fn summarize_with(curves: &[MethodCurve], margin: &[f64], scale: ScoreScale) -> Result<(Vec<Summary>, Vec<f64>)> {
    let all: Vec<Vec<f64>> = curves.iter().flat_map(|c| c.scores.iter().cloned()).collect();
    reference_point_with(&all, margin)?;
    let d = all[0].len();
    let lo: Vec<f64> = (0..d).map(|a| all.iter().map(|p| p[a]).fold(f64::INFINITY, f64::min)).collect();
    let hi: Vec<f64> = (0..d).map(|a| all.iter().map(|p| p[a]).fold(f64::NEG_INFINITY, f64::max)).collect();
    let scaled = |p: &Vec<f64>| -> Vec<f64> {
        match scale {
            ScoreScale::None => p.clone(),
            ScoreScale::Minmax => {
                (0..d).map(|a| if hi[a] > lo[a] { (p[a] - lo[a]) / (hi[a] - lo[a]) } else { 0.0 }).collect()
            }
        }
    };
    let r = reference_point_with(&all.iter().map(scaled).collect::<Vec<_>>(), margin)?;
    let out = curves
        .iter()
        .map(|c| {
            Ok(Summary {
                method: c.method.clone(),
                hv: hypervolume(&c.scores.iter().map(scaled).collect::<Vec<_>>(), &r)?,
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
