//! Draws a timed schedule as an SVG picture in the style of the report's DualPipe figure: one
//! row per rank, time to the right, one box per action coloured by kind (F, B, W) and labelled
//! with its chunk id; a full backward `BW` is a box split into its `B` and `W` shares; an
//! overlapped F&B pair is a box split into its forward (top) and backward
//! (bottom) halves labelled `f|b`. For DualPipe, chunks fed from the last rank are drawn in a
//! darker shade, as in the figure.

use std::fmt::Write;

use super::{Action, Costs, Kind, Schedule, Timeline};

const LEFT: f64 = 64.0;
const TOP: f64 = 28.0;
const ROW: f64 = 26.0;
const GAP: f64 = 4.0;
const WIDTH: f64 = 1400.0;

fn colour(op: char, dark: bool) -> &'static str {
    match (op, dark) {
        ('F', false) => "#f6b26b",
        ('F', true) => "#e69138",
        ('B', false) => "#93c47d",
        ('B', true) => "#6aa84f",
        (_, false) => "#6fa8dc",
        (_, true) => "#3d85c6",
    }
}

/// The picture of `schedule` timed by `timeline` (from [`super::simulate`] on it with `costs`).
pub fn render(schedule: &Schedule, timeline: &Timeline, costs: &Costs) -> String {
    let scale = if timeline.makespan > 0.0 {
        WIDTH / timeline.makespan
    } else {
        1.0
    };
    let rows = schedule.pp as f64;
    let height = TOP + rows * (ROW + GAP) + 40.0;
    let dark = |chunk: usize| schedule.kind == Kind::DualPipe && chunk >= schedule.chunks / 2;
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="10">"#,
        w = LEFT + WIDTH + 16.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="16" font-size="13">{} — pp={}, chunks={}, makespan={:.3}</text>"#,
        schedule.kind, schedule.pp, schedule.chunks, timeline.makespan
    );
    for (r, acts) in schedule.ranks.iter().enumerate() {
        let y = TOP + r as f64 * (ROW + GAP);
        let _ = writeln!(
            s,
            r#"<text x="4" y="{:.1}">rank {r}</text>"#,
            y + ROW / 2.0 + 4.0
        );
        for (a, span) in acts.iter().zip(&timeline.spans[r]) {
            let x = LEFT + span.start * scale;
            let w = ((span.end - span.start) * scale).max(0.5);
            match *a {
                Action::FB { f, b } => {
                    let half = ROW / 2.0;
                    rect(&mut s, x, y, w, half, colour('F', dark(f.0)));
                    rect(&mut s, x, y + half, w, half, colour('B', dark(b.0)));
                }
                Action::F { chunk, .. } => rect(&mut s, x, y, w, ROW, colour('F', dark(chunk))),
                Action::B { chunk, .. } => rect(&mut s, x, y, w, ROW, colour('B', dark(chunk))),
                Action::W { chunk, .. } => rect(&mut s, x, y, w, ROW, colour('W', dark(chunk))),
                Action::BW { chunk, .. } => {
                    // B's share of the box, then W's.
                    let full = costs.b + costs.w;
                    let wb = if full > 0.0 { w * costs.b / full } else { w };
                    rect(&mut s, x, y, wb, ROW, colour('B', dark(chunk)));
                    rect(&mut s, x + wb, y, w - wb, ROW, colour('W', dark(chunk)));
                }
            }
            let label = match *a {
                Action::FB { .. } => a.label(),
                Action::F { chunk, .. }
                | Action::B { chunk, .. }
                | Action::W { chunk, .. }
                | Action::BW { chunk, .. } => chunk.to_string(),
            };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                x + w / 2.0,
                y + ROW / 2.0 + 4.0
            );
        }
    }
    let ly = TOP + rows * (ROW + GAP) + 14.0;
    let legend = [
        ('F', "forward"),
        ('B', "backward for input"),
        ('W', "backward for weights"),
    ];
    for (i, (op, name)) in legend.iter().enumerate() {
        let x = LEFT + i as f64 * 200.0;
        rect(&mut s, x, ly - 10.0, 14.0, 12.0, colour(*op, false));
        let _ = writeln!(s, r#"<text x="{:.1}" y="{ly:.1}">{name}</text>"#, x + 18.0);
    }
    let x = LEFT + 600.0;
    let _ = writeln!(
        s,
        r#"<text x="{x:.1}" y="{ly:.1}">split box f|b: overlapped forward (top) and backward (bottom)</text>"#
    );
    s.push_str("</svg>\n");
    s
}

fn rect(s: &mut String, x: f64, y: f64, w: f64, h: f64, fill: &str) {
    let _ = writeln!(
        s,
        r##"<rect x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="{fill}" stroke="#333" stroke-width="0.5"/>"##
    );
}
