//! `Session::observe_split`: sub-batches on separate workers, each with its
//! own observer, together see exactly what one observed run of the whole
//! batch sees. `Session::pull`: whole batches on separate workers,
//! each showing its worker's observer what a run of that batch alone shows.

use std::collections::BTreeMap;

use qint8_graph::zoo::{build, ZooConfig};
use qint8_runtime::{Observer, RuntimeError, Session, SessionOptions};

/// Per tensor: element count and largest |x|.
type Seen = BTreeMap<String, (usize, f32)>;

fn recorder(
    seen: &mut Seen,
) -> impl FnMut(&str, &[usize], &[f32]) -> Result<(), String> + Send + '_ {
    move |name, _shape, x| {
        let e = seen.entry(name.to_string()).or_insert((0, 0.0));
        e.0 += x.len();
        e.1 = x.iter().fold(e.1, |m, v| m.max(v.abs()));
        Ok(())
    }
}

/// A session with default options on `threads` threads.
fn session(model: &qint8_graph::Model, threads: usize) -> Session {
    Session::new(
        model,
        SessionOptions {
            threads,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Input `name` of shape `[batch, rest...]`, the batch symbolic.
fn batched_input(name: &str, rest: &[usize]) -> qint8_graph::ValueInfo {
    use qint8_graph::Dim;
    let mut shape = vec![1];
    shape.extend_from_slice(rest);
    let mut v = qint8_graph::ValueInfo::f32(name, &shape);
    v.shape = Some(
        std::iter::once(Dim::Symbolic("batch".into()))
            .chain(rest.iter().map(|&d| Dim::Fixed(d)))
            .collect(),
    );
    v
}

/// A zoo model at the fixtures' shape: 1x32x32 images, 10 classes,
/// `width` times the architecture's width.
fn small(arch: ZooConfig, width: f64) -> qint8_graph::Model {
    build(
        &arch
            .with_width_mult(width)
            .with_resolution(32, 32)
            .with_in_channels(1)
            .with_classes(10),
    )
    .unwrap()
}

/// `n` deterministic 1x32x32 images in [-1, 1], varied by `salt`.
fn images(n: usize, salt: usize) -> ndarray::ArrayD<f32> {
    ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[n, 1, 32, 32]), |i| {
        ((i[0] * 131 + i[2] * 17 + i[3] * 7 + salt) % 23) as f32 / 11.0 - 1.0
    })
}

#[test]
fn split_observers_together_see_the_whole_batch() {
    let model = small(ZooConfig::resnet50(), 0.125);
    let session = Session::new(
        &model,
        SessionOptions {
            threads: 2,
            fuse: false,
            ..Default::default()
        },
    )
    .unwrap();
    let x = images(7, 0);
    let input = model.graph.inputs[0].name.clone();

    let mut whole = Seen::new();
    session
        .run_observed(&[(&input, x.view())], &mut recorder(&mut whole))
        .unwrap();
    let (mut a, mut b) = (Seen::new(), Seen::new());
    {
        let (mut ra, mut rb) = (recorder(&mut a), recorder(&mut b));
        let mut observers: Vec<&mut dyn Observer> = vec![&mut ra, &mut rb];
        session
            .observe_split(&[(&input, x.view())], &mut observers)
            .unwrap();
    }
    assert!(!a.is_empty() && !b.is_empty(), "both workers observed");
    assert_eq!(
        whole.keys().collect::<Vec<_>>(),
        a.keys().collect::<Vec<_>>()
    );
    for (name, &(n, m)) in &whole {
        let (na, ma) = a[name];
        let (nb, mb) = b[name];
        assert_eq!(na + nb, n, "{name}: element counts");
        let got = ma.max(mb);
        assert!((got - m).abs() <= 1e-4 * m.max(1.0), "{name}: {got} vs {m}");
    }

    // One observer: the whole batch goes to it.
    let mut single = Seen::new();
    {
        let mut r = recorder(&mut single);
        let mut observers: Vec<&mut dyn Observer> = vec![&mut r];
        session
            .observe_split(&[(&input, x.view())], &mut observers)
            .unwrap();
    }
    assert_eq!(
        single.values().map(|v| v.0).collect::<Vec<_>>(),
        whole.values().map(|v| v.0).collect::<Vec<_>>()
    );
    // No observer is an error, not a panic.
    assert!(session
        .observe_split(&[(&input, x.view())], &mut [])
        .is_err());
}

#[test]
fn each_observer_sees_its_own_whole_batch() {
    let model = small(ZooConfig::resnet50(), 0.125);
    let session = session(&model, 2);
    let input = model.graph.inputs[0].name.clone();
    // Batches of different sizes: the last one of a set is often short.
    let batches: Vec<_> = [5, 3, 5, 1, 5, 2, 5]
        .iter()
        .enumerate()
        .map(|(i, &n)| images(n, 3 * i))
        .collect();
    let alone = |x: &ndarray::ArrayD<f32>| {
        let mut seen = Seen::new();
        session
            .run_observed(&[(&input, x.view())], &mut recorder(&mut seen))
            .unwrap();
        seen
    };
    // What the batches show when each runs alone, folded together.
    let mut want = Seen::new();
    for b in &batches {
        for (name, (n, m)) in alone(b) {
            let e = want.entry(name).or_insert((0, 0.0));
            e.0 += n;
            e.1 = e.1.max(m);
        }
    }
    let ran = std::sync::Mutex::new(Vec::new());
    let job = |i: usize, observer: &mut &mut dyn Observer| -> Result<usize, RuntimeError> {
        ran.lock().unwrap().push(i);
        let b = &batches[i];
        session.observe_here(&[(&input, b.view())], *observer)?;
        Ok(b.shape()[0])
    };
    let (mut a, mut b) = (Seen::new(), Seen::new());
    let mut done = 0;
    {
        let (mut ra, mut rb) = (recorder(&mut a), recorder(&mut b));
        let mut observers: Vec<&mut dyn Observer> = vec![&mut ra, &mut rb];
        session
            .pull(batches.len(), &mut observers, &job, &mut |_, n| done += n)
            .unwrap();
    }
    assert_eq!(done, 26);
    let mut order = ran.lock().unwrap().clone();
    order.sort_unstable();
    assert_eq!(
        order,
        (0..batches.len()).collect::<Vec<_>>(),
        "each batch once"
    );
    // The two workers together saw every batch's tensors, with the bits of
    // runs alone (largest |x| does not depend on which worker ran what).
    for (name, (n, m)) in &b {
        let e = a.entry(name.clone()).or_insert((0, 0.0));
        e.0 += n;
        e.1 = e.1.max(*m);
    }
    assert_eq!(a, want);

    // One observer: one worker, batches in order.
    ran.lock().unwrap().clear();
    let mut only = Seen::new();
    {
        let mut r = recorder(&mut only);
        let mut one: Vec<&mut dyn Observer> = vec![&mut r];
        session
            .pull(batches.len(), &mut one, &job, &mut |_, _| {})
            .unwrap();
    }
    assert_eq!(*ran.lock().unwrap(), (0..batches.len()).collect::<Vec<_>>());
    assert_eq!(only, want);

    // Jobs without a state to run them with are an error, not a no-op.
    let none: &mut [&mut dyn Observer] = &mut [];
    let e = session.pull(3, none, &job, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("no worker state"), "{e}");

    // Failures: always the lowest failing batch's error, every batch below
    // it run; a batch the graph cannot take is an error, not a panic.
    let wrong = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 1, 31, 32]));
    let failing = |i: usize, observer: &mut &mut dyn Observer| -> Result<usize, RuntimeError> {
        ran.lock().unwrap().push(i);
        if i == 5 || i == 2 {
            let e = session.observe_here(&[(&input, wrong.view())], *observer);
            return Err(RuntimeError::Observer(format!(
                "batch {i}: {}",
                e.unwrap_err()
            )));
        }
        Ok(1)
    };
    for _ in 0..5 {
        ran.lock().unwrap().clear();
        let (mut p, mut q) = (Seen::new(), Seen::new());
        let (mut rp, mut rq) = (recorder(&mut p), recorder(&mut q));
        let mut observers: Vec<&mut dyn Observer> = vec![&mut rp, &mut rq];
        let e = session
            .pull(7, &mut observers, &failing, &mut |_, _| {})
            .unwrap_err();
        assert!(e.to_string().starts_with("observer: batch 2: "), "{e}");
        let ran = ran.lock().unwrap();
        assert!((0..3).all(|i| ran.contains(&i)), "{ran:?}");
    }
}

