//! SVG charts of the benchmark results (issue 7).
//!
//! Independent of the result structs: the caller turns its results into a
//! [`BarChart`] (grouped bars of a median with a min–max whisker and an
//! optional baseline, for ratios) or a [`LatencyChart`] (cumulative
//! distributions of latency samples), and [`write_svg`] / [`write_latency_svg`]
//! render them with plotters' SVG backend. Text stays `<text>` in the SVG, so
//! it is selectable and sized for reading at 100 %.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One bar: the value it shows and the ends of its whisker.
#[derive(Clone, Debug)]
pub struct Bar {
    /// Series name: bars with the same label share a colour and one legend entry.
    pub label: String,
    /// The height of the bar, printed on top of it.
    pub median: f64,
    /// Whisker ends (e.g. the min and max over rounds); NaN for no whisker.
    pub min: f64,
    pub max: f64,
}

impl Bar {
    pub fn new(label: impl Into<String>, median: f64, min: f64, max: f64) -> Self {
        Bar {
            label: label.into(),
            median,
            min,
            max,
        }
    }

    /// A bar of `median` whose whisker spans the finite `values` (e.g. the per-round ratios
    /// the median was taken over).
    pub fn with_range(label: impl Into<String>, median: f64, values: &[f64]) -> Self {
        let (min, max) = values
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold((f64::NAN, f64::NAN), |(lo, hi), v| (v.min(lo), v.max(hi)));
        Bar::new(label, median, min, max)
    }
}

/// Bars side by side above one label on the x axis.
#[derive(Clone, Debug)]
pub struct Group {
    pub label: String,
    pub bars: Vec<Bar>,
}

impl Group {
    pub fn new(label: impl Into<String>, bars: Vec<Bar>) -> Self {
        Group {
            label: label.into(),
            bars,
        }
    }
}

/// A horizontal dashed line across the chart, named in the legend.
#[derive(Clone, Debug)]
pub struct Reference {
    pub value: f64,
    /// E.g. "pod IP (direct) = 1".
    pub label: String,
}

#[derive(Clone, Debug)]
pub struct BarChart {
    pub title: String,
    /// One line under the title, e.g. what the bars and whiskers are.
    pub subtitle: Option<String>,
    pub y_label: String,
    /// Decimals of the value printed above each bar.
    pub decimals: usize,
    pub groups: Vec<Group>,
    pub reference: Option<Reference>,
}

/// One distribution of a [`LatencyChart`].
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub samples_us: Vec<f64>,
}

impl Series {
    pub fn new(label: impl Into<String>, samples_us: &[f64]) -> Self {
        Series {
            label: label.into(),
            samples_us: samples_us.to_vec(),
        }
    }
}

/// Cumulative distributions of latency samples, one line per series, with
/// each series' p50, p99 and sample count in the legend. The unit (µs, ms or
/// s) follows the samples; the x axis turns logarithmic when the samples
/// span more than 30× (e.g. 1 vs 1,000 Services).
#[derive(Clone, Debug)]
pub struct LatencyChart {
    pub title: String,
    pub subtitle: Option<String>,
    /// E.g. "% of changes at or below".
    pub y_label: String,
    pub series: Vec<Series>,
}

const FONT: &str = "sans-serif";
// plotters' SVG backend writes font-size = size / 1.24: these are 19, 13 and 12 px.
const TITLE_SIZE: f64 = 24.0;
const TEXT_SIZE: f64 = 16.0;
const SMALL_SIZE: f64 = 15.0;
/// Rough width of a character at TEXT_SIZE, for laying out the legend.
const CHAR_PX: f64 = 7.4;
const HEIGHT: u32 = 500;
/// Tableau 10: distinguishable, and still apart when printed in grey.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x1F, 0x77, 0xB4),
    RGBColor(0xFF, 0x7F, 0x0E),
    RGBColor(0x2C, 0xA0, 0x2C),
    RGBColor(0xD6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xBD),
    RGBColor(0x8C, 0x56, 0x4B),
    RGBColor(0xE3, 0x77, 0xC2),
    RGBColor(0x7F, 0x7F, 0x7F),
    RGBColor(0xBC, 0xBD, 0x22),
    RGBColor(0x17, 0xBE, 0xCF),
];
const INK: RGBColor = RGBColor(0x22, 0x22, 0x22);
const REFERENCE: RGBColor = RGBColor(0xC0, 0x00, 0x00);
const GRID: RGBColor = RGBColor(0xE4, 0xE4, 0xE4);

