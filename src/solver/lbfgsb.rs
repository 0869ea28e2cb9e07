//! L-BFGS-B 3.0 (Byrd, Lu, Nocedal, Zhu 1995; Morales and Nocedal 2011) as SciPy ships it, for the `paper`
//! method, which must truncate exactly like the authors' `scipy.optimize.minimize(method="L-BFGS-B")`.
//!
//! One iteration: the generalized Cauchy point along the projected steepest descent path (`cauchy`), the
//! free variables at that point (`freev`), a subspace Newton step on them with the limited-memory compact
//! matrix (`formk`, `cmprlb`, `subsm`, with the 3.0 projection of the step and its fallback to the
//! truncated step), then a Moré-Thuente line search (`dcsrch` / `dcstep`, ftol 1e-3, gtol 0.9, xtol 0.1)
//! capped by the largest feasible step. It stops on the projected gradient (`gtol`), on the relative
//! decrease `(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= ftol`, after `max_iter` iterations or
//! `max_fun` evaluations (SciPy's driver counts finite-difference evaluations too).
//!
//! [`minimize`] adds what `scipy.optimize.minimize` does around it when no gradient is given: variables fixed
//! by their bounds (lower = upper) are removed first, and the gradient is SciPy's 2-point forward difference
//! with the absolute step 1e-8 (`eps`), flipped backwards at an upper bound. The routine names in the code are
//! those of the Fortran, so that it can be read side by side with it. Everything is f64; the loops keep the
//! Fortran's order of summation.
#![allow(clippy::needless_range_loop)] // index loops mirror the Fortran, index for index

use crate::error::{CageError, Result};
/// Options, with SciPy's defaults.
#[derive(Clone, Copy, Debug)]
pub struct LbfgsbOptions {
    /// Stored corrections (`maxcor`).
    pub m: usize,
    /// Iteration limit (`maxiter`).
    pub max_iter: u32,
    /// Evaluation limit (`maxfun`), checked after each iteration as SciPy does.
    pub max_fun: u32,
    /// Relative decrease of f that stops the iteration (`ftol`; SciPy's factr * eps).
    pub ftol: f64,
    /// Projected gradient inf-norm that stops the iteration (`gtol`).
    pub gtol: f64,
    /// Line-search steps per iteration (`maxls`).
    pub max_ls: u32,
    /// Absolute finite-difference step (`eps`).
    pub fd_step: f64,
}

impl Default for LbfgsbOptions {
    fn default() -> Self {
        Self {
            m: 10,
            max_iter: 15000,
            max_fun: 15000,
            ftol: 2.220_446_049_250_313e-9,
            gtol: 1e-5,
            max_ls: 20,
            fd_step: 1e-8,
        }
    }
}

/// Why the iteration stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The projected gradient's inf-norm reached `gtol`.
    ProjectedGradient,
    /// The relative decrease of f reached `ftol`.
    RelativeReduction,
    /// `max_iter` iterations.
    MaxIter,
    /// More than `max_fun` evaluations.
    MaxFun,
    /// The line search failed with no correction left to drop (x is the last good iterate).
    AbnormalLineSearch,
    /// Every variable is fixed by its bounds: x = lower, nothing was run.
    AllFixed,
    /// A finite difference was asked at a point outside the bounds (a rounding of x = t + stp d): SciPy raises
    /// `ValueError` there. x is the start.
    OutsideBounds,
}

/// What [`minimize`] returns.
#[derive(Clone, Debug)]
pub struct LbfgsbResult {
    /// The final point (full length, fixed variables included).
    pub x: Vec<f64>,
    /// f(x).
    pub f: f64,
    /// Iterations (SciPy's `nit`).
    pub nit: u32,
    /// Function evaluations, finite differences included (SciPy's `nfev`).
    pub nfev: u32,
    /// Why it stopped.
    pub status: Status,
}

/// The gradient source of the core iteration: fills `g` at `x`, returns f, or `None` to abort (outside bounds).
trait Objective {
    fn fg(&mut self, x: &[f64], g: &mut [f64]) -> Option<f64>;
    fn evaluations(&self) -> u32;
}

/// `f` over the free variables (fixed ones reinserted), gradient by SciPy's bounded 2-point differences.
struct ForwardDifference<'a, F> {
    f: F,
    free: &'a [usize],
    full: Vec<f64>,
    /// The shifted point of the differences (kept to avoid an allocation per gradient).
    shifted: Vec<f64>,
    lower: &'a [f64],
    upper: &'a [f64],
    step: f64,
    nfev: u32,
}

impl<F: FnMut(&[f64]) -> f64> ForwardDifference<'_, F> {
    fn eval(&mut self, x: &[f64]) -> f64 {
        for (&k, &v) in self.free.iter().zip(x) {
            self.full[k] = v;
        }
        self.nfev += 1;
        (self.f)(&self.full)
    }
}

impl<F: FnMut(&[f64]) -> f64> Objective for ForwardDifference<'_, F> {
    fn fg(&mut self, x: &[f64], g: &mut [f64]) -> Option<f64> {
        let f0 = self.eval(x);
        let (lb, ub) = (self.lower, self.upper);
        if x.iter().enumerate().any(|(i, &v)| v < lb[i] || v > ub[i]) {
            return None;
        }
        let unbounded = lb.iter().zip(ub).all(|(l, u)| *l == f64::NEG_INFINITY && *u == f64::INFINITY);
        let mut xs = std::mem::take(&mut self.shifted);
        xs.clear();
        xs.extend_from_slice(x);
        for i in 0..x.len() {
            let x0 = x[i];
            let mut h = self.step;
            if (x0 + h) - x0 == 0.0 {
                let sign = if x0 >= 0.0 { 1.0 } else { -1.0 };
                h = f64::EPSILON.sqrt() * sign * x0.abs().max(1.0);
            }
            if !unbounded {
                // _adjust_scheme_to_bounds, '1-sided'
                let (lower_dist, upper_dist) = (x0 - lb[i], ub[i] - x0);
                let xh = x0 + h;
                let violated = xh < lb[i] || xh > ub[i];
                let fitting = h.abs() <= lower_dist.max(upper_dist);
                if violated && fitting {
                    h = -h;
                }
                if !fitting {
                    h = if upper_dist >= lower_dist { upper_dist } else { -lower_dist };
                }
            }
            xs[i] = x0 + h;
            let fi = self.eval(&xs);
            xs[i] = x0;
            g[i] = (fi - f0) / ((x0 + h) - x0);
        }
        self.shifted = xs;
        Some(f0)
    }

    fn evaluations(&self) -> u32 {
        self.nfev
    }
}

