//! Reports: the SVG plots parse as XML and draw what the data say; the
//! Markdown references every plot; files are written whole.

use qint8_analysis::sensitivity::{Method, NodeSensitivity, Outcome, Sensitivity};
use qint8_analysis::{write_report, HistogramPlot, MethodRow, ModelReport};
use qint8_eval::LayerError;

fn sample() -> ModelReport {
    let methods = ["entropy", "minmax", "percentile"]
        .iter()
        .enumerate()
        .map(|(i, m)| MethodRow {
            method: m.to_string(),
            top1: 0.90 - 0.01 * i as f64,
            top5: 0.99,
            calibration_seconds: 0.5,
            file_bytes: 1_000_000,
            drop_ci95: (i == 0).then_some(0.25),
        })
        .collect();
    // A decaying histogram with a spike, 2048 bins over [0, 8].
    let counts: Vec<u64> = (0..2048u64)
        .map(|i| if i == 100 { 50_000 } else { 10_000 / (1 + i) })
        .collect();
    let layers = (0..12)
        .map(|i| LayerError {
            tensor: format!("conv{i}<in>"),
            compared: format!("conv{i}_dq"),
            sqnr_db: 20.0 + i as f64,
            cosine: 0.999,
            max_abs: 0.1,
            values: 1000,
        })
        .collect();
    ModelReport {
        name: "tiny net".into(),
        source: "tiny.onnx".into(),
        eval_images: 100,
        calib_images: 50,
        fp32_top1: 0.91,
        fp32_bytes: 4_000_000,
        methods,
        histograms: vec![HistogramPlot {
            tensor: "relu_out".into(),
            counts,
            max: 8.0,
            thresholds: vec![
                ("entropy".into(), 3.0),
                ("minmax".into(), 8.0),
                ("percentile".into(), 5.5),
            ],
        }],
        layers,
        layers_of: "entropy".into(),
        notes: "Latency: measured elsewhere.".into(),
        sensitivity: None,
    }
}

/// Every attribute that looks numeric is a finite number.
fn check_numbers(doc: &roxmltree::Document<'_>) {
    for n in doc.descendants().filter(|n| n.is_element()) {
        for a in n.attributes() {
            if ["x", "y", "x1", "x2", "y1", "y2", "width", "height"].contains(&a.name()) {
                let v: f64 = a
                    .value()
                    .parse()
                    .unwrap_or_else(|_| panic!("{}={}", a.name(), a.value()));
                assert!(v.is_finite(), "{}={}", a.name(), a.value());
            }
        }
    }
}

fn elements<'a>(
    doc: &'a roxmltree::Document<'a>,
    tag: &str,
    class: &str,
) -> Vec<roxmltree::Node<'a, 'a>> {
    doc.descendants()
        .filter(|n| n.has_tag_name(tag) && n.attribute("class") == Some(class))
        .collect()
}

#[test]
fn plots_parse_and_show_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let report = sample();
    let files = write_report(dir.path(), "Quantization report", "Intro text.", &[report]).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "report.md",
            "tiny_net-top1.svg",
            "tiny_net-hist-0.svg",
            "tiny_net-sqnr.svg"
        ]
    );
    let md = std::fs::read_to_string(&files[0]).unwrap();
    for n in &names[1..] {
        assert!(md.contains(&format!("]({n})")), "{n} not referenced");
    }
    assert!(md.starts_with("# Quantization report\n\nIntro text."));
    // The table: fp32 and three methods, drops in points; escaped names.
    assert!(
        md.contains("| entropy | 90.00 | 99.00 | 1.00 ± 0.25 | 0.50 | 1.00 MB |")
            && md.contains("| minmax | 89.00 | 99.00 | 2.00 | 0.50 | 1.00 MB |"),
        "{md}"
    );
    assert!(md.contains("`conv0<in>`"));

    let read = |i: usize| std::fs::read_to_string(&files[i]).unwrap();
    let top1 = read(1);
    let doc = roxmltree::Document::parse(&top1).unwrap();
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    check_numbers(&doc);
    let bars = elements(&doc, "rect", "bar");
    assert_eq!(bars.len(), 4);
    // Taller bar for the better model: fp32 91 > entropy 90 > minmax 89.
    let h = |i: usize| bars[i].attribute("height").unwrap().parse::<f64>().unwrap();
    assert!(h(0) > h(1) && h(1) > h(2) && h(2) > h(3));
    assert_eq!(elements(&doc, "line", "reference").len(), 1);

    let hist = read(2);
    let doc = roxmltree::Document::parse(&hist).unwrap();
    check_numbers(&doc);
    assert_eq!(elements(&doc, "polyline", "line").len(), 1);
    let markers = elements(&doc, "line", "marker");
    assert_eq!(markers.len(), 3);
    let x = |i: usize| markers[i].attribute("x1").unwrap().parse::<f64>().unwrap();
    // Thresholds 3 < 5.5 < 8 on the same axis.
    assert!(x(0) < x(2) && x(2) < x(1));
    let labels: Vec<&str> = elements(&doc, "text", "marker-label")
        .iter()
        .filter_map(|n| n.text())
        .collect();
    assert_eq!(labels, ["entropy 3", "minmax 8", "percentile 5.5"]);
    // 2048 bins drawn as 256 columns.
    let pts = elements(&doc, "polyline", "line")[0]
        .attribute("points")
        .unwrap()
        .split(' ')
        .count();
    assert_eq!(pts, 256);

    let sqnr = read(3);
    let doc = roxmltree::Document::parse(&sqnr).unwrap();
    check_numbers(&doc);
    assert_eq!(elements(&doc, "rect", "bar").len(), 12);
    // No temporary files remain.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(left.is_empty());
}

