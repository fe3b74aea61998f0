//! The interleaved (packed) kernels against their definition.
//!
//! `packed::spec_dot` states the packed kernels' arithmetic on the original ggml row: exact
//! integer block sums, then one f32 multiply-add per block. Every kernel table must equal
//! it bit for bit, for every token count (so a token's result cannot depend on its batch)
//! and every format, on random blocks and on real rows of the model. The spec itself is
//! checked against the exact f64 dot product of the dequantized weights (dequantization
//! is checked against gguf-py elsewhere) with the 8-bit activations. For the float formats
//! (F16, BF16, F32) the spec is four chains of fused f32 multiply-adds over the f32
//! activations.

mod common;

use common::{random_acts, random_rows, Rng};
use gemma3_kernels::formats::{BlockQ8K, BlockQ8_0, QK, QK_K};
use gemma3_kernels::matmul::matmul_with;
use gemma3_kernels::packed::{
    matmul_packed, matmul_packed_many, spec_dot, ActRow, PackedKernels, PackedMatrix,
};
use gemma3_kernels::quant::{dequantize_row, quantize_q8_0, quantize_q8_k};
use gemma3_kernels::simd::{available, SCALAR};
use gemma3_kernels::{ActFormat, MatmulScratch, QMatrix, WeightFormat};
use half::f16;

struct Case {
    name: String,
    format: WeightFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    let mut rng = Rng::new(0x7061_636b);
    for format in WeightFormat::ALL {
        let cols_list: &[usize] = match format.block_size() {
            // Float formats: blocks of 32 columns; 5 blocks, the model's width.
            1 | QK => &[QK * 5, 640],
            _ => &[QK_K * 3, QK_K],
        };
        // 3 groups of 16 rows, and 9: the one-token kernels of a table that
        // reads in 2 or 4 streams take 2 or 4 groups side by side, and the
        // last ones alone.
        for (&cols, rows) in cols_list.iter().zip([48, 144]) {
            v.push(Case {
                name: format!("random {format} {rows}×{cols}"),
                format,
                rows,
                cols,
                data: random_rows(&mut rng, format, rows, cols),
            });
        }
    }
    // Real rows of the model (the fixtures), repeated to whole groups of 16.
    for fx in common::dequant_fixtures() {
        let rb = fx.format.row_bytes(fx.cols);
        let rows = 32;
        let data: Vec<u8> = (0..rows)
            .flat_map(|r| fx.raw[(r % fx.rows) * rb..(r % fx.rows + 1) * rb].to_vec())
            .collect();
        v.push(Case {
            name: fx.name.clone(),
            format: fx.format,
            rows,
            cols: fx.cols,
            data,
        });
    }
    v
}

/// Quantized activations of n tokens (token 1 all zeros, token 2 with an outlier).
struct Acts {
    q8_0: Vec<BlockQ8_0>,
    neg8: Vec<i32>,
    neg16: Vec<i32>,
    neg128: Vec<i32>,
    neg32: Vec<i32>,
    d: Vec<f32>,
    /// d·Σq per Q8_0 block.
    ds: Vec<f32>,
    q8k: Vec<BlockQ8K>,
    /// The values the kernels multiply by: d·q.
    effective: Vec<f32>,
}

fn acts(rng: &mut Rng, format: WeightFormat, n: usize, cols: usize) -> (Vec<f32>, Acts) {
    let mut x = random_acts(rng, n * cols);
    if n > 1 {
        x[cols..2 * cols].fill(0.0);
    }
    if n > 2 {
        x[2 * cols + cols / 3] = 50.0;
    }
    let a = acts_of(format, &x);
    (x, a)
}

/// The activations `x` quantized as `format`'s kernels take them.
fn acts_of(format: WeightFormat, x: &[f32]) -> Acts {
    let mut a = Acts {
        q8_0: vec![],
        neg8: vec![],
        neg16: vec![],
        neg128: vec![],
        neg32: vec![],
        d: vec![],
        ds: vec![],
        q8k: vec![],
        effective: vec![],
    };
    match format.act_format() {
        ActFormat::Q8_0 => {
            a.q8_0 = vec![BlockQ8_0::default(); x.len() / QK];
            quantize_q8_0(x, &mut a.q8_0);
            for b in &a.q8_0 {
                let d = f16::from_bits(u16::from_le_bytes(b.d)).to_f32();
                let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
                a.neg8.push(-8 * sum);
                a.neg16.push(-16 * sum);
                a.neg128.push(-128 * sum);
                a.d.push(d);
                a.ds.push(d * sum as f32);
                a.effective.extend(b.qs.iter().map(|&q| d * q as f32));
            }
        }
        ActFormat::Q8K => {
            a.q8k = vec![BlockQ8K::default(); x.len() / QK_K];
            quantize_q8_k(x, &mut a.q8k);
            for b in &a.q8k {
                a.effective.extend(b.qs.iter().map(|&q| b.d * q as f32));
                a.neg32.extend(b.bsums.iter().map(|&s| -32 * s as i32));
            }
        }
        // Float weights take the activations as they are.
        ActFormat::F32 => a.effective = x.to_vec(),
    }
    a
}

