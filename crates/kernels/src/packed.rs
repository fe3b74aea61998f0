#![allow(clippy::needless_range_loop)] // kernels index parallel arrays of registers by token
//! Weight matrices re-laid out once, at load time, for the int8 kernels
//! (and the float formats' f32 ones): 16 rows interleaved per block, so
//! that one vector lane is one row.
//!
//! In ggml's row-major layout a dot product leaves partial sums spread over
//! the lanes of a vector: every block of every (row, token) pair then needs
//! its own int→float conversion, scale multiply and float add, which is most
//! of the work in prompt processing. Here the 16 rows of a group sit side by
//! side in 4-byte columns: `dpbusd` with a broadcast group of 4 activations
//! leaves row r's sum in lane r, a block's integer sum is finished in
//! integers, and the float work is one multiply-add per block for 16 rows.
//!
//! **Numerics** (the same for every kernel table, token count and thread
//! split, so a token's result never depends on the batch it was in): for
//! each (row, token), `acc = 0`, then for each block in order
//! `acc = fma(dw · dy, S, acc)` where S is the block's exact integer sum
//! Σ w·y (with the sub-block scales applied in integers for the K-quants)
//! converted to f32; Q4_K and Q5_K also do `acc = fma(−(dmin · dy), M, acc)`
//! with M = Σ_j m_j·Σy_j, and Q4_1/Q5_1 `acc = fma(m, dy · Σy, acc)` (dy·Σy
//! is exact in f32; ggml's block_q8_1 rounds it to f16). [`spec_dot`] states this from the original ggml blocks,
//! and every table is tested bit-for-bit against it.
//!
//! Layouts. A group of 16 rows is stored in the order the kernels read it,
//! so that a pass over a matrix is one ascending stream that the hardware
//! prefetchers follow (gaps and a second stream at another offset halved
//! the speed at which one core streams the output head): units of
//! `64 / scale_bytes` blocks' quants followed by one 64-byte line of their
//! f16 scales (see [`block_offsets`]). On the Zen 4 we measured, L2
//! prefetch instructions capped one core at about 18 GB/s, where the
//! hardware prefetchers alone stream this layout at about 25 (the speed of
//! a plain summing loop), so the kernels issue software prefetches only
//! where they were measured to pay: on a Zen 5, for the K-quants and Q5_0
//! at one to three tokens (see [`stream_ahead`]).
//!
//! Lane r, column c: byte `4r + c` of a 64-byte vector. A "group of 4" is 4
//! consecutive elements of every row.
//! - Q8_0 (512 B/block): 8 vectors, element 4k+c of row r at vector k,
//!   stored as w + 128 (unsigned, as `dpbusd` wants it).
//! - Q5_0 (320 B): one vector of fifth bits (bit G of byte 4r+c = element
//!   4G+c; a shift and a mask move them into place, or one GFNI bit-matrix
//!   transform where the CPU has it, where masks loaded into mask
//!   registers cost a `dpbusd` slot each on Zen 4), then 4 nibble
//!   vectors: vector c holds elements 4c.. in its low nibbles and 16+4c.. in
//!   its high nibbles; u = q ∈ 0..32, w = u − 16.
//! - Q4_0 (256 B): Q5_0's 4 nibble vectors alone; u = q, w = u − 8.
//! - Q5_1 (320 B): Q5_0's form with u = q (Q4_1: u = q, fifth bits zero);
//!   scales d then m.
//! - Q4_K (2304 B): 8 sub-block scales `[j][r]` (u8), 4 min pairs `[p][r][2]`
//!   (u8), then 32 vectors (c, g) holding the raw bytes qs[32c + 4g ..]: low
//!   nibbles are sub-block 2c, high nibbles 2c+1. Scales: d then dmin.
//! - IQ4_NL (256 B): Q4_0's form; the nibbles index the format's table.
//! - IQ4_XS (2176 B): 8 sub-block scales `[j][r]` (i8, ls − 32), then per
//!   sub-block j 4 vectors g holding the raw qs[16j + 4g ..]: low nibbles
//!   are elements 4g.., high nibbles 16 + 4g.. of the sub-block. Scale: d.
//! - Q5_K (2816 B): Q4_K's scales and mins, then 8 vectors g holding the
//!   raw qh[4g ..] (bit j of a byte is the fifth bit of that element of
//!   sub-block j), then Q4_K's 32 vectors.
//! - Q6_K (3328 B): 16 scales `[j][r]` (i8), then per sub-block j three
//!   vectors A, B, C: A low/high nibbles = groups 4j, 4j+1; B = 4j+2, 4j+3;
//!   C bits 2i..2i+2 = high bits of group 4j+i; u ∈ 0..64, w = u − 32.
//! - Coded (2304 B; Q2_K 2560 B): 16 sub-block scales `[j][r]` (i8), then
//!   per 32 elements c 4 vectors g: low nibbles are the codes of elements
//!   32c + 4g.., high nibbles of 32c + 16 + 4g.. (sub-blocks 2c and
//!   2c + 1); for Q2_K then 8 min pairs `[p][r][2]` (u8). Scales: d (Q2_K:
//!   then dmin).
//! - F16 (1024 B per block of 32 columns, no scales): column j's 16 values
//!   at 32j (row r at 32j + 2r), as `vcvtph2ps` reads them.
//! - BF16 (1024 B): column pair p (2p, 2p + 1) at 64p, one dword per row
//!   holding column 2p in its low half: a shift left by 16 or a mask of
//!   the high half makes either column 16 f32 values.
//! - F32 (2048 B): column j's 16 values at 64j.
//!
//! **Float formats.** The activations stay f32. For each (row, token): four
//! partial sums s_k over the columns c ≡ k (mod 4), each
//! `s_k = fma(w_c, y_c, s_k)` in column order from 0, then
//! (s_0 + s_1) + (s_2 + s_3). Four chains keep one token's
//! multiply-adds from waiting on each other's latency.

use crate::coded::{decode, CodeTable};
use crate::formats::*;
use crate::matmul::{check_shapes, MatmulScratch, OutPtr, QMatrix};
use crate::quant::{q3_k_unpack, q4_1_unpack, q5_0_unpack, q5_1_unpack, q6_k_unpack};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::atomic::{compiler_fence, AtomicUsize, Ordering};
use std::sync::Arc;

/// Rows per interleaved group (one per 32-bit lane of a 512-bit vector).
pub const LANES: usize = 16;

/// The weight formats that have an interleaved form, and the widened forms
/// a prompt's kernels read (`Q5_0Wide`, `Q5_1Wide`, `Q6KWide`, `Q4KWide`,
/// `Q5KWide`), never stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedFormat {
    Q8_0,
    Q5_0,
    /// Q4_0: Q5_0's nibble vectors alone (u = q, w = u − 8).
    Q4_0,
    /// IQ4_NL: Q4_0's form, the nibbles looked up in the format's table.
    IQ4NL,
    /// IQ4_XS: 8 signed sub-block scales, then IQ4_NL's form per sub-block.
    IQ4XS,
    /// Q5_1, and Q4_1 converted exactly: Q5_0's quants, and a minimum.
    Q5_1,
    Q4K,
    /// Q4_K's layout and 512 bytes of fifth bits.
    Q5K,
    Q6K,
    /// Q5_0 widened for a prompt (see [`PackedKernels::widen`]): Q8_0's layout, with
    /// u = q ∈ 0..32 (w = u − 16) in each byte. Never a matrix's stored
    /// form, so not in [`PackedFormat::ALL`]; nor are the next four.
    Q5_0Wide,
    /// Q5_1 (and Q4_1) widened: Q5_0's widened quants (u = q) and Q5_1's
    /// scale lines.
    Q5_1Wide,
    /// Q6_K widened: its 16 scales `[j][r]`, then per sub-block j its 4
    /// vectors of groups 4j..4j+4, u ∈ 0..64 in each byte (w = u − 32).
    Q6KWide,
    /// Q4_K widened: its scales and minimums, then per sub-block j its 8
    /// vectors of groups 8j..8j+8, u ∈ 0..16 in each byte.
    Q4KWide,
    /// Q5_K widened: Q4_K's widened form with u ∈ 0..32.
    Q5KWide,
    /// Q2_K and the lattice formats, decoded to codes into a table (see
    /// [`crate::coded`]): 16 sub-block scales, codes in IQ4_XS's nibble
    /// order (Q2_K: and 16 minimums).
    Coded(CodeTable),
    /// The float formats, in blocks of [`FLOAT_BLOCK`] columns.
    F16,
    BF16,
    F32,
}

/// Columns per block of the packed float formats.
pub const FLOAT_BLOCK: usize = 32;

impl PackedFormat {
    /// Every stored packed format (the widened forms are not).
    pub const ALL: [PackedFormat; 18] = [
        PackedFormat::Q8_0,
        PackedFormat::Q5_0,
        PackedFormat::Q4_0,
        PackedFormat::IQ4NL,
        PackedFormat::IQ4XS,
        PackedFormat::Q5_1,
        PackedFormat::Q4K,
        PackedFormat::Q5K,
        PackedFormat::Q6K,
        PackedFormat::Coded(CodeTable::IQ2),
        PackedFormat::Coded(CodeTable::IQ3XXS),
        PackedFormat::Coded(CodeTable::IQ3S),
        PackedFormat::Coded(CodeTable::IQ1),
        PackedFormat::Coded(CodeTable::Q2K),
        PackedFormat::Coded(CodeTable::TQ),
        PackedFormat::F16,
        PackedFormat::BF16,
        PackedFormat::F32,
    ];

    /// The activations its kernels take.
    pub const fn act_format(self) -> ActFormat {
        match self {
            PackedFormat::Q8_0
            | PackedFormat::Q5_0
            | PackedFormat::Q5_0Wide
            | PackedFormat::Q4_0
            | PackedFormat::IQ4NL
            | PackedFormat::Q5_1
            | PackedFormat::Q5_1Wide => ActFormat::Q8_0,
            PackedFormat::Q4K
            | PackedFormat::Q4KWide
            | PackedFormat::Q5K
            | PackedFormat::Q5KWide
            | PackedFormat::Q6K
            | PackedFormat::Q6KWide
            | PackedFormat::IQ4XS
            | PackedFormat::Coded(_) => ActFormat::Q8K,
            PackedFormat::F16 | PackedFormat::BF16 | PackedFormat::F32 => ActFormat::F32,
        }
    }

    pub fn of(f: WeightFormat) -> Option<Self> {
        Some(match f {
            WeightFormat::Q8_0 => PackedFormat::Q8_0,
            WeightFormat::Q5_0 => PackedFormat::Q5_0,
            WeightFormat::Q4_0 => PackedFormat::Q4_0,
            WeightFormat::IQ4NL => PackedFormat::IQ4NL,
            WeightFormat::IQ4XS => PackedFormat::IQ4XS,
            WeightFormat::Q5_1 | WeightFormat::Q4_1 => PackedFormat::Q5_1,
            WeightFormat::Q4K => PackedFormat::Q4K,
            WeightFormat::Q5K => PackedFormat::Q5K,
            // Q3_K's values and scales fit Q6_K's form (−4..=3 in −32..=31).
            WeightFormat::Q6K | WeightFormat::Q3K => PackedFormat::Q6K,
            WeightFormat::F16 => PackedFormat::F16,
            WeightFormat::BF16 => PackedFormat::BF16,
            WeightFormat::F32 => PackedFormat::F32,
            WeightFormat::Coded(c) => PackedFormat::Coded(c.table()),
        })
    }

    /// Whether the AMX tile kernels (`packed_amx`) take it: every stored
    /// integer format. A table with tiles runs these formats on them and
    /// never widens them, whatever its `widens` lists.
    pub const fn has_tiles(self) -> bool {
        !matches!(
            self,
            PackedFormat::F16
                | PackedFormat::BF16
                | PackedFormat::F32
                | PackedFormat::Q5_0Wide
                | PackedFormat::Q5_1Wide
                | PackedFormat::Q4KWide
                | PackedFormat::Q5KWide
                | PackedFormat::Q6KWide
        )
    }

    /// Whether the tiles pay for a matrix of this format `cols` wide: not
    /// for Q4_K wider than 1024 columns. On a lent Xeon (one pinned thread,
    /// criterion, 2026-11-30; docs/performance.md) ffn_down 2048→640 Q4_K ran
    /// 146.7 G multiply-adds/s on tiles against 156.7 on the GFNI table at
    /// 64 tokens, and 97.9 against 156.0 at 512, while attn_output
    /// 1024→640 Q4_K ran 179.1 against 145.9 at 512 (147.0 against 157.4 at
    /// 64). Such a matrix takes the table's vector kernels, with the same bits.
    pub const fn tiles_pay(self, cols: usize) -> bool {
        self.has_tiles() && !(matches!(self, PackedFormat::Q4K) && cols > 1024)
    }

    /// Columns per block.
    pub const fn block_cols(self) -> usize {
        match self {
            PackedFormat::Q8_0
            | PackedFormat::Q5_0
            | PackedFormat::Q5_0Wide
            | PackedFormat::Q4_0
            | PackedFormat::IQ4NL
            | PackedFormat::Q5_1
            | PackedFormat::Q5_1Wide => 32,
            PackedFormat::Q4K
            | PackedFormat::Q4KWide
            | PackedFormat::Q5K
            | PackedFormat::Q5KWide
            | PackedFormat::Q6K
            | PackedFormat::Q6KWide
            | PackedFormat::IQ4XS
            | PackedFormat::Coded(_) => 256,
            PackedFormat::F16 | PackedFormat::BF16 | PackedFormat::F32 => FLOAT_BLOCK,
        }
    }

    /// Bytes of one block's quants for 16 rows (a multiple of 64).
    pub const fn core_bytes(self) -> usize {
        match self {
            PackedFormat::Q8_0 | PackedFormat::Q5_0Wide | PackedFormat::Q5_1Wide => 512,
            PackedFormat::Q5_0 | PackedFormat::Q5_1 => 320,
            PackedFormat::Q4_0 | PackedFormat::IQ4NL => 256,
            PackedFormat::IQ4XS => 128 + 2048,
            PackedFormat::Q4K => 2304,
            PackedFormat::Q4KWide | PackedFormat::Q5KWide => 256 + 4096,
            PackedFormat::Q5K => 2304 + 512,
            PackedFormat::Q6K => 3328,
            PackedFormat::Q6KWide => 256 + 4096,
            PackedFormat::Coded(CodeTable::Q2K) => 256 + 256 + 2048,
            PackedFormat::Coded(_) => 256 + 2048,
            PackedFormat::F16 | PackedFormat::BF16 => 2 * LANES * FLOAT_BLOCK,
            PackedFormat::F32 => 4 * LANES * FLOAT_BLOCK,
        }
    }

    /// Where a Q4_K or Q5_K block's nibbles start: after the scales and
    /// minimums, and Q5_K's fifth bits, which its kernel reads first (read
    /// after them, they made one token's Q5_K stream 11 GB/s instead of 30).
    pub const fn nibbles_offset(self) -> usize {
        match self {
            PackedFormat::Q5K => 256 + 512,
            _ => 256,
        }
    }

    /// Where a coded block's codes start, after its 16 scales.
    pub const CODED_CODES: usize = 256;

    /// Bytes at the start of a block that its kernel first needs after
    /// reading quants beyond them: the sub-block scales applied after each
    /// pass (and Q4_K's and Q5_K's minimums, after the last), and Q5_K's
    /// fifth bits, which each pass reads beside nibbles 512 bytes further
    /// on. `each_block` touches their lines in order before a block's
    /// sums, so that every block is first read in ascending order, as the
    /// prefetchers want: on the AVX2 table, whose 16 registers leave these
    /// loads where the code puts them, one token's Q5_K streamed 7 GiB/s
    /// where the AVX-512 tables streamed 27.
    pub const fn lead_bytes(self) -> usize {
        match self {
            PackedFormat::Q4K
            | PackedFormat::Q4KWide
            | PackedFormat::Q5K
            | PackedFormat::Q5KWide => self.nibbles_offset(),
            PackedFormat::Q6K | PackedFormat::Q6KWide => 256,
            PackedFormat::IQ4XS => 128,
            PackedFormat::Coded(_) => Self::CODED_CODES,
            _ => 0,
        }
    }

    /// Where Q2_K's minimums start, after its codes: the kernels read a
    /// block in ascending order (placed before the codes and read after
    /// them, they made one token's Q2_K stream 11 GB/s instead of 29).
    pub const CODED_MINS: usize = Self::CODED_CODES + 2048;

    /// Bytes of one block's f16 scales for 16 rows (none for the float
    /// formats).
    pub const fn scale_bytes(self) -> usize {
        match self {
            PackedFormat::Q4K
            | PackedFormat::Q4KWide
            | PackedFormat::Q5K
            | PackedFormat::Q5KWide
            | PackedFormat::Q5_1
            | PackedFormat::Q5_1Wide
            | PackedFormat::Coded(CodeTable::Q2K) => 64,
            PackedFormat::F16 | PackedFormat::BF16 | PackedFormat::F32 => 0,
            _ => 32,
        }
    }

    /// The form a prompt widens this format to (see
    /// [`PackedKernels::widen`]), if it has one.
    pub const fn widened(self) -> Option<PackedFormat> {
        match self {
            PackedFormat::Q5_0 => Some(PackedFormat::Q5_0Wide),
            PackedFormat::Q5_1 => Some(PackedFormat::Q5_1Wide),
            PackedFormat::Q6K => Some(PackedFormat::Q6KWide),
            PackedFormat::Q4K => Some(PackedFormat::Q4KWide),
            PackedFormat::Q5K => Some(PackedFormat::Q5KWide),
            _ => None,
        }
    }

    /// Bytes of a group of 16 rows of `nb` blocks (a multiple of 64): their
    /// quants and one 64-byte line of scales per unit (see [`block_offsets`]).
    pub const fn group_bytes(self, nb: usize) -> usize {
        let sb = self.scale_bytes();
        if sb == 0 {
            return nb * self.core_bytes();
        }
        nb * self.core_bytes() + nb.div_ceil(64 / sb) * 64
    }
}

