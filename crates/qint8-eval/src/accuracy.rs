//! Top-1/top-5 accuracy and prediction agreement.

use qint8_calibration::ImageDataset;
use qint8_graph::Model;
use qint8_runtime::{Session, SessionOptions};

use crate::{EvalError, Result};

/// Whether `a` ranks above `b`: larger, with NaN above every number (as
/// `numpy.argmax` treats NaN).
fn above(a: f32, b: f32) -> bool {
    if a.is_nan() {
        !b.is_nan()
    } else {
        !b.is_nan() && a > b
    }
}

/// Whether `a` and `b` rank equal (both NaN, or numerically equal).
fn level(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a == b
}

/// Index of the largest logit; the lowest index wins ties (as
/// `numpy.argmax`, NaN counting as the largest). 0 for an empty row.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate().skip(1) {
        if above(x, row[best]) {
            best = i;
        }
    }
    best
}

/// Rank of class `label` in `row` sorted best first with ties broken by
/// lower index: logits above it plus equal logits at lower indices. The
/// label is a top-k hit when its rank is below k, so a top-1 hit is exactly
/// `argmax(row) == label`, and every label is a top-k hit when there are at
/// most k classes. `label` must index `row`.
pub fn rank_of(row: &[f32], label: usize) -> usize {
    let x = row[label];
    row.iter()
        .enumerate()
        .filter(|&(j, &y)| above(y, x) || (j < label && level(y, x)))
        .count()
}

/// Counts of correct predictions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Score {
    /// Images seen.
    pub n: usize,
    /// Top-1 hits.
    pub top1: usize,
    /// Top-5 hits.
    pub top5: usize,
}

impl Score {
    /// Counts one image with logits `row` and true class `label` (which
    /// must index `row`).
    pub fn add(&mut self, row: &[f32], label: usize) {
        let rank = rank_of(row, label);
        self.n += 1;
        self.top1 += usize::from(rank < 1);
        self.top5 += usize::from(rank < 5);
    }

    /// Top-1 hits as a fraction of the images (0 when none).
    pub fn top1_fraction(&self) -> f64 {
        self.top1 as f64 / self.n.max(1) as f64
    }

    /// Top-5 hits as a fraction of the images (0 when none).
    pub fn top5_fraction(&self) -> f64 {
        self.top5 as f64 / self.n.max(1) as f64
    }
}

/// The result of scoring a model on a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accuracy {
    /// Hits.
    pub score: Score,
    /// Classes the model predicts (logits per image).
    pub classes: usize,
    /// The predicted class of every image, in dataset order.
    pub predictions: Vec<usize>,
    /// The true class of every image, in dataset order.
    pub labels: Vec<usize>,
}

impl Accuracy {
    /// Images on which `self` and `other` predict the same class.
    pub fn agreement(&self, other: &Accuracy) -> usize {
        self.predictions
            .iter()
            .zip(&other.predictions)
            .filter(|(a, b)| a == b)
            .count()
    }

    /// Half-width, in percentage points, of the 95% confidence interval of
    /// the top-1 difference between `self` and `other` on the same images
    /// (paired: only images one gets right and the other wrong vary; normal
    /// approximation of the McNemar difference, `1.96 sqrt(b + c - (b -
    /// c)^2 / n) / n`). `None` when the two were not scored on the same
    /// labels.
    pub fn top1_difference_ci95(&self, other: &Accuracy) -> Option<f64> {
        let n = self.labels.len();
        if n == 0
            || other.labels != self.labels
            || self.predictions.len() != n
            || other.predictions.len() != n
        {
            return None;
        }
        let (mut b, mut c) = (0f64, 0f64);
        for ((&l, &p), &q) in self
            .labels
            .iter()
            .zip(&self.predictions)
            .zip(&other.predictions)
        {
            match (p == l, q == l) {
                (true, false) => b += 1.0,
                (false, true) => c += 1.0,
                _ => {}
            }
        }
        let n = n as f64;
        let var = (b + c - (b - c) * (b - c) / n).max(0.0);
        Some(1.96 * var.sqrt() / n * 100.0)
    }
}

