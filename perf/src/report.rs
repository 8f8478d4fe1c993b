//! Results: one [`Report`] per run, printed as a table, written as JSON, compared and plotted.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latency summary in milliseconds, with the percentile curve for plots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
    /// (percentile, ms) points of the HDR percentile curve.
    pub curve: Vec<(f64, f64)>,
}

impl Latency {
    /// Summarise a histogram recorded in nanoseconds.
    pub fn from_ns(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        let curve = h
            .iter_quantiles(2)
            .map(|v| (v.quantile_iterated_to() * 100.0, ms(v.value_iterated_to())))
            .filter(|(q, _)| *q < 100.0)
            .collect();
        Some(Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            curve,
        })
    }
}

/// One run's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Label of the server under test.
    pub server: String,
    /// The scenario's parameters.
    pub params: serde_json::Value,
    /// Named figures, in display order: (name, value, unit).
    pub figures: Vec<(String, f64, String)>,
    /// Latency, where the scenario measures it.
    pub latency: Option<Latency>,
}

impl Report {
    /// A report with no figures yet.
    pub fn new(scenario: &str, server: &str, params: serde_json::Value) -> Self {
        Self {
            scenario: scenario.into(),
            server: server.into(),
            params,
            figures: Vec::new(),
            latency: None,
        }
    }

    /// Add a figure.
    pub fn add(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.push((name.into(), value, unit.into()));
    }

    /// A figure by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures.iter().find(|f| f.0 == name).map(|f| f.1)
    }

    fn rows(&self) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = self
            .figures
            .iter()
            .map(|(n, v, u)| (n.clone(), format_value(*v, u)))
            .collect();
        if let Some(l) = &self.latency {
            for (name, v) in [
                ("p50", l.p50),
                ("p90", l.p90),
                ("p99", l.p99),
                ("p99.9", l.p999),
                ("max", l.max),
            ] {
                rows.push((format!("latency {name}"), format!("{v:.3} ms")));
            }
        }
        rows
    }

    /// Print as a two-column table.
    pub fn print(&self) {
        println!("{} against {}", self.scenario, self.server);
        for (name, value) in self.rows() {
            println!("  {name:<28} {value}");
        }
    }
}

fn format_value(v: f64, unit: &str) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{} {unit}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.3} {unit}")
    }
}

/// Print several reports side by side, one column per server.
pub fn print_table(reports: &[Report]) {
    if reports.is_empty() {
        return;
    }
    let columns: Vec<Vec<(String, String)>> = reports.iter().map(Report::rows).collect();
    let mut names: Vec<String> = Vec::new();
    for col in &columns {
        for (n, _) in col {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let width = 16;
    print!("{:<28}", reports[0].scenario);
    for r in reports {
        print!(" {:>width$}", r.server);
    }
    println!();
    for name in &names {
        print!("{name:<28}");
        for col in &columns {
            let v = col
                .iter()
                .find(|(n, _)| n == name)
                .map_or("-", |(_, v)| v.as_str());
            print!(" {v:>width$}");
        }
        println!();
    }
}

/// An SVG of the HDR percentile curves (x: percentile on a log scale of 1/(1-p), y: ms).
pub fn plot_svg(reports: &[Report], title: &str) -> String {
    const W: f64 = 800.0;
    const H: f64 = 480.0;
    const PAD: f64 = 60.0;
    const COLORS: [&str; 6] = [
        "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let curves: Vec<(&str, &Vec<(f64, f64)>)> = reports
        .iter()
        .filter_map(|r| r.latency.as_ref().map(|l| (r.server.as_str(), &l.curve)))
        .collect();
    let max_ms = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(0.001);
    let x_of = |q: f64| (1.0 / (1.0 - q / 100.0)).log10() / 4.0; // 0 .. 99.99%
    let px = |q: f64| PAD + x_of(q).min(1.0) * (W - 2.0 * PAD);
    let py = |ms: f64| H - PAD - (ms / max_ms) * (H - 2.0 * PAD);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15">{title}</text>
<line x1="{PAD}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">percentile</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">latency (ms)</text>
"#,
        W / 2.0,
        H - PAD,
        W - PAD,
        H - PAD,
        H - PAD,
        W / 2.0,
        H - 18.0,
        H / 2.0,
        H / 2.0
    );
    for q in [0.0, 90.0, 99.0, 99.9, 99.99] {
        let x = px(q);
        svg += &format!(
            r##"<line x1="{x}" y1="{PAD}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{q}%</text>
"##,
            H - PAD,
            H - PAD + 16.0
        );
    }
    for i in 0..=4 {
        let ms = max_ms * f64::from(i) / 4.0;
        let y = py(ms);
        svg += &format!(
            r##"<line x1="{PAD}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{ms:.2}</text>
"##,
            W - PAD,
            PAD - 6.0,
            y + 4.0
        );
    }
    for (i, (name, curve)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = curve
            .iter()
            .map(|(q, ms)| format!("{:.1},{:.1}", px(*q), py(*ms)))
            .collect();
        svg += &format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>
<text x="{}" y="{}" fill="{color}">{name}</text>
"#,
            points.join(" "),
            PAD + 10.0,
            PAD + 16.0 * (i as f64 + 1.0)
        );
    }
    svg + "</svg>\n"
}