/// Minimises `f` over the box `lower <= x <= upper` from `x0` the way `scipy.optimize.minimize(f, x0,
/// method="L-BFGS-B", bounds=..., options=...)` does without a gradient. Bounds may be infinite; x0 is
/// clipped into them. Errors on mismatched lengths, NaN or crossed bounds, a non-finite start, or m = 0.
pub fn minimize<F: FnMut(&[f64]) -> f64>(
    f: F,
    x0: &[f64],
    lower: &[f64],
    upper: &[f64],
    opts: &LbfgsbOptions,
) -> Result<LbfgsbResult> {
    let n = x0.len();
    for (what, len) in [("lower bounds", lower.len()), ("upper bounds", upper.len())] {
        if len != n {
            return Err(CageError::Shape { what: format!("L-BFGS-B {what}"), expected: n, got: len });
        }
    }
    if let Some(i) = (0..n).find(|&i| lower[i].is_nan() || upper[i].is_nan() || lower[i] > upper[i]) {
        return Err(CageError::InvalidArgument(format!(
            "L-BFGS-B bounds of variable {i} are [{}, {}]: need lower <= upper",
            lower[i], upper[i]
        )));
    }
    if let Some(i) = (0..n).find(|&i| !x0[i].is_finite()) {
        return Err(CageError::InvalidArgument(format!("L-BFGS-B start x0[{i}] = {} is not finite", x0[i])));
    }
    if opts.m == 0 {
        return Err(CageError::InvalidArgument("L-BFGS-B needs m >= 1 stored corrections".into()));
    }
    let mut full: Vec<f64> = (0..n).map(|i| x0[i].max(lower[i]).min(upper[i])).collect();
    let free: Vec<usize> = (0..n).filter(|&i| lower[i] != upper[i]).collect();
    for i in 0..n {
        if lower[i] == upper[i] {
            full[i] = lower[i];
        }
    }
    let mut f = f;
    if free.is_empty() {
        let fx = f(&full);
        return Ok(LbfgsbResult { x: full, f: fx, nit: 0, nfev: 1, status: Status::AllFixed });
    }
    let l: Vec<f64> = free.iter().map(|&k| lower[k]).collect();
    let u: Vec<f64> = free.iter().map(|&k| upper[k]).collect();
    let mut x: Vec<f64> = free.iter().map(|&k| full[k]).collect();
    let start = full.clone();
    let mut obj = ForwardDifference {
        f,
        free: &free,
        full,
        shifted: Vec::new(),
        lower: &l,
        upper: &u,
        step: opts.fd_step,
        nfev: 0,
    };
    let (fx, nit, status) = setulb(&mut obj, &mut x, &l, &u, opts);
    let nfev = obj.evaluations();
    if status == Status::OutsideBounds {
        let fx = (obj.f)(&start);
        return Ok(LbfgsbResult { x: start, f: fx, nit, nfev, status });
    }
    let mut out = start;
    for (&k, &v) in free.iter().zip(&x) {
        out[k] = v;
    }
    Ok(LbfgsbResult { x: out, f: fx, nit, nfev, status })
}

/// Column-major index of the 1-based element (i, j) of a matrix with leading dimension `ld`.
#[inline]
fn ix(i: usize, j: usize, ld: usize) -> usize {
    (i - 1) + (j - 1) * ld
}

/// Stored state of the limited-memory matrix and the work vectors (the Fortran's `ws`, `wy`, `sy`, ...).
struct Work {
    n: usize,
    m: usize,
    ws: Vec<f64>,
    wy: Vec<f64>,
    sy: Vec<f64>,
    ss: Vec<f64>,
    wt: Vec<f64>,
    wn: Vec<f64>,
    snd: Vec<f64>,
    col: usize,
    head: usize,
    itail: usize,
    iupdat: usize,
    theta: f64,
    updatd: bool,
}

impl Work {
    fn refresh(&mut self) {
        self.col = 0;
        self.head = 1;
        self.theta = 1.0;
        self.iupdat = 0;
        self.updatd = false;
    }
}

const EPSMCH: f64 = f64::EPSILON;

