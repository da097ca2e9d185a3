//! `bench/chart.png`: per-packet cost as a multiple of the trivial XDP program (left), and CPU
//! per million flood packets by filter (right). Drawn with plotters' bitmap backend; text with
//! DejaVu Sans from Debian's `fonts-dejavu-core` (installed by `cargo xtask setup`).

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use serde_json::Value;

const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const COLORS: [RGBColor; 4] =
    [RGBColor(66, 133, 244), RGBColor(234, 67, 53), RGBColor(251, 188, 5), RGBColor(52, 168, 83)];

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn load_font() -> Result<()> {
    let bytes = std::fs::read(FONT_FILE)
        .with_context(|| format!("cannot read {FONT_FILE}: install fonts-dejavu-core (cargo xtask setup)"))?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| anyhow!("{FONT_FILE} is not a usable font"))
}

pub fn draw(results: &Value, path: &Path) -> Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, (1600, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("drawing: {e}"))?;
    let (left, right) = root.split_horizontally(1000);
    per_packet(results, &left).map_err(|e| anyhow!("drawing the per-packet chart: {e}"))?;
    flood(results, &right).map_err(|e| anyhow!("drawing the flood chart: {e}"))?;
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn per_packet(results: &Value, area: &Area<'_>) -> DrawResult {
    let rows: Vec<&Value> = results["per_packet"]["rows"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    if rows.is_empty() {
        return Ok(());
    }
    let mut groups: Vec<(String, String)> = Vec::new();
    let mut occupancies: Vec<f64> = Vec::new();
    for r in &rows {
        let g = (r["check"].as_str().unwrap_or("?").to_owned(), r["path"].as_str().unwrap_or("?").to_owned());
        if !groups.contains(&g) {
            groups.push(g);
        }
        let o = f(&r["occupancy"]);
        if !occupancies.contains(&o) {
            occupancies.push(o);
        }
    }
    let max = rows.iter().map(|r| f(&r["ratio"])).filter(|x| x.is_finite()).fold(1.0, f64::max) * 1.15;
    let n = groups.len();
    let per_group = occupancies.len() + 1;
    let mut chart = ChartBuilder::on(area)
        .caption("Per-packet cost, multiple of a trivial XDP program", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..(n * per_group) as i32, 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * per_group)
        .x_label_formatter(&|x| {
            let i = *x as usize;
            if i % per_group == occupancies.len() / 2 && i / per_group < n {
                let (c, p) = &groups[i / per_group];
                let short = match c.as_str() {
                    "allow hit" => "allow",
                    "deny hit" => "deny",
                    "per-port bucket" => "port",
                    "per-source bucket" => "source",
                    "per-(source, port) bucket" => "src+port",
                    other => other,
                };
                format!("{short} {p}")
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 14))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("× trivial XDP (CPU ns per run)")
        .label_style(("sans-serif", 15))
        .draw()?;
    for (k, occ) in occupancies.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let bars: Vec<Rectangle<(i32, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(g, (c, p))| {
                let r = rows
                    .iter()
                    .find(|r| r["check"] == c.as_str() && r["path"] == p.as_str() && f(&r["occupancy"]) == *occ)?;
                let x = (g * per_group + k) as i32;
                Some(Rectangle::new([(x, 0.0), (x + 1, f(&r["ratio"]))], color.filled()))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(format!("{} distinct sources", crate::bench::report::thousands(*occ)))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn flood(results: &Value, area: &Area<'_>) -> DrawResult {
    let rows: Vec<&Value> = results["flood"]["rows"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    if rows.is_empty() {
        return Ok(());
    }
    let max = rows.iter().map(|r| f(&r["cpu_ms_per_mpkt"])).filter(|x| x.is_finite()).fold(1.0, f64::max) * 1.2;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| match r["filter"].as_str().unwrap_or("?") {
            "none" => "no filter".to_owned(),
            "limiter" => "limiter native".to_owned(),
            "limiter_generic" => "limiter generic".to_owned(),
            "nftables" => "nftables meter".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    let mut chart = ChartBuilder::on(area)
        .caption("Veth flood: CPU ms per million packets", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0..(2 * rows.len()) as i32, 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * rows.len())
        .x_label_formatter(&|x| {
            let i = *x as usize;
            if i.is_multiple_of(2) { labels.get(i / 2).cloned().unwrap_or_default() } else { String::new() }
        })
        .x_label_style(("sans-serif", 14))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc("generator + softirq + receiver CPU ms / Mpkt")
        .label_style(("sans-serif", 15))
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let x = (2 * i) as i32;
        Rectangle::new([(x, 0.0), (x + 1, f(&r["cpu_ms_per_mpkt"]))], COLORS[i % COLORS.len()].filled())
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let v = f(&r["cpu_ms_per_mpkt"]);
        Text::new(format!("{v:.0}"), ((2 * i) as i32, v + max * 0.02), ("sans-serif", 15))
    }))?;
    Ok(())
}