/// Scores a batch's `[batch, classes]` logits (row-major) against `labels`,
/// pushing each image's predicted class to `predictions`. `what` names the
/// model in errors: a row count that differs from the labels, no classes,
/// or a label outside the classes.
pub fn score_logits(
    logits: &[f32],
    labels: &[usize],
    score: &mut Score,
    predictions: &mut Vec<usize>,
    what: &str,
) -> Result<usize> {
    if labels.is_empty() {
        return Ok(0);
    }
    let classes = logits.len() / labels.len();
    if classes == 0 || classes * labels.len() != logits.len() {
        return Err(EvalError::Invalid(format!(
            "{what}: {} logits for {} images; need [batch, classes]",
            logits.len(),
            labels.len()
        )));
    }
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        if label >= classes {
            return Err(EvalError::Invalid(format!(
                "{what}: label {label}, but the model has only {classes} classes"
            )));
        }
        score.add(row, label);
        predictions.push(argmax(row));
    }
    Ok(classes)
}

/// What [`Evaluator`]'s batch loop hands on: a batch's labels (if any),
/// its logits (row-major) and the number of classes.
type BatchLogits<'a> = dyn FnMut(Option<&[usize]>, &[f32], usize) -> Result<()> + 'a;

/// A model ready to score labeled images (or to predict unlabeled ones): its session (QDQ models run in
/// INT8: integer convolutions where the CPU has them, the rest simulated)
/// and the names of its image input and logits output.
pub struct Evaluator {
    session: Session,
    input: String,
    name: String,
}

impl Evaluator {
    /// A session for `model` (one image input, `[batch, classes]` logits as
    /// its first output) on `threads` threads (0: all cores); `name` names
    /// the model in errors.
    pub fn new(model: &Model, name: &str, threads: usize) -> Result<Self> {
        let g = &model.graph;
        if g.inputs.len() != 1 {
            return Err(EvalError::Invalid(format!(
                "{name}: the model has {} inputs; classification feeds exactly one (images)",
                g.inputs.len()
            )));
        }
        if g.outputs.is_empty() {
            return Err(EvalError::Invalid(format!(
                "{name}: the model has no outputs"
            )));
        }
        let session = Session::new(
            model,
            SessionOptions {
                threads,
                ..Default::default()
            },
        )?;
        Ok(Self {
            input: g.inputs[0].name.clone(),
            session,
            name: name.to_string(),
        })
    }