#[test]
fn observed_peak_bytes_grow_with_the_batch() {
    let model = small(ZooConfig::resnet50(), 0.125);
    let session = session(&model, 2);
    let input = model.graph.inputs[0].name.clone();
    let bytes = |n: usize| session.observed_peak_bytes(&[(input.as_str(), &[n, 1, 32, 32][..])]);
    let (two, eight) = (bytes(2).unwrap(), bytes(8).unwrap());
    assert!(two > 0 && eight > 3 * two, "{two} {eight}");
    // The plan it measured is the one an observed run of that shape uses.
    let x = images(8, 0);
    let mut seen = Seen::new();
    session
        .run_observed(&[(&input, x.view())], &mut recorder(&mut seen))
        .unwrap();
    assert_eq!(bytes(8).unwrap(), eight);
    assert!(session
        .observed_peak_bytes(&[(input.as_str(), &[2, 1, 31, 32][..])])
        .is_err());
}

/// Sessions that share run buffers, run in turns on the calling thread and
/// through their pools with different batch sizes, compute what each
/// computes with buffers of its own.
#[test]
fn sessions_sharing_buffers_compute_what_each_computes_alone() {
    let models = [
        small(ZooConfig::resnet50(), 0.125),
        small(ZooConfig::efficientnet_b0(), 0.125),
    ];
    let opts = SessionOptions {
        threads: 2,
        ..Default::default()
    };
    let alone: Vec<Session> = models
        .iter()
        .map(|m| Session::new(m, opts).unwrap())
        .collect();
    let first = Session::new(&models[0], opts).unwrap();
    let second = Session::new(&models[1], opts)
        .unwrap()
        .sharing_buffers_with(&first);
    let shared = [first, second];
    for (round, n) in [3usize, 8, 1, 5].into_iter().enumerate() {
        for (k, m) in models.iter().enumerate() {
            let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[n, 1, 32, 32]), |i| {
                ((i[0] * 7 + i[2] * 3 + i[3] + round) % 19) as f32 / 9.0 - 1.0
            });
            let input = m.graph.inputs[0].name.clone();
            let want = alone[k].run(&[(&input, x.view())]).unwrap();
            let got = if round % 2 == 0 {
                shared[k].run_here(&[(&input, x.view())]).unwrap()
            } else {
                shared[k].run(&[(&input, x.view())]).unwrap()
            };
            assert_eq!(want[0].shape(), got[0].shape());
            for (a, b) in want[0].iter().zip(got[0].iter()) {
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "round {round}, model {k}: {a} vs {b}"
                );
            }
        }
    }
}