fn row_act<'a>(a: &'a Acts, format: WeightFormat, t: usize, nb: usize) -> ActRow<'a> {
    match format.act_format() {
        // (One-element blocks: nb is the width.)
        ActFormat::F32 => ActRow::F32 {
            x: &a.effective[t * nb..(t + 1) * nb],
        },
        ActFormat::Q8_0 => ActRow::Q8_0 {
            blocks: &a.q8_0[t * nb..(t + 1) * nb],
            neg8: &a.neg8[t * nb..(t + 1) * nb],
            neg16: &a.neg16[t * nb..(t + 1) * nb],
            neg128: &a.neg128[t * nb..(t + 1) * nb],
            d: &a.d[t * nb..(t + 1) * nb],
            ds: &a.ds[t * nb..(t + 1) * nb],
        },
        _ => ActRow::Q8K {
            blocks: &a.q8k[t * nb..(t + 1) * nb],
            neg32: &a.neg32[16 * t * nb..16 * (t + 1) * nb],
        },
    }
}

/// Every packed table this CPU runs, with the AMX tile kernels emulated
/// where the CPU has no tiles but runs their vector parts (so the tile
/// kernels' code is tested on any AVX-512 machine, and on the real tiles
/// where there are some).
fn tables() -> Vec<(String, PackedKernels)> {
    let mut v: Vec<_> = available()
        .into_iter()
        .map(|k| (k.name.to_string(), k.packed))
        .collect();
    #[cfg(target_arch = "x86_64")]
    if let Some(e) = gemma3_kernels::packed_amx::emulated() {
        v.push(("amx-emulated".to_string(), e));
    }
    v
}

/// `out` equals `spec` bit for bit (n tokens × `rows` outputs each); a
/// mismatch names `what`, the token and the row.
fn assert_bits(out: &[f32], spec: &[f32], rows: usize, what: &str) {
    assert_eq!(out.len(), spec.len(), "{what}: output length");
    for (i, (&got, &want)) in out.iter().zip(spec).enumerate() {
        assert!(
            got.to_bits() == want.to_bits(),
            "{what} token {} row {}: {got:e}, spec {want:e}",
            i / rows,
            i % rows
        );
    }
}

