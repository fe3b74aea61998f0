//! Per-sequence key/value cache, stored as f16 (as llama.cpp does).
//!
//! Keys are stored in tiles of [`TILE`] consecutive positions, transposed
//! (element d of the tile's 16 keys side by side), so the attention kernels
//! read 16 keys as one vector; values are stored a row per position.
//!
//! Global layers keep every position (up to the context size). Sliding-window
//! layers keep a ring of `window + MAX_UBATCH` slots: a whole micro-batch can be
//! written before any of its tokens attends, and no key a query needs is
//! overwritten by a later token of the same micro-batch.

use crate::{Config, ModelError};
use half::f16;

/// Most tokens in one micro-batch of the forward pass.
pub const MAX_UBATCH: usize = 512;

/// `n` f16 zeros from zeroed memory (calloc): the OS maps pages on first
/// write, so a 32K-token cache costs memory only for positions used. `None`
/// where the allocator refuses the block (an absurd context), instead of
/// aborting the process as `vec!` would.
fn try_zeroed_f16(n: usize) -> Option<Vec<f16>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f16>(n).ok()?;
    // SAFETY: the layout's size is not zero. A non-null block is `n` f16s
    // of zero bits (+0.0: half::f16 is #[repr(transparent)] over u16), from
    // the global allocator with f16's layout, so the Vec may own and free it.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f16;
        (!p.is_null()).then(|| Vec::from_raw_parts(p, n, n))
    }
}

/// Positions per K tile (the attention kernels' key block).
pub const TILE: usize = gemma3_kernels::simd::KEY_BLOCK;

pub struct LayerCache {
    /// slots / TILE tiles of kv_dim × TILE: slot s, element d at [`LayerCache::k_index`].
    pub k: Vec<f16>,
    /// slots × kv_dim
    pub v: Vec<f16>,
    /// A multiple of TILE, so a tile of positions is a tile of slots.
    pub slots: usize,
    pub kv_dim: usize,
    /// Positions a query looks back over (including itself); usize::MAX = all.
    pub window: usize,
    /// The first position this layer holds: 0, or where a copied prefix
    /// began (a ring gets only the window before the copy's end, so the
    /// positions before it were never written here). Back to 0 once the
    /// sequence is written from position 0.
    pub held_from: usize,
}

impl LayerCache {
    #[inline]
    pub fn slot(&self, pos: usize) -> usize {
        pos % self.slots
    }

    /// Index in `k` of element d of the key in `slot`.
    #[inline]
    pub fn k_index(&self, slot: usize, d: usize) -> usize {
        (slot - slot % TILE) * self.kv_dim + d * TILE + slot % TILE
    }

    /// The K tile holding positions `base..base + TILE` (base a multiple of
    /// TILE), columns `col..col + width`: `width` × TILE halves.
    pub fn k_tile(&self, base: usize, col: usize, width: usize) -> &[f16] {
        debug_assert_eq!(base % TILE, 0);
        let start = self.slot(base) * self.kv_dim + col * TILE;
        &self.k[start..start + width * TILE]
    }

    /// Store the key and value of position `pos`.
    pub fn write(&mut self, pos: usize, k: &[f32], v: &[f32]) {
        if pos == 0 {
            self.held_from = 0;
        }
        let s = self.slot(pos);
        let kvd = self.kv_dim;
        assert_eq!(k.len(), kvd, "a key of kv_dim elements");
        let tile = (s - s % TILE) * kvd..(s - s % TILE + TILE) * kvd;
        put(&mut self.k[tile.clone()], &mut self.v[tile], s % TILE, k, v);
    }

