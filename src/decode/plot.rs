//! The Pareto plot of a sweep: one SVG document ([`pareto_svg`]), and the same document rasterised by resvg
//! ([`pareto_png`]), so that the two files are the same picture. The text is set in DejaVu Sans, which cage
//! embeds (assets/fonts/), because machines without system fonts would otherwise get a PNG without text.

use super::sweep::MethodCurve;
use crate::error::{CageError, Result};
use resvg::{tiny_skia, usvg};
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/// The family the SVG asks for first: the embedded font, so the PNG never depends on the machine's fonts.
const FONT_FAMILY: &str = "DejaVu Sans";

/// DejaVu Sans 2.37 (Bitstream Vera license, see assets/fonts/LICENSE-DejaVu).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// A font database holding only the embedded font, built once per process.
static FONTS: LazyLock<Arc<usvg::fontdb::Database>> = LazyLock::new(|| {
    let mut db = usvg::fontdb::Database::new();
    db.load_font_source(usvg::fontdb::Source::Binary(Arc::new(FONT)));
    db.set_sans_serif_family(FONT_FAMILY);
    Arc::new(db)
});

/// Pixels of the PNG per SVG unit: 2 keeps 12-unit text legible on high-density screens and in print.
pub const PNG_SCALE: f32 = 2.0;

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
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"'{FONT_FAMILY}', sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
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

/// The same plot as [`pareto_svg`] as a PNG: the SVG rendered by resvg at [`PNG_SCALE`] pixels per unit.
pub fn pareto_png(names: &[String], curves: &[MethodCurve], title: &str) -> Result<Vec<u8>> {
    svg_to_png(&pareto_svg(names, curves, title), PNG_SCALE)
}

/// Rasterises an SVG document with the embedded font at `scale` pixels per SVG unit and encodes it as PNG.
fn svg_to_png(svg: &str, scale: f32) -> Result<Vec<u8>> {
    let bad = |msg: String| CageError::Format { what: "Pareto plot SVG".into(), msg };
    let opt = usvg::Options { font_family: FONT_FAMILY.into(), fontdb: FONTS.clone(), ..Default::default() };
    let tree = usvg::Tree::from_str(svg, &opt).map_err(|e| bad(e.to_string()))?;
    let size = tree.size().to_int_size().scale_by(scale).ok_or_else(|| bad("empty or too large".into()))?;
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).ok_or_else(|| bad("empty".into()))?;
    resvg::render(&tree, tiny_skia::Transform::from_scale(scale, scale), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| CageError::Io { context: "encoding the Pareto PNG".into(), source: e.into() })
}