#[test]
fn every_table_equals_the_spec_bit_for_bit_and_the_spec_is_the_dot_product() {
    let tables = tables();
    let mut rng = Rng::new(7);
    let mut worst = 0.0f64;
    for c in cases() {
        let m = QMatrix::new(c.format, c.rows, c.cols, &c.data).expect("valid matrix");
        let p = PackedMatrix::pack(&m).expect("packable");
        let nb = c.cols / c.format.block_size();
        let rb = c.format.row_bytes(c.cols);
        let mut w = vec![0.0f32; c.cols];
        // 16 and more: whole tiles where the CPU has them, and a remainder;
        // 37 (≥ WIDEN_TOKENS): Q5_0, Q5_1, Q4_K, Q5_K and Q6_K (and Q4_1, Q3_K) widened
        // where a table widens (one group per task at these sizes: see the next test).
        assert!((16..=37).contains(&gemma3_kernels::packed::WIDEN_TOKENS));
        for n in [1usize, 3, 5, 9, 16, 37] {
            let (x, a) = acts(&mut rng, c.format, n, c.cols);
            let mut spec = vec![0.0f32; n * c.rows];
            for t in 0..n {
                for r in 0..c.rows {
                    let row = &c.data[r * rb..(r + 1) * rb];
                    let s = spec_dot(c.format, row, row_act(&a, c.format, t, nb));
                    spec[t * c.rows + r] = s;
                    // The spec computes the dot product.
                    dequantize_row(c.format, row, &mut w);
                    let at = &a.effective[t * c.cols..(t + 1) * c.cols];
                    let exact: f64 = w.iter().zip(at).map(|(&p, &q)| p as f64 * q as f64).sum();
                    let mag: f64 = w
                        .iter()
                        .zip(at)
                        .map(|(&p, &q)| (p as f64 * q as f64).abs())
                        .sum();
                    let err = (s as f64 - exact).abs();
                    assert!(
                        err <= 1e-5 * mag + 1e-30,
                        "{} n={n} token {t} row {r}: spec {s:e}, exact {exact:e} (Σ|terms| {mag:e})",
                        c.name
                    );
                    if mag > 0.0 {
                        worst = worst.max(err / mag);
                    }
                }
            }
            for (name, k) in &tables {
                let mut out = vec![f32::NAN; n * c.rows];
                matmul_packed(k, &p, &x, n, &mut out, &mut MatmulScratch::default());
                assert_bits(&out, &spec, c.rows, &format!("{} [{name}] n={n}", c.name));
            }
            // Q4_1, Q5_1, IQ4_NL, IQ4_XS, Q3_K, Q2_K and the lattice formats
            // have no SIMD row-major kernels: their scalar ones, for shapes
            // that cannot be packed, state the same arithmetic.
            if matches!(
                c.format,
                WeightFormat::Q4_1
                    | WeightFormat::Q5_1
                    | WeightFormat::IQ4NL
                    | WeightFormat::IQ4XS
                    | WeightFormat::Q3K
                    | WeightFormat::Coded(_)
            ) {
                let mut out = vec![f32::NAN; n * c.rows];
                matmul_with(&SCALAR, &m, &x, n, &mut out, &mut MatmulScratch::default());
                assert_bits(&out, &spec, c.rows, &format!("{} row-major n={n}", c.name));
            }
        }
    }
    eprintln!("largest |spec − exact| / Σ|terms|: {worst:.2e}");
}

/// A prompt's widened weights, at the model's shapes on one thread: each
/// task's groups are widened a few at a time (Q5_0 640 → 1024: tasks of 8
/// groups widened 6 then 2, Q5_1: 5 then 3; Q4_K and Q5_K 1024 → 640: tasks of 6 (an
/// even number, for the pair kernels), widened 3 then 3; Q6_K 2048 → 640: tasks of 6, one
/// at a time),
/// and the remainders after the 4-token passes (2 and 3 tokens) read the
/// widened form too. Every table equals the spec bit for bit.
#[test]
fn widened_prompts_in_several_goes_equal_the_spec() {
    let tables = tables();
    let mut rng = Rng::new(0x7769_6465);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for (format, rows, cols) in [
        (WeightFormat::Q5_0, 1024, 640),
        (WeightFormat::Q5_1, 1024, 640),
        (WeightFormat::Q4K, 640, 1024),
        (WeightFormat::Q5K, 640, 1024),
        (WeightFormat::Q6K, 640, 2048),
    ] {
        let data = random_rows(&mut rng, format, rows, cols);
        let m = QMatrix::new(format, rows, cols, &data).expect("valid matrix");
        let p = PackedMatrix::pack(&m).expect("packable");
        let nb = cols / format.block_size();
        let rb = format.row_bytes(cols);
        for n in [34usize, 35] {
            assert!(n >= gemma3_kernels::packed::WIDEN_TOKENS);
            let (x, a) = acts(&mut rng, format, n, cols);
            let mut spec = vec![0.0f32; n * rows];
            for t in 0..n {
                for r in 0..rows {
                    let row = &data[r * rb..(r + 1) * rb];
                    spec[t * rows + r] = spec_dot(format, row, row_act(&a, format, t, nb));
                }
            }
            for (name, k) in &tables {
                let mut out = vec![f32::NAN; n * rows];
                pool.install(|| {
                    matmul_packed(k, &p, &x, n, &mut out, &mut MatmulScratch::default())
                });
                let what = format!("{format} {rows}×{cols} [{name}] n={n}");
                assert_bits(&out, &spec, rows, &what);
            }
        }
    }
}

