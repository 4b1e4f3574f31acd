//! Loss plots as PNG images (800x500), drawn without system fonts or plotting libraries:
//! per-iteration training loss (thin, light blue), evaluation train loss (blue, square
//! markers) and evaluation validation loss (orange, diamond markers) against iteration,
//! with grid, tick labels, axis labels, a legend and a title in a built-in 5x7 pixel font.
//!
//! With no points at all the image is still written: empty axes with the text
//! "no data yet". Files are written atomically.

use crate::fsutil;
use crate::train::metrics::{self, MetricsError};
use std::io;
use std::path::{Path, PathBuf};

/// File name of the loss plot inside `out_dir`.
pub const LOSS_PLOT_FILE: &str = "loss.png";
/// Image width in pixels.
pub const WIDTH: usize = 800;
/// Image height in pixels.
pub const HEIGHT: usize = 500;

/// Colour of the per-iteration training loss.
pub const TRAIN_COLOR: Rgb = [150, 185, 225];
/// Colour of the evaluation loss on the training split.
pub const EVAL_TRAIN_COLOR: Rgb = [31, 100, 180];
/// Colour of the evaluation loss on the validation split.
pub const EVAL_VAL_COLOR: Rgb = [235, 110, 0];

const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [228, 228, 228];
const TEXT: Rgb = [40, 40, 40];

/// Plot area: left, top, right, bottom (exclusive) pixel bounds.
const LEFT: i64 = 72;
const TOP: i64 = 44;
const RIGHT: i64 = WIDTH as i64 - 24;
const BOTTOM: i64 = HEIGHT as i64 - 52;