/// Byte offsets of block `b`'s quants and of its scales within a group of
/// `nb` blocks whose blocks have `core` bytes of quants and `sb` of scales:
/// each unit of `64 / sb` blocks (fewer in a last, partial unit) is their
/// quants in order, then one 64-byte line holding their scales in order.
/// Blocks without scales (`sb` = 0) simply follow each other.
#[inline(always)]
pub const fn block_offsets(core: usize, sb: usize, nb: usize, b: usize) -> (usize, usize) {
    if sb == 0 {
        return (b * core, (b + 1) * core);
    }
    let spl = 64 / sb;
    let unit = spl * core + 64;
    let (u, j) = (b / spl, b % spl);
    let in_unit = if spl < nb - u * spl {
        spl
    } else {
        nb - u * spl
    };
    (u * unit + j * core, u * unit + in_unit * core + j * sb)
}

/// `len` zeroed bytes in their own anonymous mapping (page-aligned; the OS
/// maps pages as they are written). Huge pages are not requested here:
/// with the kernel's default `defrag` policy for madvised memory, faulting
/// them in sometimes stalled on compaction for 100-300 ms, which a user
/// waiting for the first token sees. They come later, off that path: see
/// [`collapse_in_background`].
fn zeroed_map(len: usize) -> memmap2::MmapMut {
    memmap2::MmapOptions::new()
        .len(len.max(1))
        .map_anon()
        .expect("mapping memory for a packed matrix")
}

/// A weight matrix in the interleaved layout (built by [`PackedMatrix::pack`]
/// or, several sharing one mapping, by [`PackedMatrix::pack_many`]).
pub struct PackedMatrix {
    pub format: PackedFormat,
    /// The format it was packed from (which activation format it consumes).
    pub source: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    /// Blocks per row.
    nb: usize,
    group_bytes: usize,
    /// The mapping that holds this matrix at `offset..offset + size_bytes()`.
    data: Arc<memmap2::MmapMut>,
    offset: usize,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedMatrix({:?} from {}, {}×{})",
            self.format, self.source, self.rows, self.cols
        )
    }
}

/// What packing `w` takes: its packed format and blocks per row, or None
/// when its format has no packed form, its rows are not a multiple of 16 or
/// its columns not of the format's block (those stay row-major).
fn plan(w: &QMatrix) -> Option<(PackedFormat, usize)> {
    let format = PackedFormat::of(w.format)?;
    let nb = w.cols / format.block_cols();
    if w.rows == 0
        || !w.rows.is_multiple_of(LANES)
        || nb == 0
        || !w.cols.is_multiple_of(format.block_cols())
    {
        return None;
    }
    Some((format, nb))
}

impl PackedMatrix {
    /// The interleaved copy of `w`, or None when it has no packed form.
    pub fn pack(w: &QMatrix) -> Option<Self> {
        Self::pack_releasing(w, &|_| {})
    }

    /// [`PackedMatrix::pack`], calling `release(range)` with each range of
    /// `w.data` once it has been packed (a few MB at a time), so that a
    /// caller can drop the source pages as it goes and the two copies of a
    /// large matrix are never resident together.
    pub fn pack_releasing(w: &QMatrix, release: &dyn Fn(std::ops::Range<usize>)) -> Option<Self> {
        plan(w)?;
        Self::pack_many(&[*w], &|_, r| release(r)).pop().flatten()
    }

    /// Each of `ws` interleaved (None where it has no packed form), all in
    /// one mapping and in the order given, so that a caller who multiplies
    /// them in that order reads one ascending stream, which the hardware
    /// prefetchers follow across the matrices; `release(i, range)` is called
    /// as [`PackedMatrix::pack_releasing`] does for `ws[i]`.
    pub fn pack_many(
        ws: &[QMatrix],
        release: &dyn Fn(usize, std::ops::Range<usize>),
    ) -> Vec<Option<Self>> {
        let plans: Vec<_> = ws.iter().map(plan).collect();
        let sizes: Vec<usize> = (ws.iter().zip(&plans))
            .map(|(w, p)| p.map_or(0, |(f, nb)| w.rows / LANES * f.group_bytes(nb)))
            .collect();
        let mut data = zeroed_map(sizes.iter().sum());
        let mut offset = 0;
        let mut offsets = Vec::with_capacity(ws.len());
        for (i, (w, p)) in ws.iter().zip(&plans).enumerate() {
            offsets.push(offset);
            if let Some((format, nb)) = *p {
                let out = &mut data[offset..offset + sizes[i]];
                pack_into(w, format, nb, out, &|r| release(i, r));
            }
            offset += sizes[i];
        }
        let data = Arc::new(data);
        (ws.iter().zip(plans).zip(offsets))
            .map(|((w, p), offset)| {
                let (format, nb) = p?;
                Some(PackedMatrix {
                    format,
                    source: w.format,
                    rows: w.rows,
                    cols: w.cols,
                    nb,
                    group_bytes: format.group_bytes(nb),
                    data: data.clone(),
                    offset,
                })
            })
            .collect()
    }

    fn bytes(&self) -> &[u8] {
        &self.data[self.offset..self.offset + self.size_bytes()]
    }

    /// Whether `self` and `other` live in the same mapping.
    pub fn shares_mapping(&self, other: &PackedMatrix) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
    }

    /// Back the whole mapping this matrix lives in (with the matrices
    /// packed with it) by 2 MB pages: [`collapse_huge_pages`] (about 0.3 s
    /// for the 250 MB of Gemma 3 270M).
    ///
    /// Why: one core streams the packed head at about 25 GB/s through 4 KB
    /// pages and about 30 through 2 MB ones (one TLB miss and one
    /// prefetcher restart per 2 MB instead of per 4 KB). Mapping huge pages
    /// from the start would also do, but faulting them in can stall on
    /// memory compaction for 100-300 ms, which a user waiting for the first
    /// token sees; collapsing afterwards, off the critical path, cannot.
    pub fn collapse_huge_pages(&self) -> usize {
        collapse_huge_pages(&self.data)
    }

    /// Bytes held (what one pass over the matrix reads).
    pub fn size_bytes(&self) -> usize {
        self.rows / LANES * self.group_bytes
    }
}

/// Pack `w` into `bytes` (its groups × group_bytes), calling `release` as
/// [`PackedMatrix::pack_releasing`] describes.
fn pack_into(
    w: &QMatrix,
    format: PackedFormat,
    nb: usize,
    bytes: &mut [u8],
    release: &dyn Fn(std::ops::Range<usize>),
) {
    let group_bytes = format.group_bytes(nb);
    // About 4 MB of source per batch.
    let batch = (4 << 20) / (LANES * w.row_bytes()).max(1) + 1;
    for (i, part) in bytes.chunks_mut(batch * group_bytes).enumerate() {
        let g0 = i * batch;
        part.par_chunks_mut(group_bytes)
            .enumerate()
            .for_each(|(j, out)| {
                let g = g0 + j;
                for r in 0..LANES {
                    let row = w.row(g * LANES + r);
                    for b in 0..nb {
                        let (cb, sb) = (format.core_bytes(), format.scale_bytes());
                        let (co, so) = block_offsets(cb, sb, nb, b);
                        // The scales follow the quants (co + cb ≤ so).
                        let (head, tail) = out.split_at_mut(so);
                        pack_block(w.format, row, b, r, &mut head[co..co + cb], &mut tail[..sb]);
                    }
                }
            });
        let g1 = g0 + part.len() / group_bytes;
        release(g0 * LANES * w.row_bytes()..g1 * LANES * w.row_bytes());
    }
}

/// Ask the OS to back the whole 2 MB pages inside `bytes` by huge pages,
/// copying them now, 2 MB at a time, in the calling thread (Linux
/// `MADV_COLLAPSE`). Returns the bytes collapsed; where the OS cannot (THP
/// disabled, no huge page free, another OS), pages stay as they were.
/// Contents never change, and other threads may read `bytes` meanwhile.
pub fn collapse_huge_pages(bytes: &[u8]) -> usize {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, end) = (
            bytes.as_ptr() as usize,
            bytes.as_ptr() as usize + bytes.len(),
        );
        // The Linux UAPI value (since 6.1); not every libc target defines it.
        const MADV_COLLAPSE: libc::c_int = 25;
        let mut done = 0;
        let mut p = start.next_multiple_of(HUGE);
        while p + HUGE <= end {
            // SAFETY: [p, p + 2 MB) lies inside `bytes`, which is borrowed
            // for the call; MADV_COLLAPSE only changes which physical pages
            // back it, never its contents or validity.
            if unsafe { libc::madvise(p as *mut libc::c_void, HUGE, MADV_COLLAPSE) } == 0 {
                done += HUGE;
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break; // a kernel without MADV_COLLAPSE, or THP disabled
            }
            p += HUGE;
        }
        done
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = bytes;
        0
    }
}

/// [`PackedMatrix::collapse_huge_pages`] for each of `matrices`, in a
/// background thread at the lowest CPU priority that starts after `delay`.
///
/// The delay keeps it off the path to a first token: collapsing takes the
/// process's memory-map lock, and run alongside loading and the first
/// prompt (even at the lowest priority) it moved the median time to first
/// token from 0.21 to 0.35 s. Best effort: if the thread cannot start,
/// nothing happens.
///
/// The thread holds weak references: matrices dropped in the meantime (a
/// model unloaded within the delay) are freed as usual and skipped.
pub fn collapse_in_background(matrices: Vec<Arc<PackedMatrix>>, delay: std::time::Duration) {
    if !cfg!(target_os = "linux") {
        return;
    }
    let matrices: Vec<std::sync::Weak<PackedMatrix>> =
        matrices.iter().map(Arc::downgrade).collect();
    let _ = std::thread::Builder::new()
        .name("huge-pages".into())
        .spawn(move || {
            std::thread::sleep(delay);
            #[cfg(target_os = "linux")]
            // SAFETY: plain system calls on the calling thread's own id;
            // a failure leaves the priority as it was.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
            }
            for m in matrices.iter().filter_map(std::sync::Weak::upgrade) {
                m.collapse_huge_pages();
            }
        });
}

/// Write row-lane `r` of block `b` of a group.
fn pack_block(src: WeightFormat, row: &[u8], b: usize, r: usize, core: &mut [u8], sc: &mut [u8]) {
    match src {
        WeightFormat::Q8_0 => {
            // 4 bytes at a time: w + 128 is w with its top bit flipped.
            let blk = &as_blocks::<BlockQ8_0>(row)[b];
            for k in 0..8 {
                let q = &blk.qs[4 * k..4 * k + 4];
                let v = u32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
                    ^ 0x8080_8080;
                core[64 * k + 4 * r..64 * k + 4 * r + 4].copy_from_slice(&v.to_le_bytes());
            }
            sc[2 * r..2 * r + 2].copy_from_slice(&blk.d);
        }
        WeightFormat::Q5_0 => {
            // u = q itself: the nibble bytes copy as they are, and the
            // fifth bit of element 4g + c is bit g of byte 4r + c.
            let blk = &as_blocks::<BlockQ5_0>(row)[b];
            let qh = u32::from_le_bytes(blk.qh);
            for g in 0..8 {
                for c in 0..4 {
                    core[4 * r + c] |= (((qh >> (4 * g + c)) & 1) as u8) << g;
                }
            }
            for v in 0..4 {
                core[64 + 64 * v + 4 * r..][..4].copy_from_slice(&blk.qs[4 * v..4 * v + 4]);
            }
            sc[2 * r..2 * r + 2].copy_from_slice(&blk.d);
        }
        WeightFormat::Q4_0 | WeightFormat::IQ4NL => {
            // The nibble bytes copy as they are: Q4_0's u = q (w = u − 8),
            // IQ4_NL's table indices. (The two blocks have the same layout.)
            let blk = &as_blocks::<BlockQ4_0>(row)[b];
            for v in 0..4 {
                core[64 * v + 4 * r..][..4].copy_from_slice(&blk.qs[4 * v..4 * v + 4]);
            }
            sc[2 * r..2 * r + 2].copy_from_slice(&blk.d);
        }
        WeightFormat::IQ4XS => {
            let blk = &as_blocks::<BlockIQ4XS>(row)[b];
            for j in 0..8 {
                core[16 * j + r] = blk.scale(j) as i8 as u8;
                for g in 0..4 {
                    core[128 + 64 * (4 * j + g) + 4 * r..][..4]
                        .copy_from_slice(&blk.qs[16 * j + 4 * g..16 * j + 4 * g + 4]);
                }
            }
            sc[2 * r..2 * r + 2].copy_from_slice(&blk.d);
        }
        WeightFormat::Q5_1 | WeightFormat::Q4_1 => {
            // As Q5_0 (u = q itself); Q4_1's fifth bits are zero.
            let (d, m, qh, qs) = if src == WeightFormat::Q5_1 {
                let blk = &as_blocks::<BlockQ5_1>(row)[b];
                (blk.d, blk.m, u32::from_le_bytes(blk.qh), blk.qs)
            } else {
                let blk = &as_blocks::<BlockQ4_1>(row)[b];
                (blk.d, blk.m, 0, blk.qs)
            };
            for g in 0..8 {
                for c in 0..4 {
                    core[4 * r + c] |= (((qh >> (4 * g + c)) & 1) as u8) << g;
                }
            }
            for v in 0..4 {
                core[64 + 64 * v + 4 * r..][..4].copy_from_slice(&qs[4 * v..4 * v + 4]);
            }
            sc[2 * r..2 * r + 2].copy_from_slice(&d);
            sc[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&m);
        }
        WeightFormat::Q4K | WeightFormat::Q5K => {
            let packed = if src == WeightFormat::Q4K {
                PackedFormat::Q4K
            } else {
                PackedFormat::Q5K
            };
            let nibbles = packed.nibbles_offset();
            let (d, dmin, scales, qs) = if src == WeightFormat::Q4K {
                let blk = &as_blocks::<BlockQ4K>(row)[b];
                (blk.d, blk.dmin, blk.scales, &blk.qs)
            } else {
                let blk = &as_blocks::<BlockQ5K>(row)[b];
                // The fifth bits: vector g holds the raw qh[4g..4g + 4].
                for g in 0..8 {
                    core[256 + 64 * g + 4 * r..][..4].copy_from_slice(&blk.qh[4 * g..4 * g + 4]);
                }
                (blk.d, blk.dmin, blk.scales, &blk.qs)
            };
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &scales);
                core[16 * j + r] = s;
                core[128 + 32 * (j / 2) + 2 * r + j % 2] = m;
            }
            for c in 0..4 {
                for g in 0..8 {
                    for i in 0..4 {
                        core[nibbles + 64 * (8 * c + g) + 4 * r + i] = qs[32 * c + 4 * g + i];
                    }
                }
            }
            sc[2 * r..2 * r + 2].copy_from_slice(&d);
            sc[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&dmin);
        }
        WeightFormat::Q6K | WeightFormat::Q3K => {
            let (d, q, scales) = if src == WeightFormat::Q6K {
                let blk = &as_blocks::<BlockQ6K>(row)[b];
                (blk.d, q6_k_unpack(blk), blk.scales)
            } else {
                let blk = &as_blocks::<BlockQ3K>(row)[b];
                let (q, sc) = q3_k_unpack(blk);
                (blk.d, q, sc)
            };
            let u = |k: usize| (q[k] + 32) as u8;
            for j in 0..16 {
                core[16 * j + r] = scales[j] as u8;
                let base = 256 + 192 * j;
                for c in 0..4 {
                    let e = 16 * j + c;
                    core[base + 4 * r + c] = (u(e) & 0x0F) | ((u(e + 4) & 0x0F) << 4);
                    core[base + 64 + 4 * r + c] = (u(e + 8) & 0x0F) | ((u(e + 12) & 0x0F) << 4);
                    let mut h = 0u8;
                    for i in 0..4 {
                        h |= (u(e + 4 * i) >> 4) << (2 * i);
                    }
                    core[base + 128 + 4 * r + c] = h;
                }
            }
            sc[2 * r..2 * r + 2].copy_from_slice(&d);
        }
        WeightFormat::Coded(f) => {
            let bb = f.block_bytes();
            let c = decode(f, &row[bb * b..bb * (b + 1)]);
            let has_min = f.table().has_min();
            for j in 0..16 {
                core[16 * j + r] = c.scale[j] as u8;
                if has_min {
                    core[PackedFormat::CODED_MINS + 32 * (j / 2) + 2 * r + j % 2] = c.min[j];
                }
            }
            let codes = PackedFormat::CODED_CODES;
            for ch in 0..8 {
                for g in 0..4 {
                    for i in 0..4 {
                        let e = 32 * ch + 4 * g + i;
                        core[codes + 64 * (4 * ch + g) + 4 * r + i] =
                            c.code[e] | c.code[e + 16] << 4;
                    }
                }
            }
            sc[2 * r..2 * r + 2].copy_from_slice(&c.d);
            if has_min {
                sc[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&c.dmin);
            }
        }
        WeightFormat::F16 => {
            let src = &row[2 * FLOAT_BLOCK * b..2 * FLOAT_BLOCK * (b + 1)];
            for (j, e) in src.chunks_exact(2).enumerate() {
                core[2 * LANES * j + 2 * r..][..2].copy_from_slice(e);
            }
        }
        WeightFormat::BF16 => {
            // Column pairs: one dword per row, the even column in its low half.
            let src = &row[2 * FLOAT_BLOCK * b..2 * FLOAT_BLOCK * (b + 1)];
            for (p, e) in src.chunks_exact(4).enumerate() {
                core[4 * LANES * p + 4 * r..][..4].copy_from_slice(e);
            }
        }
        WeightFormat::F32 => {
            let src = &row[4 * FLOAT_BLOCK * b..4 * FLOAT_BLOCK * (b + 1)];
            for (j, e) in src.chunks_exact(4).enumerate() {
                core[4 * LANES * j + 4 * r..][..4].copy_from_slice(e);
            }
        }
    }
}

// ---------------------------------------------------------------- the specification

/// Activations of one token as the packed kernels consume them.
#[derive(Clone, Copy)]
pub enum ActRow<'a> {
    /// Q8_0 blocks with each block's −8·Σq, −16·Σq and −128·Σq (the
    /// corrections for Q4_0's, Q5_0's and Q8_0's unsigned weights, read by
    /// the kernels as memory operands) and its scale as f32.
    Q8_0 {
        blocks: &'a [BlockQ8_0],
        neg8: &'a [i32],
        neg16: &'a [i32],
        neg128: &'a [i32],
        d: &'a [f32],
        /// d · Σq (exact in f32: 11 × 12 bits), for Q5_1's minimum.
        ds: &'a [f32],
    },
    /// Q8_K blocks with −32 times each block's 16 sub-block sums (Q6_K's
    /// correction for its unsigned weights), 16 per block.
    Q8K {
        blocks: &'a [BlockQ8K],
        neg32: &'a [i32],
    },
    /// f32 values (for the float formats).
    F32 { x: &'a [f32] },
}