fn colour(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

fn text(size: f64, h: HPos, v: VPos) -> TextStyle<'static> {
    (FONT, size).into_font().color(&INK).pos(Pos::new(h, v))
}

/// Writes `chart` as an SVG file.
pub fn write_svg(chart: &BarChart, path: &Path) -> Result<()> {
    let svg = render_svg(chart)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// Writes `chart` as an SVG file.
pub fn write_latency_svg(chart: &LatencyChart, path: &Path) -> Result<()> {
    let svg = render_latency_svg(chart)?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// Series names in order of first appearance.
fn series_labels(chart: &BarChart) -> Vec<String> {
    let mut seen = BTreeSet::new();
    chart
        .groups
        .iter()
        .flat_map(|g| &g.bars)
        .filter(|b| seen.insert(b.label.as_str()))
        .map(|b| b.label.clone())
        .collect()
}

/// The SVG text of `chart`.
pub fn render_svg(chart: &BarChart) -> Result<String> {
    let labels = series_labels(chart);
    let colour_of = |label: &str| colour(labels.iter().position(|l| l == label).unwrap_or(0));
    let bar_count: usize = chart.groups.iter().map(|g| g.bars.len()).sum();
    let width = (180 + 95 * bar_count + 40 * chart.groups.len()).max(720) as u32;

    let mut legend: Vec<LegendEntry> = labels
        .iter()
        .map(|l| LegendEntry {
            mark: Mark::Swatch,
            colour: colour_of(l),
            label: l.clone(),
        })
        .collect();
    if let Some(r) = chart.reference.as_ref().filter(|r| r.value.is_finite()) {
        legend.push(LegendEntry {
            mark: Mark::Dashed,
            colour: REFERENCE,
            label: r.label.clone(),
        });
    }

    // Room above the highest whisker or bar for its value.
    let top = chart
        .groups
        .iter()
        .flat_map(|g| &g.bars)
        .flat_map(|b| [b.median, b.max])
        .chain(chart.reference.as_ref().map(|r| r.value))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let y_top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let y_bottom = chart
        .groups
        .iter()
        .flat_map(|g| &g.bars)
        .flat_map(|b| [b.median, b.min])
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::min);

    let groups = chart.groups.len().max(1);
    let centres: Vec<f64> = (0..groups).map(|i| i as f64 + 0.5).collect();
    let group_label = |x: &f64| {
        let i = (x - 0.5).round();
        if i >= 0.0 {
            chart
                .groups
                .get(i as usize)
                .map(|g| g.label.clone())
                .unwrap_or_default()
        } else {
            String::new()
        }
    };

    let mut svg = String::new();
    {
        let (root, legend_area) = frame(
            &mut svg,
            width,
            &chart.title,
            chart.subtitle.as_deref(),
            &legend,
        )?;
        let mut plot = ChartBuilder::on(&root)
            .margin_left(10)
            .margin_right(25)
            .margin_top(10)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(
                Axis {
                    lo: 0.0,
                    hi: groups as f64,
                    ticks: centres,
                },
                y_bottom..y_top,
            )?;
        plot.configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&group_label)
            .y_label_formatter(&|v| tick(*v))
            .y_desc(chart.y_label.as_str())
            .label_style(text(TEXT_SIZE, HPos::Center, VPos::Center))
            .x_label_style(text(TEXT_SIZE, HPos::Center, VPos::Top))
            .axis_desc_style((FONT, TEXT_SIZE).into_font().color(&INK))
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .axis_style(INK)
            .draw()?;

        let mut values = Vec::new();
        for (gi, group) in chart.groups.iter().enumerate() {
            let slot = 0.8 / group.bars.len().max(1) as f64;
            for (bi, bar) in group.bars.iter().enumerate() {
                let x0 = gi as f64 + 0.1 + slot * bi as f64;
                let (left, right, mid) = (x0 + slot * 0.08, x0 + slot * 0.92, x0 + slot / 2.0);
                let c = colour_of(&bar.label);
                if !bar.median.is_finite() {
                    plot.draw_series(std::iter::once(
                        EmptyElement::at((mid, 0.0))
                            + Text::new(
                                "n/a",
                                (0, -4),
                                text(SMALL_SIZE, HPos::Center, VPos::Bottom),
                            ),
                    ))?;
                    continue;
                }
                let base = 0.0_f64.max(y_bottom);
                plot.draw_series(std::iter::once(Rectangle::new(
                    [(left, base), (right, bar.median)],
                    c.filled(),
                )))?;
                let whisker = bar.min.is_finite() && bar.max.is_finite();
                if whisker {
                    let cap = slot * 0.15;
                    let style = INK.stroke_width(2);
                    plot.draw_series([
                        PathElement::new(vec![(mid, bar.min), (mid, bar.max)], style),
                        PathElement::new(vec![(mid - cap, bar.min), (mid + cap, bar.min)], style),
                        PathElement::new(vec![(mid - cap, bar.max), (mid + cap, bar.max)], style),
                    ])?;
                }
                let label_at = if whisker {
                    bar.median.max(bar.max)
                } else {
                    bar.median
                };
                values.push((mid, label_at, format!("{:.*}", chart.decimals, bar.median)));
            }
        }
        if let Some(r) = chart.reference.as_ref().filter(|r| r.value.is_finite()) {
            plot.draw_series(std::iter::once(DashedPathElement::new(
                vec![(0.0, r.value), (groups as f64, r.value)],
                8,
                5,
                REFERENCE.stroke_width(2),
            )))?;
        }
        // Values last, over the baseline.
        plot.draw_series(values.into_iter().map(|(x, y, value)| {
            EmptyElement::at((x, y))
                + Text::new(value, (0, -5), text(SMALL_SIZE, HPos::Center, VPos::Bottom))
        }))?;
        draw_legend(&legend_area, &legend)?;
        root.present()?;
    }
    Ok(svg)
}