    /// The runtime session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Scores every image of `data` (which must have labels) in batches of
    /// `batch`, telling `progress` the images done after each batch.
    pub fn evaluate(
        &self,
        data: &ImageDataset,
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Accuracy> {
        self.run(data, batch, None, progress)
    }

    /// [`evaluate`](Self::evaluate), also returning every image's logits
    /// (row-major `[images, classes]`).
    pub fn evaluate_logits(
        &self,
        data: &ImageDataset,
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(Accuracy, Vec<f32>)> {
        let mut logits = Vec::new();
        let a = self.run(data, batch, Some(&mut logits), progress)?;
        Ok((a, logits))
    }

    /// Every image's top-1 class (the index of its largest logit, as
    /// [`argmax`]), in dataset order; `data` needs no labels. Scoring
    /// another model against these (with [`ImageDataset::with_labels`])
    /// makes its top-1 the agreement with this one.
    pub fn predict(
        &self,
        data: &ImageDataset,
        batch: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<usize>> {
        let mut predictions = Vec::with_capacity(data.len());
        self.each_batch(data, batch, &mut |_, logits, classes| {
            predictions.extend(logits.chunks_exact(classes).map(argmax));
            progress(predictions.len());
            Ok(())
        })?;
        Ok(predictions)
    }

    /// Runs `data` in batches of `batch` and hands `each` every batch's
    /// labels, logits (row-major) and number of classes, checked to be
    /// `[batch, classes]` logits with at least one class.
    fn each_batch(
        &self,
        data: &ImageDataset,
        batch: usize,
        each: &mut BatchLogits<'_>,
    ) -> Result<()> {
        if batch == 0 {
            return Err(EvalError::Invalid("batch size is 0".into()));
        }
        if data.is_empty() {
            return Err(EvalError::Invalid(format!(
                "{}: no images to evaluate",
                self.name
            )));
        }
        for b in data.batches(batch) {
            let b = b?;
            let out = self
                .session
                .run(&[(self.input.as_str(), b.inputs.view())])?;
            let logits = out.first().ok_or_else(|| {
                EvalError::Invalid(format!("{}: the model produced no outputs", self.name))
            })?;
            if logits.ndim() != 2 || logits.shape()[0] != b.len() || logits.shape()[1] == 0 {
                return Err(EvalError::Invalid(format!(
                    "{}: output shape {:?} for a batch of {}; need [batch, classes] logits",
                    self.name,
                    logits.shape(),
                    b.len()
                )));
            }
            let flat: Vec<f32> = logits.iter().copied().collect();
            each(b.labels.as_deref(), &flat, logits.shape()[1])?;
        }
        Ok(())
    }

    fn run(
        &self,
        data: &ImageDataset,
        batch: usize,
        mut keep: Option<&mut Vec<f32>>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Accuracy> {
        let mut score = Score::default();
        let mut predictions = Vec::with_capacity(data.len());
        let mut all_labels = Vec::with_capacity(data.len());
        let mut classes = 0;
        let unlabeled = || EvalError::Invalid(format!("{}: the dataset has no labels", self.name));
        if data.labels().is_none() {
            return Err(unlabeled());
        }
        self.each_batch(data, batch, &mut |labels, flat, _| {
            let labels = labels.ok_or_else(unlabeled)?;
            classes = score_logits(flat, labels, &mut score, &mut predictions, &self.name)?;
            if let Some(k) = keep.as_deref_mut() {
                k.extend_from_slice(flat);
            }
            all_labels.extend_from_slice(labels);
            progress(score.n);
            Ok(())
        })?;
        Ok(Accuracy {
            score,
            classes,
            predictions,
            labels: all_labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
        assert_eq!(argmax(&[0.0, f32::NAN, 9.0, f32::NAN]), 1);
    }

    #[test]
    fn ranks_break_ties_by_index() {
        let row = [1.0, 3.0, 3.0, 2.0, 0.5];
        assert_eq!(rank_of(&row, 1), 0);
        assert_eq!(rank_of(&row, 2), 1);
        assert_eq!(rank_of(&row, 3), 2);
        assert_eq!(rank_of(&row, 0), 3);
        assert_eq!(rank_of(&row, 4), 4);
        // A top-1 hit is exactly argmax == label.
        for l in 0..row.len() {
            assert_eq!(rank_of(&row, l) == 0, argmax(&row) == l);
        }
    }

    #[test]
    fn few_classes_make_every_label_a_top5_hit() {
        let row = [0.1, 0.9, -3.0];
        assert!((0..3).all(|l| rank_of(&row, l) < 5));
    }

    #[test]
    fn score_logits_counts_and_rejects_bad_shapes() {
        let mut s = Score::default();
        let mut p = Vec::new();
        let logits = [0.0, 1.0, 2.0, 5.0, 1.0, 0.0];
        assert_eq!(
            score_logits(&logits, &[2, 1], &mut s, &mut p, "m").unwrap(),
            3
        );
        assert_eq!((s.n, s.top1, s.top5, p.clone()), (2, 1, 2, vec![2, 0]));
        let e = score_logits(&logits, &[3, 0], &mut s, &mut p, "m").unwrap_err();
        assert!(e.to_string().contains("label 3"), "{e}");
        let e = score_logits(&logits[..5], &[0, 0], &mut s, &mut p, "m").unwrap_err();
        assert!(e.to_string().contains("[batch, classes]"), "{e}");
        let labels = vec![1, 2, 0];
        let a = Accuracy {
            score: s,
            classes: 3,
            predictions: vec![1, 2, 2],
            labels: labels.clone(),
        };
        let b = Accuracy {
            score: s,
            classes: 3,
            predictions: vec![1, 0, 0],
            labels,
        };
        assert_eq!(a.agreement(&b), 1);
        // One image each way: b = c = 1, n = 3: 1.96 sqrt(2) / 3.
        let ci = a.top1_difference_ci95(&b).unwrap();
        assert!((ci - 1.96 * 2f64.sqrt() / 3.0 * 100.0).abs() < 1e-9, "{ci}");
        assert_eq!(a.top1_difference_ci95(&a).unwrap(), 0.0);
    }
}