/// The packed kernels' result for one (row, token), computed from the
/// original ggml row with plain integer and float arithmetic: the
/// definition every table must match bit for bit (see the module docs).
pub fn spec_dot(src: WeightFormat, row: &[u8], act: ActRow) -> f32 {
    let mut acc = 0.0f32;
    match (src, act) {
        (
            WeightFormat::Q8_0 | WeightFormat::Q5_0 | WeightFormat::Q4_0 | WeightFormat::IQ4NL,
            ActRow::Q8_0 { blocks, .. },
        ) => {
            let nb = row.len() / src.block_bytes();
            for b in 0..nb {
                let (d, w): ([u8; 2], [i32; 32]) = match src {
                    WeightFormat::Q8_0 => {
                        let blk = &as_blocks::<BlockQ8_0>(row)[b];
                        (blk.d, std::array::from_fn(|k| blk.qs[k] as i32))
                    }
                    WeightFormat::Q5_0 => {
                        let blk = &as_blocks::<BlockQ5_0>(row)[b];
                        let (lo, hi) = q5_0_unpack(blk);
                        (
                            blk.d,
                            std::array::from_fn(|k| if k < 16 { lo[k] } else { hi[k - 16] } as i32),
                        )
                    }
                    _ => {
                        let blk = &as_blocks::<BlockQ4_0>(row)[b];
                        (
                            blk.d,
                            std::array::from_fn(|k| {
                                let q = if k < 16 {
                                    blk.qs[k] & 0x0F
                                } else {
                                    blk.qs[k - 16] >> 4
                                };
                                if src == WeightFormat::IQ4NL {
                                    KVALUES_IQ4NL[q as usize] as i32
                                } else {
                                    q as i32 - 8
                                }
                            }),
                        )
                    }
                };
                let y = &blocks[b];
                let s: i32 = (0..32).map(|k| w[k] * y.qs[k] as i32).sum();
                acc = (f16_le(d) * f16_le(y.d)).mul_add(s as f32, acc);
            }
        }
        (WeightFormat::Q4_1 | WeightFormat::Q5_1, ActRow::Q8_0 { blocks, .. }) => {
            let nb = row.len() / src.block_bytes();
            for (b, y) in blocks.iter().enumerate().take(nb) {
                let (d, m, q) = if src == WeightFormat::Q5_1 {
                    let blk = &as_blocks::<BlockQ5_1>(row)[b];
                    (blk.d, blk.m, q5_1_unpack(blk))
                } else {
                    let blk = &as_blocks::<BlockQ4_1>(row)[b];
                    (blk.d, blk.m, q4_1_unpack(blk))
                };
                let s: i32 = (0..32).map(|k| q[k] as i32 * y.qs[k] as i32).sum();
                let sy: i32 = y.qs.iter().map(|&v| v as i32).sum();
                let dy = f16_le(y.d);
                acc = (f16_le(d) * dy).mul_add(s as f32, acc);
                acc = f16_le(m).mul_add(dy * sy as f32, acc);
            }
        }
        (WeightFormat::Q4K | WeightFormat::Q5K, ActRow::Q8K { blocks, .. }) => {
            // Q5_K is Q4_K with a fifth bit: bit j of qh[l] for element l
            // of sub-block j.
            let five = src == WeightFormat::Q5K;
            let nb = row.len() / src.block_bytes();
            for (b, y) in blocks.iter().enumerate().take(nb) {
                let blk = if five {
                    let b5 = &as_blocks::<BlockQ5K>(row)[b];
                    (b5.d, b5.dmin, b5.scales, b5.qs, b5.qh)
                } else {
                    let b4 = &as_blocks::<BlockQ4K>(row)[b];
                    (b4.d, b4.dmin, b4.scales, b4.qs, [0; QK_K / 8])
                };
                let (d, dmin, scales, qs, qh) = blk;
                let (mut s, mut m) = (0i32, 0i32);
                for j in 0..8 {
                    let (sc, mn) = scale_min_k4(j, &scales);
                    let (c, hi) = (j / 2, j % 2 == 1);
                    let mut is = 0i32;
                    let mut ys = 0i32;
                    for l in 0..32 {
                        let byte = qs[32 * c + l];
                        let q = if hi { byte >> 4 } else { byte & 0x0F } | ((qh[l] >> j) & 1) << 4;
                        let yv = y.qs[32 * j + l] as i32;
                        is += q as i32 * yv;
                        ys += yv;
                    }
                    s += sc as i32 * is;
                    m += mn as i32 * ys;
                }
                acc = (f16_le(d) * y.d).mul_add(s as f32, acc);
                acc = (-(f16_le(dmin) * y.d)).mul_add(m as f32, acc);
            }
        }
        (WeightFormat::IQ4XS, ActRow::Q8K { blocks, .. }) => {
            for (blk, y) in as_blocks::<BlockIQ4XS>(row).iter().zip(blocks) {
                let mut s = 0i32;
                for j in 0..8 {
                    let is: i32 = (0..32)
                        .map(|k| {
                            let byte = blk.qs[16 * j + k % 16];
                            let q = if k < 16 { byte & 0x0F } else { byte >> 4 };
                            KVALUES_IQ4NL[q as usize] as i32 * y.qs[32 * j + k] as i32
                        })
                        .sum();
                    s += blk.scale(j) * is;
                }
                acc = (f16_le(blk.d) * y.d).mul_add(s as f32, acc);
            }
        }
        (WeightFormat::Q6K | WeightFormat::Q3K, ActRow::Q8K { blocks, .. }) => {
            let nb = row.len() / src.block_bytes();
            for (b, y) in blocks.iter().enumerate().take(nb) {
                let (d, q, scales) = if src == WeightFormat::Q6K {
                    let blk = &as_blocks::<BlockQ6K>(row)[b];
                    (blk.d, q6_k_unpack(blk), blk.scales)
                } else {
                    let blk = &as_blocks::<BlockQ3K>(row)[b];
                    let (q, sc) = q3_k_unpack(blk);
                    (blk.d, q, sc)
                };
                let mut s = 0i32;
                for j in 0..16 {
                    let is: i32 = (16 * j..16 * j + 16)
                        .map(|k| q[k] as i32 * y.qs[k] as i32)
                        .sum();
                    s += scales[j] as i32 * is;
                }
                acc = (f16_le(d) * y.d).mul_add(s as f32, acc);
            }
        }
        (WeightFormat::Coded(f), ActRow::Q8K { blocks, .. }) => {
            // S = Σ_j scale_j · Σ TABLE[code]·y and M = Σ_j min_j · Σy over
            // the 16 sub-blocks in exact integers; per block
            // acc = fma(d·dy, S, acc), then (Q2_K) acc = fma(−(dmin·dy), M, acc);
            // the row's sum times the table's 2^−k at the end.
            let table = f.table();
            let (bb, values) = (f.block_bytes(), table.values());
            for (blk, y) in row.chunks_exact(bb).zip(blocks) {
                let c = decode(f, blk);
                let (mut s, mut m) = (0i32, 0i32);
                for j in 0..16 {
                    let is: i32 = (16 * j..16 * j + 16)
                        .map(|e| values[c.code[e] as usize] as i32 * y.qs[e] as i32)
                        .sum();
                    s += c.scale[j] as i32 * is;
                    m += c.min[j] as i32 * y.bsums[j] as i32;
                }
                acc = (f16_le(c.d) * y.d).mul_add(s as f32, acc);
                if table.has_min() {
                    acc = (-(f16_le(c.dmin) * y.d)).mul_add(m as f32, acc);
                }
            }
            acc *= table.post();
        }
        (WeightFormat::F16 | WeightFormat::BF16 | WeightFormat::F32, ActRow::F32 { x }) => {
            let mut w = vec![0.0f32; x.len()];
            crate::quant::dequantize_row(src, row, &mut w);
            let mut s = [0.0f32; 4];
            for (c, (&w, &y)) in w.iter().zip(x).enumerate() {
                s[c % 4] = w.mul_add(y, s[c % 4]);
            }
            acc = (s[0] + s[1]) + (s[2] + s[3]);
        }
        (f, _) => panic!("spec_dot: no packed form for {f} with these activations"),
    }
    acc
}

// ---------------------------------------------------------------- generic kernels