/// The SVG text of `chart`.
pub fn render_latency_svg(chart: &LatencyChart) -> Result<String> {
    let all: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| &s.samples_us)
        .copied()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .collect();
    let unit = Unit::for_samples(&all);
    let positive = all.iter().copied().filter(|v| *v > 0.0);
    let (lo, hi) = positive.fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let log = lo.is_finite() && hi / lo > 30.0;

    // x in the chart's unit, or its log10 on a log axis.
    let to_x = |us: f64| {
        let v = us / unit.divisor();
        if log { v.log10() } else { v }
    };
    let (x_lo, x_hi) = if !lo.is_finite() {
        (0.0, 1.0)
    } else if log {
        let d = unit.divisor();
        (nice_below(lo / d).log10(), nice_above(hi / d).log10())
    } else {
        let (min, max) = all
            .iter()
            .fold((f64::INFINITY, 0.0_f64), |(a, b), v| (a.min(*v), b.max(*v)));
        let (min, max) = (to_x(min), to_x(max));
        let pad = ((max - min) * 0.05).max(max * 0.01).max(1e-9);
        ((min - pad).max(0.0), max + pad)
    };
    let log_ticks: Vec<f64> = if log {
        (x_lo.floor() as i32..=x_hi.ceil() as i32)
            .flat_map(|e| [1.0, 2.0, 5.0].map(|m| (m * 10f64.powi(e)).log10()))
            .filter(|x| *x >= x_lo - 1e-9 && *x <= x_hi + 1e-9)
            .collect()
    } else {
        Vec::new()
    };

    let legend: Vec<LegendEntry> = chart
        .series
        .iter()
        .enumerate()
        .map(|(i, s)| LegendEntry {
            mark: Mark::Line,
            colour: colour(i),
            label: series_legend(s, unit),
        })
        .collect();

    let width = 900;
    let mut svg = String::new();
    {
        let (root, legend_area) = frame(
            &mut svg,
            width,
            &chart.title,
            chart.subtitle.as_deref(),
            &legend,
        )?;
        let mut plot = ChartBuilder::on(&root)
            .margin_left(10)
            .margin_right(30)
            .margin_top(10)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                Axis {
                    lo: x_lo,
                    hi: x_hi,
                    ticks: if log {
                        log_ticks
                    } else {
                        linear_ticks(x_lo, x_hi, 10)
                    },
                },
                0.0..100.0,
            )?;
        let x_tick = |x: &f64| tick(if log { 10f64.powf(*x) } else { *x });
        let x_desc = format!(
            "latency ({}{})",
            unit.name(),
            if log { ", log scale" } else { "" }
        );
        plot.configure_mesh()
            .x_label_formatter(&x_tick)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_labels(11)
            .x_desc(x_desc)
            .y_desc(chart.y_label.as_str())
            .label_style(text(TEXT_SIZE, HPos::Center, VPos::Center))
            .x_label_style(text(TEXT_SIZE, HPos::Center, VPos::Top))
            .axis_desc_style((FONT, TEXT_SIZE).into_font().color(&INK))
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .axis_style(INK)
            .draw()?;
        for (i, s) in chart.series.iter().enumerate() {
            let samples: Vec<f64> = s
                .samples_us
                .iter()
                .copied()
                .filter(|v| v.is_finite() && (*v > 0.0 || (!log && *v >= 0.0)))
                .collect();
            if samples.is_empty() {
                continue;
            }
            let points = cdf_points(&samples, 1000)
                .into_iter()
                .map(|(us, pct)| (to_x(us), pct));
            plot.draw_series(LineSeries::new(points, colour(i).stroke_width(2)))?;
        }
        draw_legend(&legend_area, &legend)?;
        root.present()?;
    }
    Ok(svg)
}

