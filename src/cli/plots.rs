//! SVG pictures of a routing profile (`moe-edge profile --plot DIR`), drawn with `plotters`:
//! - `usage.svg`: share of routed slots per layer (rows) and expert (columns), overall;
//! - `usage-by-label.svg`: the same per label, side by side on one colour scale;
//! - `locality.svg`: per layer, how often a token reuses the previous token's experts and how
//!   often the previous layer's hidden state predicts the layer's experts, against chance (k/E).

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use moe_edge_engine::{RoutingProfile, Usage};

/// Draws every picture into `dir` (created if needed); returns the files written.
pub fn draw_profile(profile: &RoutingProfile, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = vec![];
    let max_share = |u: &Usage| {
        u.layers
            .iter()
            .flat_map(|l| l.slot_share.iter().copied())
            .fold(0.0f64, f64::max)
    };

    let path = dir.join("usage.svg");
    let top = max_share(&profile.overall).max(1e-9);
    draw_svg(
        &path,
        (900, 140 + 36 * profile.layers.len() as u32),
        |root| {
            heatmap(
                root,
                &profile.overall,
                &format!(
                    "share of each layer's routed slots, all text ({} tokens; brightest {:.0}%)",
                    profile.overall.tokens,
                    100.0 * top
                ),
                top,
            )
        },
    )?;
    written.push(path);

    if !profile.labels.is_empty() {
        let path = dir.join("usage-by-label.svg");
        let top = profile
            .labels
            .iter()
            .map(|l| max_share(&l.usage))
            .fold(1e-9, f64::max);
        let n = profile.labels.len() as u32;
        draw_svg(
            &path,
            (360 * n.max(1), 140 + 36 * profile.layers.len() as u32),
            |root| {
                let (head, body) = root.split_vertically(30);
                head.titled(
                    &format!(
                        "share of each layer's routed slots by label (one colour scale, brightest {:.0}%)",
                        100.0 * top
                    ),
                    ("sans-serif", 18),
                )
                .map_err(plot_error)?;
                let panels = body.split_evenly((1, profile.labels.len()));
                for (panel, l) in panels.iter().zip(&profile.labels) {
                    heatmap(
                        panel,
                        &l.usage,
                        &format!("{} ({} tokens)", l.label, l.usage.tokens),
                        top,
                    )?;
                }
                Ok(())
            },
        )?;
        written.push(path);
    }

    let path = dir.join("locality.svg");
    draw_svg(&path, (800, 480), |root| locality(root, profile))?;
    written.push(path);
    Ok(written)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A named, coloured line of (x, y) points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

/// Renders into an SVG file under a temporary name, renamed into place once complete.
fn draw_svg(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Area<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(&root)?;
        root.present().map_err(plot_error)?;
    }
    let mut file = moe_edge_engine::PartialFile::create(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(file.writer(), svg.as_bytes())?;
    file.commit()
        .with_context(|| format!("writing {}", path.display()))
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}

/// Layers down, experts across; colour = share of the layer's routed slots, scaled to `top`.
fn heatmap(area: &Area<'_>, usage: &Usage, title: &str, top: f64) -> anyhow::Result<()> {
    let layers = usage.layers.len().max(1);
    let experts = usage.layers.first().map_or(1, |l| l.chosen.len()).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(
            (0..experts - 1).into_segmented(),
            (0..layers - 1).into_segmented(),
        )
        .map_err(plot_error)?;
    let layer_names: Vec<usize> = usage.layers.iter().map(|l| l.layer).collect();
    let centre = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => Some(*i),
        _ => None,
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert")
        .y_desc("layer")
        .x_labels(experts.min(32))
        .y_labels(layers)
        .x_label_formatter(&|x| centre(x).map_or(String::new(), |e| e.to_string()))
        .y_label_formatter(&|y| {
            centre(y)
                .and_then(|i| layer_names.get(i))
                .map_or(String::new(), |l| l.to_string())
        })
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(usage.layers.iter().enumerate().flat_map(|(row, l)| {
            l.slot_share.iter().enumerate().map(move |(e, &share)| {
                let colour = ViridisRGB::get_color_normalized(share / top, 0.0, 1.0);
                Rectangle::new(
                    [
                        (SegmentValue::Exact(e), SegmentValue::Exact(row)),
                        (SegmentValue::Exact(e + 1), SegmentValue::Exact(row + 1)),
                    ],
                    colour.filled(),
                )
            })
        }))
        .map_err(plot_error)?;
    Ok(())
}

/// Reuse and prediction rates per layer, with chance (k/E) for reference.
fn locality(area: &Area<'_>, profile: &RoutingProfile) -> anyhow::Result<()> {
    let layers = profile.overall.layers.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            "expert locality: next token reuse, next layer predicted from this one",
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(-0.25f64..(layers.max(2) as f64 - 0.75), 0f64..1f64)
        .map_err(plot_error)?;
    let layer_names: Vec<usize> = profile.layers.iter().map(|l| l.layer).collect();
    chart
        .configure_mesh()
        .x_labels(layers.max(2) + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() > 1e-6 || i < 0.0 {
                return String::new();
            }
            layer_names
                .get(i as usize)
                .map_or(String::new(), |l| l.to_string())
        })
        .x_desc("MoE layer")
        .y_desc("share of a token's experts")
        .draw()
        .map_err(plot_error)?;
    let points = |f: &dyn Fn(&moe_edge_engine::LayerUsage) -> Option<f64>| -> Vec<(f64, f64)> {
        profile
            .overall
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| f(l).map(|v| (i as f64, v)))
            .collect()
    };
    let series: [Series; 3] = [
        (
            "previous token chose it (reuse)",
            RGBColor(31, 119, 180),
            points(&|l| Some(l.reuse.rate)),
        ),
        (
            "layer's router on the previous layer's input (predicted)",
            RGBColor(214, 39, 40),
            points(&|l| l.predicted.map(|p| p.rate)),
        ),
        (
            "chance (top-k / experts)",
            RGBColor(127, 127, 127),
            points(&|l| {
                let k = profile
                    .layers
                    .iter()
                    .find(|s| s.layer == l.layer)
                    .map_or(0, |s| s.top_k);
                Some(k as f64 / l.chosen.len().max(1) as f64)
            }),
        ),
    ];
    for (name, colour, data) in series {
        chart
            .draw_series(LineSeries::new(data.clone(), colour.stroke_width(2)))
            .map_err(plot_error)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        chart
            .draw_series(data.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}