/// The vector operations the packed kernels are written in: 64 bytes / 16
/// i32 lanes (`V`) and 16 f32 lanes (`F`). Every operation is exact integer
/// arithmetic or a single IEEE-rounded float operation, so all
/// implementations give bit-identical results.
pub(crate) trait Isa {
    type V: Copy;
    type F: Copy;
    /// True when [`Isa::dot_b128`] computes Σ u·y and the caller must start
    /// the accumulator at −128·Σy; false when it computes Σ (u − 128)·y.
    const B128_CORR: bool;
    unsafe fn load(p: *const u8) -> Self::V;
    unsafe fn splat8(x: u8) -> Self::V;
    unsafe fn and(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn or(a: Self::V, b: Self::V) -> Self::V;
    /// Shifts of 16-bit lanes by N < 8 (callers mask the bits that cross bytes).
    unsafe fn shr<const N: u32>(a: Self::V) -> Self::V;
    unsafe fn shl<const N: u32>(a: Self::V) -> Self::V;
    /// `shr` by a count known at run time.
    unsafe fn shr_by(a: Self::V, n: u32) -> Self::V;
    unsafe fn splat32(x: i32) -> Self::V;
    unsafe fn add32(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul32(a: Self::V, b: Self::V) -> Self::V;
    /// acc + Σ_{c<4} u[4l+c]·y[c] per lane l (u ≤ 127 unsigned, y = 4 signed bytes).
    unsafe fn dot_u8(acc: Self::V, u: Self::V, y4: i32) -> Self::V;
    /// A running `dot_u8` sum that a table without `dpbusd` keeps partly in
    /// 16-bit lanes: `psum_add` adds a vector's 16-bit pair products there
    /// without widening them, and `psum_end` widens once (exact while the
    /// caller adds at most K vectors between `psum_begin` and the end with
    /// K · 2 · max(u) · 128 < 2^15: 8 vectors of 4-bit u, 4 of 5-bit, 2 of
    /// 6-bit). The others add each product to the i32 lanes as `dot_u8` does.
    type P: Copy;
    unsafe fn psum_begin(acc: Self::V) -> Self::P;
    unsafe fn psum_add(p: Self::P, u: Self::V, y4: i32) -> Self::P;
    /// acc + Σ u·y, acc as it was at `psum_begin`.
    unsafe fn psum_end(p: Self::P) -> Self::V;
    /// acc + (Σ u·y) · s per lane for a `p` begun at 0, `sc` the
    /// `prep_scale` of s (|s| < 2^15): the widening is the multiply.
    unsafe fn psum_end_scaled(acc: Self::V, p: Self::P, sc: Self::V) -> Self::V;
    /// The form of the scales s (i32 lanes, |s| < 2^15) `psum_end_scaled` takes.
    unsafe fn prep_scale(s: Self::V) -> Self::V;
    /// True where `psum_end_scaled` costs what `psum_end` does (the
    /// widening is the multiply), so scales are best applied there; false
    /// where it is a separate 32-bit multiply.
    const SCALED_END_FREE: bool;
    /// True where several tokens' sums in several chains do not fit the
    /// registers (AVX2: 16 registers, two per `V`): with 4 tokens Q4_K's
    /// kernel takes them two at a time, Q5_K's takes a pass per sub-block,
    /// and the float formats' one chain at a time.
    const FEW_REGISTERS: bool;
    /// i32 lanes `lo` and `hi` (each |x| < 2^15) as pairs of i16, lo in the
    /// low half of each lane.
    unsafe fn pair16(lo: Self::V, hi: Self::V) -> Self::V;
    /// acc + a₀·b₀ + a₁·b₁ per lane, a₀, a₁ the i16 halves of a's lane and
    /// b₀, b₁ those of `pair` (`pmaddwd`).
    unsafe fn madd_pairs(acc: Self::V, a: Self::V, pair: i32) -> Self::V;
    /// The same for u = w + 128 (see `B128_CORR`).
    unsafe fn dot_b128(acc: Self::V, u: Self::V, y4: i32) -> Self::V;
    /// `table[16·(l / 16) + idx[l]]` for each byte l (idx < 16): a lookup
    /// in the 16 bytes of each 16-byte lane of `table` (`pshufb`).
    unsafe fn lut16(table: Self::V, idx: Self::V) -> Self::V;
    /// 16 bytes at p, zero- or sign-extended to the 16 lanes.
    unsafe fn widen_u8(p: *const u8) -> Self::V;
    unsafe fn widen_i8(p: *const u8) -> Self::V;
    /// acc + p[2l]·b0 + p[2l+1]·b1 per lane l, p unsigned bytes, b = (b0, b1) i16 in `pair`.
    unsafe fn dot_pairs(acc: Self::V, p: *const u8, pair: i32) -> Self::V;
    unsafe fn to_f(v: Self::V) -> Self::F;
    unsafe fn load_f16(p: *const u8) -> Self::F;
    /// The low (even) or high (odd) bf16 halves of 16 dwords at p, as f32.
    unsafe fn load_bf16_even(p: *const u8) -> Self::F;
    unsafe fn load_bf16_odd(p: *const u8) -> Self::F;
    unsafe fn load_f32(p: *const u8) -> Self::F;
    unsafe fn add_f(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn splat_f(x: f32) -> Self::F;
    unsafe fn mul_f(a: Self::F, b: Self::F) -> Self::F;
    /// a·b + c, one rounding.
    unsafe fn fmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// c − a·b, one rounding.
    unsafe fn fnmadd(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn zero_f() -> Self::F;
    unsafe fn store_f(p: *mut f32, v: Self::F);
    unsafe fn store(p: *mut u8, v: Self::V);
    /// (a & b) | c.
    #[inline(always)]
    unsafe fn and_or(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        Self::or(Self::and(a, b), c)
    }
    /// Bit `g` of every byte of `h`, moved to bit 4 (the others cleared).
    #[inline(always)]
    unsafe fn fifth_bits(h: Self::V, g: usize) -> Self::V
    where
        Self: Sized,
    {
        fifth_bits_by_shifts::<Self>(h, g)
    }
    /// Bits 2i and 2i + 1 of every byte of `h`, moved to bits 4 and 5 (the
    /// others cleared).
    #[inline(always)]
    unsafe fn two_bits(h: Self::V, i: usize) -> Self::V
    where
        Self: Sized,
    {
        two_bits_by_shifts::<Self>(h, i)
    }
}

/// [`Isa::fifth_bits`] by two 16-bit shifts (bit g of each byte to bit 0,
/// then to bit 4) and a mask. Not by one shift chosen with a `match` on g:
/// Q5_K's passes know g only at run time, and there the match became a
/// jump table that took Q5_K at one token from 28 to 8–10 GB/s.
#[inline(always)]
pub(crate) unsafe fn fifth_bits_by_shifts<I: Isa>(h: I::V, g: usize) -> I::V {
    I::and(I::shl::<4>(I::shr_by(h, g as u32)), I::splat8(0x10))
}

/// [`Isa::two_bits`] by a 16-bit shift and a mask.
#[inline(always)]
pub(crate) unsafe fn two_bits_by_shifts<I: Isa>(h: I::V, i: usize) -> I::V {
    let moved = match i {
        0 => I::shl::<4>(h),
        1 => I::shl::<2>(h),
        2 => h,
        _ => I::shr::<2>(h),
    };
    I::and(moved, I::splat8(0x30))
}

#[inline(always)]
pub(crate) unsafe fn y4(qs: &[i8], k: usize) -> i32 {
    debug_assert!(k + 4 <= qs.len());
    (qs.as_ptr().add(k) as *const i32).read_unaligned()
}

/// Every group of `w` (whole groups of `nb` blocks) times NT tokens;
/// `out[t][16g + r]` receives row r of group g. The groups are read in up
/// to STREAMS streams (see `PackedKernels::t1`, `t2` and `t3`; the entries
/// for 4 tokens give 1).
#[inline(always)]
pub(crate) unsafe fn kernel<I: Isa, const NT: usize, const STREAMS: usize>(
    format: PackedFormat,
    w: &[u8],
    group_bytes: usize,
    nb: usize,
    a: &[ActRow; NT],
    out: &mut [&mut [f32]; NT],
) {
    // The callers are safe code: the layout and the activations' variant
    // must be the format's, or the kernels below would read out of bounds.
    assert_eq!(
        group_bytes,
        format.group_bytes(nb),
        "{format:?}: group size"
    );
    let groups = w.len() / group_bytes;
    for t in 0..NT {
        assert!(out[t].len() >= groups * LANES);
        let variant = match a[t] {
            ActRow::Q8_0 { .. } => ActFormat::Q8_0,
            ActRow::Q8K { .. } => ActFormat::Q8K,
            ActRow::F32 { .. } => ActFormat::F32,
        };
        assert_eq!(variant, format.act_format(), "{format:?}: activations");
        match a[t] {
            ActRow::Q8_0 {
                blocks,
                neg8,
                neg16,
                neg128,
                d,
                ds,
            } => assert!(
                blocks.len() >= nb
                    && neg8.len() >= nb
                    && neg16.len() >= nb
                    && neg128.len() >= nb
                    && d.len() >= nb
                    && ds.len() >= nb
            ),
            ActRow::Q8K { blocks, neg32 } => {
                assert!(blocks.len() >= nb && neg32.len() >= 16 * nb)
            }
            ActRow::F32 { x } => assert!(x.len() >= nb * FLOAT_BLOCK),
        }
    }
    // The format is matched once per call, each arm running its own loop
    // over the groups: with the match inside the loop (one indirect jump per
    // group of 16 rows), one-token calls on a few groups ran 3–5% slower.
    let store = |g: usize, acc: [I::F; NT], out: &mut [&mut [f32]; NT]| {
        for t in 0..NT {
            I::store_f(out[t].as_mut_ptr().add(g * LANES), acc[t]);
        }
    };
    // With S streams (one to three tokens), group i goes with groups i + q, i + 2q,
    // …, q = ⌊groups / S⌋, block by block in turn, so that the memory sees S
    // ascending streams (see `PackedKernels::t1`); the last groups % S go
    // alone, after the last stream. Each group's arithmetic is its own, so
    // the bits do not change. Formats whose blocks of 16 rows span 2-3 KB
    // (256 columns) take at most two streams: more were slower (they
    // alternate in coarse steps).
    const {
        assert!(
            STREAMS == 1 || STREAMS == 2 || STREAMS == 4,
            "1, 2 or 4 streams"
        )
    };
    let gp = |g: usize| w.as_ptr().add(g * group_bytes);
    macro_rules! groups {
        ($most:literal; $f:ident $(, $p:expr)*) => {{
            let s = STREAMS.min($most);
            let q = groups / s;
            macro_rules! tuples {
                ($s:literal) => {
                    for i in 0..q {
                        let gps: [*const u8; $s] = std::array::from_fn(|k| gp(i + k * q));
                        let accs = $f::<I, NT, $s $(, $p)*>(gps, nb, a);
                        for (k, acc) in accs.into_iter().enumerate() {
                            store(i + k * q, acc, out);
                        }
                    }
                };
            }
            // One call site per group count: the kernels' closures are
            // inlined only where they have one, and lose the target
            // features where not (a second call of the one-group kernel
            // took prompts from 600 to 7 tokens/s).
            let alone = match s {
                4 => {
                    tuples!(4);
                    4 * q
                }
                2 => {
                    tuples!(2);
                    2 * q
                }
                _ => 0,
            };
            for g in alone..groups {
                let [acc] = $f::<I, NT, 1 $(, $p)*>([gp(g)], nb, a);
                store(g, acc, out);
            }
        }};
    }
    // The float formats' kernel reads a group alone.
    macro_rules! float_groups {
        ($kind:expr) => {
            for g in 0..groups {
                store(g, group_float::<I, NT, $kind>(gp(g), nb, a), out);
            }
        };
    }
    match format {
        PackedFormat::Q8_0 => groups!(4; group_q8_0),
        PackedFormat::Q5_0 => groups!(4; group_q5_0, false, false),
        PackedFormat::Q5_0Wide => groups!(4; group_q5_0, false, true),
        PackedFormat::Q5_1Wide => groups!(4; group_q5_0, true, true),
        PackedFormat::Q4_0 => groups!(4; group_nibbles, false),
        PackedFormat::IQ4NL => groups!(4; group_nibbles, true),
        PackedFormat::IQ4XS => groups!(2; group_iq4xs),
        PackedFormat::Q5_1 => groups!(4; group_q5_0, true, false),
        PackedFormat::Q4K => groups!(2; group_q4k, false, false),
        PackedFormat::Q4KWide => groups!(2; group_q4k, false, true),
        PackedFormat::Q5K => groups!(2; group_q4k, true, false),
        PackedFormat::Q5KWide => groups!(2; group_q4k, true, true),
        PackedFormat::Q6K => groups!(2; group_q6k, false),
        PackedFormat::Q6KWide => groups!(2; group_q6k, true),
        PackedFormat::Coded(CodeTable::IQ2) => groups!(2; group_coded, IQ2_T),
        PackedFormat::Coded(CodeTable::IQ3XXS) => groups!(2; group_coded, IQ3XXS_T),
        PackedFormat::Coded(CodeTable::IQ3S) => groups!(2; group_coded, IQ3S_T),
        PackedFormat::Coded(CodeTable::IQ1) => groups!(2; group_coded, IQ1_T),
        PackedFormat::Coded(CodeTable::Q2K) => groups!(2; group_coded, Q2K_T),
        PackedFormat::Coded(CodeTable::TQ) => groups!(2; group_coded, TQ_T),
        PackedFormat::F16 => float_groups!(F16_KIND),
        PackedFormat::BF16 => float_groups!(BF16_KIND),
        PackedFormat::F32 => float_groups!(F32_KIND),
    }
}

/// Walks blocks b = 0..nb of the NG groups at `gps` (one, or several read
/// side by side) unit by unit, with the addresses [`block_offsets`] gives:
/// for each unit, `sums(b, quants)` of its blocks (the integer work; with
/// several groups, block b of each in turn), then
/// `finish(k, b, scales, sums)` of group k's blocks in block order (the
/// float steps). Per block the kernels pay two pointer additions instead
/// of that function's divisions (for one token, Q8_0's loop lost about a
/// third of its instructions to them), and a unit of each group is read in
/// ascending order, its scale line after all its quants: read after the
/// first block's quants instead, the scale line made the Zen 4's
/// prefetchers lose the stream (Q8_0 at one token streamed 26–27 GB/s
/// against 30–32 on one thread).
///
/// The format is a value, not a type parameter, so that each kernel calls
/// this once: a closure with one call site is inlined, and must be, or it
/// loses the caller's target features (kernels whose closures had two call
/// sites, one per layout, ran at about 1 GB/s once their bodies grew).
///
/// With `ahead` > 0 each block's lines are prefetched `ahead` bytes on,
/// before its sums (see [`stream_ahead`]). The units' scale lines are left
/// to the hardware: prefetched too, tg64 ran 1–4% slower on one thread
/// (two runs) and 6% on two (one run), each way in turn in one process.
#[inline(always)]
unsafe fn each_block<S, const NG: usize>(
    gps: [*const u8; NG],
    nb: usize,
    f: PackedFormat,
    ahead: usize,
    sums: impl Fn(usize, *const u8) -> S,
    mut finish: impl FnMut(usize, usize, *const u8, S),
) {
    let (core, sb, lead) = (f.core_bytes(), f.scale_bytes(), f.lead_bytes());
    debug_assert!(sb == 32 || sb == 64, "a unit holds one or two blocks");
    let mut unit = 0;
    let mut b0 = 0;
    while b0 < nb {
        let in_unit = (64 / sb).min(nb - b0);
        let scales = unit + in_unit * core;
        // One call site each (the closures must be inlined to get the
        // caller's target features), in loops of a constant trip count.
        let mut s = [const { [const { MaybeUninit::<S>::uninit() }; 2] }; NG];
        for j in 0..64 / sb {
            if j < in_unit {
                // With several groups, block j of each in turn: one stream each.
                for (k, sk) in s.iter_mut().enumerate() {
                    let block = gps[k].add(unit + j * core);
                    // One load per leading line, in order, kept before the
                    // block's other loads (see `PackedFormat::lead_bytes`).
                    for l in (0..lead).step_by(64) {
                        std::ptr::read_volatile(block.add(l));
                    }
                    compiler_fence(Ordering::SeqCst);
                    if ahead > 0 {
                        for l in (0..core).step_by(64) {
                            prefetch_line(block.wrapping_add(ahead + l));
                        }
                    }
                    sk[j].write(sums(b0 + j, block));
                    // Keeps block j's loads before block j + 1's: the compiler
                    // had scheduled the second block of a Q8_0 unit first, and a
                    // descending start took Q8_0 to 11–13 GB/s.
                    compiler_fence(Ordering::SeqCst);
                }
            }
        }
        for (k, sk) in s.iter().enumerate() {
            for (j, sj) in sk.iter().enumerate().take(64 / sb) {
                if j < in_unit {
                    let sc = gps[k].add(scales + j * sb);
                    finish(k, b0 + j, sc, sj.assume_init_read());
                }
            }
        }
        unit = scales + 64;
        b0 += in_unit;
    }
}

/// The environment variable that sets [`stream_ahead`]: a byte count, 0 for
/// no prefetches, at most [`MAX_STREAM_AHEAD`].
pub const PREFETCH_VAR: &str = "GEMMA3_PREFETCH";

/// The largest [`PREFETCH_VAR`] accepted.
pub const MAX_STREAM_AHEAD: usize = 1 << 20;

/// [`stream_ahead`] before its first call.
const AHEAD_UNSET: usize = usize::MAX;
static STREAM_AHEAD: AtomicUsize = AtomicUsize::new(AHEAD_UNSET);

/// How many bytes ahead of its reads a kernel of one to three tokens
/// prefetches the blocks of Q4_K, Q5_K, Q6_K (and Q3_K, packed as Q6_K) and
/// Q5_0, or 0 for none: [`PREFETCH_VAR`] if set, else 4096 on an AMD Zen 5
/// and 0 elsewhere.
///
/// Why: streaming matrices much larger than the caches at one token, one
/// thread, a Zen 5 core's hardware prefetchers alone kept up with the
/// small-block formats (Q8_0 39–42 GB/s; Q4_0, Q5_0, Q5_1, IQ4_NL 36–38)
/// but not with the K-quants, whose 256-column blocks start with their
/// sub-block scales (Q4_K 19–24 GB/s, Q5_K 20, Q6_K 25–27, Q3_K 26); a
/// prefetch of each block's lines 4 KB ahead took those to 31–40, 33–35, 32–36 and
/// 34–35. It took Q8_0 down to 35–36 and left the other small-block formats
/// as they were, but in the model, whose matrices are small (110 KB to
/// 1 MB a layer, each a stream the hardware must pick up anew), Q5_0 gained
/// too: tg64 on one thread, the three in turn in one process, 149.1 tok/s
/// without prefetches, 150.9 with the K-quants', 155.0 with Q5_0's as well
/// (medians of 27). Only there: on the Zen 4 this project ran on before,
/// software prefetches of the weights capped a core at about 18 GB/s (see
/// the module docs), so other CPUs keep none until measured. The
/// prefetches change no result.
pub fn stream_ahead() -> usize {
    match STREAM_AHEAD.load(Ordering::Relaxed) {
        AHEAD_UNSET => {
            // (A bad value is refused by the CLI at start; here it leaves
            // the default.)
            let v = requested_stream_ahead()
                .ok()
                .flatten()
                .unwrap_or_else(default_stream_ahead);
            // A value set meanwhile (`set_stream_ahead`) stands.
            match STREAM_AHEAD.compare_exchange(
                AHEAD_UNSET,
                v,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => v,
                Err(set) => set,
            }
        }
        v => v,
    }
}

/// Sets [`stream_ahead`] for this process (at most [`MAX_STREAM_AHEAD`]),
/// for benchmarks that compare distances in turn.
pub fn set_stream_ahead(bytes: usize) {
    STREAM_AHEAD.store(bytes.min(MAX_STREAM_AHEAD), Ordering::Relaxed);
}

/// [`PREFETCH_VAR`]'s distance: None if it is unset or empty, an error that
/// names it if it is not a byte count up to [`MAX_STREAM_AHEAD`].
pub fn requested_stream_ahead() -> Result<Option<usize>, String> {
    match std::env::var_os(PREFETCH_VAR).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => parse_stream_ahead(&v.to_string_lossy()).map(Some),
    }
}

/// A [`PREFETCH_VAR`] value as a distance in bytes.
fn parse_stream_ahead(v: &str) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if n <= MAX_STREAM_AHEAD => Ok(n),
        _ => Err(format!(
            "{PREFETCH_VAR}={v:?}: expected a byte count from 0 (no prefetches) to {MAX_STREAM_AHEAD}"
        )),
    }
}

/// 4096 on an AMD CPU of family 26 (Zen 5), where it was measured, else 0.
fn default_stream_ahead() -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::x86::amd_family() == Some(26) {
        return 4096;
    }
    0
}

/// [`stream_ahead`] for a kernel of `nt` tokens on `f`, or 0 where it
/// prefetches nothing: four tokens, which only prompts run, and prompts read
/// a task's weights first (see `packed_groups`). A prompt's last one to
/// three tokens take the kernels that prefetch; there the lines are in
/// cache already, and the prefetches cost a little issue bandwidth only.
#[inline(always)]
fn stream_ahead_for(f: PackedFormat, nt: usize) -> usize {
    match f {
        PackedFormat::Q4K | PackedFormat::Q5K | PackedFormat::Q6K | PackedFormat::Q5_0
            if nt < 4 =>
        {
            stream_ahead()
        }
        _ => 0,
    }
}

/// A prefetch of the line at `p` into L1 (a hint: `p` may lie anywhere).
#[inline(always)]
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    prefetch_hint::<{ std::arch::x86_64::_MM_HINT_T0 }>(p);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A prefetch of the line at `p` into L2 (a hint: `p` may lie anywhere).
#[inline(always)]
fn prefetch_l2(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    prefetch_hint::<{ std::arch::x86_64::_MM_HINT_T1 }>(p);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// `_mm_prefetch` of the line at `p` with hint `H`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_hint<const H: i32>(p: *const u8) {
    // SAFETY: a prefetch reads nothing and cannot fault, whatever `p` is.
    unsafe { std::arch::x86_64::_mm_prefetch::<H>(p as *const i8) };
}

/// The f32 activations of token t; the caller checked the variant.
#[inline(always)]
unsafe fn f32s<'a>(a: &ActRow<'a>) -> &'a [f32] {
    match *a {
        ActRow::F32 { x } => x,
        _ => std::hint::unreachable_unchecked(),
    }
}

const F16_KIND: u8 = 0;
const BF16_KIND: u8 = 1;
const F32_KIND: u8 = 2;

/// A group of a float format (KIND) times NT tokens: four chains of
/// multiply-adds per token over the columns c ≡ k (mod 4), as the module
/// docs define; each column's 16 rows are converted to f32 once for the NT
/// tokens, whose activation is broadcast from memory.
#[inline(always)]
unsafe fn group_float<I: Isa, const NT: usize, const KIND: u8>(
    gp: *const u8,
    nb: usize,
    a: &[ActRow; NT],
) -> [I::F; NT] {
    let core = match KIND {
        F32_KIND => PackedFormat::F32.core_bytes(),
        _ => PackedFormat::F16.core_bytes(),
    };
    let xs: [*const f32; NT] = std::array::from_fn(|t| f32s(&a[t]).as_ptr());
    let mut s = [[I::zero_f(); 4]; NT];
    if I::FEW_REGISTERS && NT > 1 {
        // One chain k at a time, over all the group's columns c ≡ k (mod
        // 4): each chain's operations in the same order, so the same bits,
        // but NT sums in registers instead of 4·NT (for 4 tokens 32 AVX2
        // registers, which had spilled). Each column is still read once.
        for k in 0..4 {
            for b in 0..nb {
                let bp = gp.add(b * core);
                for q in 0..FLOAT_BLOCK / 4 {
                    let c = 4 * q + k;
                    let w = match KIND {
                        F16_KIND => I::load_f16(bp.add(2 * LANES * c)),
                        BF16_KIND => {
                            // Columns 2p and 2p + 1 share pair p's dwords.
                            let p = bp.add(4 * LANES * (c / 2));
                            if k % 2 == 0 {
                                I::load_bf16_even(p)
                            } else {
                                I::load_bf16_odd(p)
                            }
                        }
                        _ => I::load_f32(bp.add(4 * LANES * c)),
                    };
                    for t in 0..NT {
                        let x = *xs[t].add(FLOAT_BLOCK * b + c);
                        s[t][k] = I::fmadd(w, I::splat_f(x), s[t][k]);
                    }
                }
            }
        }
        return std::array::from_fn(|t| {
            I::add_f(I::add_f(s[t][0], s[t][1]), I::add_f(s[t][2], s[t][3]))
        });
    }
    for b in 0..nb {
        let bp = gp.add(b * core);
        for q in 0..FLOAT_BLOCK / 4 {
            // Columns 4q .. 4q + 4 of the block.
            let w: [I::F; 4] = match KIND {
                F16_KIND => std::array::from_fn(|k| I::load_f16(bp.add(2 * LANES * (4 * q + k)))),
                BF16_KIND => {
                    let (p0, p1) = (bp.add(4 * LANES * 2 * q), bp.add(4 * LANES * (2 * q + 1)));
                    [
                        I::load_bf16_even(p0),
                        I::load_bf16_odd(p0),
                        I::load_bf16_even(p1),
                        I::load_bf16_odd(p1),
                    ]
                }
                _ => std::array::from_fn(|k| I::load_f32(bp.add(4 * LANES * (4 * q + k)))),
            };
            for t in 0..NT {
                let x = xs[t].add(FLOAT_BLOCK * b + 4 * q);
                for k in 0..4 {
                    s[t][k] = I::fmadd(w[k], I::splat_f(*x.add(k)), s[t][k]);
                }
            }
        }
    }
    std::array::from_fn(|t| I::add_f(I::add_f(s[t][0], s[t][1]), I::add_f(s[t][2], s[t][3])))
}

/// The Q8_0 activation parts of token t, in the variant's field order
/// (blocks, neg16, neg128, d); the caller checked the variant.
#[inline(always)]
unsafe fn q8<'a>(a: &ActRow<'a>) -> (&'a [BlockQ8_0], &'a [i32], &'a [i32], &'a [f32]) {
    match *a {
        ActRow::Q8_0 {
            blocks,
            neg16,
            neg128,
            d,
            ..
        } => (blocks, neg16, neg128, d),
        _ => std::hint::unreachable_unchecked(),
    }
}

#[inline(always)]
unsafe fn q8k<'a>(a: &ActRow<'a>) -> &'a [BlockQ8K] {
    q8k_neg32(a).0
}

/// The Q8_K blocks and the −32·(sub-block sums) of token t.
#[inline(always)]
unsafe fn q8k_neg32<'a>(a: &ActRow<'a>) -> (&'a [BlockQ8K], &'a [i32]) {
    match *a {
        ActRow::Q8K { blocks, neg32 } => (blocks, neg32),
        _ => std::hint::unreachable_unchecked(),
    }
}