/// A ReduceMean whose axes come as an input (opset 18, as PyTorch's dynamo
/// exporter writes global pooling) does not keep sub-batches from running
/// on separate workers.
#[test]
fn reduce_mean_with_axes_as_input_still_splits_the_batch() {
    use qint8_graph::{Graph, Model, Node, Op, Tensor, ValueInfo};
    let mut init = std::collections::BTreeMap::new();
    init.insert("axes".to_string(), Tensor::vec_i64(&[2, 3]));
    let graph = Graph {
        name: "pool".into(),
        inputs: vec![batched_input("x", &[3, 4, 4])],
        outputs: vec![ValueInfo::f32("y", &[1, 3, 1, 1])],
        nodes: vec![
            Node::new("r", Op::Relu, &["x"], &["r"]),
            Node::new(
                "m",
                Op::ReduceMean {
                    axes: None,
                    keepdims: true,
                    noop_with_empty_axes: false,
                },
                &["r", "axes"],
                &["y"],
            ),
        ],
        initializers: init,
        value_info: vec![],
    };
    let session = session(&Model::new(graph, 18), 2);
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[6, 3, 4, 4]), |i| {
        (i[0] + i[1] * 2 + i[2] * i[3]) as f32 / 7.0 - 1.0
    });
    let (mut a, mut b) = (Seen::new(), Seen::new());
    {
        let (mut ra, mut rb) = (recorder(&mut a), recorder(&mut b));
        let mut observers: Vec<&mut dyn Observer> = vec![&mut ra, &mut rb];
        session
            .observe_split(&[("x", x.view())], &mut observers)
            .unwrap();
    }
    assert!(!a.is_empty() && !b.is_empty(), "both workers observed");
    assert_eq!(a["y"].0 + b["y"].0, 6 * 3);
}