/// A linear f64 axis with the ticks given (plotters' `with_key_points` loses the
/// formatting of f64 axes that `configure_mesh` needs).
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = self.hi - self.lo;
        let t = if span > 0.0 {
            (value - self.lo) / span
        } else {
            0.0
        };
        limit.0 + (f64::from(limit.1 - limit.0) * t).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, _hint: H) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Lays out the page: background, title and subtitle, the legend's strip at
/// the bottom. Returns the plot's area and the legend's.
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn frame<'a>(
    svg: &'a mut String,
    width: u32,
    title: &str,
    subtitle: Option<&str>,
    legend: &[LegendEntry],
) -> Result<(Area<'a>, Area<'a>)> {
    let rows = legend_rows(legend, width).len() as u32;
    let legend_height = 16 + 24 * rows;
    let root = SVGBackend::with_string(svg, (width, HEIGHT + legend_height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut area = root.titled(title, (FONT, TITLE_SIZE).into_font().color(&INK))?;
    if let Some(subtitle) = subtitle {
        area = area.titled(subtitle, (FONT, SMALL_SIZE).into_font().color(&INK))?;
    }
    let (_, h) = area.dim_in_pixel();
    Ok(area.split_vertically(h.saturating_sub(legend_height)))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mark {
    Swatch,
    Line,
    Dashed,
}

struct LegendEntry {
    mark: Mark,
    colour: RGBColor,
    label: String,
}

const LEGEND_LEFT: i32 = 90;
const MARK_PX: i32 = 28;

fn entry_px(e: &LegendEntry) -> i32 {
    MARK_PX + 8 + (e.label.chars().count() as f64 * CHAR_PX) as i32 + 28
}

/// Entries per row, wrapping at the chart's width.
fn legend_rows(legend: &[LegendEntry], width: u32) -> Vec<Vec<&LegendEntry>> {
    let mut rows: Vec<Vec<&LegendEntry>> = Vec::new();
    let mut x = i32::MAX;
    for e in legend {
        let w = entry_px(e);
        if x.saturating_add(w) > width as i32 - 10 {
            rows.push(Vec::new());
            x = LEGEND_LEFT;
        }
        rows.last_mut().expect("a row was pushed").push(e);
        x += w;
    }
    rows
}

fn draw_legend(area: &Area<'_>, legend: &[LegendEntry]) -> Result<()> {
    let (width, _) = area.dim_in_pixel();
    for (row, entries) in legend_rows(legend, width).into_iter().enumerate() {
        let y = 8 + 24 * row as i32 + 10;
        let mut x = LEGEND_LEFT;
        for e in entries {
            match e.mark {
                Mark::Swatch => area.draw(&Rectangle::new(
                    [(x + 6, y - 8), (x + MARK_PX - 6, y + 8)],
                    e.colour.filled(),
                ))?,
                Mark::Line => area.draw(&PathElement::new(
                    vec![(x, y), (x + MARK_PX, y)],
                    e.colour.stroke_width(3),
                ))?,
                Mark::Dashed => area.draw(&DashedPathElement::new(
                    vec![(x, y), (x + MARK_PX, y)],
                    8,
                    4,
                    e.colour.stroke_width(2),
                ))?,
            }
            area.draw(&Text::new(
                e.label.clone(),
                (x + MARK_PX + 8, y),
                text(TEXT_SIZE, HPos::Left, VPos::Center),
            ))?;
            x += entry_px(e);
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Unit {
    Us,
    Ms,
    S,
}

impl Unit {
    /// The unit the median sample reads best in.
    fn for_samples(samples_us: &[f64]) -> Unit {
        let mut sorted = samples_us.to_vec();
        sorted.sort_by(f64::total_cmp);
        match sorted.get(sorted.len() / 2) {
            Some(m) if *m >= 1e6 => Unit::S,
            Some(m) if *m >= 1e3 => Unit::Ms,
            _ => Unit::Us,
        }
    }

    fn divisor(self) -> f64 {
        match self {
            Unit::Us => 1.0,
            Unit::Ms => 1e3,
            Unit::S => 1e6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Us => "µs",
            Unit::Ms => "ms",
            Unit::S => "s",
        }
    }
}

/// Nearest-rank percentile, as in stats.rs.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn series_legend(s: &Series, unit: Unit) -> String {
    let mut sorted: Vec<f64> = s
        .samples_us
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    if sorted.is_empty() {
        return format!("{} (no samples)", s.label);
    }
    sorted.sort_by(f64::total_cmp);
    let at = |p| tick(percentile(&sorted, p) / unit.divisor());
    format!(
        "{}: p50 {} {u}, p99 {} {u} (n = {})",
        s.label,
        at(50.0),
        at(99.0),
        sorted.len(),
        u = unit.name()
    )
}

/// The empirical CDF as (sample, % of samples at or below it), a step per
/// sample, or `max_points` evenly spaced quantiles when there are more.
fn cdf_points(samples: &[f64], max_points: usize) -> Vec<(f64, f64)> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let mut points = vec![(sorted[0], 0.0)];
    if n <= max_points {
        for (i, v) in sorted.iter().enumerate() {
            points.push((*v, 100.0 * i as f64 / n as f64));
            points.push((*v, 100.0 * (i + 1) as f64 / n as f64));
        }
    } else {
        for k in 1..=max_points {
            let p = 100.0 * k as f64 / max_points as f64;
            points.push((percentile(&sorted, p), p));
        }
    }
    points
}

/// The largest 1, 2 or 5 × 10ⁿ at or below `v` (> 0).
fn nice_below(v: f64) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    [5.0, 2.0, 1.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|x| *x <= v * (1.0 + 1e-9))
        .unwrap_or(decade / 2.0)
}

/// The smallest 1, 2 or 5 × 10ⁿ at or above `v` (> 0).
fn nice_above(v: f64) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|x| *x >= v * (1.0 - 1e-9))
        .unwrap_or(decade * 10.0)
}

/// About `count` round tick positions covering `lo..=hi`.
fn linear_ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 {
        return vec![lo];
    }
    let raw = span / count.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A tick label: up to three significant decimals, without trailing zeros.
fn tick(v: f64) -> String {
    let s = if v.abs() >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that tags nest and close, attributes are quoted and text has
    /// no bare `<` or `&` (enough for what plotters writes).
    fn assert_well_formed(svg: &str) {
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = svg;
        let mut roots = 0;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            assert!(
                text.split('&').skip(1).all(|e| {
                    ["lt;", "gt;", "amp;", "quot;", "apos;"]
                        .iter()
                        .any(|x| e.starts_with(x))
                }),
                "bare & in {text:?}"
            );
            let close = rest[open..].find('>').expect("unclosed tag") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "< inside tag {tag:?}");
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in {tag:?}"
            );
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name.trim()), "mismatched </{name}>");
            } else if !tag.starts_with('?') && !tag.starts_with('!') {
                let name = tag.split_whitespace().next().expect("tag name");
                let name = name.trim_end_matches('/');
                if stack.is_empty() {
                    roots += 1;
                }
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
        assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
        assert_eq!(roots, 1);
        assert!(svg.trim_start().starts_with("<svg"));
    }

    /// `<rect` elements filled with `c`.
    fn rects_of(svg: &str, c: RGBColor) -> usize {
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
        svg.lines()
            .filter(|l| l.starts_with("<rect") && l.contains(&fill))
            .count()
    }

    fn east_west() -> BarChart {
        BarChart {
            title: "East–west: p50 latency ÷ direct path".into(),
            subtitle: Some("bars: median over 10 rounds; whiskers: min–max".into()),
            y_label: "p50 ÷ pod IP (direct)".into(),
            decimals: 3,
            groups: vec![
                Group::new(
                    "1 Service",
                    vec![
                        Bar::with_range("Sluice (socket LB)", 0.981, &[0.95, 0.981, 1.01]),
                        Bar::new("kube-proxy iptables rules", 1.052, 1.03, 1.08),
                        Bar::new("kube-proxy nftables rules", 1.047, 1.02, 1.07),
                    ],
                ),
                Group::new(
                    "1,000 Services",
                    vec![
                        Bar::new("Sluice (socket LB)", 0.990, 0.96, 1.02),
                        Bar::new("kube-proxy iptables rules", 1.734, 1.61, 1.80),
                        Bar::new("kube-proxy nftables rules", 1.061, 1.04, 1.09),
                    ],
                ),
            ],
            reference: Some(Reference {
                value: 1.0,
                label: "pod IP (direct) = 1".into(),
            }),
        }
    }

    #[test]
    fn bar_chart_is_svg_with_text_and_a_rect_per_bar() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("east_west.svg");
        let chart = east_west();
        write_svg(&chart, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_well_formed(&svg);
        for needle in [
            "East–west: p50 latency ÷ direct path",
            "bars: median over 10 rounds; whiskers: min–max",
            "p50 ÷ pod IP (direct)",
            "1 Service",
            "1,000 Services",
            "Sluice (socket LB)",
            "kube-proxy iptables rules",
            "kube-proxy nftables rules",
            "pod IP (direct) = 1",
            ">\n0.981\n<",
            ">\n1.734\n<",
        ] {
            assert!(svg.contains(needle), "{needle:?} missing");
        }
        // Each series: one rect per group, and its legend swatch.
        for i in 0..3 {
            assert_eq!(rects_of(&svg, colour(i)), 2 + 1, "series {i}");
        }
        // Whiskers: three lines per bar, in the ink colour.
        let ink = "stroke=\"#222222\"";
        let whiskers = svg
            .lines()
            .filter(|l| {
                l.starts_with("<polyline") && l.contains(ink) && l.contains("stroke-width=\"2\"")
            })
            .count();
        assert_eq!(whiskers, 6 * 3);
    }

    #[test]
    fn bar_chart_escapes_text_and_survives_missing_values() {
        let chart = BarChart {
            title: "a < b & c".into(),
            subtitle: None,
            y_label: "rate ÷ 0 policies".into(),
            decimals: 2,
            groups: vec![Group::new(
                "1,000 policies",
                vec![
                    Bar::new("measured", f64::NAN, f64::NAN, f64::NAN),
                    Bar::with_range("no whisker", 0.97, &[]),
                ],
            )],
            reference: None,
        };
        let svg = render_svg(&chart).unwrap();
        assert_well_formed(&svg);
        assert!(svg.contains("a &lt; b &amp; c"));
        assert!(svg.contains(">\nn/a\n<"));
        assert!(svg.contains(">\n0.97\n<"));
        assert_eq!(
            rects_of(&svg, colour(0)),
            1,
            "no bar for NaN, only the swatch"
        );
        assert_eq!(rects_of(&svg, colour(1)), 2);
        let empty = BarChart {
            groups: Vec::new(),
            ..chart
        };
        assert_well_formed(&render_svg(&empty).unwrap());
    }

    #[test]
    fn latency_chart_draws_a_line_per_series_with_percentiles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enforcement.svg");
        let fast: Vec<f64> = (1..=50).map(|i| 10_000.0 + 200.0 * f64::from(i)).collect();
        let slow: Vec<f64> = (1..=5000).map(|i| 15_000.0 + 4.0 * f64::from(i)).collect();
        let chart = LatencyChart {
            title: "NetworkPolicy change → enforcement".into(),
            subtitle: None,
            y_label: "% of changes at or below".into(),
            series: vec![
                Series::new("default-deny written", &fast),
                Series::new("the allowing policy removed", &slow),
                Series::new("never measured", &[]),
            ],
        };
        write_latency_svg(&chart, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_well_formed(&svg);
        for needle in [
            "NetworkPolicy change → enforcement",
            "% of changes at or below",
            "latency (ms)",
            "default-deny written: p50 15 ms, p99 20 ms (n = 50)",
            "the allowing policy removed: p50 25 ms, p99 34.8 ms (n = 5000)",
            "never measured (no samples)",
        ] {
            assert!(svg.contains(needle), "{needle:?} missing");
        }
        let lines_of = |c: RGBColor| {
            let stroke = format!("stroke=\"#{:02X}{:02X}{:02X}\"", c.0, c.1, c.2);
            svg.lines()
                .filter(|l| l.starts_with("<polyline") && l.contains(&stroke))
                .count()
        };
        // The curve and the legend's line.
        assert_eq!(lines_of(colour(0)), 2);
        assert_eq!(lines_of(colour(1)), 2);
        assert_eq!(lines_of(colour(2)), 1, "legend only");
    }

    #[test]
    fn latency_chart_goes_logarithmic_over_a_wide_spread() {
        let one: Vec<f64> = (1..=100).map(|i| 500.0 + f64::from(i)).collect();
        let thousand: Vec<f64> = (1..=100).map(|i| 80_000.0 + 100.0 * f64::from(i)).collect();
        let chart = LatencyChart {
            title: "Programming latency".into(),
            subtitle: None,
            y_label: "% of changes at or below".into(),
            series: vec![
                Series::new("1 Service", &one),
                Series::new("1,000 Services", &thousand),
            ],
        };
        let svg = render_latency_svg(&chart).unwrap();
        assert_well_formed(&svg);
        assert!(svg.contains("latency (ms, log scale)"));
        for tick in [">\n0.5\n<", ">\n1\n<", ">\n10\n<", ">\n100\n<"] {
            assert!(svg.contains(tick), "tick {tick:?} missing");
        }
        let empty = LatencyChart {
            series: Vec::new(),
            ..chart
        };
        assert_well_formed(&render_latency_svg(&empty).unwrap());
    }

    #[test]
    fn cdf_steps_or_quantiles_end_at_100() {
        let small = cdf_points(&[3.0, 1.0, 2.0], 1000);
        assert_eq!(small.first(), Some(&(1.0, 0.0)));
        assert_eq!(small.last(), Some(&(3.0, 100.0)));
        assert_eq!(small.len(), 1 + 2 * 3);
        let many: Vec<f64> = (0..10_000).map(f64::from).collect();
        let big = cdf_points(&many, 1000);
        assert_eq!(big.len(), 1001);
        assert_eq!(big.last(), Some(&(9999.0, 100.0)));
        assert!(big.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert!(cdf_points(&[], 10).is_empty());
    }

    #[test]
    fn ticks_read_cleanly() {
        assert_eq!(
            [0.0, 0.5, 1.0, 1.25, 12.5, 150.0, 0.0126].map(tick),
            ["0", "0.5", "1", "1.25", "12.5", "150", "0.013"]
        );
        let ticks = linear_ticks(0.0, 1.0, 10);
        assert_eq!(ticks.len(), 11);
        assert!(
            ticks
                .iter()
                .enumerate()
                .all(|(i, t)| (t - i as f64 * 0.1).abs() < 1e-9)
        );
        assert_eq!(linear_ticks(3.0, 3.0, 10), [3.0]);
        assert_eq!(linear_ticks(2.0, 19.0, 8).first(), Some(&2.5));
    }
}