/// One 32-element block's integer sums for NT tokens, from `is`: the low
/// vectors `unpack(c).0` against elements 4c.. and the high ones against
/// 16 + 4c.., by `dot_b128` when `B128` (u = w + 128) else in partial sums
/// (`Isa::psum_add`) of at most K vectors each (K · 2 · max(u) · 128 <
/// 2^15: 4 for 5-bit u, 8 for 4-bit). One token alone gets two chains
/// (low, high), summed in exact integers, so that its `dpbusd`s do not all
/// wait on each other.
#[inline(always)]
unsafe fn block32_sums<I: Isa, const NT: usize, const B128: bool, const K: usize>(
    mut is: [I::V; NT],
    a: &[ActRow; NT],
    b: usize,
    unpack: impl Fn(usize) -> (I::V, I::V),
) -> [I::V; NT] {
    let y = |t: usize, k: usize| y4(&q8(&a[t]).0.get_unchecked(b).qs, k);
    if B128 {
        let mut is2 = [I::splat32(0); NT];
        for c in 0..4 {
            let (lo, hi) = unpack(c);
            for t in 0..NT {
                if NT == 1 {
                    is[t] = I::dot_b128(is[t], lo, y(t, 4 * c));
                    is2[t] = I::dot_b128(is2[t], hi, y(t, 16 + 4 * c));
                } else {
                    is[t] = I::dot_b128(is[t], lo, y(t, 4 * c));
                    is[t] = I::dot_b128(is[t], hi, y(t, 16 + 4 * c));
                }
            }
        }
        if NT == 1 {
            is[0] = I::add32(is[0], is2[0]);
        }
        return is;
    }
    // Refused at compile time: a partial sum of fewer than 4 vectors for one
    // token (its chains take 4 each); with several tokens K = 2 also works.
    const {
        assert!(
            B128 || NT > 1 || K >= 4,
            "one token's chains take 4 vectors"
        )
    };
    if NT == 1 {
        let (mut lo_p, mut hi_p) = (I::psum_begin(is[0]), I::psum_begin(I::splat32(0)));
        for c in 0..4 {
            let (lo, hi) = unpack(c);
            lo_p = I::psum_add(lo_p, lo, y(0, 4 * c));
            hi_p = I::psum_add(hi_p, hi, y(0, 16 + 4 * c));
        }
        is[0] = I::add32(I::psum_end(lo_p), I::psum_end(hi_p));
        return is;
    }
    let mut p: [I::P; NT] = std::array::from_fn(|t| I::psum_begin(is[t]));
    for c in 0..4 {
        // Whole partial sums of K vectors (a constant: this folds away).
        if c > 0 && (2 * c) % K == 0 {
            for t in 0..NT {
                p[t] = I::psum_begin(I::psum_end(p[t]));
            }
        }
        let (lo, hi) = unpack(c);
        for t in 0..NT {
            p[t] = I::psum_add(I::psum_add(p[t], lo, y(t, 4 * c)), hi, y(t, 16 + 4 * c));
        }
    }
    std::array::from_fn(|t| I::psum_end(p[t]))
}

/// A block's float step with Q8_0 activations: `acc = fma(dw · dy, S, acc)`.
#[inline(always)]
pub(crate) unsafe fn block_finish<I: Isa, const NT: usize>(
    acc: &mut [I::F; NT],
    scales: *const u8,
    a: &[ActRow; NT],
    b: usize,
    is: [I::V; NT],
) {
    let dw = I::load_f16(scales);
    for t in 0..NT {
        let dy = *q8(&a[t]).3.get_unchecked(b);
        acc[t] = I::fmadd(I::mul_f(dw, I::splat_f(dy)), I::to_f(is[t]), acc[t]);
    }
}

/// Each token's −128·Σy for block b where `dot_b128` needs it (see
/// `B128_CORR`), else 0.
#[inline(always)]
unsafe fn start128<I: Isa, const NT: usize>(a: &[ActRow; NT], b: usize) -> [I::V; NT] {
    std::array::from_fn(|t| {
        I::splat32(if I::B128_CORR {
            *q8(&a[t]).2.get_unchecked(b)
        } else {
            0
        })
    })
}

#[inline(always)]
unsafe fn group_q8_0<I: Isa, const NT: usize, const NG: usize>(
    gps: [*const u8; NG],
    nb: usize,
    a: &[ActRow; NT],
) -> [[I::F; NT]; NG] {
    let mut acc = [[I::zero_f(); NT]; NG];
    each_block(
        gps,
        nb,
        PackedFormat::Q8_0,
        0,
        |b, core| {
            block32_sums::<I, NT, true, 1>(start128::<I, NT>(a, b), a, b, |c| {
                (I::load(core.add(64 * c)), I::load(core.add(64 * (4 + c))))
            })
        },
        |k, b, scales, is| block_finish::<I, NT>(&mut acc[k], scales, a, b, is),
    );
    acc
}

/// A Q5_0 (or Q5_1) block's vector c of low weights (elements 4c.. of each
/// row, u in each byte) and of high weights (16 + 4c..): nibbles joined to
/// their fifth bits.
#[inline(always)]
pub(crate) unsafe fn q5_0_vectors<I: Isa>(core: *const u8, c: usize) -> (I::V, I::V) {
    let (h, v, m4) = (
        I::load(core),
        I::load(core.add(64 + 64 * c)),
        I::splat8(0x0F),
    );
    (
        I::and_or(v, m4, I::fifth_bits(h, c)),
        I::and_or(I::shr::<4>(v), m4, I::fifth_bits(h, 4 + c)),
    )
}

/// A Q6_K block's sub-block j as its 4 vectors of groups 4j..4j+4 (u in each
/// byte): nibbles from A and B joined to their two high bits from C.
#[inline(always)]
unsafe fn q6k_vectors<I: Isa>(core: *const u8, j: usize) -> [I::V; 4] {
    let base = core.add(256 + 192 * j);
    let (va, vb, vc) = (I::load(base), I::load(base.add(64)), I::load(base.add(128)));
    let m4 = I::splat8(0x0F);
    [
        I::and_or(va, m4, I::two_bits(vc, 0)),
        I::and_or(I::shr::<4>(va), m4, I::two_bits(vc, 1)),
        I::and_or(vb, m4, I::two_bits(vc, 2)),
        I::and_or(I::shr::<4>(vb), m4, I::two_bits(vc, 3)),
    ]
}

/// Tokens 2k and 2k + 1 of a pass over 4 (the halves in which some AVX2
/// kernels take theirs).
#[inline(always)]
fn token_pair<'b, 'a, const NT: usize>(a: &'b [ActRow<'a>; NT], k: usize) -> &'b [ActRow<'a>; 2] {
    a[2 * k..2 * k + 2]
        .try_into()
        .expect("tokens 2k and 2k + 1")
}

/// Q5_0, or with `MIN` Q5_1 (the same quants, u = q, and a minimum m:
/// `acc = fma(m, dy·Σy, acc)` after the scaled sum), either one widened
/// with `WIDE` (its u read as they are, as Q8_0's are).
#[inline(always)]
unsafe fn group_q5_0<
    I: Isa,
    const NT: usize,
    const NG: usize,
    const MIN: bool,
    const WIDE: bool,
>(
    gps: [*const u8; NG],
    nb: usize,
    a: &[ActRow; NT],
) -> [[I::F; NT]; NG] {
    let mut acc = [[I::zero_f(); NT]; NG];
    let sums = |b: usize, core: *const u8| {
        // Q5_0's weights are u − 16: start at −16·Σy.
        let start = std::array::from_fn(|t| {
            I::splat32(if MIN {
                0
            } else {
                *q8(&a[t]).1.get_unchecked(b)
            })
        });
        if MIN && WIDE && NT == 4 && I::FEW_REGISTERS {
            // Tokens 0, 1 then 2, 3 over the block (in L1 the second
            // time), as `group_q4k` does: with 4 tokens at once the AVX2
            // code had loaded the block's 32 activation broadcasts ahead
            // and spilled them. Q5_K_M file, pp512 on one thread, Zen 3,
            // alternating runs: ahead of 4 tokens at once in 6 of 8
            // (+4%), of the unwidened kernel in 12 of 16.
            let mut is = start;
            for k in 0..2 {
                let two = token_pair(a, k);
                let s2 = block32_sums::<I, 2, false, 4>([is[2 * k], is[2 * k + 1]], two, b, |c| {
                    (I::load(core.add(64 * c)), I::load(core.add(64 * (4 + c))))
                });
                (is[2 * k], is[2 * k + 1]) = (s2[0], s2[1]);
            }
            return is;
        }
        if WIDE {
            return block32_sums::<I, NT, false, 4>(start, a, b, |c| {
                (I::load(core.add(64 * c)), I::load(core.add(64 * (4 + c))))
            });
        }
        block32_sums::<I, NT, false, 4>(start, a, b, |c| q5_0_vectors::<I>(core, c))
    };
    let finish = |b: usize, scales: *const u8, is: [I::V; NT], acc: &mut [I::F; NT]| {
        block_finish::<I, NT>(acc, scales, a, b, is);
        if MIN {
            let m = I::load_f16(scales.add(32));
            for t in 0..NT {
                acc[t] = I::fmadd(m, I::splat_f(*q8_ds(&a[t]).get_unchecked(b)), acc[t]);
            }
        }
    };
    let f = match (MIN, WIDE) {
        (true, true) => PackedFormat::Q5_1Wide,
        (true, false) => PackedFormat::Q5_1,
        (false, true) => PackedFormat::Q5_0Wide,
        (false, false) => PackedFormat::Q5_0,
    };
    each_block(gps, nb, f, stream_ahead_for(f, NT), sums, |k, b, sc, is| {
        finish(b, sc, is, &mut acc[k])
    });
    acc
}

/// Q4_0 (u = q, the low and high nibbles of 4 vectors, w = u − 8, so the
/// sum starts at −8·Σy), or with `LUT` IQ4_NL (each nibble looked up in the
/// table, +128 and unsigned, then as Q8_0: the sum corrected by −128·Σy).
#[inline(always)]
unsafe fn group_nibbles<I: Isa, const NT: usize, const NG: usize, const LUT: bool>(
    gps: [*const u8; NG],
    nb: usize,
    a: &[ActRow; NT],
) -> [[I::F; NT]; NG] {
    let mut acc = [[I::zero_f(); NT]; NG];
    let m4 = I::splat8(0x0F);
    let table = I::load(IQ4NL_U128.as_ptr());
    // IQ4_NL's layout is Q4_0's.
    each_block(
        gps,
        nb,
        PackedFormat::Q4_0,
        0,
        |b, core| {
            let start = if LUT {
                start128::<I, NT>(a, b)
            } else {
                std::array::from_fn(|t| I::splat32(*q8_neg8(&a[t]).get_unchecked(b)))
            };
            block32_sums::<I, NT, LUT, 8>(start, a, b, |c| {
                let v = I::load(core.add(64 * c));
                let (lo, hi) = (I::and(v, m4), I::and(I::shr::<4>(v), m4));
                if LUT {
                    (I::lut16(table, lo), I::lut16(table, hi))
                } else {
                    (lo, hi)
                }
            })
        },
        |k, b, scales, is| block_finish::<I, NT>(&mut acc[k], scales, a, b, is),
    );
    acc
}

/// IQ4_NL's table as unsigned bytes (value + 128, as `dpbusd` wants them).
static IQ4NL_U128: [u8; 64] = lut_lanes(KVALUES_IQ4NL, 128);

/// IQ4_XS: per sub-block j, IQ4_NL's looked-up sum (corrected by
/// −128·Σy_j), times the signed scale in exact integers; one float step per
/// super-block.
#[inline(always)]
unsafe fn group_iq4xs<I: Isa, const NT: usize, const NG: usize>(
    gps: [*const u8; NG],
    nb: usize,
    a: &[ActRow; NT],
) -> [[I::F; NT]; NG] {
    let mut acc = [[I::zero_f(); NT]; NG];
    let m4 = I::splat8(0x0F);
    let table = I::load(IQ4NL_U128.as_ptr());
    let sums = |b: usize, core: *const u8| {
        let mut s = [I::splat32(0); NT];
        for j in 0..8 {
            let mut is = [I::splat32(0); NT];
            if I::B128_CORR {
                for t in 0..NT {
                    let y = q8k(&a[t]).get_unchecked(b);
                    let sum = y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32;
                    is[t] = I::splat32(-128 * sum);
                }
            }
            for g in 0..4 {
                let v = I::load(core.add(128 + 64 * (4 * j + g)));
                let lo = I::lut16(table, I::and(v, m4));
                let hi = I::lut16(table, I::and(I::shr::<4>(v), m4));
                for t in 0..NT {
                    let y = &q8k(&a[t]).get_unchecked(b).qs;
                    is[t] = I::dot_b128(is[t], lo, y4(y, 32 * j + 4 * g));
                    is[t] = I::dot_b128(is[t], hi, y4(y, 32 * j + 16 + 4 * g));
                }
            }
            let sc = I::widen_i8(core.add(16 * j));
            for t in 0..NT {
                s[t] = I::add32(s[t], I::mul32(is[t], sc));
            }
        }
        s
    };
    each_block(gps, nb, PackedFormat::IQ4XS, 0, sums, |k, b, scales, s| {
        super_finish::<I, NT>(&mut acc[k], scales, a, b, s)
    });
    acc
}

/// A super-block's float step with Q8_K activations: `acc = fma(d · dy, S, acc)`.
#[inline(always)]
pub(crate) unsafe fn super_finish<I: Isa, const NT: usize>(
    acc: &mut [I::F; NT],
    scales: *const u8,
    a: &[ActRow; NT],
    b: usize,
    s: [I::V; NT],
) {
    let d = I::load_f16(scales);
    for t in 0..NT {
        let dy = I::splat_f(q8k(&a[t]).get_unchecked(b).d);
        acc[t] = I::fmadd(I::mul_f(d, dy), I::to_f(s[t]), acc[t]);
    }
}

// `group_coded`'s table parameter: a `CodeTable` as its index in `CodeTable::ALL`.
const IQ2_T: u8 = CodeTable::IQ2 as u8;
const IQ3XXS_T: u8 = CodeTable::IQ3XXS as u8;
const IQ3S_T: u8 = CodeTable::IQ3S as u8;
const IQ1_T: u8 = CodeTable::IQ1 as u8;
const Q2K_T: u8 = CodeTable::Q2K as u8;
const TQ_T: u8 = CodeTable::TQ as u8;

/// Each code table's values + 64 (unsigned, as `dpbusd` wants them): every
/// table's values lie within ±62, so u = v + 64 lies in 2..=126, where
/// AVX2's 16-bit pair products cannot saturate (2 · 126 · 128 < 2^15) and
/// `dot_u8` serves every table. With + 128, AVX2 needed `dot_b128`'s sign
/// trick (three more operations a vector).
static CODE_TABLES_U64: [[u8; 64]; 6] = CodeTable::all_lanes(64);
const _: () = {
    let mut k = 0;
    while k < 6 {
        let v = CodeTable::ALL[k].values();
        let mut i = 0;
        while i < 16 {
            assert!(v[i] >= -63 && v[i] <= 63, "a code table's value leaves ±63");
            i += 1;
        }
        k += 1;
    }
};

/// `lo` and `hi` as the low and high halves of one i32 (the form of a
/// broadcast `pmaddwd` operand).
#[inline(always)]
pub(crate) fn i16_pair(lo: i16, hi: i16) -> i32 {
    (lo as u16 as u32 | (hi as u16 as u32) << 16) as i32
}

/// s + k·Σ_j s_j·Σy_j for each token: s_j the 16 i8 sub-block scales at
/// `scales` (`[j][r]`), Σy_j the sums of the token's Q8_K block b over
/// sub-blocks of 16; two sub-blocks a `madd_pairs` (|s_j| ≤ 128, |Σy_j| ≤
/// 2048). The offset of formats whose u = w + k′ when their scales are
/// applied as partial sums widen (`Isa::SCALED_END_FREE`), with k = −k′.
#[inline(always)]
unsafe fn scaled_block_sums<I: Isa, const NT: usize>(
    mut s: [I::V; NT],
    scales: *const u8,
    a: &[ActRow; NT],
    b: usize,
    k: i32,
) -> [I::V; NT] {
    let mut m = [I::splat32(0); NT];
    for p in 0..8 {
        let pair = I::pair16(
            I::widen_i8(scales.add(32 * p)),
            I::widen_i8(scales.add(32 * p + 16)),
        );
        for t in 0..NT {
            let bs = &q8k(&a[t]).get_unchecked(b).bsums;
            m[t] = I::madd_pairs(m[t], pair, i16_pair(bs[2 * p], bs[2 * p + 1]));
        }
    }
    for t in 0..NT {
        s[t] = I::add32(s[t], I::mul32(m[t], I::splat32(k)));
    }
    s
}

/// M = Σ_j m_j · Σy_j for 16 rows, two sub-blocks per `dot_pairs`: the u8
/// minimums of sub-blocks 2p and 2p + 1 at `mins + 32p` (`[r][2]`), and
/// `sum(j)` the activations' sum over sub-block j (Q4_K's sub-blocks of 32,
/// Q2_K's of 16).
#[inline(always)]
pub(crate) unsafe fn min_sums<I: Isa>(
    mins: *const u8,
    pairs: usize,
    sum: impl Fn(usize) -> i16,
) -> I::V {
    let mut m = I::splat32(0);
    for p in 0..pairs {
        let pair = i16_pair(sum(2 * p), sum(2 * p + 1));
        m = I::dot_pairs(m, mins.add(32 * p), pair);
    }
    m
}

