//! The curve of BENCHMARKS.md: full sync time and one change's latency
//! against the number of objects, natgw and the baseline, drawn by
//! plotters into an SVG.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::combinators::IntoLogRange;
use plotters::prelude::*;

/// One scale: objects, and each side's figures in milliseconds.
#[derive(Clone, Debug)]
pub struct Point {
    pub objects: usize,
    pub natgw_full: f64,
    pub natgw_change: f64,
    pub baseline_full: Option<f64>,
    pub baseline_change: Option<f64>,
}

fn series(points: &[Point], pick: impl Fn(&Point) -> Option<f64>) -> Vec<(f64, f64)> {
    points.iter().filter_map(|p| pick(p).map(|v| (p.objects as f64, v.max(0.01)))).collect()
}

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    natgw: Vec<(f64, f64)>,
    baseline: Vec<(f64, f64)>,
) -> Result<()> {
    let all = natgw.iter().chain(&baseline);
    let (xmax, ymin, ymax) =
        all.fold((1.0f64, f64::MAX, 0.0f64), |(x, lo, hi), (px, py)| (x.max(*px), lo.min(*py), hi.max(*py)));
    let err = |e: DrawingAreaErrorKind<std::io::Error>| anyhow!("plot: {e}");
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((50.0..xmax * 1.5).log_scale(), (ymin / 2.0..ymax * 2.0).log_scale())
        .map_err(err)?;
    chart.configure_mesh().x_desc("objects").y_desc("milliseconds").draw().map_err(err)?;
    for (name, data, color) in [("natgw", natgw, BLUE), ("Kube-OVN baseline (iptables)", baseline, RED)] {
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(data.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Two panels side by side: full sync, one change.
pub fn draw(points: &[Point], machine: &str, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<std::io::Error>| anyhow!("plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(&format!("natgw-bench --curve ({machine})"), ("sans-serif", 14)).map_err(err)?;
    let (left, right) = root.split_horizontally(600);
    panel(
        &left,
        "full sync into an empty gateway",
        series(points, |p| Some(p.natgw_full)),
        series(points, |p| p.baseline_full),
    )?;
    panel(
        &right,
        "one change, to translation in force (p50)",
        series(points, |p| Some(p.natgw_change)),
        series(points, |p| p.baseline_change),
    )?;
    root.present().map_err(err)?;
    Ok(())
}
