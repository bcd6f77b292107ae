//! Small, dependency-free SVG charts: bars, lines and labelled vertical
//! markers on linear or logarithmic axes. Every element carries a `class`
//! (`bar`, `line`, `marker`, `tick`, ...) so tests and stylesheets can find
//! it, and every number written is finite.

use std::fmt::Write as _;

/// Colors of successive series and markers.
pub const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One bar of a bar chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Category label under the bar.
    pub label: String,
    /// Height.
    pub value: f64,
    /// Fill color (CSS).
    pub color: String,
}

/// A polyline series.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// Points `(x, y)`.
    pub points: Vec<(f64, f64)>,
    /// Stroke color (CSS).
    pub color: String,
    /// Fill the area under the line (a histogram outline).
    pub filled: bool,
}

/// A vertical line at `x` with a label.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    /// Label beside the line.
    pub label: String,
    /// Position on the x axis.
    pub x: f64,
    /// Stroke color (CSS).
    pub color: String,
}

/// A chart: title, axis labels and what to draw.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Logarithmic y axis (values <= 0 are drawn at the bottom).
    pub log_y: bool,
    /// Bars, evenly spaced (a bar chart when non-empty; x is then the bar index).
    pub bars: Vec<Bar>,
    /// Error bars: the half-length of each bar's (`value ± e`), in the
    /// order of `bars`; none where empty, non-finite or not positive.
    pub errors: Vec<f64>,
    /// A horizontal reference line `(label, y)` across a bar chart.
    pub reference: Option<(String, f64)>,
    /// Lines.
    pub series: Vec<Series>,
    /// Vertical markers.
    pub markers: Vec<Marker>,
    /// Lower bound of the y axis (else from the data; 0 for bars).
    pub y_min: Option<f64>,
}

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 90.0;

/// Escapes text for XML content and attributes.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {}
            c => o.push(c),
        }
    }
    o
}

/// A finite number for an attribute (non-finite becomes 0).
fn num(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    format!("{v:.2}")
}

/// Short tick text: 3 significant digits, exponent form when needed.
pub fn tick_text(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// Up to about `n` round tick positions covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !lo.is_finite() || !hi.is_finite() || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..=n * 2 + 2)
        .map(|i| first + i as f64 * step)
        .take_while(|v| *v <= hi + step * 1e-9)
        .collect()
}