/// A coded format (T names its table): per sub-block of 16 the looked-up
/// sum of (v + 64)·y, corrected by −64·Σy (Q2_K's codes are its unsigned
/// values and go to `dot_u8` as they are), times the
/// sub-block's scale in exact integers; one float step per super-block
/// (Q2_K: two, with its minimums as Q4_K's), and the table's 2^−k at the end.
#[inline(always)]
unsafe fn group_coded<I: Isa, const NT: usize, const NG: usize, const T: u8>(
    gps: [*const u8; NG],
    nb: usize,
    a: &[ActRow; NT],
) -> [[I::F; NT]; NG] {
    let table = CodeTable::ALL[T as usize];
    let min = table.has_min();
    let codes = PackedFormat::CODED_CODES;
    let mut acc = [[I::zero_f(); NT]; NG];
    let m4 = I::splat8(0x0F);
    let lut = I::load(CODE_TABLES_U64[T as usize].as_ptr());
    // The integer sums, and Q2_K's minimum sums M for each token.
    let sums = |b: usize, core: *const u8| {
        let mut s = [I::splat32(0); NT];
        for c in 0..8 {
            if I::SCALED_END_FREE {
                // Each sub-block's scale applied as its partial sums widen
                // (as Q6_K's): Q2_K's u ≤ 3 lets a sub-block's 4 vectors
                // share one partial sum, the looked-up u ≤ 126 one each.
                // The tables' −64·Σ_j s_j·Σy_j is added below.
                // (Not `array::map`: its closure was compiled out of line,
                // without the kernel's target features.)
                let sc = [
                    I::prep_scale(I::widen_i8(core.add(16 * (2 * c)))),
                    I::prep_scale(I::widen_i8(core.add(16 * (2 * c + 1)))),
                ];
                let zero = I::psum_begin(I::splat32(0));
                let mut p = [[zero; 2]; NT];
                for g in 0..4 {
                    let v = I::load(core.add(codes + 64 * (4 * c + g)));
                    let (lo, hi) = (I::and(v, m4), I::and(I::shr::<4>(v), m4));
                    let u = if min {
                        [lo, hi]
                    } else {
                        [I::lut16(lut, lo), I::lut16(lut, hi)]
                    };
                    for t in 0..NT {
                        let y = &q8k(&a[t]).get_unchecked(b).qs;
                        for h in 0..2 {
                            p[t][h] = I::psum_add(p[t][h], u[h], y4(y, 32 * c + 16 * h + 4 * g));
                            if !min {
                                s[t] = I::psum_end_scaled(s[t], p[t][h], sc[h]);
                                p[t][h] = zero;
                            }
                        }
                    }
                }
                if min {
                    for t in 0..NT {
                        for h in 0..2 {
                            s[t] = I::psum_end_scaled(s[t], p[t][h], sc[h]);
                        }
                    }
                }
                continue;
            }
            // Sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles).
            let mut is = [[I::splat32(0); 2]; NT];
            if !min {
                // The looked-up u = v + 64: start at −64·Σy.
                for t in 0..NT {
                    let y = q8k(&a[t]).get_unchecked(b);
                    for h in 0..2 {
                        is[t][h] = I::splat32(-64 * y.bsums[2 * c + h] as i32);
                    }
                }
            }
            for g in 0..4 {
                let v = I::load(core.add(codes + 64 * (4 * c + g)));
                let (lo, hi) = (I::and(v, m4), I::and(I::shr::<4>(v), m4));
                // Q2_K's codes are its values; the others' are looked up.
                let (lo, hi) = if min {
                    (lo, hi)
                } else {
                    (I::lut16(lut, lo), I::lut16(lut, hi))
                };
                for t in 0..NT {
                    let y = &q8k(&a[t]).get_unchecked(b).qs;
                    let (ylo, yhi) = (y4(y, 32 * c + 4 * g), y4(y, 32 * c + 16 + 4 * g));
                    is[t][0] = I::dot_u8(is[t][0], lo, ylo);
                    is[t][1] = I::dot_u8(is[t][1], hi, yhi);
                }
            }
            let sc_lo = I::widen_i8(core.add(16 * (2 * c)));
            let sc_hi = I::widen_i8(core.add(16 * (2 * c + 1)));
            for t in 0..NT {
                s[t] = I::add32(s[t], I::mul32(is[t][0], sc_lo));
                s[t] = I::add32(s[t], I::mul32(is[t][1], sc_hi));
            }
        }
        if I::SCALED_END_FREE && !min {
            // The same exact S as starting each sub-block at −64·Σy_j
            // (|Σ_j s_j·Σ u·y| < 2^30).
            s = scaled_block_sums::<I, NT>(s, core, a, b, -64);
        }
        let mut m = [I::splat32(0); NT];
        if min {
            for t in 0..NT {
                let y = q8k(&a[t]).get_unchecked(b);
                m[t] = min_sums::<I>(core.add(PackedFormat::CODED_MINS), 8, |j| y.bsums[j]);
            }
        }
        (s, m)
    };
    let finish =
        |b: usize, scales: *const u8, (s, m): ([I::V; NT], [I::V; NT]), acc: &mut [I::F; NT]| {
            let d = I::load_f16(scales);
            for t in 0..NT {
                let dy = I::splat_f(q8k(&a[t]).get_unchecked(b).d);
                acc[t] = I::fmadd(I::mul_f(d, dy), I::to_f(s[t]), acc[t]);
                if min {
                    let dmin = I::load_f16(scales.add(32));
                    acc[t] = I::fnmadd(I::mul_f(dmin, dy), I::to_f(m[t]), acc[t]);
                }
            }
        };
    let f = PackedFormat::Coded(table);
    each_block(gps, nb, f, 0, sums, |k, b, sc, s| {
        finish(b, sc, s, &mut acc[k])
    });
    let post = table.post();
    if post != 1.0 {
        for acc in &mut acc {
            for t in 0..NT {
                acc[t] = I::mul_f(acc[t], I::splat_f(post));
            }
        }
    }
    acc
}

/// The −8·Σq of token t's Q8_0 blocks; the caller checked the variant.
#[inline(always)]
unsafe fn q8_neg8<'a>(a: &ActRow<'a>) -> &'a [i32] {
    match *a {
        ActRow::Q8_0 { neg8, .. } => neg8,
        _ => std::hint::unreachable_unchecked(),
    }
}

/// The d·Σq of token t's Q8_0 blocks; the caller checked the variant.
#[inline(always)]
unsafe fn q8_ds<'a>(a: &ActRow<'a>) -> &'a [f32] {
    match *a {
        ActRow::Q8_0 { ds, .. } => ds,
        _ => std::hint::unreachable_unchecked(),
    }
}

/// A Q4_K (with `FIVE` Q5_K; either one widened with `WIDE`) block's
/// integer sums S (sub-block scales applied) and minimum sums M for NT
/// tokens.
#[inline(always)]
unsafe fn q4k_sums<I: Isa, const NT: usize, const FIVE: bool, const WIDE: bool>(
    core: *const u8,
    b: usize,
    a: &[ActRow; NT],
) -> ([I::V; NT], [I::V; NT]) {
    let f = q4k_format(FIVE, WIDE);
    let nibbles = f.nibbles_offset();
    let mut s = [I::splat32(0); NT];
    // Each sub-block j = 2c + h in a pass of its own, one partial sum per
    // token: for the widened forms (their bytes read as they are), and for
    // Q5_K with 4 tokens on AVX2 (the low nibbles and fifth bits of vectors
    // (c, g), then a second pass over the same 512 bytes for the high
    // ones), where two sums per token in registers spilled. Criterion,
    // Q5_K 2048 → 640 at 512 tokens before prompts widened it (this path
    // now runs for batches under `WIDEN_TOKENS`), medians of 3, 4 and 6
    // alternating rounds: 41.6 → 53.1, 41.2 → 43.2 and 38.1 → 48.3 G. (Q4_K measured
    // slower this way unwidened, and takes its tokens in pairs instead: see
    // `group_q4k`.)
    if WIDE || (FIVE && NT == 4 && I::FEW_REGISTERS) {
        for j in 0..8 {
            let sc = I::prep_scale(I::widen_u8(core.add(16 * j)));
            let zero = I::psum_begin(I::splat32(0));
            let mut p = [zero; NT];
            for g in 0..8 {
                // 5-bit u: at most 4 vectors in a partial sum (4-bit: 8).
                if FIVE && g == 4 {
                    for t in 0..NT {
                        s[t] = I::psum_end_scaled(s[t], p[t], sc);
                    }
                    p = [zero; NT];
                }
                let u = if WIDE {
                    I::load(core.add(nibbles + 512 * j + 64 * g))
                } else {
                    q4k_vector::<I, FIVE>(core, j, g)
                };
                for t in 0..NT {
                    let y = &q8k(&a[t]).get_unchecked(b).qs;
                    p[t] = I::psum_add(p[t], u, y4(y, 32 * j + 4 * g));
                }
            }
            for t in 0..NT {
                s[t] = I::psum_end_scaled(s[t], p[t], sc);
            }
        }
    } else {
        for c in 0..4 {
            let sc_lo = I::prep_scale(I::widen_u8(core.add(16 * (2 * c))));
            let sc_hi = I::prep_scale(I::widen_u8(core.add(16 * (2 * c + 1))));
            let zero = I::psum_begin(I::splat32(0));
            let mut lo_p = [zero; NT];
            let mut hi_p = [zero; NT];
            for g in 0..8 {
                // Q5_K's 5-bit u: at most 4 vectors in a partial sum.
                if FIVE && g == 4 {
                    for t in 0..NT {
                        s[t] = I::psum_end_scaled(s[t], lo_p[t], sc_lo);
                        s[t] = I::psum_end_scaled(s[t], hi_p[t], sc_hi);
                    }
                    lo_p = [zero; NT];
                    hi_p = [zero; NT];
                }
                let (lo, hi) = q4k_pair::<I, FIVE>(core, c, g);
                for t in 0..NT {
                    let y = &q8k(&a[t]).get_unchecked(b).qs;
                    lo_p[t] = I::psum_add(lo_p[t], lo, y4(y, 64 * c + 4 * g));
                    hi_p[t] = I::psum_add(hi_p[t], hi, y4(y, 64 * c + 32 + 4 * g));
                }
            }
            for t in 0..NT {
                s[t] = I::psum_end_scaled(s[t], lo_p[t], sc_lo);
                s[t] = I::psum_end_scaled(s[t], hi_p[t], sc_hi);
            }
        }
    }
    (s, q4k_min_sums::<I, NT>(core, b, a))
}

/// A Q4_K (with `FIVE` Q5_K) block's sub-block j as its vector g (u in
/// each byte): the low (j even) or high nibbles of vector (j / 2, g), and
/// Q5_K's fifth bits.
#[inline(always)]
pub(crate) unsafe fn q4k_vector<I: Isa, const FIVE: bool>(
    core: *const u8,
    j: usize,
    g: usize,
) -> I::V {
    let nibbles = q4k_format(FIVE, false).nibbles_offset();
    let v = I::load(core.add(nibbles + 64 * (8 * (j / 2) + g)));
    let v = if j.is_multiple_of(2) {
        v
    } else {
        I::shr::<4>(v)
    };
    let m4 = I::splat8(0x0F);
    if FIVE {
        I::and_or(v, m4, I::fifth_bits(I::load(core.add(256 + 64 * g)), j))
    } else {
        I::and(v, m4)
    }
}

/// Sub-blocks 2c and 2c + 1 of a Q4_K (with `FIVE` Q5_K) block as their
/// vectors g: the low and high nibbles of one vector, both read before the
/// caller stores either (so the compiler can load the nibbles and fifth
/// bits once for both; not checked in the AMX tiles' code, which no CPU
/// here runs).
#[inline(always)]
pub(crate) unsafe fn q4k_pair<I: Isa, const FIVE: bool>(
    core: *const u8,
    c: usize,
    g: usize,
) -> (I::V, I::V) {
    (
        q4k_vector::<I, FIVE>(core, 2 * c, g),
        q4k_vector::<I, FIVE>(core, 2 * c + 1, g),
    )
}

/// A Q4_K-like block's minimum sums M for NT tokens: Σ_j m_j·Σy_j.
#[inline(always)]
pub(crate) unsafe fn q4k_min_sums<I: Isa, const NT: usize>(
    core: *const u8,
    b: usize,
    a: &[ActRow; NT],
) -> [I::V; NT] {
    let mut m = [I::splat32(0); NT];
    for t in 0..NT {
        let y = q8k(&a[t]).get_unchecked(b);
        m[t] = min_sums::<I>(core.add(128), 4, |j| y.bsums[2 * j] + y.bsums[2 * j + 1]);
    }
    m
}

/// The packed format `group_q4k` reads.
const fn q4k_format(five: bool, wide: bool) -> PackedFormat {
    match (five, wide) {
        (true, true) => PackedFormat::Q5KWide,
        (true, false) => PackedFormat::Q5K,
        (false, true) => PackedFormat::Q4KWide,
        (false, false) => PackedFormat::Q4K,
    }
}

/// Q4_K, or with `FIVE` Q5_K (its fifth bits merged into each nibble),
/// either one widened with `WIDE`.
#[inline(always)]
unsafe fn group_q4k<
    I: Isa,
    const NT: usize,
    const NG: usize,
    const FIVE: bool,
    const WIDE: bool,
>(
    gps: [*const u8; NG],
    nb: usize,
    a: &[ActRow; NT],
) -> [[I::F; NT]; NG] {
    let f = q4k_format(FIVE, WIDE);
    let mut acc = [[I::zero_f(); NT]; NG];
    let sums = |b: usize, core: *const u8| {
        if NT == 4 && I::FEW_REGISTERS && !FIVE && !WIDE {
            // Tokens 0, 1 then 2, 3 over the block (in L1 the second
            // time): the nibbles are split twice, but 4 tokens' 16 partial
            // sum registers had spilled in the inner loop. (One call site,
            // in a loop: with two, the closure was left out of line,
            // without the caller's target features.) Q5_K, whose partial
            // sums end every 4 vectors, measured slower this way (46.3 →
            // 42.4 G at 512 tokens). (Measured before prompts widened Q4_K:
            // this path now runs for batches under `WIDEN_TOKENS`.)
            let (mut s, mut m) = ([I::splat32(0); NT], [I::splat32(0); NT]);
            for k in 0..2 {
                let two = token_pair(a, k);
                let (sk, mk) = q4k_sums::<I, 2, FIVE, WIDE>(core, b, two);
                (s[2 * k], s[2 * k + 1], m[2 * k], m[2 * k + 1]) = (sk[0], sk[1], mk[0], mk[1]);
            }
            return (s, m);
        }
        q4k_sums::<I, NT, FIVE, WIDE>(core, b, a)
    };
    let finish =
        |b: usize, scales: *const u8, (s, m): ([I::V; NT], [I::V; NT]), acc: &mut [I::F; NT]| {
            let d = I::load_f16(scales);
            let dmin = I::load_f16(scales.add(32));
            for t in 0..NT {
                let dy = I::splat_f(q8k(&a[t]).get_unchecked(b).d);
                acc[t] = I::fmadd(I::mul_f(d, dy), I::to_f(s[t]), acc[t]);
                acc[t] = I::fnmadd(I::mul_f(dmin, dy), I::to_f(m[t]), acc[t]);
            }
        };
    each_block(gps, nb, f, stream_ahead_for(f, NT), sums, |k, b, sc, s| {
        finish(b, sc, s, &mut acc[k])
    });
    acc
}

#[inline(always)]
unsafe fn group_q6k<I: Isa, const NT: usize, const NG: usize, const WIDE: bool>(
    gps: [*const u8; NG],
    nb: usize,
    a: &[ActRow; NT],
) -> [[I::F; NT]; NG] {
    let mut acc = [[I::zero_f(); NT]; NG];
    let sums = |b: usize, core: *const u8| {
        let mut s = [I::splat32(0); NT];
        for j in 0..16 {
            let g = if WIDE {
                let base = core.add(256 + 256 * j);
                std::array::from_fn(|i| I::load(base.add(64 * i)))
            } else {
                q6k_vectors::<I>(core, j)
            };
            let sc = I::widen_i8(core.add(16 * j));
            if I::SCALED_END_FREE {
                // Σ s_j·Σ u·y here, the scale applied as each partial sum
                // widens; the −32·Σ s_j·Σy_j below.
                let sc = I::prep_scale(sc);
                for t in 0..NT {
                    let y = &q8k(&a[t]).get_unchecked(b).qs;
                    // 6-bit u: partial sums of 2 vectors.
                    for i in [0, 2] {
                        let (y0, y1) = (y4(y, 16 * j + 4 * i), y4(y, 16 * j + 4 * i + 4));
                        let p = I::psum_begin(I::splat32(0));
                        let p = I::psum_add(I::psum_add(p, g[i], y0), g[i + 1], y1);
                        s[t] = I::psum_end_scaled(s[t], p, sc);
                    }
                }
                continue;
            }
            for t in 0..NT {
                let (y, neg32) = q8k_neg32(&a[t]);
                let y = y.get_unchecked(b);
                let mut is = I::splat32(*neg32.get_unchecked(16 * b + j));
                // 6-bit u: partial sums of 2 vectors.
                for i in [0, 2] {
                    let (y0, y1) = (y4(&y.qs, 16 * j + 4 * i), y4(&y.qs, 16 * j + 4 * i + 4));
                    let p = I::psum_add(I::psum_add(I::psum_begin(is), g[i], y0), g[i + 1], y1);
                    is = I::psum_end(p);
                }
                s[t] = I::add32(s[t], I::mul32(is, sc));
            }
        }
        if I::SCALED_END_FREE {
            // The same exact integer S as the other path's
            // Σ_j s_j·(Σ u·y − 32·Σy_j) (|S| < 2^28).
            s = scaled_block_sums::<I, NT>(s, core, a, b, -32);
        }
        s
    };
    let f = if WIDE {
        PackedFormat::Q6KWide
    } else {
        PackedFormat::Q6K
    };
    each_block(
        gps,
        nb,
        f,
        stream_ahead_for(f, NT),
        sums,
        |k, b, scales, s| super_finish::<I, NT>(&mut acc[k], scales, a, b, s),
    );
    acc
}

// ---------------------------------------------------------------- scalar Isa

/// Plain-Rust vectors: the scalar table's kernels, and the twin every SIMD
/// table is checked against.
pub(crate) struct Scalar;

#[derive(Clone, Copy)]
pub(crate) struct SV([u8; 64]);

impl SV {
    fn lane(&self, l: usize) -> i32 {
        i32::from_le_bytes(self.0[4 * l..4 * l + 4].try_into().unwrap())
    }
    fn from_lanes(f: impl Fn(usize) -> i32) -> SV {
        let mut v = [0u8; 64];
        for l in 0..16 {
            v[4 * l..4 * l + 4].copy_from_slice(&f(l).to_le_bytes());
        }
        SV(v)
    }
    fn bytes(f: impl Fn(usize) -> u8) -> SV {
        SV(std::array::from_fn(f))
    }
}

fn shift16(a: SV, f: impl Fn(u16) -> u16) -> SV {
    let w = |i: usize| u16::from_le_bytes([a.0[i & !1], a.0[i | 1]]);
    SV::bytes(|i| f(w(i)).to_le_bytes()[i & 1])
}