/// Every value an observer sees, copied: name -> (shape, data).
type Copied = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// `Session::record_split` keeps, per sub-batch, exactly the values (shape
/// and data) an observer of that sub-batch sees, with or without a split,
/// run after run on reused buffers; `Session::record_here` those of the
/// whole batch.
#[test]
fn recordings_hold_what_observers_see() {
    let model = small(ZooConfig::efficientnet_b0(), 0.25);
    let session = Session::new(
        &model,
        SessionOptions {
            threads: 2,
            fuse: false,
            simplify: false,
            ..Default::default()
        },
    )
    .unwrap();
    let input = model.graph.inputs[0].name.clone();
    for (round, batch) in [5usize, 5, 1].into_iter().enumerate() {
        let x = images(batch, round);
        assert!(session.splits_batches(&[(&input, x.shape())], batch));
        // Parts 0: `record_here`, the whole batch on this thread.
        for parts in [0, 1, 2] {
            let recordings = match parts {
                0 => vec![session.record_here(&[(&input, x.view())]).unwrap()],
                _ => session.record_split(&[(&input, x.view())], parts).unwrap(),
            };
            let parts = parts.max(1);
            assert_eq!(recordings.len(), parts.min(batch));
            let mut start = 0;
            for rec in &recordings {
                let n = rec.get(&input).unwrap().0[0];
                let sub = x.slice_axis(ndarray::Axis(0), (start..start + n).into());
                start += n;
                let mut seen = Copied::new();
                session
                    .run_observed(
                        &[(&input, sub.view())],
                        &mut |name: &str, s: &[usize], d: &[f32]| {
                            seen.insert(name.to_string(), (s.to_vec(), d.to_vec()));
                            Ok(())
                        },
                    )
                    .unwrap();
                let kept: Copied = rec
                    .iter()
                    .map(|(name, s, d)| (name.to_string(), (s.to_vec(), d.to_vec())))
                    .collect();
                assert_eq!(kept.len(), seen.len(), "batch {batch}, {parts} parts");
                for (name, (s, d)) in &seen {
                    let (ks, kd) = rec.get(name).unwrap_or_else(|| panic!("{name} not kept"));
                    assert_eq!((ks, kd), (s.as_slice(), d.as_slice()), "{name}");
                }
            }
            assert_eq!(start, batch, "the recordings cover the batch");
        }
    }
}

/// `run_here_kept` leaves in its buffer exactly the outputs `run_here`
/// copies out, and nothing else.
#[test]
fn kept_outputs_equal_copied_outputs() {
    let model = small(ZooConfig::resnet50(), 0.125);
    let session = Session::new(&model, SessionOptions::default()).unwrap();
    let input = model.graph.inputs[0].name.clone();
    let output = model.graph.outputs[0].name.clone();
    for batch in [3usize, 1, 3] {
        let x = images(batch, 0);
        let copied = session.run_here(&[(&input, x.view())]).unwrap();
        let kept = session.run_here_kept(&[(&input, x.view())]).unwrap();
        let (shape, data) = kept.get(&output).unwrap();
        assert_eq!(shape, copied[0].shape());
        assert_eq!(data, copied[0].as_slice().unwrap());
        assert_eq!(kept.iter().count(), 1, "only the output is kept");
        assert!(kept.get(&input).is_none());
    }
}

/// `x -> Conv(x, DequantizeLinear(int8 weights))`, then `tail` (a node
/// reading `c` and writing `y`), with a symbolic batch.
fn qdq_conv_graph(tail: qint8_graph::Node) -> qint8_graph::Model {
    use qint8_graph::{ConvAttrs, Graph, Model, Node, Op, Tensor, ValueInfo};
    let mut init = BTreeMap::new();
    let w: Vec<i8> = (0..2 * 9).map(|i| (i * 5 % 11) as i8 - 5).collect();
    init.insert(
        "w".to_string(),
        Tensor::I8(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 1, 3, 3]), w).unwrap()),
    );
    init.insert("s".to_string(), Tensor::scalar_f32(0.05));
    let graph = Graph {
        name: "qdq".into(),
        inputs: vec![batched_input("x", &[1, 4, 4])],
        outputs: vec![ValueInfo::f32("y", &[1, 2, 2, 2])],
        nodes: vec![
            Node::new("dq", Op::DequantizeLinear { axis: 1 }, &["w", "s"], &["wd"]),
            Node::new(
                "conv",
                Op::Conv(ConvAttrs {
                    strides: vec![1, 1],
                    pads: vec![0; 4],
                    dilations: vec![1, 1],
                    group: 1,
                    ..Default::default()
                }),
                &["x", "wd"],
                &["c"],
            ),
            tail,
        ],
        initializers: init,
        value_info: vec![],
    };
    Model::new(graph, 13)
}

