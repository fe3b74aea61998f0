//! Every kernel table the machine can run (`simd::available()`: scalar first, then each SIMD
//! level the CPU supports) against
//!  1. the exact value of what it is asked to compute: Σ dequant(w)·dequant(q8(x)) in f64,
//!     with the weights dequantized by `dequantize_row` (itself checked against gguf-py) and
//!     the 8-bit activation blocks expanded from their public fields;
//!  2. the scalar table;
//!
//! for every weight format, on the real rows of the fixtures and on random blocks, for 1, 3
//! and 64 tokens and odd block counts. Integer sums inside a block are exact, so the only
//! freedom a kernel has is the order of its f32 additions: the tolerance is 1e-5 of Σ|terms|
//! (about 80 f32 ulps of the largest partial sum).
//!
//! And: a token's output does not depend on the batch it is computed in, bit for bit (the
//! server batches unrelated requests together and relies on this).

mod common;

use common::{random_acts, random_rows, Rng};
use gemma3_kernels::formats::{BlockQ8K, BlockQ8_0, QK, QK_K};
use gemma3_kernels::matmul::{matmul, matmul_with};
use gemma3_kernels::quant::{dequantize_row, quantize_q8_0, quantize_q8_k};
use gemma3_kernels::simd::{available, DotKernels, SCALAR};
use gemma3_kernels::{ActFormat, MatmulScratch, QMatrix, WeightFormat};
use half::f16;

const REL_TOL: f64 = 1e-5;

/// A weight matrix under test.
struct Case {
    name: String,
    format: WeightFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for fx in common::dequant_fixtures() {
        v.push(Case {
            name: fx.name.clone(),
            format: fx.format,
            rows: fx.rows,
            cols: fx.cols,
            data: fx.raw.clone(),
        });
    }
    let mut rng = Rng::new(0x7461_626c_6573);
    for format in WeightFormat::ALL {
        // Odd block counts: 5 legacy blocks, 3 super-blocks; 33 for the float formats. 37 rows
        // so that matmul splits the rows over several tasks with a ragged last one.
        let cols_list: &[usize] = match format.block_size() {
            1 => &[33, 160],
            32 => &[32 * 5, 32],
            _ => &[256 * 3, 256],
        };
        for &cols in cols_list {
            v.push(Case {
                name: format!("random {format} 37×{cols}"),
                format,
                rows: 37,
                cols,
                data: random_rows(&mut rng, format, 37, cols),
            });
        }
    }
    v
}

/// The activations the kernels actually see for `x` (tokens × cols): the 8-bit blocks
/// expanded to f32 (d·q), or `x` itself for float weights.
fn effective_acts(format: WeightFormat, x: &[f32]) -> Vec<f32> {
    match format.act_format() {
        ActFormat::F32 => x.to_vec(),
        ActFormat::Q8_0 => {
            let mut b = vec![BlockQ8_0::default(); x.len() / QK];
            quantize_q8_0(x, &mut b);
            b.iter()
                .flat_map(|b| {
                    let d = f16::from_bits(u16::from_le_bytes(b.d)).to_f32();
                    b.qs.iter().map(move |&q| d * q as f32)
                })
                .collect()
        }
        ActFormat::Q8K => {
            let mut b = vec![BlockQ8K::default(); x.len() / QK_K];
            quantize_q8_k(x, &mut b);
            b.iter()
                .flat_map(|b| {
                    // bsums must be the sums of each 16 quants (kernels fold the mins with them).
                    for (j, s) in b.bsums.iter().enumerate() {
                        let sum: i32 = b.qs[16 * j..16 * j + 16].iter().map(|&q| q as i32).sum();
                        assert_eq!(*s as i32, sum, "q8_K bsums");
                    }
                    b.qs.iter().map(move |&q| b.d * q as f32)
                })
                .collect()
        }
    }
}

/// Activations for `n` tokens: random in [-2, 2]; token 1 all zeros (amax = 0 blocks) and
/// token 2 with one large outlier, when the batch has them.
fn acts(rng: &mut Rng, n: usize, cols: usize) -> Vec<f32> {
    let mut x = random_acts(rng, n * cols);
    if n > 1 {
        x[cols..2 * cols].fill(0.0);
    }
    if n > 2 {
        x[2 * cols + cols / 3] = 50.0;
    }
    x
}

fn run_table(k: &DotKernels, c: &Case, x: &[f32], n: usize) -> Vec<f32> {
    let m = QMatrix::new(c.format, c.rows, c.cols, &c.data).expect("valid matrix");
    let mut out = vec![f32::NAN; n * c.rows];
    matmul_with(k, &m, x, n, &mut out, &mut MatmulScratch::default());
    out
}

