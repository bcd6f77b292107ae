//! Human-readable output: aligned tables, grouped numbers, byte sizes and shapes.

use qint8_graph::{DataType, Dim, ValueInfo};

/// Column alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    /// Left-aligned (text).
    Left,
    /// Right-aligned (numbers).
    Right,
}

/// A table with a header row, rendered with aligned columns.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers and alignments.
    pub(crate) fn new(columns: &[(&str, Align)]) -> Self {
        Self {
            headers: columns.iter().map(|(h, _)| h.to_string()).collect(),
            align: columns.iter().map(|(_, a)| *a).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells are empty, extra cells are dropped).
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }

    /// The table, each line indented by `indent` spaces and ending in a newline.
    pub(crate) fn render(&self, indent: usize) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|c| {
                std::iter::once(&self.headers[c])
                    .chain(self.rows.iter().map(|r| &r[c]))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| -> String {
            let mut s = " ".repeat(indent);
            for (c, cell) in cells.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                let last = c + 1 == cells.len();
                match self.align[c] {
                    Align::Left if last => s.push_str(cell),
                    Align::Left => {
                        s.push_str(cell);
                        s.push_str(&" ".repeat(pad));
                    }
                    Align::Right => {
                        s.push_str(&" ".repeat(pad));
                        s.push_str(cell);
                    }
                }
                if !last {
                    s.push_str("  ");
                }
            }
            s.push('\n');
            s
        };
        let mut out = line(&self.headers);
        let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        out.push_str(&line(&rule));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

/// `key  value` lines with the values aligned.
pub(crate) fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

/// An integer with thousands separators: `1102914` -> `1,102,914`.
pub(crate) fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A byte count, exact and in decimal units: `3358973` -> `3,358,973 B (3.36 MB)`.
pub(crate) fn bytes(n: usize) -> String {
    let x = n as f64;
    let short = if x >= 1e9 {
        format!(" ({:.2} GB)", x / 1e9)
    } else if x >= 1e6 {
        format!(" ({:.2} MB)", x / 1e6)
    } else if x >= 1e3 {
        format!(" ({:.2} kB)", x / 1e3)
    } else {
        String::new()
    };
    format!("{} B{short}", group(n))
}

/// Lower-case ONNX name of an element type (`float`, `int64`, ...).
pub(crate) fn dtype(d: DataType) -> String {
    DataType::onnx_name(d.to_onnx()).to_lowercase()
}

/// A declared shape: `[batch, 1, 32, 32]`, or `unknown` when undeclared.
pub(crate) fn shape(v: &ValueInfo) -> String {
    match &v.shape {
        Some(dims) => dims_text(dims),
        None => "unknown".to_string(),
    }
}

/// Dimensions as `[a, b, c]` (symbolic ones by name, `?` when unnamed).
pub(crate) fn dims_text(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims.iter().map(Dim::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// A concrete shape as `[a, b, c]`.
pub(crate) fn usize_dims(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// A declared shape as JSON: numbers for fixed sizes, strings for symbolic
/// ones, `null` when undeclared.
pub(crate) fn shape_json(v: &ValueInfo) -> serde_json::Value {
    match &v.shape {
        None => serde_json::Value::Null,
        Some(dims) => dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => serde_json::json!(n),
                Dim::Symbolic(s) => serde_json::json!(s),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(838654), "838,654");
        assert_eq!(group(1102914), "1,102,914");
    }

    #[test]
    fn formats_bytes() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3358973), "3,358,973 B (3.36 MB)");
    }

    #[test]
    fn aligns_table_columns() {
        let mut t = Table::new(&[("op", Align::Left), ("count", Align::Right)]);
        t.row(vec!["Conv".into(), "53".into()]);
        t.row(vec!["GlobalAveragePool".into(), "1".into()]);
        let s = t.render(2);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "  op                 count");
        assert_eq!(lines[1], "  -----------------  -----");
        assert_eq!(lines[2], "  Conv                  53");
        assert_eq!(lines[3], "  GlobalAveragePool      1");
    }

    #[test]
    fn shapes_show_symbolic_names() {
        let v = ValueInfo {
            name: "x".into(),
            dtype: DataType::Float,
            shape: Some(vec![Dim::Symbolic("batch".into()), Dim::Fixed(3)]),
        };
        assert_eq!(shape(&v), "[batch, 3]");
        assert_eq!(shape_json(&v), serde_json::json!(["batch", 3]));
        assert_eq!(dtype(v.dtype), "float");
    }
}