#[test]
fn unwritable_directories_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let e = write_report(&file.join("sub"), "t", "", &[sample()]).unwrap_err();
    assert!(e.to_string().contains("not-a-dir"), "{e}");
}

/// A report with a sensitivity analysis: its chart (with error bars) and
/// the ten most sensitive nodes, ranked, with each top set's z.
#[test]
fn sensitivity_section_ranks_the_top_ten() {
    let o = |top1, js, se| Outcome {
        top1,
        sqnr_db: 30.0,
        kl: 2.0 * js,
        js,
        js_stderr: se,
    };
    // Graph order: node k has divergence (k + 1) * 1e-5, so node 11 ranks first.
    let nodes = (0..12)
        .map(|k| NodeSensitivity {
            node: format!("/stage{k}/conv|{k}"),
            op: "Conv",
            alone: o(0.9, (k + 1) as f64 * 1e-5, 2e-6),
            float: o(0.9 + 0.001 * k as f64, 1e-3, 1e-4),
            output_sqnr_db: Some(35.0),
            top_set_z: (k > 0).then_some(if k == 9 { 0.5 } else { 3.0 + k as f64 }),
            split: None,
        })
        .collect();
    let report = ModelReport {
        sensitivity: Some(Sensitivity {
            method: Method::Linearized,
            images: 100,
            fp32_top1: 0.91,
            int8: o(0.895, 2e-3, 1e-4),
            nodes,
            eval_seconds: 0.1,
            seconds: 0.45,
        }),
        ..sample()
    };
    let dir = tempfile::tempdir().unwrap();
    let files = write_report(dir.path(), "t", "", &[report]).unwrap();
    let md = std::fs::read_to_string(&files[0]).unwrap();
    let name = |p: &std::path::PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(name(files.last().unwrap()), "tiny_net-sensitivity.svg");
    assert!(md.contains("](tiny_net-sensitivity.svg)"));
    assert!(
        md.contains("Which layer hurts (entropy model, 100 images, first-order estimates"),
        "{md}"
    );
    assert!(md.contains("0.5 s, 4.5x one evaluation): the 10 most sensitive of 12 nodes"));
    let rows: Vec<&str> = md.lines().filter(|l| l.contains("/stage")).collect();
    assert_eq!(rows.len(), 10, "{md}");
    // Most sensitive first, names escaped, recovered top-1 against the
    // fully quantized 89.5%.
    assert_eq!(
        rows[0],
        "| 1 | `/stage11/conv\\|11` | Conv | 1.20e-4 ± 2.0e-6 | 14.0 | +1.60 |"
    );
    assert!(rows[2].starts_with("| 3 | `/stage9/conv\\|9` |") && rows[2].contains("| 0.5 |"));
    assert!(
        md.contains("These images set the top 1, 2, 4, 5, 6, 7, 8, 9, 10 apart"),
        "{md}"
    );
    // The same difference on every image gives a huge z, shown as such.
    assert_eq!(qint8_analysis::report::z_text(f64::MAX), ">1000");
    assert_eq!(qint8_analysis::report::z_text(2.26), "2.3");
    let svg = std::fs::read_to_string(files.last().unwrap()).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    check_numbers(&doc);
    assert_eq!(elements(&doc, "rect", "bar").len(), 12);
    assert_eq!(elements(&doc, "path", "error").len(), 12);
}
