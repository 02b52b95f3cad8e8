//! The CPU device's GEMM: faer on strided host views, plus the `vzeroupper` hygiene it needs.
//!
//! Why faer and how it is threaded is measured and recorded in `cpu/mod.rs`.

/// Below this many multiply-adds a GEMM runs on one thread: on the model's small shapes faer's
/// parallel split costs more than it saves (see the measurements above).
pub const PAR_MIN_MACS: usize = 1 << 21;

/// A read-only strided matrix inside a host slice: element (i, j) is `data[off + i*rs + j*cs]`.
pub struct StridedRef<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

/// A mutable strided matrix inside a host slice.
pub struct StridedMut<'a> {
    pub data: &'a mut [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

fn check(len: usize, off: usize, rows: usize, cols: usize, rs: usize, cs: usize, what: &str) {
    if rows == 0 || cols == 0 {
        return;
    }
    let last = off + (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last < len,
        "gemm: {what} view ({rows}x{cols}, off {off}, strides {rs},{cs}) exceeds buffer of {len}"
    );
}

/// `c (+)= a · b` with `c: m×n`, `a: m×k`, `b: k×n`, all strided, on `threads` threads of the
/// current rayon pool (1 = the calling thread only).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: StridedMut<'_>,
    a: StridedRef<'_>,
    b: StridedRef<'_>,
    accumulate: bool,
    threads: usize,
) {
    check(c.data.len(), c.off, m, n, c.rs, c.cs, "c");
    check(a.data.len(), a.off, m, k, a.rs, a.cs, "a");
    check(b.data.len(), b.off, k, n, b.rs, b.cs, "b");
    if m == 0 || n == 0 {
        return;
    }
    let par = if threads > 1 && m * n * k >= PAR_MIN_MACS {
        faer::Par::rayon(threads)
    } else {
        faer::Par::Seq
    };
    let accum = if accumulate {
        faer::Accum::Add
    } else {
        faer::Accum::Replace
    };
    // SAFETY: every element each view can reach was bounds-checked above; `c` is a unique borrow
    // and cannot alias `a` or `b` (shared borrows); strides are non-negative and fit in isize.
    unsafe {
        let cm = faer::MatMut::from_raw_parts_mut(
            c.data.as_mut_ptr().add(c.off),
            m,
            n,
            c.rs as isize,
            c.cs as isize,
        );
        let am = faer::MatRef::from_raw_parts(
            a.data.as_ptr().add(a.off),
            m,
            k,
            a.rs as isize,
            a.cs as isize,
        );
        let bm = faer::MatRef::from_raw_parts(
            b.data.as_ptr().add(b.off),
            k,
            n,
            b.rs as isize,
            b.cs as isize,
        );
        faer::linalg::matmul::matmul(cm, accum, am, bm, 1.0f32, par);
    }
    clear_upper_simd_state();
}

/// Clears the upper halves of the AVX registers after faer's AVX/AVX-512 kernels (`vzeroupper`).
///
/// Without it, the SSE-encoded code that runs next on the same thread (libm's `expf` in softmax,
/// SiLU and cross-entropy) pays the dirty-upper-state penalty: measured 10-20× slower
/// element-wise kernels on the development machine (Xeon with AVX-512).
fn clear_upper_simd_state() {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx")]
        fn zeroupper() {
            std::arch::x86_64::_mm256_zeroupper();
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU supports AVX (checked just above).
            unsafe { zeroupper() }
        }
    }
}

/// Single-threaded [`sgemm`] (used inside kernels that are already parallel).
pub fn sgemm_seq(
    m: usize,
    n: usize,
    k: usize,
    c: StridedMut<'_>,
    a: StridedRef<'_>,
    b: StridedRef<'_>,
    accumulate: bool,
) {
    sgemm(m, n, k, c, a, b, accumulate, 1)
}