/// Several matrices times one input, sharing its quantization where their
/// activation formats agree (and re-quantizing where they change), give
/// each matrix's own result bit for bit, whatever the thread count: for a
/// few tokens the matrices are cut into contiguous parts across threads
/// (about 1 MB each for a big one, as the 1.3 MB one here), otherwise into
/// small tasks; a single thread takes neither split.
#[test]
fn a_shared_input_gives_each_matrix_its_own_result() {
    let mut rng = Rng::new(0x6d61_6e79);
    let cols = 512;
    let formats = [
        WeightFormat::Q5_0,
        WeightFormat::Q8_0,
        WeightFormat::Q8_0,
        WeightFormat::Q4K,
        WeightFormat::Q6K,
        WeightFormat::Q4_0,
    ];
    let rows = [32, 16, 2560, 48, 16, 32];
    let data: Vec<Vec<u8>> = (formats.iter().zip(rows))
        .map(|(&f, r)| random_rows(&mut rng, f, r, cols))
        .collect();
    let packed: Vec<PackedMatrix> = (0..formats.len())
        .map(|i| {
            let m = QMatrix::new(formats[i], rows[i], cols, &data[i]).unwrap();
            PackedMatrix::pack(&m).unwrap()
        })
        .collect();
    let ws: Vec<&PackedMatrix> = packed.iter().collect();
    let pool = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
    };
    let one = pool(1);
    for (name, k) in &tables() {
        for n in [1usize, 2, 5, 6, 21] {
            let x = random_acts(&mut rng, n * cols);
            // Each matrix alone, on one thread.
            let alone: Vec<Vec<f32>> = one.install(|| {
                (packed.iter().zip(rows))
                    .map(|(p, r)| {
                        let mut out = vec![0.0f32; n * r];
                        let mut scratch = MatmulScratch::default();
                        matmul_packed(k, p, &x, n, &mut out, &mut scratch);
                        out
                    })
                    .collect()
            });
            for threads in [1, 2, 3] {
                let mut outs: Vec<Vec<f32>> = rows.iter().map(|r| vec![f32::NAN; n * r]).collect();
                let mut refs: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                pool(threads).install(|| {
                    let mut scratch = MatmulScratch::default();
                    matmul_packed_many(k, &ws, &mut refs, &x, n, &mut scratch)
                });
                for i in 0..ws.len() {
                    assert!(
                        alone[i]
                            .iter()
                            .zip(&outs[i])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "[{}] n={n}, {threads} threads: matrix {i} ({}) differs",
                        name,
                        formats[i]
                    );
                }
            }
        }
    }
}

/// The kernel entries are safe functions: activations of another format's
/// variant, or a group size that is not the format's, are refused with a
/// panic before anything is read (not read out of bounds).
#[test]
fn kernels_refuse_a_mismatched_layout_or_activations() {
    use gemma3_kernels::packed::PackedFormat;
    let nb = 2;
    for (name, k) in tables() {
        let run = |f: PackedFormat, gb: usize, a: ActRow| {
            let w = vec![0u8; 4 * gb.max(f.group_bytes(nb))];
            let mut out = vec![0.0f32; 64];
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                (k.t1)(f, &w[..gb], gb, nb, &[a], &mut [&mut out[..]])
            }))
            .is_err()
        };
        let x = vec![0.0f32; 64];
        let f32_row = ActRow::F32 { x: &x };
        let q8 = vec![BlockQ8_0::default(); nb];
        let (zi, zf) = (vec![0i32; nb], vec![0.0f32; nb]);
        let q8_row = ActRow::Q8_0 {
            blocks: &q8,
            neg8: &zi,
            neg16: &zi,
            neg128: &zi,
            d: &zf,
            ds: &zf,
        };
        let (q5, f16) = (PackedFormat::Q5_0, PackedFormat::F16);
        assert!(!run(q5, q5.group_bytes(nb), q8_row), "[{name}] valid call");
        assert!(
            !run(f16, f16.group_bytes(nb), f32_row),
            "[{name}] valid call"
        );
        assert!(
            run(q5, q5.group_bytes(nb), f32_row),
            "[{name}] f32 rows for Q5_0"
        );
        assert!(
            run(f16, f16.group_bytes(nb), q8_row),
            "[{name}] Q8_0 rows for F16"
        );
        assert!(run(q5, 64, q8_row), "[{name}] a group size not Q5_0's");
    }
}