/// Which sub-batches observed `y`, and the outputs of a plain run: the
/// batch is split only where no value mixes samples, and a run gives the
/// same outputs either way.
fn split_and_outputs(model: &qint8_graph::Model) -> (Vec<usize>, Vec<f32>, Vec<f32>) {
    let x = images(6, 3)
        .slice_move(ndarray::s![.., 0..1, 0..4, 0..4])
        .into_dyn();
    let session = |threads| session(model, threads);
    let (mut a, mut b) = (Seen::new(), Seen::new());
    {
        let (mut ra, mut rb) = (recorder(&mut a), recorder(&mut b));
        let mut observers: Vec<&mut dyn Observer> = vec![&mut ra, &mut rb];
        session(2)
            .observe_split(&[("x", x.view())], &mut observers)
            .unwrap();
    }
    let seen = [&a, &b]
        .iter()
        .map(|s| s.get("y").map_or(0, |v| v.0))
        .collect();
    let two = session(2).run(&[("x", x.view())]).unwrap();
    let one = session(1).run(&[("x", x.view())]).unwrap();
    (
        seen,
        two[0].iter().copied().collect(),
        one[0].iter().copied().collect(),
    )
}

/// Weights behind a DequantizeLinear (a QDQ model's) do not count as values
/// without the batch in front: the batch still splits.
#[test]
fn qdq_weights_do_not_keep_the_batch_from_splitting() {
    use qint8_graph::{Node, Op};
    let model = qdq_conv_graph(Node::new("r", Op::Relu, &["c"], &["y"]));
    let (seen, two, one) = split_and_outputs(&model);
    assert_eq!(seen, vec![3 * 8, 3 * 8], "each worker ran half the batch");
    assert_eq!(two, one);
}

/// A graph that mixes samples (Softmax over the batch axis) runs whole,
/// and its outputs are those of a one-thread run.
#[test]
fn a_graph_mixing_samples_runs_whole() {
    use qint8_graph::{Node, Op};
    let model = qdq_conv_graph(Node::new("sm", Op::Softmax { axis: 0 }, &["c"], &["y"]));
    assert!(!session(&model, 2).splits_batches(&[("x", &[6, 1, 4, 4][..])], 6));
    let (seen, two, one) = split_and_outputs(&model);
    assert_eq!(
        seen,
        vec![6 * 8, 0],
        "the first observer saw the whole batch"
    );
    assert_eq!(two, one);
}

/// An input of the wrong shape is reported with the whole batch's shape by
/// every way of running, splitting ones included.
#[test]
fn wrong_input_shapes_are_reported_whole() {
    use qint8_graph::{Node, Op};
    let model = qdq_conv_graph(Node::new("r", Op::Relu, &["c"], &["y"]));
    let session = session(&model, 2);
    let x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[6, 1, 5, 5]));
    let inputs = [("x", x.view())];
    let (mut a, mut b) = (Seen::new(), Seen::new());
    let (mut ra, mut rb) = (recorder(&mut a), recorder(&mut b));
    let mut observers: Vec<&mut dyn Observer> = vec![&mut ra, &mut rb];
    let errors = [
        session.run(&inputs).map(drop).unwrap_err(),
        session.observe_split(&inputs, &mut observers).unwrap_err(),
        session.record_split(&inputs, 2).map(drop).unwrap_err(),
        session.record_here(&inputs).map(drop).unwrap_err(),
        session
            .observe_here(&inputs, &mut recorder(&mut Seen::new()))
            .unwrap_err(),
    ];
    for e in errors {
        let msg = e.to_string();
        assert!(msg.contains("[6, 1, 5, 5]"), "{msg}");
    }
}