impl Isa for Scalar {
    type V = SV;
    type F = [f32; 16];
    const B128_CORR: bool = false;
    unsafe fn load(p: *const u8) -> SV {
        SV(std::ptr::read_unaligned(p as *const [u8; 64]))
    }
    unsafe fn splat8(x: u8) -> SV {
        SV([x; 64])
    }
    unsafe fn and(a: SV, b: SV) -> SV {
        SV::bytes(|i| a.0[i] & b.0[i])
    }
    unsafe fn or(a: SV, b: SV) -> SV {
        SV::bytes(|i| a.0[i] | b.0[i])
    }
    unsafe fn shr<const N: u32>(a: SV) -> SV {
        shift16(a, |w| w >> N)
    }
    unsafe fn shl<const N: u32>(a: SV) -> SV {
        shift16(a, |w| w << N)
    }
    unsafe fn shr_by(a: SV, n: u32) -> SV {
        shift16(a, |w| w >> n)
    }
    unsafe fn splat32(x: i32) -> SV {
        SV::from_lanes(|_| x)
    }
    unsafe fn add32(a: SV, b: SV) -> SV {
        SV::from_lanes(|l| a.lane(l).wrapping_add(b.lane(l)))
    }
    unsafe fn mul32(a: SV, b: SV) -> SV {
        SV::from_lanes(|l| a.lane(l).wrapping_mul(b.lane(l)))
    }
    type P = SV;
    unsafe fn psum_begin(acc: SV) -> SV {
        acc
    }
    unsafe fn psum_add(p: SV, u: SV, y4: i32) -> SV {
        Self::dot_u8(p, u, y4)
    }
    unsafe fn psum_end(p: SV) -> SV {
        p
    }
    unsafe fn psum_end_scaled(acc: SV, p: SV, sc: SV) -> SV {
        Self::add32(acc, Self::mul32(p, sc))
    }
    unsafe fn prep_scale(s: SV) -> SV {
        s
    }
    // (True, so that the scalar twin takes the paths the AVX2 kernels take.)
    const SCALED_END_FREE: bool = true;
    const FEW_REGISTERS: bool = true;
    unsafe fn pair16(lo: SV, hi: SV) -> SV {
        SV::from_lanes(|l| (lo.lane(l) as u16 as u32 | (hi.lane(l) as u32) << 16) as i32)
    }
    unsafe fn madd_pairs(acc: SV, a: SV, pair: i32) -> SV {
        let (b0, b1) = (pair as i16 as i32, (pair >> 16) as i16 as i32);
        SV::from_lanes(|l| {
            let (a0, a1) = (a.lane(l) as i16 as i32, (a.lane(l) >> 16) as i16 as i32);
            acc.lane(l) + a0 * b0 + a1 * b1
        })
    }
    unsafe fn dot_u8(acc: SV, u: SV, y4: i32) -> SV {
        let y = y4.to_le_bytes();
        SV::from_lanes(|l| {
            acc.lane(l)
                + (0..4)
                    .map(|c| u.0[4 * l + c] as i32 * y[c] as i8 as i32)
                    .sum::<i32>()
        })
    }
    unsafe fn dot_b128(acc: SV, u: SV, y4: i32) -> SV {
        let y = y4.to_le_bytes();
        SV::from_lanes(|l| {
            acc.lane(l)
                + (0..4)
                    .map(|c| (u.0[4 * l + c] as i32 - 128) * y[c] as i8 as i32)
                    .sum::<i32>()
        })
    }
    unsafe fn lut16(table: SV, idx: SV) -> SV {
        SV::bytes(|l| table.0[16 * (l / 16) + (idx.0[l] & 15) as usize])
    }
    unsafe fn widen_u8(p: *const u8) -> SV {
        SV::from_lanes(|l| *p.add(l) as i32)
    }
    unsafe fn widen_i8(p: *const u8) -> SV {
        SV::from_lanes(|l| *p.add(l) as i8 as i32)
    }
    unsafe fn dot_pairs(acc: SV, p: *const u8, pair: i32) -> SV {
        let (b0, b1) = (pair as i16 as i32, (pair >> 16) as i16 as i32);
        SV::from_lanes(|l| acc.lane(l) + *p.add(2 * l) as i32 * b0 + *p.add(2 * l + 1) as i32 * b1)
    }
    unsafe fn to_f(v: SV) -> [f32; 16] {
        std::array::from_fn(|l| v.lane(l) as f32)
    }
    unsafe fn load_f16(p: *const u8) -> [f32; 16] {
        std::array::from_fn(|l| f16_le([*p.add(2 * l), *p.add(2 * l + 1)]))
    }
    unsafe fn load_bf16_even(p: *const u8) -> [f32; 16] {
        std::array::from_fn(|l| {
            f32::from_bits(u32::from(*p.add(4 * l)) << 16 | u32::from(*p.add(4 * l + 1)) << 24)
        })
    }
    unsafe fn load_bf16_odd(p: *const u8) -> [f32; 16] {
        std::array::from_fn(|l| {
            f32::from_bits(u32::from(*p.add(4 * l + 2)) << 16 | u32::from(*p.add(4 * l + 3)) << 24)
        })
    }
    unsafe fn load_f32(p: *const u8) -> [f32; 16] {
        std::array::from_fn(|l| (p.add(4 * l) as *const f32).read_unaligned())
    }
    unsafe fn add_f(a: [f32; 16], b: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|l| a[l] + b[l])
    }
    unsafe fn splat_f(x: f32) -> [f32; 16] {
        [x; 16]
    }
    unsafe fn mul_f(a: [f32; 16], b: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|l| a[l] * b[l])
    }
    unsafe fn fmadd(a: [f32; 16], b: [f32; 16], c: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
    }
    unsafe fn fnmadd(a: [f32; 16], b: [f32; 16], c: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|l| (-a[l]).mul_add(b[l], c[l]))
    }
    unsafe fn zero_f() -> [f32; 16] {
        [0.0; 16]
    }
    unsafe fn store_f(p: *mut f32, v: [f32; 16]) {
        std::ptr::copy_nonoverlapping(v.as_ptr(), p, 16);
    }
    unsafe fn store(p: *mut u8, v: SV) {
        std::ptr::write_unaligned(p as *mut [u8; 64], v.0)
    }
}

// ---------------------------------------------------------------- tables and driver

/// A table's packed kernels for 1 and 4 tokens (see `kernel`), and, where
/// the CPU has matrix tiles, one for any multiple of [`TILE_TOKENS`] tokens
/// whose activations are equally spaced in memory (slices of one buffer).
#[derive(Clone, Copy)]
#[allow(clippy::type_complexity)]
pub struct PackedKernels {
    /// One token. The AVX2 table reads its groups in four streams (two
    /// for the formats whose blocks are 256 columns wide), four quarters of
    /// its rows side by side: on a Zen 3, whose prefetchers fetch more for
    /// several streams than for one, a plain read of one stream ran at
    /// 16–22 GB/s and of two at 21–28, and one token through Q8_0 weights
    /// read 15.7 GiB/s in one stream, 21.4 in two and 22.8–27.4 in four
    /// (eight were slower). The AVX-512 tables read one stream, measured
    /// on a Zen 4 at the speed of a plain read.
    pub t1: fn(PackedFormat, &[u8], usize, usize, &[ActRow; 1], &mut [&mut [f32]; 1]),
    /// Two tokens (a batch's remainder of 2 after its fours: two sequences
    /// generating together), one pass over the weights instead of two. The
    /// AVX2 table reads two streams here (four would hold 16 vectors of
    /// float sums). Before, each token ran alone: on the Zen 3, one thread,
    /// criterion, 2 tokens through the output head 29.0 → 34.2 G
    /// multiply-adds/s (26.0 in one stream), ffn_gate (Q5_0) 42.9 → 57.8,
    /// ffn_down (Q6_K) 38.4 → 48.5; a server with 2 clients, one thread,
    /// 100–101 → 121–126 tokens/s.
    pub t2: fn(PackedFormat, &[u8], usize, usize, &[ActRow; 2], &mut [&mut [f32]; 2]),
    /// Three tokens, likewise (two streams on AVX2). Against t2 then t1 (two
    /// passes), 3 tokens on the Zen 3, one thread: the head 39.7 → 46.8 G
    /// multiply-adds/s (38.1 in one stream), ffn_gate 53.1 → 64.3, ffn_down
    /// 45.1 → 55.4.
    pub t3: fn(PackedFormat, &[u8], usize, usize, &[ActRow; 3], &mut [&mut [f32]; 3]),
    /// Four tokens (prompts, and batches of 4 or more sequences).
    pub t4: fn(PackedFormat, &[u8], usize, usize, &[ActRow; 4], &mut [&mut [f32]; 4]),
    pub tiles: Option<fn(PackedFormat, &[u8], usize, usize, &[ActRow], &mut [&mut [f32]])>,
    /// For a prompt of [`WIDEN_TOKENS`] or more tokens, the table's widening
    /// of Q5_0, Q5_1 (and Q4_1), Q4_K, Q5_K and Q6_K weights, a few groups at a time, into their
    /// [`PackedFormat::widened`] forms, with the
    /// kernels' own unpacking: done once instead of for every 4 tokens (for
    /// Q5_0 on the AVX2 table, about 70 of the ~250 vector operations per
    /// block of 16 rows and 4 tokens); for the formats in `widens`.
    ///
    /// Widening in plain 64-bit words (its first version) took 4% of pp64's
    /// samples on two threads; with the table's vectors, pp64 on one thread
    /// ran 596–673 → 682–688 tokens/s (4 alternating rounds).
    ///
    /// Zen 3, one thread, criterion, alternating rounds:
    /// - Q5_0 at 512 tokens: attn_q 67–72 → 80–87 G multiply-adds/s,
    ///   ffn_gate 72–74 → 84–91; at 64 tokens +10–17%; at 16 tokens −5 to
    ///   −13% (so not below 32). pp512 554–571 → 612–619 tokens/s.
    /// - Q6_K (and Q3_K, packed as Q6_K): ffn_down at 512 tokens 57 → 64,
    ///   at 64 tokens 54 → 59; pp512 within its noise (it is 9 of the 18
    ///   layers' ffn_down).
    /// - Q4_K (the nibbles split once, not for every pair of tokens; a
    ///   sub-block's 8 vectors in one partial sum per token): attn_output at
    ///   512 tokens 58–72 → 75–78, ffn_down 2048 → 640 60–77 → 65–77 (two
    ///   sets of 4–5 alternating rounds); pp512 (max of 3 runs) median
    ///   660.6 → 670.6 tokens/s, ahead in 7 of 8 rounds; pp64 724.4 →
    ///   737.5, ahead in 8 of 10. (Tokens in pairs over the widened form
    ///   as well: pp512 the same, 667.7 against 666.2.)
    /// - Q5_K (the same form, u up to 31: partial sums of 4 vectors): 2048
    ///   → 640 at 512 tokens 52.6 → 75.1 (5 alternating rounds).
    /// - Q5_1 and Q4_1 (Q5_0's widened quants, tokens in pairs: see
    ///   `group_q5_0`): 640 → 2048 at 512 tokens, medians of 5 rounds, Q5_1
    ///   45.2 → 53.8, Q4_1 47.2 → 55.4; the Q5_K_M file's pp512 ahead in 12
    ///   of 16 alternating rounds.
    ///
    /// The widened Q5_0 loop runs about 180 operations a block, 80 of them
    /// on the two multiply pipes (`pmaddubsw`, `pmaddwd`). Passes of 3
    /// tokens (no spills) or 2 were slower than 4: ffn_gate at 512 tokens
    /// 86 and 78 against 89.
    pub widen: Option<fn(PackedFormat, &[u8], usize, &mut [u8])>,
    /// The stored formats `widen` is used for (each has a
    /// [`PackedFormat::widened`] form).
    ///
    /// The AVX-512 tables widen only Q5_0 and Q5_1 (and Q4_1; the GFNI
    /// pair table not Q5_0, which `q5_0_pairs_t4` reads as stored): with
    /// `vpdpbusd` a nibble costs an `and` (and a shift for the high ones)
    /// to unpack, and (our reading, not measured) a widened group of 2048
    /// columns (35 KB for Q4_K) is larger than the Zen 4's 32 KB L1 that 4
    /// tokens sweep it from. Zen 4, one thread, best of
    /// 40–60 interleaved runs, widened against not (3 rounds): Q5_0 640 →
    /// 1024 and 640 → 2048 +6 to +12% at 512 tokens, 0 to +6% at 64; Q5_1
    /// +8%, Q4_1 +5 to +10% at 512; Q4_K 1024 → 640 −3 to −7%, 2048 → 640
    /// −10 to −20%; Q6_K (and Q3_K) −8 to +7%; Q5_K +8% at 64 tokens but −4
    /// to −5% at 512.
    pub widens: &'static [PackedFormat],
}

/// Every stored format with a widened form (what the AVX2 and scalar
/// tables widen).
pub const WIDENS_ALL: &[PackedFormat] = &[
    PackedFormat::Q5_0,
    PackedFormat::Q5_1,
    PackedFormat::Q4K,
    PackedFormat::Q5K,
    PackedFormat::Q6K,
];

/// Fewest tokens for which a table with [`PackedKernels::widen`] widens.
pub const WIDEN_TOKENS: usize = 32;

/// Bytes of widened weights a task makes at a time: their 4-token passes
/// then read them from L2.
const WIDEN_BYTES: usize = 64 * 1024;

/// Whole groups of `from` (`src`, of `nb` blocks each) in its widened form
/// ([`PackedFormat::widened`]), into `dst` (as many of its groups), with
/// the kernels' own unpacking: block by block, each written as its kernel
/// reads the widened form, then each unit's scale line as it is (a format
/// and its widened form keep the same scales and blocks per unit).
///
/// # Safety
/// None beyond the table's: the lengths are checked here.
#[inline(always)]
pub(crate) unsafe fn widen<I: Isa>(from: PackedFormat, src: &[u8], nb: usize, dst: &mut [u8]) {
    let to = from.widened().expect("a format with a widened form");
    let (sgb, dgb) = (from.group_bytes(nb), to.group_bytes(nb));
    let (sc, dc) = (from.core_bytes(), to.core_bytes());
    assert!(src.len().is_multiple_of(sgb) && src.len() / sgb * dgb == dst.len());
    assert_eq!(from.scale_bytes(), to.scale_bytes());
    for (sg, dg) in src.chunks_exact(sgb).zip(dst.chunks_exact_mut(dgb)) {
        let (mut si, mut di, mut b) = (0, 0, 0);
        while b < nb {
            let in_unit = (64 / from.scale_bytes()).min(nb - b);
            for _ in 0..in_unit {
                let (s, d) = (sg[si..si + sc].as_ptr(), dg[di..di + dc].as_mut_ptr());
                match from {
                    PackedFormat::Q5_0 | PackedFormat::Q5_1 => {
                        for c in 0..4 {
                            let (lo, hi) = q5_0_vectors::<I>(s, c);
                            I::store(d.add(64 * c), lo);
                            I::store(d.add(64 * (4 + c)), hi);
                        }
                    }
                    PackedFormat::Q4K | PackedFormat::Q5K => {
                        std::ptr::copy_nonoverlapping(s, d, 256);
                        // Sub-block by sub-block, in the order the widened
                        // form is written (the stores in one ascending run).
                        for j in 0..8 {
                            for g in 0..8 {
                                let u = if from == PackedFormat::Q5K {
                                    q4k_vector::<I, true>(s, j, g)
                                } else {
                                    q4k_vector::<I, false>(s, j, g)
                                };
                                I::store(d.add(256 + 512 * j + 64 * g), u);
                            }
                        }
                    }
                    PackedFormat::Q6K => {
                        std::ptr::copy_nonoverlapping(s, d, 256);
                        for j in 0..16 {
                            for (k, v) in q6k_vectors::<I>(s, j).into_iter().enumerate() {
                                I::store(d.add(256 + 256 * j + 64 * k), v);
                            }
                        }
                    }
                    _ => unreachable!("{from:?} has no widened form"),
                }
                si += sc;
                di += dc;
            }
            dg[di..di + 64].copy_from_slice(&sg[si..si + 64]);
            si += 64;
            di += 64;
            b += in_unit;
        }
    }
}

/// 64 bytes on a cache line of their own (the widened weights' unit of
/// storage, so that no vector load splits a line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Token multiple of [`PackedKernels::tiles`].
pub const TILE_TOKENS: usize = 16;

/// The scalar table's entry for NT tokens.
fn scalar_nt<const NT: usize>(
    f: PackedFormat,
    w: &[u8],
    gb: usize,
    nb: usize,
    a: &[ActRow; NT],
    o: &mut [&mut [f32]; NT],
) {
    // SAFETY: the kernel checks every length it indexes without checks.
    unsafe { kernel::<Scalar, NT, 1>(f, w, gb, nb, a, o) }
}

pub const PACKED_SCALAR: PackedKernels = PackedKernels {
    t1: scalar_nt::<1>,
    t2: scalar_nt::<2>,
    t3: scalar_nt::<3>,
    t4: scalar_nt::<4>,
    tiles: None,
    widen: Some(scalar_widen),
    widens: WIDENS_ALL,
};

/// The scalar table's widening.
fn scalar_widen(f: PackedFormat, src: &[u8], nb: usize, dst: &mut [u8]) {
    // SAFETY: `widen` checks the lengths it reads and writes without checks.
    unsafe { widen::<Scalar>(f, src, nb, dst) }
}

/// `out[t][r] = Σ_c x[t][c] · W[r][c]` for a packed W (as [`crate::matmul()`]).
pub fn matmul_packed(
    k: &PackedKernels,
    w: &PackedMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    scratch: &mut MatmulScratch,
) {
    matmul_packed_many(k, &[w], &mut [out], x, n, scratch)
}

/// [`matmul_packed`] for several matrices that multiply the same `x`
/// (a layer's q, k and v; its gate and up), quantizing `x` once when they
/// consume the same activation format (as the Q8_0, Q5_0 and Q4_0 ones do).
/// Each result is the one [`matmul_packed`] gives.
pub fn matmul_packed_many(
    k: &PackedKernels,
    ws: &[&PackedMatrix],
    outs: &mut [&mut [f32]],
    x: &[f32],
    n: usize,
    scratch: &mut MatmulScratch,
) {
    assert_eq!(ws.len(), outs.len(), "one output per matrix");
    assert!(ws.len() <= MAX_MANY, "at most {MAX_MANY} matrices at once");
    for (w, out) in ws.iter().zip(outs.iter()) {
        check_shapes(x, out, n, w.rows, w.cols);
    }
    if n == 0 {
        return;
    }
    // (All have x's width: check_shapes.)
    let mut i = 0;
    while i < ws.len() {
        let source = ws[i].source;
        let acts = scratch.quantize_packed(source, x, ws[i].cols);
        // This matrix and the following ones that read the same activations.
        let mut j = i;
        while j < ws.len() && ws[j].source.act_format() == source.act_format() {
            j += 1;
        }
        run_packed(k, &ws[i..j], &mut outs[i..j], acts, n);
        i = j;
    }
}

/// Most matrices one call of [`matmul_packed_many`] takes.
pub const MAX_MANY: usize = 8;

