//! Shape inference of the data-movement operators added for transformer and
//! ShuffleNet exports (Slice, Split, Pad, ScatterND, Range): results on
//! small graphs, and a clear error naming the node for each kind of bad input.

use std::collections::HashMap;

use qint8_graph::shape::{infer, Shapes};
use qint8_graph::{Graph, Node, Op, PadMode, Tensor, ValueInfo};

fn graph(input: &[usize], nodes: Vec<Node>, inits: Vec<(&str, Tensor)>) -> Graph {
    let mut g = Graph {
        name: "t".into(),
        inputs: vec![ValueInfo::f32("x", input)],
        outputs: vec![ValueInfo::f32("y", &[])],
        nodes,
        ..Default::default()
    };
    for (k, t) in inits {
        g.initializers.insert(k.to_string(), t);
    }
    g
}

fn run(g: &Graph) -> Result<Shapes, String> {
    infer(g, &HashMap::new()).map_err(|e| e.to_string())
}

fn slice(inputs: &[&str]) -> Node {
    let op = Op::Slice {
        starts: None,
        ends: None,
        axes: None,
    };
    Node::new("sl", op, inputs, &["y"])
}

#[test]
fn slice_clamps_and_steps() {
    let g = graph(
        &[2, 10],
        vec![slice(&["x", "s", "e", "a", "p"])],
        vec![
            ("s", Tensor::vec_i64(&[-3, 0])),
            ("e", Tensor::vec_i64(&[i64::MIN, 1000])),
            ("a", Tensor::vec_i64(&[1, 0])),
            ("p", Tensor::vec_i64(&[-2, 1])),
        ],
    );
    // Axis 1: 7, 5, 3, 1 (start -3 is 7, the end clamps below 0).
    assert_eq!(run(&g).unwrap()["y"].shape, vec![2, 4]);
}

#[test]
fn slice_errors_name_the_problem() {
    let bad = |a: &[i64], p: &[i64]| {
        let g = graph(
            &[2, 10],
            vec![slice(&["x", "s", "e", "a", "p"])],
            vec![
                ("s", Tensor::vec_i64(&[0, 0])),
                ("e", Tensor::vec_i64(&[1, 1])),
                ("a", Tensor::vec_i64(a)),
                ("p", Tensor::vec_i64(p)),
            ],
        );
        run(&g).unwrap_err()
    };
    let e = bad(&[1, -1], &[1, 1]);
    assert!(
        e.contains("sl") && e.contains("axis 1 is sliced twice"),
        "{e}"
    );
    assert!(bad(&[0, 1], &[1, 0]).contains("a step is 0"));
    assert!(bad(&[0, 2], &[1, 1]).contains("out of range"));
    // Starts that depend on the data cannot be resolved.
    let g = graph(&[2, 10], vec![slice(&["x", "x", "x"])], vec![]);
    assert!(run(&g)
        .unwrap_err()
        .contains("starts (input 1) must be a constant"));
}

#[test]
fn split_sizes_from_input_or_equal_parts() {
    let split = |inputs: &[&str], outs: &[&str]| {
        Node::new(
            "sp",
            Op::Split {
                axis: 1,
                split: None,
            },
            inputs,
            outs,
        )
    };
    let g = graph(&[1, 7, 3], vec![split(&["x"], &["a", "b", "c"])], vec![]);
    let s = run(&g).unwrap();
    let dims: Vec<usize> = ["a", "b", "c"].iter().map(|n| s[*n].shape[1]).collect();
    assert_eq!(dims, vec![3, 3, 1]);
    let g = graph(
        &[1, 7, 3],
        vec![split(&["x", "n"], &["a", "b"])],
        vec![("n", Tensor::vec_i64(&[2, 4]))],
    );
    let e = run(&g).unwrap_err();
    assert!(
        e.contains("sp") && e.contains("do not divide dimension 7"),
        "{e}"
    );
}

#[test]
fn pad_and_scatter_errors() {
    let pad = Node::new(
        "pd",
        Op::Pad {
            mode: PadMode::Constant,
            pads: None,
            value: 0.0,
        },
        &["x", "p"],
        &["y"],
    );
    let g = graph(
        &[2, 3],
        vec![pad.clone()],
        vec![("p", Tensor::vec_i64(&[0, 1, 0, 2]))],
    );
    assert_eq!(run(&g).unwrap()["y"].shape, vec![2, 6]);
    let g = graph(
        &[2, 3],
        vec![pad.clone()],
        vec![("p", Tensor::vec_i64(&[0, -2, 0, -2]))],
    );
    assert!(run(&g).unwrap_err().contains("below zero"));
    let g = graph(&[2, 3], vec![pad], vec![("p", Tensor::vec_i64(&[1, 1]))]);
    assert!(run(&g).unwrap_err().contains("need 4 values"));

    // A constant ScatterND folds; an index past the data is an error.
    let scatter = |idx: i64| {
        graph(
            &[1],
            vec![Node::new("sc", Op::ScatterND, &["d", "i", "u"], &["y"])],
            vec![
                ("d", Tensor::vec_i64(&[0, 0, 0])),
                ("i", Tensor::I64(ndarray::arr2(&[[idx]]).into_dyn())),
                ("u", Tensor::vec_i64(&[5])),
            ],
        )
    };
    let s = run(&scatter(-1)).unwrap();
    assert_eq!(s["y"].value, Some(Tensor::vec_i64(&[0, 0, 5])));
    assert!(run(&scatter(3))
        .unwrap_err()
        .contains("index 3 out of range"));
}

#[test]
fn range_folds_or_explains() {
    let r = |start: Tensor| {
        graph(
            &[1],
            vec![Node::new("rg", Op::Range, &["a", "b", "c"], &["y"])],
            vec![
                ("a", start),
                ("b", Tensor::I64(ndarray::arr0(10i64).into_dyn())),
                ("c", Tensor::I64(ndarray::arr0(4i64).into_dyn())),
            ],
        )
    };
    let s = run(&r(Tensor::I64(ndarray::arr0(1i64).into_dyn()))).unwrap();
    assert_eq!(s["y"].value, Some(Tensor::vec_i64(&[1, 5, 9])));
    // A Range of runtime values is refused with the reason.
    let g = graph(
        &[1],
        vec![Node::new("rg", Op::Range, &["x", "x", "x"], &["y"])],
        vec![],
    );
    assert!(run(&g).unwrap_err().contains("must be constants"));
}