/// Check `table` on every case; Err describes the first disagreement. Returns the largest
/// |kernel − exact| / Σ|terms| seen. `run` computes a case's matmul (the table's, or a
/// deliberately broken one in the self-test).
fn check_table(name: &str, run: impl Fn(&Case, &[f32], usize) -> Vec<f32>) -> Result<f64, String> {
    let mut rng = Rng::new(42);
    let mut worst = 0.0f64;
    for c in cases() {
        let mut w = vec![0.0f32; c.rows * c.cols];
        let rb = c.format.row_bytes(c.cols);
        for r in 0..c.rows {
            dequantize_row(
                c.format,
                &c.data[r * rb..(r + 1) * rb],
                &mut w[r * c.cols..(r + 1) * c.cols],
            );
        }
        for n in [1usize, 3, 5, 64] {
            let x = acts(&mut rng, n, c.cols);
            let a = effective_acts(c.format, &x);
            let scalar = run_table(&SCALAR, &c, &x, n);
            let out = run(&c, &x, n);
            for t in 0..n {
                for r in 0..c.rows {
                    let wr = &w[r * c.cols..(r + 1) * c.cols];
                    let at = &a[t * c.cols..(t + 1) * c.cols];
                    let exact: f64 = wr.iter().zip(at).map(|(&p, &q)| p as f64 * q as f64).sum();
                    let mag: f64 = wr
                        .iter()
                        .zip(at)
                        .map(|(&p, &q)| (p as f64 * q as f64).abs())
                        .sum();
                    let got = out[t * c.rows + r] as f64;
                    let s = scalar[t * c.rows + r] as f64;
                    let tol = REL_TOL * mag + 1e-30;
                    if !(got.is_finite() && (got - exact).abs() <= tol) {
                        return Err(format!(
                            "{} [{}] n={n} token {t} row {r}: got {got:e}, exact {exact:e} (Σ|terms| {mag:e})",
                            c.name, name
                        ));
                    }
                    if (got - s).abs() > tol {
                        return Err(format!(
                            "{} [{}] n={n} token {t} row {r}: got {got:e}, scalar {s:e} (Σ|terms| {mag:e})",
                            c.name, name
                        ));
                    }
                    if mag > 0.0 {
                        worst = worst.max((got - exact).abs() / mag);
                    }
                }
            }
        }
    }
    Ok(worst)
}

#[test]
fn every_table_computes_the_exact_dot_and_agrees_with_scalar() {
    let tables = available();
    assert_eq!(tables[0].name, SCALAR.name, "scalar comes first");
    eprintln!(
        "kernel tables on this machine: {:?}",
        tables.iter().map(|k| k.name).collect::<Vec<_>>()
    );
    for k in &tables {
        match check_table(k.name, |c, x, n| run_table(k, c, x, n)) {
            Ok(worst) => eprintln!(
                "[{}] largest |kernel − exact| / Σ|terms|: {worst:.2e} (tolerance {REL_TOL:e})",
                k.name
            ),
            Err(e) => panic!("{e}"),
        }
    }
}

/// The check is sharp enough to see typical kernel bugs: a dropped tail block, and the K-quant
/// mins left out (simulated by running the scalar table on weights altered that way).
#[test]
fn the_check_catches_broken_kernels() {
    let drop_last_block = |c: &Case, x: &[f32], n: usize| {
        let mut broken = Case {
            name: c.name.clone(),
            data: c.data.clone(),
            ..*c
        };
        if c.format.block_size() > 1 && c.cols > c.format.block_size() {
            let (rb, bb) = (c.format.row_bytes(c.cols), c.format.block_bytes());
            for row in broken.data.chunks_exact_mut(rb) {
                row[rb - bb..].fill(0);
            }
        }
        run_table(&SCALAR, &broken, x, n)
    };
    let e = check_table("drops-last-block", drop_last_block).expect_err("must be caught");
    eprintln!("caught: {e}");
    let no_mins = |c: &Case, x: &[f32], n: usize| {
        let mut broken = Case {
            name: c.name.clone(),
            data: c.data.clone(),
            ..*c
        };
        if matches!(c.format, WeightFormat::Q4K | WeightFormat::Q5K) {
            for block in broken.data.chunks_exact_mut(c.format.block_bytes()) {
                block[2..4].fill(0); // dmin = 0
            }
        }
        run_table(&SCALAR, &broken, x, n)
    };
    let e = check_table("no-mins", no_mins).expect_err("must be caught");
    assert!(e.contains("Q4_K") || e.contains("q4_k"), "{e}");
}