pub type Rgb = [u8; 3];

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot write plot {}: {source}; check that the directory is writable", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// Renders the loss plot and writes it to `path` as a PNG, atomically. `train` holds
/// `(iter, loss)` per training iteration, `evals` holds `(iter, train_loss, val_loss)`;
/// non-finite values are skipped. Without any point the image says "no data yet".
pub fn write_loss_plot(
    path: &Path,
    train: &[(u64, f64)],
    evals: &[(u64, f64, f64)],
) -> Result<(), PlotError> {
    let canvas = render_loss_plot(train, evals);
    fsutil::write_atomic_with(path, |w| {
        let mut enc = png::Encoder::new(w, WIDTH as u32, HEIGHT as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(io::Error::other)?;
        writer
            .write_image_data(&canvas.pixels)
            .map_err(io::Error::other)?;
        writer.finish().map_err(io::Error::other)
    })
    .map_err(|source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the loss points of a metrics log (see [`metrics::read_points`]) and writes their
/// plot to `png_path`.
pub fn plot_metrics(metrics_path: &Path, png_path: &Path) -> Result<(), PlotError> {
    let points = metrics::read_points(metrics_path)?;
    write_loss_plot(png_path, &points.train, &points.evals)
}

/// An RGB image, row-major, 3 bytes per pixel.
struct Canvas {
    pixels: Vec<u8>,
    /// Drawing is limited to this rectangle: left, top, right, bottom (exclusive).
    clip: (i64, i64, i64, i64),
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            pixels: WHITE.repeat(WIDTH * HEIGHT),
            clip: (0, 0, WIDTH as i64, HEIGHT as i64),
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        let (l, t, r, b) = self.clip;
        if x >= l && x < r && y >= t && y < b {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0..y1 {
            for x in x0..x1 {
                self.set(x, y, c);
            }
        }
    }

    /// Bresenham line from (x0, y0) to (x1, y1), both ends included.
    fn line(&mut self, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb) {
        let dx = (x1 - x0).abs();
        let dy = -(y1 - y0).abs();
        let sx = if x0 < x1 { 1 } else { -1 };
        let sy = if y0 < y1 { 1 } else { -1 };
        let mut err = dx + dy;
        loop {
            self.set(x0, y0, c);
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    /// A line two pixels wide.
    fn thick_line(&mut self, a: (i64, i64), b: (i64, i64), c: Rgb) {
        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            self.line((a.0 + ox, a.1 + oy), (b.0 + ox, b.1 + oy), c);
        }
    }

    fn marker(&mut self, (x, y): (i64, i64), shape: Marker, c: Rgb) {
        for dy in -4i64..=4 {
            for dx in -4i64..=4 {
                let inside = match shape {
                    Marker::Square => dx.abs() <= 3 && dy.abs() <= 3,
                    Marker::Diamond => dx.abs() + dy.abs() <= 4,
                };
                if inside {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }

    /// Draws `text` with its top-left corner at (x, y), each font pixel `scale` pixels wide.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: Rgb) {
        for (i, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x + i as i64 * 6 * scale;
            // Letters with descenders hang two rows below the baseline.
            let y = y + if DESCENDERS.contains(ch) {
                2 * scale
            } else {
                0
            };
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let px = gx + col * scale;
                        let py = y + r as i64 * scale;
                        self.fill_rect(px, py, px + scale, py + scale, c);
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Marker {
    Square,
    Diamond,
}

/// Width in pixels of `text` drawn at `scale`.
fn text_width(text: &str, scale: i64) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * 6 - 1) * scale
    }
}

/// Letters whose glyphs are drawn two rows lower (their last two rows are the descender).
const DESCENDERS: &str = "gpqyGPQY";

/// 5x7 glyphs, one string of `#`/`.` per row (leftmost column first).
#[rustfmt::skip]
const FONT: &[(char, [&str; 7])] = &[
    ('0', [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."]),
    ('1', ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('2', [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"]),
    ('3', ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."]),
    ('4', ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."]),
    ('5', ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."]),
    ('6', ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."]),
    ('7', ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."]),
    ('8', [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."]),
    ('9', [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."]),
    ('a', [".....", ".....", ".###.", "....#", ".####", "#...#", ".####"]),
    ('b', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."]),
    ('c', [".....", ".....", ".###.", "#....", "#....", "#...#", ".###."]),
    ('d', ["....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"]),
    ('e', [".....", ".....", ".###.", "#...#", "#####", "#....", ".###."]),
    ('f', ["..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."]),
    ('g', [".####", "#...#", "#...#", "#...#", ".####", "....#", ".###."]),
    ('h', ["#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('i', ["..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."]),
    ('j', ["...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."]),
    ('k', ["#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."]),
    ('l', [".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."]),
    ('m', [".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"]),
    ('n', [".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"]),
    ('o', [".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."]),
    ('p', ["####.", "#...#", "#...#", "#...#", "####.", "#....", "#...."]),
    ('q', [".####", "#...#", "#...#", "#...#", ".####", "....#", "....#"]),
    ('r', [".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."]),
    ('s', [".....", ".....", ".####", "#....", ".###.", "....#", "####."]),
    ('t', [".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."]),
    ('u', [".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"]),
    ('v', [".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."]),
    ('w', [".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."]),
    ('x', [".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"]),
    ('y', ["#...#", "#...#", "#...#", "#...#", ".####", "....#", ".###."]),
    ('z', [".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"]),
    ('.', [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."]),
    (',', [".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."]),
    (':', [".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."]),
    ('-', [".....", ".....", ".....", "#####", ".....", ".....", "....."]),
    ('+', [".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."]),
    ('/', [".....", "....#", "...#.", "..#..", ".#...", "#....", "....."]),
    ('(', ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."]),
    (')', [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."]),
    (' ', [".....", ".....", ".....", ".....", ".....", ".....", "....."]),
];

/// Row bit masks (bit 4 = leftmost column) of `ch`; upper case is drawn as lower case and
/// characters without a glyph as an empty box.
fn glyph(ch: char) -> [u8; 7] {
    let ch = ch.to_ascii_lowercase();
    let rows = FONT
        .iter()
        .find(|(c, _)| *c == ch)
        .map(|(_, rows)| *rows)
        .unwrap_or([
            "#####", "#...#", "#...#", "#...#", "#...#", "#...#", "#####",
        ]);
    let mut out = [0u8; 7];
    for (o, row) in out.iter_mut().zip(rows) {
        *o = row
            .bytes()
            .fold(0, |acc, b| (acc << 1) | u8::from(b == b'#'));
    }
    out
}

/// Evenly spaced "nice" tick values (steps of 1, 2 or 5 times a power of ten) covering
/// `[lo, hi]`, at least `min_step` apart; returns the ticks and the step.
fn ticks(lo: f64, hi: f64, target: usize, min_step: f64) -> (Vec<f64>, f64) {
    let raw = ((hi - lo) / target as f64)
        .max(min_step)
        .max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * 0.999)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil();
    let mut out = Vec::new();
    let mut k = first;
    while k * step <= hi + step * 1e-9 && out.len() < 50 {
        out.push(k * step);
        k += 1.0;
    }
    (out, step)
}

/// Tick label for a loss value with as many decimals as the step needs.
fn loss_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    // Avoid "-0.0" for a tick that is zero up to rounding.
    let v = if v.abs() < step * 1e-6 { 0.0 } else { v };
    format!("{v:.decimals$}")
}

/// Tick label for an iteration: plain below 100000, then in thousands (`250k`).
fn iter_label(v: f64) -> String {
    let v = v.round() as u64;
    if v >= 100_000 && v.is_multiple_of(1000) {
        format!("{}k", v / 1000)
    } else {
        v.to_string()
    }
}

/// Maps data coordinates to pixels in the plot area.
struct Axes {
    x: (f64, f64),
    y: (f64, f64),
}

impl Axes {
    fn px(&self, x: f64, y: f64) -> (i64, i64) {
        let fx = (x - self.x.0) / (self.x.1 - self.x.0);
        let fy = (y - self.y.0) / (self.y.1 - self.y.0);
        let px = LEFT as f64 + fx * (RIGHT - 1 - LEFT) as f64;
        let py = (BOTTOM - 1) as f64 - fy * (BOTTOM - 1 - TOP) as f64;
        (px.round() as i64, py.round() as i64)
    }
}

/// Renders the plot into an RGB canvas.
fn render_loss_plot(train: &[(u64, f64)], evals: &[(u64, f64, f64)]) -> Canvas {
    let train: Vec<(f64, f64)> = train
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(i, l)| (i as f64, l))
        .collect();
    let series = |pick: fn(&(u64, f64, f64)) -> f64| -> Vec<(f64, f64)> {
        evals
            .iter()
            .filter(|e| pick(e).is_finite())
            .map(|e| (e.0 as f64, pick(e)))
            .collect()
    };
    let eval_train = series(|e| e.1);
    let eval_val = series(|e| e.2);
    let all = || train.iter().chain(&eval_train).chain(&eval_val);
    let empty = all().next().is_none();

    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if empty {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 > y0 { (y1 - y0) * 0.05 } else { 0.5 };
    y0 -= pad;
    y1 += pad;
    let axes = Axes {
        x: (x0, x1),
        y: (y0, y1),
    };

    let mut c = Canvas::new();
    let title = "training loss";
    c.text(
        (WIDTH as i64 - text_width(title, 2)) / 2,
        12,
        title,
        2,
        TEXT,
    );

    // Grid and tick labels.
    let (xt, _) = ticks(x0, x1, 8, 1.0);
    let (yt, ystep) = ticks(y0, y1, 6, 0.0);
    for &x in &xt {
        let (px, _) = axes.px(x, y0);
        c.line((px, TOP), (px, BOTTOM - 1), GRID);
        c.line((px, BOTTOM), (px, BOTTOM + 4), BLACK);
        let label = iter_label(x);
        c.text(px - text_width(&label, 1) / 2, BOTTOM + 8, &label, 1, TEXT);
    }
    for &y in &yt {
        let (_, py) = axes.px(x0, y);
        c.line((LEFT, py), (RIGHT - 1, py), GRID);
        c.line((LEFT - 5, py), (LEFT - 1, py), BLACK);
        let label = loss_label(y, ystep);
        c.text(LEFT - 9 - text_width(&label, 1), py - 3, &label, 1, TEXT);
    }
    let xlabel = "iteration";
    let xl = (LEFT + RIGHT - text_width(xlabel, 1)) / 2;
    c.text(xl, BOTTOM + 26, xlabel, 1, TEXT);
    c.text(LEFT - 40, TOP - 16, "loss", 1, TEXT);

    // Series, clipped to the plot area.
    c.clip = (LEFT + 1, TOP, RIGHT - 1, BOTTOM - 1);
    for w in train.windows(2) {
        c.line(
            axes.px(w[0].0, w[0].1),
            axes.px(w[1].0, w[1].1),
            TRAIN_COLOR,
        );
    }
    if let [(x, y)] = train.as_slice() {
        c.marker(axes.px(*x, *y), Marker::Diamond, TRAIN_COLOR);
    }
    for (pts, color, marker) in [
        (&eval_train, EVAL_TRAIN_COLOR, Marker::Square),
        (&eval_val, EVAL_VAL_COLOR, Marker::Diamond),
    ] {
        for w in pts.windows(2) {
            c.thick_line(axes.px(w[0].0, w[0].1), axes.px(w[1].0, w[1].1), color);
        }
        // Markers only while they stay distinguishable.
        if pts.len() <= 200 {
            for &(x, y) in pts.iter() {
                c.marker(axes.px(x, y), marker, color);
            }
        }
    }
    c.clip = (0, 0, WIDTH as i64, HEIGHT as i64);

    // Frame.
    c.line((LEFT, TOP), (RIGHT - 1, TOP), BLACK);
    c.line((LEFT, BOTTOM - 1), (RIGHT - 1, BOTTOM - 1), BLACK);
    c.line((LEFT, TOP), (LEFT, BOTTOM - 1), BLACK);
    c.line((RIGHT - 1, TOP), (RIGHT - 1, BOTTOM - 1), BLACK);

    if empty {
        let msg = "no data yet";
        let (cx, cy) = ((LEFT + RIGHT) / 2, (TOP + BOTTOM) / 2);
        c.text(cx - text_width(msg, 2) / 2, cy - 7, msg, 2, TEXT);
        return c;
    }

    // Legend (top right), listing the series that have points.
    let entries: Vec<(&str, Rgb, Option<Marker>)> = [
        (!train.is_empty()).then_some(("train loss (per iter)", TRAIN_COLOR, None)),
        (!eval_train.is_empty()).then_some((
            "eval train loss",
            EVAL_TRAIN_COLOR,
            Some(Marker::Square),
        )),
        (!eval_val.is_empty()).then_some(("eval val loss", EVAL_VAL_COLOR, Some(Marker::Diamond))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let text_w = entries
        .iter()
        .map(|e| text_width(e.0, 1))
        .max()
        .unwrap_or(0);
    let (lw, lh) = (text_w + 48, entries.len() as i64 * 16 + 8);
    let (lx, ly) = (RIGHT - 10 - lw, TOP + 10);
    c.fill_rect(lx, ly, lx + lw, ly + lh, WHITE);
    c.line((lx, ly), (lx + lw, ly), BLACK);
    c.line((lx, ly + lh), (lx + lw, ly + lh), BLACK);
    c.line((lx, ly), (lx, ly + lh), BLACK);
    c.line((lx + lw, ly), (lx + lw, ly + lh), BLACK);
    for (i, (label, color, marker)) in entries.into_iter().enumerate() {
        let y = ly + 12 + i as i64 * 16;
        match marker {
            Some(m) => {
                c.thick_line((lx + 8, y), (lx + 32, y), color);
                c.marker((lx + 20, y), m, color);
            }
            None => c.line((lx + 8, y), (lx + 32, y), color),
        }
        c.text(lx + 40, y - 3, label, 1, TEXT);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let bytes = fs::read(path).unwrap();
        let decoder = png::Decoder::new(io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count(pixels: &[u8], c: Rgb) -> usize {
        pixels.chunks_exact(3).filter(|p| *p == c).count()
    }

    #[test]
    fn plot_decodes_with_every_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOSS_PLOT_FILE);
        let train: Vec<(u64, f64)> = (0..2000)
            .map(|i| {
                (
                    i,
                    4.0 * (-(i as f64) / 600.0).exp() + 1.2 + 0.1 * ((i * 7) % 5) as f64,
                )
            })
            .collect();
        let evals: Vec<(u64, f64, f64)> = (0..=8)
            .map(|k| {
                let l = 4.0 * (-(k as f64 * 250.0) / 600.0).exp() + 1.3;
                (k * 250, l, l + 0.15)
            })
            .collect();
        write_loss_plot(&path, &train, &evals).unwrap();
        let (w, h, px) = decode(&path);
        assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
        // Far more pixels than the legend's samples alone (about 100 each).
        assert!(
            count(&px, TRAIN_COLOR) > 1000,
            "{}",
            count(&px, TRAIN_COLOR)
        );
        assert!(count(&px, EVAL_TRAIN_COLOR) > 1000);
        assert!(count(&px, EVAL_VAL_COLOR) > 1000);
        assert!(count(&px, TEXT) > 500, "labels drawn");
        assert!(count(&px, WHITE) > WIDTH * HEIGHT / 2);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn legend_lists_only_present_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        write_loss_plot(&path, &[(0, 3.0), (10, 2.5), (20, 2.0)], &[]).unwrap();
        let (_, _, px) = decode(&path);
        assert!(count(&px, TRAIN_COLOR) > 300);
        assert_eq!(count(&px, EVAL_TRAIN_COLOR), 0);
        assert_eq!(count(&px, EVAL_VAL_COLOR), 0);
        // One eval point, non-finite values and a single iteration do not break the axes.
        write_loss_plot(&path, &[(5, f64::NAN)], &[(5, 2.0, f64::INFINITY)]).unwrap();
        let (_, _, px) = decode(&path);
        assert!(count(&px, EVAL_TRAIN_COLOR) > 20);
        assert_eq!(count(&px, EVAL_VAL_COLOR), 0);
        assert_eq!(count(&px, TRAIN_COLOR), 0);
    }

    #[test]
    fn empty_input_writes_no_data_plot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        write_loss_plot(&path, &[], &[]).unwrap();
        let (w, h, px) = decode(&path);
        assert_eq!((w, h), (WIDTH as u32, HEIGHT as u32));
        assert_eq!(count(&px, TRAIN_COLOR), 0);
        assert!(count(&px, TEXT) > 100);
    }

    #[test]
    fn plot_from_metrics_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = metrics::MetricsLog::open(dir.path(), None).unwrap();
        for i in 0..50u64 {
            log.log(
                &serde_json::json!({"kind": "train", "iter": i, "loss": 3.0 - i as f64 * 0.02}),
            )
            .unwrap();
        }
        log.log(
            &serde_json::json!({"kind": "eval", "iter": 49, "train_loss": 2.1, "val_loss": 2.2}),
        )
        .unwrap();
        let png_path = dir.path().join(LOSS_PLOT_FILE);
        plot_metrics(log.path(), &png_path).unwrap();
        let (_, _, px) = decode(&png_path);
        assert!(count(&px, EVAL_VAL_COLOR) > 20);
        let err = plot_metrics(&dir.path().join("absent.jsonl"), &png_path).unwrap_err();
        assert!(err.to_string().contains("absent.jsonl"), "{err}");
    }

    #[test]
    fn ticks_and_labels() {
        let (t, s) = ticks(0.0, 5000.0, 8, 1.0);
        assert_eq!(s, 1000.0);
        assert_eq!(t, vec![0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0]);
        let (t, s) = ticks(1.93, 4.41, 6, 0.0);
        assert_eq!(s, 0.5);
        assert_eq!(t.first(), Some(&2.0));
        assert_eq!(t.last(), Some(&4.0));
        assert_eq!(loss_label(2.5, 0.5), "2.5");
        assert_eq!(loss_label(3.0, 1.0), "3");
        assert_eq!(loss_label(2.25, 0.05), "2.25");
        assert_eq!(loss_label(-0.0, 0.2), "0.0");
        assert_eq!(loss_label(-1e-17, 0.2), "0.0");
        let (t, _) = ticks(0.0, 1.0, 8, 1.0);
        assert_eq!(t, vec![0.0, 1.0]);
        assert_eq!(iter_label(600_000.0), "600k");
        assert_eq!(iter_label(2500.0), "2500");
        // Glyph rows are five columns wide.
        assert_eq!(glyph('1'), [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]);
        assert_eq!(glyph('L'), glyph('l'));
    }
}