/// Token t's activation rows within `acts` (all n tokens of a matrix of
/// `nb` blocks, `cols` columns), made once per product: the kernels take
/// them 4 at a time by reference. Built for each pass of 4 tokens, as
/// before, the copies of these 100-byte values took 4–5% of pp512's
/// samples on one thread on the Zen 4 (stores read back before they had
/// reached the cache).
fn token_rows<'a>(acts: ActRow<'a>, nb: usize, cols: usize, n: usize) -> Vec<ActRow<'a>> {
    let act = |t: usize| -> ActRow<'a> {
        match acts {
            ActRow::Q8_0 {
                blocks,
                neg8,
                neg16,
                neg128,
                d,
                ds,
            } => ActRow::Q8_0 {
                blocks: &blocks[t * nb..(t + 1) * nb],
                neg8: &neg8[t * nb..(t + 1) * nb],
                neg16: &neg16[t * nb..(t + 1) * nb],
                neg128: &neg128[t * nb..(t + 1) * nb],
                d: &d[t * nb..(t + 1) * nb],
                ds: &ds[t * nb..(t + 1) * nb],
            },
            ActRow::Q8K { blocks, neg32 } => ActRow::Q8K {
                blocks: &blocks[t * nb..(t + 1) * nb],
                neg32: &neg32[16 * t * nb..16 * (t + 1) * nb],
            },
            ActRow::F32 { x } => ActRow::F32 {
                x: &x[t * cols..(t + 1) * cols],
            },
        }
    };
    (0..n).map(act).collect()
}

/// Groups `g0..g1` of `w` times the tokens of `acts` (one row each, see
/// [`token_rows`]), into `out` (the n × w.rows result, which this call
/// alone writes at those rows).
///
/// `next`: the weights this thread will likely read after these (its next
/// task's), prefetched into L2 a share before each pass of 4 tokens, so
/// that their misses overlap this task's arithmetic instead of stalling
/// the next task's first read (a widened task prefetches its own next
/// groups the same way, then `next`). Zen 4, the model with and without
/// these prefetches in turn in one process (a temporary switch), medians:
/// pp64 on one thread 990.6 → 1013.3 tok/s (ahead in 45 of 60 pairs), on
/// two 1464.4 → 1507.9 (49 of 60); pp128 on one 1090.7 → 1124.0 (22 of
/// 30); pp512 the same within the noise (8 and 9 of 16). Prefetches change
/// no result. (The tile kernels do not prefetch: not measured there.)
///
/// # Safety
/// `out` must point to n × w.rows floats that no other thread touches at
/// rows 16·g0..16·g1 meanwhile, and g0 ≤ g1 ≤ w.rows / 16.
unsafe fn packed_groups(
    k: &PackedKernels,
    w: &PackedMatrix,
    acts: &[ActRow],
    out: OutPtr,
    (g0, g1): (usize, usize),
    next: &[u8],
) {
    let (nb, n) = (w.nb, acts.len());
    let (gb, rows) = (w.group_bytes, w.rows);
    // Token t's outputs for the rows of groups ga..gz, within g0..g1.
    let out_rows = |(ga, gz): (usize, usize), t: usize| {
        debug_assert!(g0 <= ga && ga <= gz && gz <= g1 && t < n);
        // SAFETY: rows 16·ga..16·gz of token t lie within those the caller
        // gave this call (see above).
        unsafe {
            std::slice::from_raw_parts_mut(out.0.add(t * rows + ga * LANES), (gz - ga) * LANES)
        }
    };
    // Tokens t0.. times groups ga..gz, stored in `format` at `wg`.
    let run = |format: PackedFormat,
               wg: &[u8],
               gb: usize,
               groups: (usize, usize),
               t0: usize,
               next: &[u8]| {
        let slice = |t: usize| out_rows(groups, t);
        let mut t = t0;
        // `next`'s lines, a share before each pass.
        let (lines, passes) = (next.len() / 64, (n - t0) / 4);
        let mut pass = 0;
        while t + 4 <= n {
            for l in lines * pass / passes..lines * (pass + 1) / passes {
                prefetch_l2(next.as_ptr().wrapping_add(64 * l));
            }
            pass += 1;
            (k.t4)(
                format,
                wg,
                gb,
                nb,
                acts[t..t + 4].try_into().expect("4 tokens"),
                &mut [slice(t), slice(t + 1), slice(t + 2), slice(t + 3)],
            );
            t += 4;
        }
        // The remainder (2 or 3 sequences generating together, or a prompt's
        // last tokens) in one pass over the weights.
        match n - t {
            3 => (k.t3)(
                format,
                wg,
                gb,
                nb,
                acts[t..].try_into().expect("3 tokens"),
                &mut [slice(t), slice(t + 1), slice(t + 2)],
            ),
            2 => (k.t2)(
                format,
                wg,
                gb,
                nb,
                acts[t..].try_into().expect("2 tokens"),
                &mut [slice(t), slice(t + 1)],
            ),
            1 => (k.t1)(
                format,
                wg,
                gb,
                nb,
                acts[t..].try_into().expect("1 token"),
                &mut [slice(t)],
            ),
            _ => {}
        }
    };
    let wg = &w.bytes()[g0 * gb..g1 * gb];
    let tiles = k.tiles.filter(|_| w.format.tiles_pay(w.cols));
    if let Some(tiles) = tiles {
        let n16 = n / TILE_TOKENS * TILE_TOKENS;
        if n16 > 0 {
            let mut outs: Vec<&mut [f32]> = (0..n16).map(|t| out_rows((g0, g1), t)).collect();
            tiles(w.format, wg, gb, nb, &acts[..n16], &mut outs);
        }
        return run(w.format, wg, gb, (g0, g1), n16, &[]);
    }
    let table_widen = k
        .widen
        .filter(|_| n >= WIDEN_TOKENS && k.widens.contains(&w.format));
    if let (Some(table_widen), Some(wide)) = (table_widen, w.format.widened()) {
        // A few groups at a time widened, then all the tokens over them.
        let wgb = wide.group_bytes(nb);
        let per = (WIDEN_BYTES / wgb).clamp(1, g1 - g0);
        let mut buf = vec![Line([0; 64]); per * wgb / 64];
        let mut ga = g0;
        while ga < g1 {
            let gz = (ga + per).min(g1);
            // SAFETY: `Line` is 64 plain bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, (gz - ga) * wgb)
            };
            table_widen(w.format, &wg[(ga - g0) * gb..(gz - g0) * gb], nb, bytes);
            // The next few groups' stored weights, or the next task's.
            let after = if gz < g1 {
                &wg[(gz - g0) * gb..((gz + per).min(g1) - g0) * gb]
            } else {
                next
            };
            run(wide, bytes, wgb, (ga, gz), 0, after);
            ga = gz;
        }
        return;
    }
    if n > crate::pool::SMALL_BATCH {
        // A prompt's task reads its weights once from memory and then from
        // cache for each 4 tokens: one load per line first, so that they
        // come in as one stream with many misses in flight, where the
        // first pass's loads had few in flight (our reading; not counted,
        // this VM has no counters). Same bits (only the order of reads
        // changes). One thread, Zen 5, the model with and
        // without Q5_0's widening (which reads its groups the same way) in
        // turn in one process, medians of 59 prompts: before this, pp64
        // was 1.5–2.6% faster widened; with it, 5.4% faster not (twice)
        // and 7–8% faster than the old way (three runs; two threads 5–6%),
        // pp128 +1.8 and +2.1% not widened, pp512 the same.
        for l in (0..wg.len()).step_by(64) {
            // SAFETY: l lies inside `wg`.
            unsafe { std::ptr::read_volatile(wg.as_ptr().add(l)) };
        }
    }
    run(w.format, wg, gb, (g0, g1), 0, next)
}

/// The packed products of `ws` (which all read `acts`) into `outs`.
fn run_packed(
    k: &PackedKernels,
    ws: &[&PackedMatrix],
    outs: &mut [&mut [f32]],
    acts: ActRow,
    n: usize,
) {
    assert!(ws.len() <= MAX_MANY && ws.len() == outs.len());
    let mut ptrs = [OutPtr(std::ptr::null_mut()); MAX_MANY];
    for (p, o) in ptrs.iter_mut().zip(outs.iter_mut()) {
        *p = OutPtr(o.as_mut_ptr());
    }
    // The matrices read the same activations, so have the same blocks.
    debug_assert!(ws.iter().all(|w| (w.nb, w.cols) == (ws[0].nb, ws[0].cols)));
    let rows = token_rows(acts, ws[0].nb, ws[0].cols, n);
    let threads = crate::pool::threads();
    if n <= crate::pool::SMALL_BATCH && threads > 1 {
        // Generation, on the spin pool: the weights stream from memory
        // once. Cut the bytes of all the matrices (stored one after
        // another) into contiguous parts, so that each thread reads long
        // ascending runs instead of small tasks handed out alternately:
        // four parts per thread for a layer's matrices (about 45–230 KB),
        // parts of about 1 MB for a big one such as the output head, a
        // multiple of the thread count, claimed in turn so that a thread
        // the host slows does not hold the others up. One part per thread
        // for a layer's matrices left the token waiting on the slower vCPU:
        // on a Zen 3 whose second vCPU was often busy, tg128 on two threads,
        // 12 alternating rounds, median 124.0 → 133.0 tok/s (ahead in 8).
        let total: usize = ws.iter().map(|w| w.size_bytes()).sum();
        let parts = (total >> 20).div_ceil(threads).max(4) * threads;
        let part = |p: usize| {
            let (b0, b1) = (total * p / parts, total * (p + 1) / parts);
            let mut base = 0;
            for (i, w) in ws.iter().enumerate() {
                let (gb, groups) = (w.group_bytes, w.rows / LANES);
                // Groups whose first byte lies in b0..b1.
                let g0 = b0.saturating_sub(base).div_ceil(gb).min(groups);
                let g1 = b1.saturating_sub(base).div_ceil(gb).min(groups);
                if g0 < g1 {
                    // SAFETY: the parts cut each matrix's groups into
                    // disjoint ranges, each written by one task.
                    unsafe { packed_groups(k, w, &rows, ptrs[i], (g0, g1), &[]) };
                }
                base += w.size_bytes();
            }
        };
        crate::pool::for_each_task(parts, &part);
        return;
    }
    // Each matrix cut into tasks of whole groups: at least ~32 KiB of
    // weight·token work so scheduling stays cheap next to it, at most ~256
    // KiB of weights so a task's groups stay in L2 while its tokens sweep
    // them, and enough tasks to balance the threads. The matrices' tasks
    // run as one set (one fork and join for all of them, not one each).
    let mut chunks = [(0usize, 0usize); MAX_MANY];
    let mut first = [0usize; MAX_MANY + 1];
    for (i, w) in ws.iter().enumerate() {
        let groups = w.rows / LANES;
        let gb = w.group_bytes;
        let min_g = (32 * 1024 / (gb * n)).max(1);
        let max_g = (256 * 1024 / gb).max(min_g);
        // (Even, so that the AVX-512 prompt kernels can take a task's
        // groups in pairs: see `packed_x86::bytes_pairs_t4`.)
        let chunk = (groups / (threads * 8))
            .clamp(min_g, max_g)
            .next_multiple_of(2)
            .min(groups);
        chunks[i] = (chunk, groups);
        first[i + 1] = first[i] + groups.div_ceil(chunk);
    }
    let m = ws.len();
    // Task t: its matrix and its groups.
    let place = |t: usize| {
        let i = first[1..=m].partition_point(|&f| f <= t);
        let (chunk, groups) = chunks[i];
        let g0 = (t - first[i]) * chunk;
        (i, g0, (g0 + chunk).min(groups))
    };
    let task = |t: usize| {
        let (i, g0, g1) = place(t);
        // The threads claim tasks in turn, so this one's next is likely
        // `threads` on (the last tasks have none). Prompts only: a batch of
        // up to 4 tokens on one thread streams its weights, where the
        // prefetches were not measured.
        let next = match t + threads {
            u if u < first[m] && n > crate::pool::SMALL_BATCH => {
                let (j, h0, h1) = place(u);
                let gb = ws[j].group_bytes;
                &ws[j].bytes()[h0 * gb..h1 * gb]
            }
            _ => &[][..],
        };
        // SAFETY: the tasks' group ranges are disjoint, and each matrix
        // has its own output.
        unsafe { packed_groups(k, ws[i], &rows, ptrs[i], (g0, g1), next) }
    };
    crate::pool::for_each_task(first[m], &task);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GEMMA3_PREFETCH takes a byte count up to the limit; anything else is
    /// an error that names the variable.
    #[test]
    fn prefetch_distances_parse() {
        assert_eq!(parse_stream_ahead("4096"), Ok(4096));
        assert_eq!(parse_stream_ahead(" 0 "), Ok(0));
        assert_eq!(parse_stream_ahead("1048576"), Ok(MAX_STREAM_AHEAD));
        for bad in ["1048577", "-1", "4k", "", "1e3"] {
            let e = parse_stream_ahead(bad).unwrap_err();
            assert!(e.contains("GEMMA3_PREFETCH"), "{bad}: {e}");
        }
    }

    /// Tiles for every integer format but Q4_K past 1024 columns (measured
    /// slower there on a lent Xeon: see `tiles_pay`).
    #[test]
    fn tiles_pay_where_they_were_measured_to() {
        assert!(PackedFormat::Q4K.tiles_pay(1024));
        assert!(!PackedFormat::Q4K.tiles_pay(2048));
        assert!(PackedFormat::Q6K.tiles_pay(2048));
        assert!(PackedFormat::Q5_0.tiles_pay(640));
        assert!(!PackedFormat::F16.tiles_pay(640));
        assert!(!PackedFormat::Q4KWide.tiles_pay(256));
    }

    /// The kernels' walk over a group visits every block once at the
    /// offsets `block_offsets` defines, finishes the blocks in order (the
    /// float steps' order is part of the arithmetic), each with its own
    /// sums, and touches quants and scales in ascending address order;
    /// walking several groups, it does so in each, taking block b of each
    /// in turn.
    #[test]
    fn each_block_walks_block_offsets() {
        fn check<const NG: usize>(f: PackedFormat) {
            for nb in 1..=9 {
                let gb = f.group_bytes(nb);
                let mut seen = vec![Vec::new(); NG];
                let touched = std::cell::RefCell::new(vec![Vec::new(); NG]);
                let sums_order = std::cell::RefCell::new(Vec::new());
                let groups = vec![0u8; NG * gb];
                let gps: [*const u8; NG] = std::array::from_fn(|k| groups[k * gb..].as_ptr());
                let at = |p: *const u8| {
                    let o = p as usize - groups.as_ptr() as usize;
                    (o / gb, o % gb)
                };
                // SAFETY: every pointer each_block forms lies inside `groups`
                // or one past its end; none is read.
                unsafe {
                    each_block(
                        gps,
                        nb,
                        f,
                        0,
                        |b, c| {
                            let (k, c) = at(c);
                            touched.borrow_mut()[k].push(c);
                            sums_order.borrow_mut().push((b, k));
                            (b, k, c)
                        },
                        |k, b, s, (sb, sk, c)| {
                            let (gk, s) = at(s);
                            assert_eq!(
                                (gk, sk),
                                (k, k),
                                "{f:?}: group {k} finished with another's"
                            );
                            touched.borrow_mut()[k].push(s);
                            assert_eq!(sb, b, "{f:?}: block {b} finished with block {sb}'s sums");
                            seen[k].push((b, c, s))
                        },
                    )
                };
                let want: Vec<_> = (0..nb)
                    .map(|b| {
                        let (c, s) = block_offsets(f.core_bytes(), f.scale_bytes(), nb, b);
                        (b, c, s)
                    })
                    .collect();
                for (k, touched) in touched.into_inner().iter().enumerate() {
                    assert_eq!(seen[k], want, "{f:?}, {nb} blocks, group {k}");
                    assert!(
                        touched.is_sorted(),
                        "{f:?}, {nb} blocks, group {k}: touched {touched:?}"
                    );
                }
                let in_turn: Vec<_> = (0..nb).flat_map(|b| (0..NG).map(move |k| (b, k))).collect();
                assert_eq!(sums_order.into_inner(), in_turn, "{f:?}, {nb} blocks");
            }
        }
        // (The float formats have no scales, and their kernel steps a
        // block at a time.)
        use PackedFormat::*;
        let stored = [Q8_0, Q5_0, Q4_0, IQ4NL, Q5_1, Q4K, Q5K, Q6K, IQ4XS]
            .into_iter()
            .chain(CodeTable::ALL.map(Coded));
        // The widened forms a prompt's kernels walk too.
        let formats = stored.flat_map(|f| std::iter::once(f).chain(f.widened()));
        for f in formats {
            check::<1>(f);
            check::<2>(f);
            check::<4>(f);
        }
    }

    /// The tables widen only stored formats that have a widened form, and
    /// `WIDENS_ALL` is all of them.
    #[test]
    fn tables_widen_formats_with_a_widened_form() {
        for f in PackedFormat::ALL {
            assert_eq!(f.widened().is_some(), WIDENS_ALL.contains(&f), "{f:?}");
        }
        for k in crate::simd::available() {
            for f in k.packed.widens {
                assert!(f.widened().is_some(), "{}: {f:?}", k.name);
            }
        }
    }

    /// A packed format's kernels take the activations its source formats
    /// are quantized to.
    #[test]
    fn packed_and_source_formats_agree_on_activations() {
        for w in WeightFormat::ALL {
            let p = PackedFormat::of(w).expect("every format packs");
            assert_eq!(p.act_format(), w.act_format(), "{w} packed as {p:?}");
        }
    }

    /// Every block's quants and scales tile the group exactly once, in
    /// ascending order, whatever the block count; in the stored formats and
    /// the widened ones.
    #[test]
    fn block_offsets_tile_the_group_in_order() {
        let widened = PackedFormat::ALL
            .into_iter()
            .filter_map(PackedFormat::widened);
        for f in PackedFormat::ALL.into_iter().chain(widened) {
            let (cb, sb) = (f.core_bytes(), f.scale_bytes());
            for nb in 1..=9 {
                let gb = f.group_bytes(nb);
                assert_eq!(gb % 64, 0);
                let mut used = vec![0u8; gb];
                let mut last_core = None;
                for b in 0..nb {
                    let (co, so) = block_offsets(cb, sb, nb, b);
                    assert!(last_core.is_none_or(|l| co > l), "{f:?} nb {nb} b {b}");
                    last_core = Some(co);
                    assert!(co + cb <= so && so + sb <= gb);
                    used[co..co + cb].iter_mut().for_each(|u| *u += 1);
                    used[so..so + sb].iter_mut().for_each(|u| *u += 1);
                }
                // Only the unused part of a last, partial scale line is left.
                let spare = match sb {
                    0 => 0,
                    _ => (64 / sb - nb % (64 / sb)) % (64 / sb) * sb,
                };
                assert_eq!(used.iter().filter(|&&u| u == 0).count(), spare);
                assert!(used.iter().all(|&u| u <= 1));
            }
        }
    }
}