#[test]
fn a_tokens_output_does_not_depend_on_its_batch() {
    let mut rng = Rng::new(7);
    let mut tables = available();
    // `matmul` itself, with the table it picks at run time.
    tables.push(*gemma3_kernels::simd::best());
    for c in cases() {
        let n = 64;
        let x = acts(&mut rng, n, c.cols);
        for (i, k) in tables.iter().enumerate() {
            let use_best = i + 1 == tables.len();
            let m = QMatrix::new(c.format, c.rows, c.cols, &c.data).unwrap();
            let mut scratch = MatmulScratch::default();
            let mut batch = vec![0.0f32; n * c.rows];
            if use_best {
                matmul(&m, &x, n, &mut batch, &mut scratch);
            } else {
                matmul_with(k, &m, &x, n, &mut batch, &mut scratch);
            }
            // Each token alone, reusing the scratch.
            for t in 0..n {
                let xt = &x[t * c.cols..(t + 1) * c.cols];
                let mut one = vec![0.0f32; c.rows];
                if use_best {
                    matmul(&m, xt, 1, &mut one, &mut scratch);
                } else {
                    matmul_with(k, &m, xt, 1, &mut one, &mut scratch);
                }
                let want: Vec<u32> = batch[t * c.rows..(t + 1) * c.rows]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let got: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
                assert_eq!(
                    got, want,
                    "{} [{}]: token {t} alone differs from token {t} in a batch of {n}",
                    c.name, k.name
                );
            }
            // Sub-batches that split differently into groups (3, 4 + 1, 4 + 3 tokens).
            for (t0, len) in [(n - 3, 3), (10, 5), (0, 7)] {
                let mut sub = vec![0.0f32; len * c.rows];
                matmul_with(
                    k,
                    &m,
                    &x[t0 * c.cols..(t0 + len) * c.cols],
                    len,
                    &mut sub,
                    &mut MatmulScratch::default(),
                );
                let want: Vec<u32> = batch[t0 * c.rows..(t0 + len) * c.rows]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let got: Vec<u32> = sub.iter().map(|v| v.to_bits()).collect();
                assert_eq!(
                    got,
                    want,
                    "{} [{}]: tokens {t0}..{} as a batch of {len} differ from the batch of {n}",
                    c.name,
                    k.name,
                    t0 + len
                );
            }
        }
    }
}

/// `GEMMA3_KERNELS` picks a table by name among those available, the default is the last
/// (fastest) one or the scalar one under `GEMMA3_FORCE_SCALAR`, and a name the CPU does not
/// run, or one that contradicts `GEMMA3_FORCE_SCALAR`, is refused with a message naming it
/// and what the CPU runs.
#[test]
fn kernel_table_choice_by_name() {
    use gemma3_kernels::simd::{choose, Level};
    let mid = DotKernels {
        name: "mid",
        level: Level::Avx2,
        ..SCALAR
    };
    let top = DotKernels {
        name: "top",
        level: Level::Avx512,
        ..SCALAR
    };
    let avail = [SCALAR, mid, top];
    let pick = |scalar, r| choose(&avail, scalar, r).map(|k| k.name);
    assert_eq!(pick(false, None), Ok("top"));
    assert_eq!(pick(true, None), Ok("scalar"));
    assert_eq!(pick(false, Some("mid")), Ok("mid"));
    assert_eq!(pick(false, Some("scalar")), Ok("scalar"));
    assert_eq!(pick(true, Some("scalar")), Ok("scalar"));
    let e = pick(false, Some("avx9")).unwrap_err();
    assert!(
        e.contains("GEMMA3_KERNELS=\"avx9\"") && e.contains("scalar, mid, top"),
        "{e}"
    );
    let e = pick(true, Some("mid")).unwrap_err();
    assert!(
        e.contains("GEMMA3_FORCE_SCALAR") && e.contains("mid"),
        "{e}"
    );
    assert_eq!(choose(&[], false, None).map(|k| k.name), Ok("scalar"));
}

/// Each kernel table's level picks the attention ops and activation quantizers of that
/// level, so that `GEMMA3_KERNELS=avx2` runs an AVX2-only CPU's code throughout (the bits
/// are the same either way, so the whole-model twin test cannot see this).
#[test]
fn the_other_dispatched_code_follows_the_table_level() {
    use gemma3_kernels::quant::act_quantizers_for;
    use gemma3_kernels::simd::{f16_for, Level};
    for k in available() {
        let (f16, quant) = (f16_for(k.level).name, act_quantizers_for(k.level).name);
        let want = match k.level {
            Level::Scalar => ("scalar", "scalar"),
            Level::Avx2 => ("avx2-f16c", "avx2"),
            Level::Avx512 => ("avx512-f16c", "avx512"),
        };
        assert_eq!((f16, quant), want, "table {}", k.name);
        let levels = match k.name {
            "scalar" => Level::Scalar,
            "avx2" => Level::Avx2,
            _ => Level::Avx512,
        };
        assert_eq!(k.level, levels, "table {}", k.name);
    }
}
