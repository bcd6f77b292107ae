//! Dense f32 matrix products through the `gemm` crate (run-time selected
//! AVX2/AVX-512 microkernels), with a checked, safe interface.

use gemm::Parallelism;

/// A strided matrix view: element `(i, j)` is at `offset + i * rs + j * cs`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    /// Backing data.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// This matrix's transpose, as a view of the same data.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `c[m x n] (row stride ldc) = a[m x k] * b[k x n] (+ c when `accumulate`)`.
///
/// Returns `false` (computing nothing) if a view is too short for its
/// dimensions; callers size buffers from inferred shapes, so this is an
/// internal consistency check rather than a user error.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if !(a.fits(m, k) && b.fits(k, n) && (m - 1) * ldc + n <= c.len()) {
        return false;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return true;
    }
    let par = if threads > 1 && m * n * k >= 1 << 15 && !super::is_sequential() {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the checks above keep every accessed element inside the slices;
    // `c` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    true
}

/// Reference product for tests: the triple loop.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_reference(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
            }
            let dst = &mut c[i * ldc + j];
            *dst = if accumulate {
                *dst + s as f32
            } else {
                s as f32
            };
        }
    }
}