/// What an observed run of `x` shows, and its outputs.
fn observed(s: &Session, x: &ndarray::ArrayD<f32>) -> (Seen, Vec<ndarray::ArrayD<f32>>) {
    let mut seen = Seen::new();
    let out = s
        .run_observed(&[("input", x.view())], &mut recorder(&mut seen))
        .unwrap();
    (seen, out)
}

/// A one-thread session that fuses nothing: every value is shown.
fn unfused(model: &qint8_graph::Model) -> Session {
    Session::new(
        model,
        SessionOptions {
            threads: 1,
            fuse: false,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Fusion swallows a convolution's output (Conv + Relu, Conv + residual
/// Add); kept visible, those outputs are shown with the values the
/// unfused graph gives them, the others still fuse, and the run's outputs
/// do not change.
#[test]
fn visible_values_survive_fusion() {
    let model = small(ZooConfig::resnet50(), 0.125);
    let x = images(3, 5);
    let observe = |s: &Session| observed(s, &x);
    let unfused = unfused(&model);
    let (all, reference) = observe(&unfused);
    // Every convolution's output: fused away by default.
    let convs: Vec<String> = unfused
        .graph()
        .nodes
        .iter()
        .filter(|n| matches!(n.op, qint8_graph::Op::Conv(_)))
        .map(|n| n.outputs[0].clone())
        .collect();
    let (fused_seen, fused_out) = observe(&session(&model, 1));
    let hidden = convs
        .iter()
        .filter(|c| !fused_seen.contains_key(*c))
        .count();
    assert!(
        hidden > convs.len() / 2,
        "only {hidden} of {} hidden",
        convs.len()
    );
    // Every other one kept visible: those are shown, the rest still fuse.
    let (keep, rest): (Vec<_>, Vec<_>) = convs.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let kept = session(&model, 1).keeping_visible(keep.iter().map(|(_, c)| c.to_string()));
    let (seen, out) = observe(&kept);
    for (_, c) in &keep {
        assert_eq!(seen.get(*c), all.get(*c), "{c}");
    }
    assert!(rest.iter().any(|(_, c)| !seen.contains_key(*c)));
    assert_eq!(out, reference);
    assert_eq!(fused_out, reference);
}

/// Conv + SiLU, as EfficientNet exports it (`Sigmoid(y)` and
/// `Mul(y, Sigmoid(y))` reading a convolution's output `y`), runs as one
/// step with SiLU in the convolution's epilogue: neither `y` nor the
/// Sigmoid's output is shown, the SiLU output is, and every value equals
/// the unfused graph's bit for bit.
#[test]
fn silu_fuses_into_convolutions() {
    let model = small(ZooConfig::efficientnet_b0(), 0.25);
    let x = images(3, 2);
    let observe = |s: &Session| observed(s, &x);
    let unfused = unfused(&model);
    let (all, reference) = observe(&unfused);
    let g = unfused.graph();
    let conv_outputs: std::collections::HashSet<&str> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, qint8_graph::Op::Conv(_)))
        .map(|n| n.outputs[0].as_str())
        .collect();
    // (y, Sigmoid(y), SiLU(y)) for every convolution output y (not the
    // squeeze-and-excitation gates, whose Mul scales another tensor).
    let sites: Vec<[&str; 3]> = g
        .nodes
        .iter()
        .filter(|s| matches!(s.op, qint8_graph::Op::Sigmoid))
        .filter(|s| conv_outputs.contains(s.inputs[0].as_str()))
        .filter_map(|s| {
            let m = g.nodes.iter().find(|m| {
                matches!(m.op, qint8_graph::Op::Mul)
                    && m.inputs.contains(&s.outputs[0])
                    && m.inputs.contains(&s.inputs[0])
            })?;
            Some([
                s.inputs[0].as_str(),
                s.outputs[0].as_str(),
                m.outputs[0].as_str(),
            ])
        })
        .collect();
    assert!(sites.len() >= 16, "{} SiLU sites", sites.len());
    let (seen, out) = observe(&session(&model, 1));
    for [y, sig, silu] in &sites {
        assert!(
            !seen.contains_key(*y) && !seen.contains_key(*sig),
            "{y} not fused"
        );
        assert_eq!(seen.get(*silu), all.get(*silu), "{silu}");
    }
    assert_eq!(out, reference);
    // Two threads split the batch: the same values.
    let (_, two) = observe(&session(&model, 2));
    assert_eq!(two, reference);
}