impl Chart {
    /// The chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let pw = WIDTH - LEFT - RIGHT;
        let ph = HEIGHT - TOP - BOTTOM;
        // Data ranges.
        let mut xs: Vec<f64> = Vec::new();
        let mut ys: Vec<f64> = Vec::new();
        for s in &self.series {
            for &(x, y) in &s.points {
                xs.push(x);
                ys.push(y);
            }
        }
        xs.extend(self.markers.iter().map(|m| m.x));
        ys.extend(self.bars.iter().map(|b| b.value));
        ys.extend(
            self.bars
                .iter()
                .zip(&self.errors)
                .filter(|(_, e)| e.is_finite() && **e > 0.0)
                .map(|(b, e)| b.value + e),
        );
        if let Some((_, y)) = &self.reference {
            ys.push(*y);
        }
        let finite =
            |v: &[f64]| -> Vec<f64> { v.iter().copied().filter(|x| x.is_finite()).collect() };
        let (xs, ys) = (finite(&xs), finite(&ys));
        let fold = |v: &[f64]| {
            v.iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
                    (l.min(x), h.max(x))
                })
        };
        let bar_chart = !self.bars.is_empty();
        let (mut x0, mut x1) = if bar_chart {
            (0.0, self.bars.len() as f64)
        } else {
            fold(&xs)
        };
        if x1.is_nan() || x0.is_nan() || x1 <= x0 {
            x0 = if x0.is_finite() { x0 - 1.0 } else { 0.0 };
            x1 = x0 + 2.0;
        }
        let (mut y0, mut y1) = fold(&ys);
        if self.log_y {
            let pos: Vec<f64> = ys.iter().copied().filter(|v| *v > 0.0).collect();
            let (lo, hi) = fold(&pos);
            let (lo, hi) = if lo.is_finite() {
                (lo, hi)
            } else {
                (1.0, 10.0)
            };
            y0 = lo.log10().floor();
            y1 = hi.log10().ceil().max(y0 + 1.0);
        } else {
            if bar_chart {
                y0 = y0.min(0.0);
            }
            if let Some(m) = self.y_min {
                y0 = m;
            }
            if !y0.is_finite() {
                y0 = 0.0;
            }
            if y1.is_nan() || y1 <= y0 {
                y1 = y0 + 1.0;
            }
            y1 += (y1 - y0) * 0.05;
        }
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| {
            let v = if self.log_y {
                if y > 0.0 {
                    y.log10()
                } else {
                    y0
                }
            } else {
                y
            };
            TOP + ph - ((v.clamp(y0, y1) - y0) / (y1 - y0)) * ph
        };

        let mut o = String::new();
        let _ = write!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#,
            w = WIDTH,
            h = HEIGHT
        );
        let _ = write!(
            o,
            r#"<rect class="background" x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = write!(
            o,
            r#"<text class="title" x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            num(WIDTH / 2.0),
            escape(&self.title)
        );
        // Axes.
        let _ = write!(
            o,
            r#"<line class="axis" x1="{l}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line class="axis" x1="{l}" y1="{t}" x2="{l}" y2="{b}" stroke="black"/>"#,
            l = num(LEFT),
            r = num(LEFT + pw),
            t = num(TOP),
            b = num(TOP + ph)
        );
        // Y ticks.
        let yt: Vec<f64> = if self.log_y {
            (y0 as i64..=y1 as i64).map(|e| e as f64).collect()
        } else {
            ticks(y0, y1, 5)
        };
        for t in yt {
            let (y, text) = if self.log_y {
                (sy(10f64.powf(t)), tick_text(10f64.powf(t)))
            } else {
                (sy(t), tick_text(t))
            };
            let _ = write!(
                o,
                r##"<line class="grid" x1="{l}" y1="{y}" x2="{r}" y2="{y}" stroke="#dddddd"/><text class="tick" x="{tx}" y="{ty}" text-anchor="end">{text}</text>"##,
                l = num(LEFT),
                r = num(LEFT + pw),
                y = num(y),
                tx = num(LEFT - 6.0),
                ty = num(y + 4.0),
                text = escape(&text)
            );
        }
        // X ticks (numeric charts).
        if !bar_chart {
            for t in ticks(x0, x1, 6) {
                let _ = write!(
                    o,
                    r#"<text class="tick" x="{x}" y="{y}" text-anchor="middle">{text}</text>"#,
                    x = num(sx(t)),
                    y = num(TOP + ph + 16.0),
                    text = escape(&tick_text(t))
                );
            }
        }
        // Bars.
        let slot = pw / self.bars.len().max(1) as f64;
        // Many bars: no value labels, and every k-th category label only.
        let crowded = self.bars.len() > 24;
        let label_every = self.bars.len().div_ceil(24).max(1);
        for (i, b) in self.bars.iter().enumerate() {
            let (top, base) = (sy(b.value), sy(y0.max(0.0).min(y1)));
            let (y, h) = if top < base {
                (top, base - top)
            } else {
                (base, top - base)
            };
            let x = LEFT + i as f64 * slot + slot * 0.15;
            let _ = write!(
                o,
                r#"<rect class="bar" x="{x}" y="{y}" width="{w}" height="{h}" fill="{c}"><title>{t}: {v}</title></rect>"#,
                x = num(x),
                y = num(y),
                w = num(slot * 0.7),
                h = num(h),
                c = escape(&b.color),
                t = escape(&b.label),
                v = escape(&tick_text(b.value))
            );
            let cx = LEFT + (i as f64 + 0.5) * slot;
            // The value label goes above the error bar, if any.
            let mut label_y = y;
            if let Some(&e) = self.errors.get(i).filter(|e| e.is_finite() && **e > 0.0) {
                let (hi, lo, cap) = (sy(b.value + e), sy(b.value - e), slot * 0.15);
                let _ = write!(
                    o,
                    r#"<path class="error" d="M{l} {hi}H{r}M{cx} {hi}V{lo}M{l} {lo}H{r}" stroke="black" fill="none"><title>± {t}</title></path>"#,
                    l = num(cx - cap),
                    r = num(cx + cap),
                    cx = num(cx),
                    hi = num(hi),
                    lo = num(lo),
                    t = escape(&tick_text(e))
                );
                label_y = label_y.min(hi);
            }
            let ly = TOP + ph + 14.0;
            if crowded && i % label_every != 0 {
                continue;
            }
            let _ = write!(
                o,
                r#"<text class="label" x="{x}" y="{y}" text-anchor="end" transform="rotate(-35 {x} {y})">{t}</text>"#,
                x = num(cx),
                y = num(ly),
                t = escape(&b.label)
            );
            if crowded {
                continue;
            }
            let _ = write!(
                o,
                r#"<text class="value" x="{x}" y="{y}" text-anchor="middle" font-size="10">{v}</text>"#,
                x = num(cx),
                y = num(label_y - 3.0),
                v = escape(&tick_text(b.value))
            );
        }
        if let Some((label, v)) = &self.reference {
            let y = sy(*v);
            let _ = write!(
                o,
                r#"<line class="reference" x1="{l}" y1="{y}" x2="{r}" y2="{y}" stroke="black" stroke-dasharray="6 3"/><text class="reference-label" x="{r}" y="{ty}" text-anchor="end">{t}</text>"#,
                l = num(LEFT),
                r = num(LEFT + pw),
                y = num(y),
                ty = num(y - 4.0),
                t = escape(label)
            );
        }
        // Series.
        for s in &self.series {
            let pts: Vec<String> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{},{}", num(sx(x)), num(sy(y))))
                .collect();
            if pts.is_empty() {
                continue;
            }
            if s.filled {
                let first = s
                    .points
                    .iter()
                    .find(|(x, _)| x.is_finite())
                    .map_or(x0, |p| p.0);
                let last = s
                    .points
                    .iter()
                    .rev()
                    .find(|(x, _)| x.is_finite())
                    .map_or(x1, |p| p.0);
                let base = num(TOP + ph);
                let _ = write!(
                    o,
                    r#"<polygon class="area" points="{},{base} {} {},{base}" fill="{c}" fill-opacity="0.35" stroke="none"/>"#,
                    num(sx(first)),
                    pts.join(" "),
                    num(sx(last)),
                    c = escape(&s.color)
                );
            }
            let _ = write!(
                o,
                r#"<polyline class="line" points="{}" fill="none" stroke="{c}" stroke-width="1.5"><title>{n}</title></polyline>"#,
                pts.join(" "),
                c = escape(&s.color),
                n = escape(&s.name)
            );
        }
        // Markers, labels staggered so close ones stay readable.
        for (i, m) in self.markers.iter().enumerate() {
            let x = sx(m.x);
            let _ = write!(
                o,
                r#"<line class="marker" x1="{x}" y1="{t}" x2="{x}" y2="{b}" stroke="{c}" stroke-width="2"><title>{l}</title></line><text class="marker-label" x="{tx}" y="{ty}" fill="{c}">{l}</text>"#,
                x = num(x),
                t = num(TOP),
                b = num(TOP + ph),
                c = escape(&m.color),
                l = escape(&m.label),
                tx = num((x + 4.0).min(WIDTH - 150.0)),
                ty = num(TOP + 14.0 + 14.0 * i as f64)
            );
        }
        // Axis labels.
        let _ = write!(
            o,
            r#"<text class="x-label" x="{x}" y="{y}" text-anchor="middle">{t}</text>"#,
            x = num(LEFT + pw / 2.0),
            y = num(HEIGHT - 8.0),
            t = escape(&self.x_label)
        );
        let _ = write!(
            o,
            r#"<text class="y-label" x="16" y="{y}" text-anchor="middle" transform="rotate(-90 16 {y})">{t}</text>"#,
            y = num(TOP + ph / 2.0),
            t = escape(&self.y_label)
        );
        o.push_str("</svg>\n");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(
            ticks(0.0, 1.0, 5),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        let t = ticks(3.0, 97.0, 5);
        assert!(
            t.first().unwrap() >= &3.0 && t.last().unwrap() <= &97.0 && t.len() >= 4,
            "{t:?}"
        );
        assert_eq!(ticks(1.0, 1.0, 5), vec![1.0]);
    }

    #[test]
    fn error_bars_are_drawn_where_given_and_fit_the_axis() {
        let bar = |v: f64| Bar {
            label: format!("b{v}"),
            value: v,
            color: PALETTE[0].into(),
        };
        let chart = Chart {
            bars: [1.0, 2.0, 3.0, 4.0].map(bar).to_vec(),
            errors: vec![0.5, f64::NAN, 0.0, 2.0],
            ..Default::default()
        };
        let svg = chart.to_svg();
        assert_eq!(svg.matches("class=\"error\"").count(), 2, "{svg}");
        assert!(svg.contains("<title>± 2</title>") && svg.contains("<title>± 0.5</title>"));
        assert!(!svg.contains("NaN"));
        // The axis reaches the top of the highest error bar (4 + 2).
        assert!(svg.contains(">6</text>"), "{svg}");
        let plain = Chart {
            errors: vec![],
            ..chart
        };
        let svg = plain.to_svg();
        assert_eq!(svg.matches("class=\"error\"").count(), 0);
        assert!(!svg.contains(">6</text>"), "{svg}");
    }

    #[test]
    fn text_is_escaped_and_numbers_are_short() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
        assert_eq!(tick_text(0.5), "0.5");
        assert_eq!(tick_text(92.43), "92.43");
        assert_eq!(tick_text(123.4), "123");
        assert_eq!(tick_text(12.5), "12.5");
        assert_eq!(tick_text(2e6), "2.0e6");
        assert_eq!(num(f64::NAN), "0.00");
    }
}