    /// Store the keys and values of positions `pos0..pos0 + n` (`k` and `v`
    /// n × kv_dim, n at most the slots): the stores [`LayerCache::write`]
    /// makes for each, a tile of slots per task across threads for a long
    /// run (each tile's halves written by one thread).
    pub fn write_run(&mut self, pos0: usize, k: &[f32], v: &[f32]) {
        let kvd = self.kv_dim;
        let n = k.len() / kvd;
        assert!(k.len() == n * kvd && v.len() == n * kvd && n <= self.slots);
        debug_assert_eq!(self.slots % TILE, 0, "whole tiles of slots");
        if pos0 == 0 {
            self.held_from = 0;
        }
        if n < 64 || gemma3_kernels::pool::threads() == 1 {
            for (i, (k, v)) in k.chunks_exact(kvd).zip(v.chunks_exact(kvd)).enumerate() {
                self.write(pos0 + i, k, v);
            }
            return;
        }
        let (slots, s0) = (self.slots, self.slot(pos0));
        // Tiles holding slots s0.. (wrapping round the ring) up to n of them.
        let (first, last, tiles) = (s0 / TILE, (s0 + n - 1) / TILE, slots / TILE);
        let wanted = |t: usize| (t + tiles - first) % tiles <= last - first;
        // The wanted tiles picked first, then shared out: filtered in
        // parallel, a global layer's few tiles among thousands could all
        // fall to one thread.
        let work: Vec<_> = (self.k.chunks_mut(TILE * kvd))
            .zip(self.v.chunks_mut(TILE * kvd))
            .enumerate()
            .filter(|(t, _)| wanted(*t))
            .collect();
        let tile = |(t, (kt, vt)): (usize, (&mut [f16], &mut [f16]))| {
            for j in 0..TILE {
                // Token i of the run is the one in slot t·TILE + j.
                let i = (t * TILE + j + slots - s0) % slots;
                if i < n {
                    let row = i * kvd..(i + 1) * kvd;
                    put(kt, vt, j, &k[row.clone()], &v[row]);
                }
            }
        };
        gemma3_kernels::pool::for_each_item(work, 1, &tile);
    }
}

/// A key and value into slot j of a tile (`kt`: element d of slot j at
/// d·TILE + j; `vt`: slot j's row).
fn put(kt: &mut [f16], vt: &mut [f16], j: usize, k: &[f32], v: &[f32]) {
    let kvd = k.len();
    // Converted a slice at a time (vector instructions where the CPU has
    // them; the same rounding as f16::from_f32), then scattered into the
    // tile's column j.
    let mut kh = [f16::ZERO; 64];
    let mut column = kt[j..].iter_mut().step_by(TILE).take(kvd);
    for chunk in k.chunks(64) {
        let h = &mut kh[..chunk.len()];
        gemma3_kernels::ops::to_f16(chunk, h);
        // (h first: zip asks it first, so column is not advanced past the
        // chunk's end.)
        for (&x, dst) in h.iter().zip(column.by_ref()) {
            *dst = x;
        }
    }
    gemma3_kernels::ops::to_f16(v, &mut vt[j * kvd..(j + 1) * kvd]);
}

/// Slots of a layer's cache: every position of the context on global
/// layers, a ring of window + MAX_UBATCH on sliding-window ones; whole tiles.
fn layer_slots(cfg: &Config, l: usize, ctx: usize) -> (usize, usize) {
    let round = |n: usize| n.div_ceil(TILE) * TILE;
    if cfg.is_global(l) {
        (round(ctx), usize::MAX)
    } else {
        (
            round(cfg.sliding_window + MAX_UBATCH).min(round(ctx)),
            cfg.sliding_window,
        )
    }
}

pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Largest number of positions this cache holds.
    pub ctx: usize,
    pub kv_dim: usize,
}