#[test]
fn matrices_that_cannot_be_packed_are_refused() {
    let mut rng = Rng::new(1);
    // 20 rows: not whole groups of 16.
    let data = random_rows(&mut rng, WeightFormat::Q8_0, 20, 64);
    let m = QMatrix::new(WeightFormat::Q8_0, 20, 64, &data).unwrap();
    assert!(PackedMatrix::pack(&m).is_none());
    // Float rows that are not whole blocks of 32 columns.
    let data = random_rows(&mut rng, WeightFormat::F16, 16, 48);
    let m = QMatrix::new(WeightFormat::F16, 16, 48, &data).unwrap();
    assert!(PackedMatrix::pack(&m).is_none());
    let data = random_rows(&mut rng, WeightFormat::F16, 16, 64);
    let m = QMatrix::new(WeightFormat::F16, 16, 64, &data).unwrap();
    assert!(PackedMatrix::pack(&m).is_some());
}

/// Moving a packed matrix to huge pages (where the OS allows; elsewhere a
/// no-op) changes none of its results, and nothing breaks while another
/// thread multiplies by it meanwhile.
#[test]
fn collapsing_to_huge_pages_changes_nothing() {
    let mut rng = Rng::new(0x6875_6765);
    // 6144 rows of Q8_0 × 640: 4.2 MB packed, so at least one whole 2 MB page.
    let (rows, cols) = (6144, 640);
    let data = random_rows(&mut rng, WeightFormat::Q8_0, rows, cols);
    let w = QMatrix::new(WeightFormat::Q8_0, rows, cols, &data).unwrap();
    let p = PackedMatrix::pack(&w).unwrap();
    let x = random_acts(&mut rng, 5 * cols);
    let k = &available()[0].packed;
    let run = || {
        let mut out = vec![0.0f32; 5 * rows];
        matmul_packed(k, &p, &x, 5, &mut out, &mut MatmulScratch::default());
        out
    };
    let before = run();
    let during = std::thread::scope(|s| {
        let reader = s.spawn(|| (0..3).map(|_| run()).collect::<Vec<_>>());
        p.collapse_huge_pages();
        reader.join().unwrap()
    });
    for out in during.iter().chain([&run()]) {
        assert!(out
            .iter()
            .zip(&before)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

/// Blocks at their largest codes (every quant byte 0xFF) against
/// activations all equal (−1, then +1: 127 in magnitude once quantized, and
/// −128 in Q8_K): every product at its largest magnitude. A table's
/// intermediate sums must not wrap (the AVX2 table adds up to 8 vectors of
/// 4-bit weights', 4 of 5-bit and 2 of 6-bit 16-bit pair products before
/// widening them), so each table equals the spec bit for bit here too:
/// for 5 tokens, and for 37, which the tables that widen a prompt's weights
/// (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) run on their widened forms.
#[test]
fn extreme_blocks_and_activations_wrap_no_table() {
    let tables = tables();
    let mut rng = Rng::new(11);
    let formats = [
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::Q8_0,
        WeightFormat::Q3K,
        WeightFormat::Q4K,
        WeightFormat::Q5K,
        WeightFormat::Q6K,
    ];
    for format in formats {
        let (rows, cols) = (16, 2 * QK_K);
        let rb = format.row_bytes(cols);
        // Random rows for their finite f16 scales; every other byte 0xFF.
        let mut data = random_rows(&mut rng, format, rows, cols);
        let offsets = common::scale_offsets(format);
        for block in data.chunks_exact_mut(format.block_bytes()) {
            for (i, byte) in block.iter_mut().enumerate() {
                if !offsets.iter().any(|&o| i == o || i == o + 1) {
                    *byte = 0xFF;
                }
            }
        }
        let m = QMatrix::new(format, rows, cols, &data).expect("valid matrix");
        let p = PackedMatrix::pack(&m).expect("packable");
        let nb = cols / format.block_size();
        for (value, n) in [(-1.0f32, 5), (1.0, 5), (-1.0, 37), (1.0, 37)] {
            let x = vec![value; n * cols];
            let a = acts_of(format, &x);
            let spec: Vec<f32> = (0..n * rows)
                .map(|i| {
                    let (t, r) = (i / rows, i % rows);
                    spec_dot(
                        format,
                        &data[r * rb..(r + 1) * rb],
                        row_act(&a, format, t, nb),
                    )
                })
                .collect();
            for (name, k) in &tables {
                let mut out = vec![f32::NAN; n * rows];
                matmul_packed(k, &p, &x, n, &mut out, &mut MatmulScratch::default());
                let what = format!("{format} all {value}, {n} tokens [{name}]");
                assert_bits(&out, &spec, rows, &what);
            }
        }
    }
}