/// The driver `mainlb`, with SciPy's iteration and evaluation limits. Returns (f, iterations, status).
#[allow(clippy::too_many_lines)]
fn setulb(obj: &mut impl Objective, x: &mut [f64], l: &[f64], u: &[f64], o: &LbfgsbOptions) -> (f64, u32, Status) {
    let n = x.len();
    let m = o.m;
    let nbd: Vec<u8> = (0..n)
        .map(|i| match (l[i].is_finite(), u[i].is_finite()) {
            (false, false) => 0,
            (true, false) => 1,
            (true, true) => 2,
            (false, true) => 3,
        })
        .collect();
    let mut w = Work {
        n,
        m,
        ws: vec![0.0; n * m],
        wy: vec![0.0; n * m],
        sy: vec![0.0; m * m],
        ss: vec![0.0; m * m],
        wt: vec![0.0; m * m],
        wn: vec![0.0; 4 * m * m],
        snd: vec![0.0; 4 * m * m],
        col: 0,
        head: 1,
        itail: 0,
        iupdat: 0,
        theta: 1.0,
        updatd: false,
    };
    let (mut z, mut r, mut d, mut t, mut xp) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut g = vec![0.0; n];
    let mut brk = vec![0.0; n];
    let (mut index, mut iwhere, mut indx2) = (vec![0usize; n], vec![0i32; n], vec![0usize; n]);
    let (mut p, mut c, mut wbp, mut v) = (vec![0.0; 2 * m], vec![0.0; 2 * m], vec![0.0; 2 * m], vec![0.0; 2 * m]);
    let mut wv = vec![0.0; 2 * m];
    let tol = o.ftol;
    let (cnstnd, boxed) = active(x, l, u, &nbd, &mut iwhere);
    let Some(mut f) = obj.fg(x, &mut g) else { return (f64::NAN, 0, Status::OutsideBounds) };
    let mut sbgnrm = projgr(x, l, u, &nbd, &g);
    if sbgnrm <= o.gtol {
        return (f, 0, Status::ProjectedGradient);
    }
    let mut iter: u32 = 0;
    let (mut nfree, mut nenter, mut ileave) = (n, 0, n);
    let mut search = Dcsrch::default();
    for (i, k) in index.iter_mut().enumerate() {
        *k = i;
    }
    loop {
        // 222: the generalized Cauchy point and the free variables there (skipped without bounds).
        let wrk;
        if !cnstnd && w.col > 0 {
            z.copy_from_slice(x);
            wrk = w.updatd;
        } else {
            let ok = cauchy(
                &w,
                x,
                l,
                u,
                &nbd,
                &g,
                &mut indx2,
                &mut iwhere,
                &mut brk,
                &mut d,
                &mut z,
                &mut p,
                &mut c,
                &mut wbp,
                &mut v,
                sbgnrm,
            );
            if !ok {
                w.refresh();
                continue;
            }
            (nfree, nenter, ileave, wrk) = freev(n, nfree, &mut index, &mut indx2, &iwhere, w.updatd, cnstnd, iter);
        }
        // 333: the subspace minimisation.
        if nfree != 0 && w.col != 0 {
            let ok = (!wrk || formk(&mut w, nfree, &index, nenter, ileave, &indx2))
                && cmprlb(&w, x, &g, &z, &mut r, &mut p, &c, &index, nfree, cnstnd)
                && subsm(&w, nfree, &index, l, u, &nbd, &mut z, &mut r, &mut xp, x, &g, &mut wv);
            if !ok {
                w.refresh();
                continue;
            }
        }
        // 555: the search direction and lnsrlb.
        for i in 0..n {
            d[i] = z[i] - x[i];
        }
        // SciPy: dnorm = dnrm2(d), dtd = dnorm^2 (not d.d).
        let dnorm = nrm2(&d);
        let dtd = dnorm * dnorm;
        let mut stpmx = 1e10;
        if cnstnd {
            if iter == 0 {
                stpmx = 1.0;
            } else {
                for i in 0..n {
                    let a1 = d[i];
                    if nbd[i] != 0 {
                        if a1 < 0.0 && nbd[i] <= 2 {
                            let a2 = l[i] - x[i];
                            if a2 >= 0.0 {
                                stpmx = 0.0;
                            } else if a1 * stpmx < a2 {
                                stpmx = a2 / a1;
                            }
                        } else if a1 > 0.0 && nbd[i] >= 2 {
                            let a2 = u[i] - x[i];
                            if a2 <= 0.0 {
                                stpmx = 0.0;
                            } else if a1 * stpmx > a2 {
                                stpmx = a2 / a1;
                            }
                        }
                    }
                }
            }
        }
        let mut stp = if iter == 0 && !boxed { (1.0 / dnorm).min(stpmx) } else { 1.0 };
        t.copy_from_slice(x);
        r.copy_from_slice(&g);
        let fold = f;
        let mut ifun: u32 = 0;
        let mut gdold = 0.0;
        let mut gd;
        search.task = Task::Start;
        let failed = loop {
            gd = dot(&g, &d);
            if ifun == 0 {
                gdold = gd;
                if gd >= 0.0 {
                    break true; // not a descent direction (info = -4)
                }
            }
            search.step(f, gd, &mut stp, 1e-3, 0.9, 0.1, 0.0, stpmx);
            if matches!(search.task, Task::Convergence | Task::Warning) {
                break false;
            }
            ifun += 1;
            let iback = ifun - 1;
            if stp == 1.0 {
                x.copy_from_slice(&z);
            } else {
                // SciPy's C translation clamps the step against rounding beyond a bound.
                for i in 0..n {
                    x[i] = stp * d[i] + t[i];
                    if nbd[i] == 1 || nbd[i] == 2 {
                        x[i] = x[i].max(l[i]);
                    }
                    if nbd[i] == 2 || nbd[i] == 3 {
                        x[i] = x[i].min(u[i]);
                    }
                }
            }
            if iback >= o.max_ls {
                break true;
            }
            match obj.fg(x, &mut g) {
                Some(fx) => f = fx,
                None => return (f64::NAN, iter, Status::OutsideBounds),
            }
        };
        if failed {
            x.copy_from_slice(&t);
            g.copy_from_slice(&r);
            f = fold;
            if w.col == 0 {
                return (f, iter, Status::AbnormalLineSearch); // SciPy's nit counts only accepted steps
            }
            w.refresh();
            continue;
        }
        // NEW_X: SciPy's driver counts the iteration and applies its limits before the convergence tests.
        iter += 1;
        sbgnrm = projgr(x, l, u, &nbd, &g);
        if iter >= o.max_iter {
            return (f, iter, Status::MaxIter);
        }
        if obj.evaluations() > o.max_fun {
            return (f, iter, Status::MaxFun);
        }
        // 777: the tests, then the update of the limited-memory matrix.
        if sbgnrm <= o.gtol {
            return (f, iter, Status::ProjectedGradient);
        }
        let ddum = fold.abs().max(f.abs()).max(1.0);
        if fold - f <= tol * ddum {
            return (f, iter, Status::RelativeReduction);
        }
        for i in 0..n {
            r[i] = g[i] - r[i];
        }
        let rr = nrm2(&r).powi(2); // SciPy: dnrm2(r)^2
        let (dr, ddum) = if stp == 1.0 {
            (gd - gdold, -gdold)
        } else {
            for di in d.iter_mut() {
                *di *= stp;
            }
            ((gd - gdold) * stp, -gdold * stp)
        };
        if dr <= EPSMCH * ddum {
            w.updatd = false;
            continue;
        }
        w.updatd = true;
        w.iupdat += 1;
        matupd(&mut w, &d, &r, rr, dr, stp, dtd);
        if !formt(&mut w) {
            w.refresh();
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Euclidean norm as OpenBLAS's x87 dnrm2 computes it: the sum of squares in extended precision, one rounding.
fn nrm2(a: &[f64]) -> f64 {
    // Compensated sum of exact squares (hi + lo), then a Newton correction of the square root.
    let (mut hi, mut lo) = (0.0f64, 0.0f64);
    for &x in a {
        let p = x * x;
        let pe = x.mul_add(x, -p);
        let s = hi + p;
        let bb = s - hi;
        lo += (hi - (s - bb)) + (p - bb) + pe;
        hi = s;
    }
    let (s, e) = (hi + lo, lo - ((hi + lo) - hi));
    if s <= 0.0 {
        return 0.0;
    }
    let r = s.sqrt();
    r + ((-r).mul_add(r, s) + e) / (2.0 * r)
}

/// Projects x into the box and classifies the variables; returns (cnstnd, boxed).
fn active(x: &mut [f64], l: &[f64], u: &[f64], nbd: &[u8], iwhere: &mut [i32]) -> (bool, bool) {
    let (mut cnstnd, mut boxed) = (false, true);
    for i in 0..x.len() {
        if nbd[i] > 0 {
            if nbd[i] <= 2 && x[i] <= l[i] {
                x[i] = l[i];
            } else if nbd[i] >= 2 && x[i] >= u[i] {
                x[i] = u[i];
            }
        }
    }
    for i in 0..x.len() {
        if nbd[i] != 2 {
            boxed = false;
        }
        if nbd[i] == 0 {
            iwhere[i] = -1;
        } else {
            cnstnd = true;
            iwhere[i] = if nbd[i] == 2 && u[i] - l[i] <= 0.0 { 3 } else { 0 };
        }
    }
    (cnstnd, boxed)
}

/// Inf-norm of the projected gradient.
fn projgr(x: &[f64], l: &[f64], u: &[f64], nbd: &[u8], g: &[f64]) -> f64 {
    let mut s: f64 = 0.0;
    for i in 0..x.len() {
        let mut gi = g[i];
        if nbd[i] != 0 {
            if gi < 0.0 {
                if nbd[i] >= 2 {
                    gi = (x[i] - u[i]).max(gi);
                }
            } else if nbd[i] <= 2 {
                gi = (x[i] - l[i]).min(gi);
            }
        }
        s = s.max(gi.abs());
    }
    s
}

/// LINPACK dpofa: upper Cholesky factor R (A = R'R) of the n x n block at `off`, in place. False if not
/// positive definite.
fn dpofa(a: &mut [f64], off: usize, ld: usize, n: usize) -> bool {
    let at = |i: usize, j: usize| off + ix(i, j, ld);
    for j in 1..=n {
        let mut s = 0.0;
        for k in 1..j {
            let mut dd = 0.0;
            for q in 1..k {
                dd += a[at(q, k)] * a[at(q, j)];
            }
            let tt = (a[at(k, j)] - dd) / a[at(k, k)];
            a[at(k, j)] = tt;
            s += tt * tt;
        }
        let s = a[at(j, j)] - s;
        if s <= 0.0 {
            return false;
        }
        a[at(j, j)] = s.sqrt();
    }
    true
}

/// LINPACK dtrsl for an upper triangular T (n x n at `off`): solves T b = b (`trans` false) or T' b = b.
fn dtrsl(tm: &[f64], off: usize, ld: usize, n: usize, b: &mut [f64], trans: bool) -> bool {
    let at = |i: usize, j: usize| off + ix(i, j, ld);
    if (1..=n).any(|j| tm[at(j, j)] == 0.0) {
        return false;
    }
    if n == 0 {
        return true;
    }
    if !trans {
        b[n - 1] /= tm[at(n, n)];
        for jj in 2..=n {
            let j = n - jj + 1;
            let temp = -b[j];
            for i in 1..=j {
                b[i - 1] += temp * tm[at(i, j + 1)];
            }
            b[j - 1] /= tm[at(j, j)];
        }
    } else {
        b[0] /= tm[at(1, 1)];
        for j in 2..=n {
            let mut s = 0.0;
            for i in 1..j {
                s += tm[at(i, j)] * b[i - 1];
            }
            b[j - 1] = (b[j - 1] - s) / tm[at(j, j)];
        }
    }
    true
}

/// Product of the 2col x 2col middle matrix of the compact L-BFGS formula with v, into p.
fn bmv(w: &Work, v: &[f64], p: &mut [f64]) -> bool {
    let (m, col) = (w.m, w.col);
    if col == 0 {
        return true;
    }
    let sy = |i: usize, j: usize| w.sy[ix(i, j, m)];
    p[col] = v[col];
    for i in 2..=col {
        let i2 = col + i;
        let mut sum = 0.0;
        for k in 1..i {
            sum += sy(i, k) * v[k - 1] / sy(k, k);
        }
        p[i2 - 1] = v[i2 - 1] + sum;
    }
    if !dtrsl(&w.wt, 0, m, col, &mut p[col..2 * col], true) {
        return false;
    }
    for i in 1..=col {
        p[i - 1] = v[i - 1] / sy(i, i).sqrt();
    }
    if !dtrsl(&w.wt, 0, m, col, &mut p[col..2 * col], false) {
        return false;
    }
    for i in 1..=col {
        p[i - 1] = -p[i - 1] / sy(i, i).sqrt();
    }
    for i in 1..=col {
        let mut sum = 0.0;
        for k in i + 1..=col {
            sum += sy(k, i) * p[col + k - 1] / sy(i, i);
        }
        p[i - 1] += sum;
    }
    true
}

/// LINPACK-style heap step of `hpsolb` on t[0..n] (1-based inside): builds the heap when `build`, then moves
/// the least breakpoint to position n.
fn hpsolb(n: usize, t: &mut [f64], iorder: &mut [usize], build: bool) {
    if build {
        for k in 2..=n {
            let ddum = t[k - 1];
            let indxin = iorder[k - 1];
            let mut i = k;
            while i > 1 {
                let j = i / 2;
                if ddum < t[j - 1] {
                    t[i - 1] = t[j - 1];
                    iorder[i - 1] = iorder[j - 1];
                    i = j;
                } else {
                    break;
                }
            }
            t[i - 1] = ddum;
            iorder[i - 1] = indxin;
        }
    }
    if n > 1 {
        let mut i = 1;
        let out = t[0];
        let indxou = iorder[0];
        let ddum = t[n - 1];
        let indxin = iorder[n - 1];
        loop {
            let mut j = i + i;
            if j < n {
                if t[j] < t[j - 1] {
                    j += 1;
                }
                if t[j - 1] < ddum {
                    t[i - 1] = t[j - 1];
                    iorder[i - 1] = iorder[j - 1];
                    i = j;
                    continue;
                }
            }
            break;
        }
        t[i - 1] = ddum;
        iorder[i - 1] = indxin;
        t[n - 1] = out;
        iorder[n - 1] = indxou;
    }
}

/// The generalized Cauchy point xcp along the projected gradient path; c = W'(xcp - x) for `cmprlb`.
#[allow(clippy::too_many_arguments)]
fn cauchy(
    w: &Work,
    x: &[f64],
    l: &[f64],
    u: &[f64],
    nbd: &[u8],
    g: &[f64],
    iorder: &mut [usize],
    iwhere: &mut [i32],
    t: &mut [f64],
    d: &mut [f64],
    xcp: &mut [f64],
    p: &mut [f64],
    c: &mut [f64],
    wbp: &mut [f64],
    v: &mut [f64],
    sbgnrm: f64,
) -> bool {
    let (n, m, col, theta) = (w.n, w.m, w.col, w.theta);
    if sbgnrm <= 0.0 {
        xcp.copy_from_slice(x);
        return true;
    }
    let mut bnded = true;
    let mut nfree = n; // 0-based: the free variables are stored downwards from n - 1
    let mut nbreak = 0usize;
    let mut ibkmin = 0usize;
    let mut bkmin = 0.0;
    let col2 = 2 * col;
    let mut f1 = 0.0;
    for pi in p.iter_mut().take(col2) {
        *pi = 0.0;
    }
    for i in 0..n {
        let neggi = -g[i];
        let (mut tl, mut tu) = (0.0, 0.0);
        if iwhere[i] != 3 && iwhere[i] != -1 {
            if nbd[i] <= 2 {
                tl = x[i] - l[i];
            }
            if nbd[i] >= 2 {
                tu = u[i] - x[i];
            }
            let xlower = nbd[i] <= 2 && tl <= 0.0;
            let xupper = nbd[i] >= 2 && tu <= 0.0;
            iwhere[i] = 0;
            if xlower {
                if neggi <= 0.0 {
                    iwhere[i] = 1;
                }
            } else if xupper {
                if neggi >= 0.0 {
                    iwhere[i] = 2;
                }
            } else if neggi.abs() <= 0.0 {
                iwhere[i] = -3;
            }
        }
        let mut pointr = w.head;
        if iwhere[i] != 0 && iwhere[i] != -1 {
            d[i] = 0.0;
        } else {
            d[i] = neggi;
            f1 -= neggi * neggi;
            for j in 1..=col {
                p[j - 1] += w.wy[ix(i + 1, pointr, n)] * neggi;
                p[col + j - 1] += w.ws[ix(i + 1, pointr, n)] * neggi;
                pointr = pointr % m + 1;
            }
            if nbd[i] <= 2 && nbd[i] != 0 && neggi < 0.0 {
                iorder[nbreak] = i;
                t[nbreak] = tl / (-neggi);
                nbreak += 1;
                if nbreak == 1 || t[nbreak - 1] < bkmin {
                    bkmin = t[nbreak - 1];
                    ibkmin = nbreak - 1;
                }
            } else if nbd[i] >= 2 && neggi > 0.0 {
                iorder[nbreak] = i;
                t[nbreak] = tu / neggi;
                nbreak += 1;
                if nbreak == 1 || t[nbreak - 1] < bkmin {
                    bkmin = t[nbreak - 1];
                    ibkmin = nbreak - 1;
                }
            } else {
                nfree -= 1;
                iorder[nfree] = i;
                if neggi.abs() > 0.0 {
                    bnded = false;
                }
            }
        }
    }
    if theta != 1.0 {
        for pi in p[col..col2].iter_mut() {
            *pi *= theta;
        }
    }
    xcp.copy_from_slice(x);
    if nbreak == 0 && nfree == n {
        return true;
    }
    for ci in c.iter_mut().take(col2) {
        *ci = 0.0;
    }
    let mut f2 = -theta * f1;
    let f2_org = f2;
    if col > 0 {
        if !bmv(w, p, v) {
            return false;
        }
        f2 -= dot(&v[..col2], &p[..col2]);
    }
    let mut dtm = -f1 / f2;
    let mut tsum = 0.0;
    let mut skip_xcp = false;
    if nbreak > 0 {
        let mut nleft = nbreak;
        let mut it = 1;
        let mut tj = 0.0;
        loop {
            let tj0 = tj;
            let ibp;
            if it == 1 {
                tj = bkmin;
                ibp = iorder[ibkmin];
            } else {
                if it == 2 && ibkmin != nbreak - 1 {
                    t[ibkmin] = t[nbreak - 1];
                    iorder[ibkmin] = iorder[nbreak - 1];
                }
                hpsolb(nleft, t, iorder, it == 2);
                tj = t[nleft - 1];
                ibp = iorder[nleft - 1];
            }
            let dt = tj - tj0;
            if dtm < dt {
                break;
            }
            tsum += dt;
            nleft -= 1;
            it += 1;
            let dibp = d[ibp];
            d[ibp] = 0.0;
            let zibp;
            if dibp > 0.0 {
                zibp = u[ibp] - x[ibp];
                xcp[ibp] = u[ibp];
                iwhere[ibp] = 2;
            } else {
                zibp = l[ibp] - x[ibp];
                xcp[ibp] = l[ibp];
                iwhere[ibp] = 1;
            }
            if nleft == 0 && nbreak == n {
                dtm = dt;
                skip_xcp = true;
                break;
            }
            let dibp2 = dibp * dibp;
            f1 = f1 + dt * f2 + dibp2 - theta * dibp * zibp;
            f2 -= theta * dibp2;
            if col > 0 {
                for j in 0..col2 {
                    c[j] += dt * p[j];
                }
                let mut pointr = w.head;
                for j in 1..=col {
                    wbp[j - 1] = w.wy[ix(ibp + 1, pointr, n)];
                    wbp[col + j - 1] = theta * w.ws[ix(ibp + 1, pointr, n)];
                    pointr = pointr % m + 1;
                }
                if !bmv(w, wbp, v) {
                    return false;
                }
                let wmc = dot(&c[..col2], &v[..col2]);
                let wmp = dot(&p[..col2], &v[..col2]);
                let wmw = dot(&wbp[..col2], &v[..col2]);
                for j in 0..col2 {
                    p[j] -= dibp * wbp[j];
                }
                f1 += dibp * wmc;
                f2 = f2 + 2.0 * dibp * wmp - dibp2 * wmw;
            }
            f2 = (EPSMCH * f2_org).max(f2);
            if nleft > 0 {
                dtm = -f1 / f2;
                continue;
            } else if bnded {
                dtm = 0.0;
            } else {
                dtm = -f1 / f2;
            }
            break;
        }
    }
    if !skip_xcp {
        if dtm <= 0.0 {
            dtm = 0.0;
        }
        tsum += dtm;
        for i in 0..n {
            xcp[i] += tsum * d[i];
        }
    }
    if col > 0 {
        for j in 0..col2 {
            c[j] += dtm * p[j];
        }
    }
    true
}

/// The free variables at the Cauchy point (index[..nfree]) and those that entered or left the free set since
/// the last iteration (indx2). Returns (nfree, nenter, ileave, wrk).
#[allow(clippy::too_many_arguments)]
fn freev(
    n: usize,
    nfree: usize,
    index: &mut [usize],
    indx2: &mut [usize],
    iwhere: &[i32],
    updatd: bool,
    cnstnd: bool,
    iter: u32,
) -> (usize, usize, usize, bool) {
    let mut nenter = 0;
    let mut ileave = n;
    if iter > 0 && cnstnd {
        for &k in index.iter().take(nfree) {
            if iwhere[k] > 0 {
                ileave -= 1;
                indx2[ileave] = k;
            }
        }
        for &k in index.iter().skip(nfree) {
            if iwhere[k] <= 0 {
                indx2[nenter] = k;
                nenter += 1;
            }
        }
    }
    let wrk = ileave < n || nenter > 0 || updatd;
    let mut nf = 0;
    let mut iact = n;
    for i in 0..n {
        if iwhere[i] <= 0 {
            index[nf] = i;
            nf += 1;
        } else {
            iact -= 1;
            index[iact] = i;
        }
    }
    (nf, nenter, ileave, wrk)
}

/// Forms and factorises the middle matrix K of the subspace problem (LEL' with the Cholesky factors in wn).
fn formk(w: &mut Work, nsub: usize, ind: &[usize], nenter: usize, ileave: usize, indx2: &[usize]) -> bool {
    let (n, m, col, theta) = (w.n, w.m, w.col, w.theta);
    let m2 = 2 * m;
    let ws = |k: usize, j: usize| w.ws[ix(k + 1, j, n)];
    let wy = |k: usize, j: usize| w.wy[ix(k + 1, j, n)];
    let wn1 = &mut w.snd;
    let upcl;
    if w.updatd {
        if w.iupdat > m {
            for jy in 1..m {
                let js = m + jy;
                for q in 0..m - jy {
                    wn1[ix(jy + q, jy, m2)] = wn1[ix(jy + 1 + q, jy + 1, m2)];
                    wn1[ix(js + q, js, m2)] = wn1[ix(js + 1 + q, js + 1, m2)];
                }
                for q in 0..m - 1 {
                    wn1[ix(m + 1 + q, jy, m2)] = wn1[ix(m + 2 + q, jy + 1, m2)];
                }
            }
        }
        let (pbegin, pend, dbegin, dend) = (0, nsub, nsub, n);
        let iy = col;
        let is = m + col;
        let mut ipntr = w.head + col - 1;
        if ipntr > m {
            ipntr -= m;
        }
        let mut jpntr = w.head;
        for jy in 1..=col {
            let js = m + jy;
            let (mut temp1, mut temp2, mut temp3) = (0.0, 0.0, 0.0);
            for &k1 in &ind[pbegin..pend] {
                temp1 += wy(k1, ipntr) * wy(k1, jpntr);
            }
            for &k1 in &ind[dbegin..dend] {
                temp2 += ws(k1, ipntr) * ws(k1, jpntr);
                temp3 += ws(k1, ipntr) * wy(k1, jpntr);
            }
            wn1[ix(iy, jy, m2)] = temp1;
            wn1[ix(is, js, m2)] = temp2;
            wn1[ix(is, jy, m2)] = temp3;
            jpntr = jpntr % m + 1;
        }
        let jy = col;
        let mut jpntr = w.head + col - 1;
        if jpntr > m {
            jpntr -= m;
        }
        let mut ipntr = w.head;
        for i in 1..=col {
            let is = m + i;
            let mut temp3 = 0.0;
            for &k1 in &ind[pbegin..pend] {
                temp3 += ws(k1, ipntr) * wy(k1, jpntr);
            }
            ipntr = ipntr % m + 1;
            wn1[ix(is, jy, m2)] = temp3;
        }
        upcl = col - 1;
    } else {
        upcl = col;
    }
    let mut ipntr = w.head;
    for iy in 1..=upcl {
        let is = m + iy;
        let mut jpntr = w.head;
        for jy in 1..=iy {
            let js = m + jy;
            let (mut temp1, mut temp2, mut temp3, mut temp4) = (0.0, 0.0, 0.0, 0.0);
            for &k1 in &indx2[..nenter] {
                temp1 += wy(k1, ipntr) * wy(k1, jpntr);
                temp2 += ws(k1, ipntr) * ws(k1, jpntr);
            }
            for &k1 in &indx2[ileave..n] {
                temp3 += wy(k1, ipntr) * wy(k1, jpntr);
                temp4 += ws(k1, ipntr) * ws(k1, jpntr);
            }
            wn1[ix(iy, jy, m2)] = wn1[ix(iy, jy, m2)] + temp1 - temp3;
            wn1[ix(is, js, m2)] = wn1[ix(is, js, m2)] - temp2 + temp4;
            jpntr = jpntr % m + 1;
        }
        ipntr = ipntr % m + 1;
    }
    let mut ipntr = w.head;
    for is in m + 1..=m + upcl {
        let mut jpntr = w.head;
        for jy in 1..=upcl {
            let (mut temp1, mut temp3) = (0.0, 0.0);
            for &k1 in &indx2[..nenter] {
                temp1 += ws(k1, ipntr) * wy(k1, jpntr);
            }
            for &k1 in &indx2[ileave..n] {
                temp3 += ws(k1, ipntr) * wy(k1, jpntr);
            }
            if is <= jy + m {
                wn1[ix(is, jy, m2)] = wn1[ix(is, jy, m2)] + temp1 - temp3;
            } else {
                wn1[ix(is, jy, m2)] = wn1[ix(is, jy, m2)] - temp1 + temp3;
            }
            jpntr = jpntr % m + 1;
        }
        ipntr = ipntr % m + 1;
    }
    let wn = &mut w.wn;
    for iy in 1..=col {
        let is = col + iy;
        let is1 = m + iy;
        for jy in 1..=iy {
            let js = col + jy;
            let js1 = m + jy;
            wn[ix(jy, iy, m2)] = wn1[ix(iy, jy, m2)] / theta;
            wn[ix(js, is, m2)] = wn1[ix(is1, js1, m2)] * theta;
        }
        for jy in 1..iy {
            wn[ix(jy, is, m2)] = -wn1[ix(is1, jy, m2)];
        }
        for jy in iy..=col {
            wn[ix(jy, is, m2)] = wn1[ix(is1, jy, m2)];
        }
        wn[ix(iy, iy, m2)] += w.sy[ix(iy, iy, m)];
    }
    if !dpofa(wn, 0, m2, col) {
        return false;
    }
    let col2 = 2 * col;
    let mut colv = vec![0.0; col];
    for js in col + 1..=col2 {
        for i in 1..=col {
            colv[i - 1] = wn[ix(i, js, m2)];
        }
        if !dtrsl(wn, 0, m2, col, &mut colv, true) {
            return false;
        }
        for i in 1..=col {
            wn[ix(i, js, m2)] = colv[i - 1];
        }
    }
    for is in col + 1..=col2 {
        for js in is..=col2 {
            let mut s = 0.0;
            for i in 1..=col {
                s += wn[ix(i, is, m2)] * wn[ix(i, js, m2)];
            }
            wn[ix(is, js, m2)] += s;
        }
    }
    dpofa(wn, ix(col + 1, col + 1, m2), m2, col)
}

/// r = -Z'(B(xcp - x) + g), the reduced gradient of the quadratic model at the Cauchy point.
#[allow(clippy::too_many_arguments)]
fn cmprlb(
    w: &Work,
    x: &[f64],
    g: &[f64],
    z: &[f64],
    r: &mut [f64],
    wa: &mut [f64],
    c: &[f64],
    index: &[usize],
    nfree: usize,
    cnstnd: bool,
) -> bool {
    let (n, m, col, theta) = (w.n, w.m, w.col, w.theta);
    if !cnstnd && col > 0 {
        for i in 0..n {
            r[i] = -g[i];
        }
        return true;
    }
    for i in 0..nfree {
        let k = index[i];
        r[i] = -theta * (z[k] - x[k]) - g[k];
    }
    if !bmv(w, c, wa) {
        return false;
    }
    let mut pointr = w.head;
    for j in 1..=col {
        let a1 = wa[j - 1];
        let a2 = theta * wa[col + j - 1];
        for i in 0..nfree {
            let k = index[i];
            r[i] += w.wy[ix(k + 1, pointr, n)] * a1 + w.ws[ix(k + 1, pointr, n)] * a2;
        }
        pointr = pointr % m + 1;
    }
    true
}

/// Subspace Newton step on the free variables from the Cauchy point z, projected into the box (3.0), with the
/// fallback to the truncated step when the projected one is not a descent direction.
#[allow(clippy::too_many_arguments)]
fn subsm(
    w: &Work,
    nsub: usize,
    ind: &[usize],
    l: &[f64],
    u: &[f64],
    nbd: &[u8],
    x: &mut [f64],
    d: &mut [f64],
    xp: &mut [f64],
    xx: &[f64],
    gg: &[f64],
    wv: &mut [f64],
) -> bool {
    let (n, m, col, theta) = (w.n, w.m, w.col, w.theta);
    if nsub == 0 {
        return true;
    }
    let mut pointr = w.head;
    for i in 1..=col {
        let (mut temp1, mut temp2) = (0.0, 0.0);
        for j in 0..nsub {
            let k = ind[j];
            temp1 += w.wy[ix(k + 1, pointr, n)] * d[j];
            temp2 += w.ws[ix(k + 1, pointr, n)] * d[j];
        }
        wv[i - 1] = temp1;
        wv[col + i - 1] = theta * temp2;
        pointr = pointr % m + 1;
    }
    let m2 = 2 * m;
    let col2 = 2 * col;
    if !dtrsl(&w.wn, 0, m2, col2, &mut wv[..col2], true) {
        return false;
    }
    for wi in wv.iter_mut().take(col) {
        *wi = -*wi;
    }
    if !dtrsl(&w.wn, 0, m2, col2, &mut wv[..col2], false) {
        return false;
    }
    let mut pointr = w.head;
    for jy in 1..=col {
        let js = col + jy;
        for i in 0..nsub {
            let k = ind[i];
            d[i] += w.wy[ix(k + 1, pointr, n)] * wv[jy - 1] / theta + w.ws[ix(k + 1, pointr, n)] * wv[js - 1];
        }
        pointr = pointr % m + 1;
    }
    for di in d.iter_mut().take(nsub) {
        *di *= 1.0 / theta;
    }
    // 3.0: project the Newton step.
    let mut iword = false;
    xp.copy_from_slice(x);
    for i in 0..nsub {
        let k = ind[i];
        let (dk, xk) = (d[i], x[k]);
        match nbd[k] {
            0 => x[k] = xk + dk,
            1 => {
                x[k] = l[k].max(xk + dk);
                iword |= x[k] == l[k];
            }
            2 => {
                let xk = l[k].max(xk + dk);
                x[k] = u[k].min(xk);
                iword |= x[k] == l[k] || x[k] == u[k];
            }
            _ => {
                x[k] = u[k].min(xk + dk);
                iword |= x[k] == u[k];
            }
        }
    }
    if !iword {
        return true;
    }
    let mut dd_p = 0.0;
    for i in 0..n {
        dd_p += (x[i] - xx[i]) * gg[i];
    }
    if dd_p > 0.0 {
        x.copy_from_slice(xp);
        let alpha0 = 1.0;
        let mut alpha = alpha0;
        let mut temp1 = alpha;
        let mut ibd = 0;
        for i in 0..nsub {
            let k = ind[i];
            let dk = d[i];
            if nbd[k] != 0 {
                if dk < 0.0 && nbd[k] <= 2 {
                    let temp2 = l[k] - x[k];
                    if temp2 >= 0.0 {
                        temp1 = 0.0;
                    } else if dk * alpha < temp2 {
                        temp1 = temp2 / dk;
                    }
                } else if dk > 0.0 && nbd[k] >= 2 {
                    let temp2 = u[k] - x[k];
                    if temp2 <= 0.0 {
                        temp1 = 0.0;
                    } else if dk * alpha > temp2 {
                        temp1 = temp2 / dk;
                    }
                }
                if temp1 < alpha {
                    alpha = temp1;
                    ibd = i;
                }
            }
        }
        if alpha < 1.0 {
            let dk = d[ibd];
            let k = ind[ibd];
            if dk > 0.0 {
                x[k] = u[k];
                d[ibd] = 0.0;
            } else if dk < 0.0 {
                x[k] = l[k];
                d[ibd] = 0.0;
            }
        }
        for i in 0..nsub {
            let k = ind[i];
            x[k] += alpha * d[i];
        }
    }
    true
}

/// Adds the newest correction pair (s = d, y = r) to the stored ones and updates S'S and S'Y.
fn matupd(w: &mut Work, d: &[f64], r: &[f64], rr: f64, dr: f64, stp: f64, dtd: f64) {
    let (n, m) = (w.n, w.m);
    if w.iupdat <= m {
        w.col = w.iupdat;
        w.itail = (w.head + w.iupdat - 2) % m + 1;
    } else {
        w.itail = w.itail % m + 1;
        w.head = w.head % m + 1;
    }
    let it = w.itail;
    w.ws[ix(1, it, n)..ix(1, it, n) + n].copy_from_slice(d);
    w.wy[ix(1, it, n)..ix(1, it, n) + n].copy_from_slice(r);
    w.theta = rr / dr;
    let col = w.col;
    if w.iupdat > m {
        for j in 1..col {
            for q in 0..j {
                w.ss[ix(1 + q, j, m)] = w.ss[ix(2 + q, j + 1, m)];
            }
            for q in 0..col - j {
                w.sy[ix(j + q, j, m)] = w.sy[ix(j + 1 + q, j + 1, m)];
            }
        }
    }
    let mut pointr = w.head;
    for j in 1..col {
        let ys = &w.wy[ix(1, pointr, n)..ix(1, pointr, n) + n];
        w.sy[ix(col, j, m)] = dot(d, ys);
        let ss = &w.ws[ix(1, pointr, n)..ix(1, pointr, n) + n];
        w.ss[ix(j, col, m)] = dot(ss, d);
        pointr = pointr % m + 1;
    }
    w.ss[ix(col, col, m)] = if stp == 1.0 { dtd } else { stp * stp * dtd };
    w.sy[ix(col, col, m)] = dr;
}

/// T = theta S'S + L D^-1 L', Cholesky-factorised into wt (upper).
fn formt(w: &mut Work) -> bool {
    let (m, col, theta) = (w.m, w.col, w.theta);
    for j in 1..=col {
        w.wt[ix(1, j, m)] = theta * w.ss[ix(1, j, m)];
    }
    for i in 2..=col {
        for j in i..=col {
            let k1 = i.min(j) - 1;
            let mut ddum = 0.0;
            for k in 1..=k1 {
                ddum += w.sy[ix(i, k, m)] * w.sy[ix(j, k, m)] / w.sy[ix(k, k, m)];
            }
            w.wt[ix(i, j, m)] = ddum + theta * w.ss[ix(i, j, m)];
        }
    }
    dpofa(&mut w.wt, 0, m, col)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Task {
    #[default]
    Start,
    Fg,
    Convergence,
    Warning,
    Error,
}

/// MINPACK-2 dcsrch (Moré-Thuente): its saved state persists between calls, as the Fortran's isave/dsave do.
#[derive(Default)]
struct Dcsrch {
    task: Task,
    brackt: bool,
    stage: u8,
    ginit: f64,
    gtest: f64,
    gx: f64,
    gy: f64,
    finit: f64,
    fx: f64,
    fy: f64,
    stx: f64,
    sty: f64,
    stmin: f64,
    stmax: f64,
    width: f64,
    width1: f64,
}

impl Dcsrch {
    #[allow(clippy::too_many_arguments)]
    fn step(&mut self, f: f64, g: f64, stp: &mut f64, ftol: f64, gtol: f64, xtol: f64, stpmin: f64, stpmax: f64) {
        const XTRAPL: f64 = 1.1;
        const XTRAPU: f64 = 4.0;
        if self.task == Task::Start {
            if *stp < stpmin || *stp > stpmax || g >= 0.0 {
                self.task = Task::Error;
                return;
            }
            self.brackt = false;
            self.stage = 1;
            self.finit = f;
            self.ginit = g;
            self.gtest = ftol * self.ginit;
            self.width = stpmax - stpmin;
            self.width1 = self.width / 0.5;
            self.stx = 0.0;
            self.fx = self.finit;
            self.gx = self.ginit;
            self.sty = 0.0;
            self.fy = self.finit;
            self.gy = self.ginit;
            self.stmin = 0.0;
            self.stmax = *stp + XTRAPU * *stp;
            self.task = Task::Fg;
            return;
        }
        let ftest = self.finit + *stp * self.gtest;
        if self.stage == 1 && f <= ftest && g >= 0.0 {
            self.stage = 2;
        }
        let mut task = Task::Fg;
        if self.brackt && (*stp <= self.stmin || *stp >= self.stmax) {
            task = Task::Warning;
        }
        if self.brackt && self.stmax - self.stmin <= xtol * self.stmax {
            task = Task::Warning;
        }
        if *stp == stpmax && f <= ftest && g <= self.gtest {
            task = Task::Warning;
        }
        if *stp == stpmin && (f > ftest || g >= self.gtest) {
            task = Task::Warning;
        }
        if f <= ftest && g.abs() <= gtol * (-self.ginit) {
            task = Task::Convergence;
        }
        if task != Task::Fg {
            self.task = task;
            return;
        }
        if self.stage == 1 && f <= self.fx && f > ftest {
            let fm = f - *stp * self.gtest;
            let mut fxm = self.fx - self.stx * self.gtest;
            let mut fym = self.fy - self.sty * self.gtest;
            let gm = g - self.gtest;
            let mut gxm = self.gx - self.gtest;
            let mut gym = self.gy - self.gtest;
            dcstep(
                &mut self.stx,
                &mut fxm,
                &mut gxm,
                &mut self.sty,
                &mut fym,
                &mut gym,
                stp,
                fm,
                gm,
                &mut self.brackt,
                self.stmin,
                self.stmax,
            );
            self.fx = fxm + self.stx * self.gtest;
            self.fy = fym + self.sty * self.gtest;
            self.gx = gxm + self.gtest;
            self.gy = gym + self.gtest;
        } else {
            dcstep(
                &mut self.stx,
                &mut self.fx,
                &mut self.gx,
                &mut self.sty,
                &mut self.fy,
                &mut self.gy,
                stp,
                f,
                g,
                &mut self.brackt,
                self.stmin,
                self.stmax,
            );
        }
        if self.brackt {
            if (self.sty - self.stx).abs() >= 0.66 * self.width1 {
                *stp = self.stx + 0.5 * (self.sty - self.stx);
            }
            self.width1 = self.width;
            self.width = (self.sty - self.stx).abs();
        }
        if self.brackt {
            self.stmin = self.stx.min(self.sty);
            self.stmax = self.stx.max(self.sty);
        } else {
            self.stmin = *stp + XTRAPL * (*stp - self.stx);
            self.stmax = *stp + XTRAPU * (*stp - self.stx);
        }
        *stp = stp.max(stpmin);
        *stp = stp.min(stpmax);
        if self.brackt && (*stp <= self.stmin || *stp >= self.stmax || self.stmax - self.stmin <= xtol * self.stmax) {
            *stp = self.stx;
        }
        self.task = Task::Fg;
    }
}

/// MINPACK-2 dcstep: a safeguarded cubic/quadratic step and the update of the interval of uncertainty.
#[allow(clippy::too_many_arguments)]
fn dcstep(
    stx: &mut f64,
    fx: &mut f64,
    dx: &mut f64,
    sty: &mut f64,
    fy: &mut f64,
    dy: &mut f64,
    stp: &mut f64,
    fp: f64,
    dp: f64,
    brackt: &mut bool,
    stpmin: f64,
    stpmax: f64,
) {
    let sgnd = dp * (*dx / dx.abs());
    let stpf;
    if fp > *fx {
        let theta = 3.0 * (*fx - fp) / (*stp - *stx) + *dx + dp;
        let s = theta.abs().max(dx.abs()).max(dp.abs());
        let mut gamma = s * ((theta / s).powi(2) - (*dx / s) * (dp / s)).sqrt();
        if *stp < *stx {
            gamma = -gamma;
        }
        let p = (gamma - *dx) + theta;
        let q = ((gamma - *dx) + gamma) + dp;
        let r = p / q;
        let stpc = *stx + r * (*stp - *stx);
        let stpq = *stx + ((*dx / ((*fx - fp) / (*stp - *stx) + *dx)) / 2.0) * (*stp - *stx);
        stpf = if (stpc - *stx).abs() < (stpq - *stx).abs() { stpc } else { stpc + (stpq - stpc) / 2.0 };
        *brackt = true;
    } else if sgnd < 0.0 {
        let theta = 3.0 * (*fx - fp) / (*stp - *stx) + *dx + dp;
        let s = theta.abs().max(dx.abs()).max(dp.abs());
        let mut gamma = s * ((theta / s).powi(2) - (*dx / s) * (dp / s)).sqrt();
        if *stp > *stx {
            gamma = -gamma;
        }
        let p = (gamma - dp) + theta;
        let q = ((gamma - dp) + gamma) + *dx;
        let r = p / q;
        let stpc = *stp + r * (*stx - *stp);
        let stpq = *stp + (dp / (dp - *dx)) * (*stx - *stp);
        stpf = if (stpc - *stp).abs() > (stpq - *stp).abs() { stpc } else { stpq };
        *brackt = true;
    } else if dp.abs() < dx.abs() {
        let theta = 3.0 * (*fx - fp) / (*stp - *stx) + *dx + dp;
        let s = theta.abs().max(dx.abs()).max(dp.abs());
        let mut gamma = s * (0.0f64.max((theta / s).powi(2) - (*dx / s) * (dp / s))).sqrt();
        if *stp > *stx {
            gamma = -gamma;
        }
        let p = (gamma - dp) + theta;
        let q = (gamma + (*dx - dp)) + gamma;
        let r = p / q;
        let stpc = if r < 0.0 && gamma != 0.0 {
            *stp + r * (*stx - *stp)
        } else if *stp > *stx {
            stpmax
        } else {
            stpmin
        };
        let stpq = *stp + (dp / (dp - *dx)) * (*stx - *stp);
        if *brackt {
            let s1 = if (stpc - *stp).abs() < (stpq - *stp).abs() { stpc } else { stpq };
            stpf =
                if *stp > *stx { (*stp + 0.66 * (*sty - *stp)).min(s1) } else { (*stp + 0.66 * (*sty - *stp)).max(s1) };
        } else {
            let s1 = if (stpc - *stp).abs() > (stpq - *stp).abs() { stpc } else { stpq };
            stpf = s1.min(stpmax).max(stpmin);
        }
    } else if *brackt {
        let theta = 3.0 * (fp - *fy) / (*sty - *stp) + *dy + dp;
        let s = theta.abs().max(dy.abs()).max(dp.abs());
        let mut gamma = s * ((theta / s).powi(2) - (*dy / s) * (dp / s)).sqrt();
        if *stp > *sty {
            gamma = -gamma;
        }
        let p = (gamma - dp) + theta;
        let q = ((gamma - dp) + gamma) + *dy;
        let r = p / q;
        stpf = *stp + r * (*sty - *stp);
    } else if *stp > *stx {
        stpf = stpmax;
    } else {
        stpf = stpmin;
    }
    if fp > *fx {
        *sty = *stp;
        *fy = fp;
        *dy = dp;
    } else {
        if sgnd < 0.0 {
            *sty = *stx;
            *fy = *fx;
            *dy = *dx;
        }
        *stx = *stp;
        *fx = fp;
        *dx = dp;
    }
    *stp = stpf;
}