impl KvCache {
    /// A cache for `ctx` positions (clamped to the model's context length).
    ///
    /// Panics where the memory cannot be had; [`KvCache::try_new`] says so
    /// instead.
    pub fn new(cfg: &Config, ctx: usize) -> Self {
        Self::try_new(cfg, ctx).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A cache of `ctx` positions (clamped to 1..=the model's context), or
    /// an error naming the size when the allocator refuses it.
    pub fn try_new(cfg: &Config, ctx: usize) -> Result<Self, ModelError> {
        let ctx = ctx.clamp(1, cfg.ctx_len);
        let kv_dim = cfg.kv_dim();
        let too_large = || ModelError::KvCacheAlloc {
            ctx,
            mib: Self::bytes_for(cfg, ctx) >> 20,
        };
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let (slots, window) = layer_slots(cfg, l, ctx);
                let n = slots.checked_mul(kv_dim).ok_or_else(too_large)?;
                Ok(LayerCache {
                    k: try_zeroed_f16(n).ok_or_else(too_large)?,
                    v: try_zeroed_f16(n).ok_or_else(too_large)?,
                    slots,
                    kv_dim,
                    window,
                    held_from: 0,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(KvCache {
            layers,
            ctx,
            kv_dim,
        })
    }

    /// Bytes this cache holds.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 2)
            .sum()
    }

    /// Bytes a cache of `ctx` positions needs, without allocating it.
    pub fn bytes_for(cfg: &Config, ctx: usize) -> usize {
        let ctx = ctx.clamp(1, cfg.ctx_len);
        (0..cfg.n_layers)
            .map(|l| layer_slots(cfg, l, ctx).0 * cfg.kv_dim() * 2 * 2)
            .sum()
    }

    /// Whether this cache, after `len` positions were written, still holds
    /// everything a continuation at position `n` (≤ len) needs: on a
    /// sliding-window layer, the positions written after n-1 must not have
    /// overwritten the last `window` positions before n, and a copied
    /// prefix must have brought them ([`LayerCache::held_from`]).
    pub fn holds_prefix(&self, n: usize, len: usize) -> bool {
        n <= len
            && len <= self.ctx
            && self.layers.iter().all(|l| {
                let first = n - n.min(l.window);
                first >= l.held_from && len <= first + l.slots
            })
    }

    /// Copy the state of positions 0..n from `src` (for prefix reuse). Returns
    /// false if `src` no longer holds all the positions a continuation at n
    /// needs (a sliding-window ring that has moved past n).
    pub fn copy_prefix_from(&mut self, src: &KvCache, n: usize, src_len: usize) -> bool {
        if n > self.ctx || !src.holds_prefix(n, src_len) {
            return false;
        }
        if self.layers.iter().any(|d| n.min(d.window) > d.slots) {
            return false;
        }
        for (dst, s) in self.layers.iter_mut().zip(&src.layers) {
            let first = n - n.min(s.window);
            // (A shorter prefix of this copy, continued later, would need
            // positions before `first`, which a ring was not given.)
            dst.held_from = first;
            let kvd = self.kv_dim;
            for p in first..n {
                let (ss, ds) = (s.slot(p), dst.slot(p));
                for d in 0..kvd {
                    let (si, di) = (s.k_index(ss, d), dst.k_index(ds, d));
                    dst.k[di] = s.k[si];
                }
                dst.v[ds * kvd..(ds + 1) * kvd].copy_from_slice(&s.v[ss * kvd..(ss + 1) * kvd]);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run written at once, across threads, stores what writing its
    /// positions one at a time does: for rings of 4, 5 and 33 tiles, runs
    /// from 1 slot to all of them, starting on and off tile boundaries and
    /// wrapping round the ring.
    #[test]
    fn a_run_written_at_once_equals_its_positions_one_by_one() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let kvd = 24;
        let cache = |slots: usize| LayerCache {
            k: vec![f16::ZERO; slots * kvd],
            v: vec![f16::ZERO; slots * kvd],
            slots,
            kv_dim: kvd,
            window: usize::MAX,
            held_from: 0,
        };
        for slots in [64, 80, 528] {
            for n in [1, 63, 64, 65, 100, slots] {
                for pos0 in [0, 5, 16, slots - 7, 2 * slots + 3] {
                    if n > slots {
                        continue;
                    }
                    let x: Vec<f32> = (0..n * kvd).map(|i| i as f32 * 0.25 - 7.0).collect();
                    let y: Vec<f32> = x.iter().map(|v| -v / 3.0).collect();
                    let (mut one, mut run) = (cache(slots), cache(slots));
                    for i in 0..n {
                        let r = i * kvd..(i + 1) * kvd;
                        one.write(pos0 + i, &x[r.clone()], &y[r]);
                    }
                    pool.install(|| run.write_run(pos0, &x, &y));
                    let what = format!("slots {slots}, n {n}, from {pos0}");
                    assert!(one.k == run.k && one.v == run.v, "{what}");
                }
            }
        }
    }
}
