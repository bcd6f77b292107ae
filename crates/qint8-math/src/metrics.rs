//! Error metrics between a reference tensor and its quantized approximation.

use crate::error::{MathError, Result};

fn check_pair(a: &[f32], b: &[f32]) -> Result<()> {
    if a.len() != b.len() {
        return Err(MathError::LengthMismatch {
            what: "metric operands",
            expected: a.len(),
            got: b.len(),
        });
    }
    for (what, x) in [("reference", a), ("approximation", b)] {
        if let Some((index, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(MathError::NonFiniteData { what, index, value });
        }
    }
    Ok(())
}

/// Signal-to-quantization-noise ratio in dB:
/// `10 log10(sum x^2 / sum (x - y)^2)`. Infinite when `y == x`; 0 for empty input
/// or an all-zero reference with nonzero error... more precisely `-inf` dB when
/// the reference has no energy but the error does.
pub fn sqnr_db(reference: &[f32], approx: &[f32]) -> Result<f64> {
    check_pair(reference, approx)?;
    let (mut sig, mut noise) = (0.0f64, 0.0f64);
    for (&x, &y) in reference.iter().zip(approx) {
        let (x, y) = (x as f64, y as f64);
        sig += x * x;
        noise += (x - y) * (x - y);
    }
    Ok(if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (sig / noise).log10()
    })
}

/// Cosine similarity `<x, y> / (|x| |y|)`; 1 when both are zero, 0 when only one is.
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> Result<f64> {
    check_pair(a, b)?;
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    Ok(match (aa == 0.0, bb == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => ab / (aa.sqrt() * bb.sqrt()),
    })
}

/// Largest `|x - y|` (0 for empty input).
pub fn max_abs_error(a: &[f32], b: &[f32]) -> Result<f32> {
    check_pair(a, b)?;
    Ok(a.iter()
        .zip(b)
        .fold(0.0f32, |m, (&x, &y)| m.max((x - y).abs())))
}

/// `KL(P || Q)` in nats between two histograms of the same binning, each
/// normalized to sum 1. Infinite when `P` has mass where `Q` has none.
pub fn kl_divergence(p: &[u64], q: &[u64]) -> Result<f64> {
    if p.len() != q.len() {
        return Err(MathError::LengthMismatch {
            what: "histograms",
            expected: p.len(),
            got: q.len(),
        });
    }
    let ps: f64 = p.iter().map(|&v| v as f64).sum();
    let qs: f64 = q.iter().map(|&v| v as f64).sum();
    if ps == 0.0 || qs == 0.0 {
        return Err(MathError::EmptyHistogram);
    }
    let mut kl = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        if a > 0 {
            if b == 0 {
                return Ok(f64::INFINITY);
            }
            let (pa, qb) = (a as f64 / ps, b as f64 / qs);
            kl += pa * (pa / qb).ln();
        }
    }
    Ok(kl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let y = [1.0, 2.0, 3.0, 5.0];
        // signal 30, noise 1 -> 10 log10(30)
        assert!((sqnr_db(&x, &y).unwrap() - 10.0 * 30f64.log10()).abs() < 1e-12);
        assert_eq!(sqnr_db(&x, &x).unwrap(), f64::INFINITY);
        assert!((cosine_similarity(&x, &x).unwrap() - 1.0).abs() < 1e-12);
        assert!((cosine_similarity(&[1.0, 0.0], &[0.0, 1.0]).unwrap()).abs() < 1e-12);
        assert_eq!(cosine_similarity(&[0.0], &[0.0]).unwrap(), 1.0);
        assert_eq!(max_abs_error(&x, &y).unwrap(), 1.0);
        assert!(sqnr_db(&x, &[1.0]).is_err());
        assert!(matches!(
            sqnr_db(&[f32::NAN], &[1.0]),
            Err(MathError::NonFiniteData {
                what: "reference",
                index: 0,
                ..
            })
        ));
    }

    #[test]
    fn kl_by_hand() {
        assert_eq!(kl_divergence(&[1, 1], &[1, 1]).unwrap(), 0.0);
        let k = kl_divergence(&[1, 0], &[1, 1]).unwrap();
        assert!((k - 2f64.ln()).abs() < 1e-12);
        assert_eq!(kl_divergence(&[1, 1], &[1, 0]).unwrap(), f64::INFINITY);
        assert!(kl_divergence(&[0, 0], &[1, 1]).is_err());
    }
}
