//! The AMX-INT8 path of the ternary kernel (Xeons since Sapphire Rapids): one `tdpbsud`
//! multiplies a 16 × 64 tile of signed bytes by a 64 × 16 tile of unsigned bytes into 16 × 16
//! exact i32 sums, 16 K multiply-adds per instruction, several times what `vpdpbusd` gives per
//! cycle, so the projections stop being most of the forward.
//!
//! The A tiles are 16 tokens' int8 activations (64 inputs each, copied into contiguous 1 KiB
//! tiles once per task); the B tiles are 16 weight rows' codes `T + 1 ∈ {0, 1, 2}` (unsigned) in
//! the order the instruction wants (tile row `r` holds each weight row's inputs `4r … 4r + 3`),
//! made from the 2-bit layout for a chunk of 32 rows at a time. Each sum is `Σ q·(T + 1)`, the
//! integer every other loop produces, so the outputs are the same bits.
//!
//! Tile registers are not renamed: a load into a tile waits for every earlier product that
//! reads it. The step's loads and products are interleaved so that each load waits only for the
//! previous step's first products (twice the speed of loading all four tiles first, measured).
//!
//! Rust's AMX intrinsics are unstable, so the tile instructions are inline assembly (stable),
//! and the detection is by CPUID plus Linux's permission request for the tile data state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, without which the first tile instruction faults).

use super::{PackedTernary, QuantRows, BLOCK, BLOCK_BYTES};
use std::arch::asm;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Rows of a tile: 16 tokens (A), or the 16 weight rows a B tile holds side by side.
const TILE: usize = 16;
/// Bytes of a tile row: 64 inputs.
const TILE_K: usize = 64;
/// Weight rows per chunk: two B tiles.
const ROWS: usize = 2 * TILE;
/// Tokens per step: two A tiles (with the two B tiles: four accumulators, all eight tiles).
const TOKS: usize = 2 * TILE;
/// Most tokens a task owns: its activation tiles stay in L2 (128 × 6912 bytes at the 2B
/// shape's widest input), and each weight chunk's tiles are made once per task.
const MAX_TASK_TOKENS: usize = 128;

/// Whether this CPU has AMX-TILE and AMX-INT8, the kernel let this process use them, and the
/// user did not turn them off (`RPT_NO_AMX=1`: the vector loops then run, the same integers).
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| allowed(std::env::var("RPT_NO_AMX").ok().as_deref()) && detect())
}

/// `RPT_NO_AMX` unset, empty or `0` allows the tiles; anything else turns them off.
fn allowed(no_amx: Option<&str>) -> bool {
    matches!(no_amx.map(str::trim), None | Some("" | "0"))
}

fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // Leaf 7 is read only if the CPU reports it.
    let has_amx = __cpuid_count(0, 0).eax >= 7 && {
        let edx = __cpuid_count(7, 0).edx;
        (edx >> 24) & 1 == 1 && (edx >> 25) & 1 == 1 // AMX-TILE, AMX-INT8
    };
    // The weight tiles are made with AVX-512 (every AMX CPU has it).
    has_amx && std::arch::is_x86_feature_detected!("avx512f") && request_tile_permission()
}

/// Asks Linux for the tile data state (feature 18) for this process and all its threads.
#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's permissions; it fails
    // cleanly (non-zero) on kernels or sandboxes that refuse it.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// The tile configuration (palette 1): all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// A cache line: the unit of [`TileBuf`], so that every tile row is one line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Bytes for tiles, 64-byte aligned: a tile row that straddles two cache lines (a `Vec<u8>`
/// is 16-aligned) made the products 2.5× slower (measured).
#[derive(Default)]
struct TileBuf(Vec<Line>);

impl TileBuf {
    /// The first `n` bytes (a multiple of 64), grown if needed; old contents are kept.
    fn bytes(&mut self, n: usize) -> &mut [u8] {
        assert!(n.is_multiple_of(64), "tile buffers hold whole lines");
        if self.0.len() < n / 64 {
            self.0.resize(n / 64, Line([0; 64]));
        }
        // SAFETY: `Line` is 64 plain bytes; the vector holds at least n / 64 of them.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, n) }
    }
}

/// Tiles configured for this thread while alive; released (back to the initial state, so
/// context switches stop saving 8 KB of tile data) when dropped, also on unwinding.
struct Tiles;

impl Tiles {
    /// SAFETY: only after [`available`] returned true.
    unsafe fn configure() -> Self {
        let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for t in 0..8 {
            cfg.colsb[t] = TILE_K as u16;
            cfg.rows[t] = TILE as u8;
        }
        // SAFETY: the configuration is 64 aligned bytes of palette 1 with valid tile shapes.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) &cfg, options(nostack, readonly)) };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `configure`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Runs the kernel over `y [m, out]` with tiles, writing `emit(Σ q·T, rowv[r])` at `[r, n]`, as
/// `super::tiled` does. Tasks own consecutive tokens.
///
/// SAFETY: only after [`available`] returned true.
pub(super) unsafe fn tiled<T: Copy + Send + Sync>(
    x: &QuantRows,
    w: &PackedTernary,
    y: &mut [MaybeUninit<T>],
    rowv: &[f32],
    emit: impl Fn(i32, f32) -> T + Sync,
) {
    use rayon::prelude::*;
    let (m, out) = (x.m, w.out);
    // Enough tasks for every thread twice, in whole steps of TOKS tokens.
    let per_task = m.div_ceil(2 * rayon::current_num_threads()).next_multiple_of(TOKS).clamp(TOKS, MAX_TASK_TOKENS);
    y.par_chunks_mut(per_task * out).enumerate().for_each_init(
        || (TileBuf::default(), TileBuf::default()),
        |(acts, wt), (task, dst)| {
            let r0 = task * per_task;
            // SAFETY: the caller checked `available`; the bounds are the task's own.
            unsafe { task_rows(x, w, r0, dst.len() / out, dst, rowv, &emit, acts, wt) };
        },
    );
}

/// Tokens `r0 .. r0 + rows` against every weight row, into `dst` (those tokens' rows of `y`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,avx512f")]
unsafe fn task_rows<T: Copy>(
    x: &QuantRows,
    w: &PackedTernary,
    r0: usize,
    rows: usize,
    dst: &mut [MaybeUninit<T>],
    rowv: &[f32],
    emit: &impl Fn(i32, f32) -> T,
    acts: &mut TileBuf,
    wt: &mut TileBuf,
) {
    let out = w.out;
    let kp = w.blocks * BLOCK;
    let ktiles = kp / TILE_K;
    let steps = rows.div_ceil(TOKS);
    let acts = activation_tiles(x, r0, rows, steps * TOKS, acts);
    let wt = wt.bytes(2 * ktiles * TILE * TILE_K);
    let mut sums = Sums([[0; TILE * TILE]; 4]);
    // SAFETY: `available` was checked by the caller.
    let _tiles = unsafe { Tiles::configure() };
    for n0 in (0..out).step_by(ROWS) {
        let nrows = ROWS.min(out - n0);
        // SAFETY: AVX-512F comes with AMX (`available` checks it).
        unsafe { weight_tiles(w, n0, nrows, wt) };
        for step in 0..steps {
            let t0 = step * TOKS;
            // SAFETY: `acts` holds 2 · steps · ktiles tiles of 1 KiB, `wt` 2 · ktiles.
            let a = unsafe { acts.as_ptr().add(t0 * kp) };
            unsafe { step_sums(a, wt.as_ptr(), ktiles, &mut sums) };
            // Sum tile `2·g + o`: tokens `16g + j` (tile row j) × weight rows `16o + i` (column i).
            for j in 0..TOKS.min(rows - t0) {
                let r = t0 + j;
                let (s, off) = (rowv[r0 + r], x.sum[r0 + r]);
                let yrow = &mut dst[r * out + n0..][..nrows];
                let (g, jj) = (j / TILE, j % TILE);
                for (o, ys) in yrow.chunks_mut(TILE).enumerate() {
                    let accs = &sums.0[2 * g + o][jj * TILE..][..ys.len()];
                    for (y, &acc) in ys.iter_mut().zip(accs) {
                        y.write(emit(acc - off, s));
                    }
                }
            }
        }
    }
}

/// The four accumulator tiles of a step, 16 × 16 i32 each, row-major.
#[repr(C, align(64))]
struct Sums([[i32; TILE * TILE]; 4]);

/// One step: two A tiles (tokens 0–15 and 16–31, at `a` and `a + ktiles` KiB) times two B tiles
/// (weight rows 0–15 and 16–31 of the chunk, at `wt` and `wt + ktiles` KiB) over all `ktiles`
/// input tiles; `tdpbsud`: signed activations times unsigned codes. Every tile is 1 KiB of
/// contiguous bytes, which the prefetchers stream (rows 512 bytes apart or more stalled).
///
/// SAFETY: `a` and `wt` point at 2 · `ktiles` KiB each, tiles configured.
unsafe fn step_sums(a: *const i8, wt: *const u8, ktiles: usize, sums: &mut Sums) {
    let tile = TILE * TILE_K;
    // SAFETY (every block): the caller's bounds; the tile registers are not compiler-allocated.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        for kt in 0..ktiles {
            asm!(
                // Tiles are not renamed: a load waits for every earlier product reading its
                // tile. Interleaved, each load waits only for the previous step's first products.
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbsud tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbsud tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbsud tmm2, tmm5, tmm6",
                "tdpbsud tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(kt * tile),
                a1 = in(reg) a.add((ktiles + kt) * tile),
                b0 = in(reg) wt.add(kt * tile),
                b1 = in(reg) wt.add((ktiles + kt) * tile),
                s = in(reg) TILE_K,
                options(nostack, readonly),
            );
        }
        let c = sums.0.as_mut_ptr() as *mut i32;
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(TILE * TILE),
            c2 = in(reg) c.add(2 * TILE * TILE),
            c3 = in(reg) c.add(3 * TILE * TILE),
            s = in(reg) TILE * 4,
            options(nostack),
        );
    }
}

/// Tokens `r0 .. r0 + rows` of `x`, zero-padded to `tokens` (a multiple of 16), as A tiles in
/// `buf`: per group of 16 tokens and input tile, the 16 tokens' 64 inputs, row after row.
fn activation_tiles<'a>(x: &QuantRows, r0: usize, rows: usize, tokens: usize, buf: &'a mut TileBuf) -> &'a [i8] {
    let kp = x.blocks * BLOCK;
    let ktiles = kp / TILE_K;
    let acts = buf.bytes(tokens * kp);
    for t in 0..tokens {
        let (g, j) = (t / TILE, t % TILE);
        for kt in 0..ktiles {
            let dst = &mut acts[((g * ktiles + kt) * TILE + j) * TILE_K..][..TILE_K];
            match t < rows {
                // The quantised codes are i8; the tile holds their bytes.
                true => dst.copy_from_slice(i8_bytes(&x.row(r0 + t)[kt * TILE_K..][..TILE_K])),
                false => dst.fill(0),
            }
        }
    }
    // SAFETY: i8 and u8 have the same layout.
    unsafe { std::slice::from_raw_parts(acts.as_ptr() as *const i8, acts.len()) }
}

/// The bytes of i8 codes.
fn i8_bytes(v: &[i8]) -> &[u8] {
    // SAFETY: i8 and u8 have the same layout.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len()) }
}

/// Weight rows `n0 .. n0 + nrows` (at most 32) as B tiles in `wt`: per 16 rows and 64 inputs, a
/// tile whose row `r` holds each weight row's codes of inputs `4r … 4r + 3` (rows past `out`
/// are zero: their sums are never emitted).
///
/// In a packed block, byte `j` holds inputs `j + 32·slot` in bits `2·slot`: the four codes of
/// inputs `4r … 4r + 3` are one little-endian u32 of packed bytes (`4r mod 32 …`), shifted right
/// by `2·slot` and masked per byte. So a block of 16 rows is a 16 × 8 transpose of u32 words,
/// then four shift-and-masks give its two tiles.
#[target_feature(enable = "avx512f")]
unsafe fn weight_tiles(w: &PackedTernary, n0: usize, nrows: usize, wt: &mut [u8]) {
    use std::arch::x86_64::*;
    let row_bytes = w.blocks * BLOCK_BYTES;
    let tile = TILE * TILE_K;
    let ktiles = w.blocks * BLOCK / TILE_K;
    assert!(nrows <= ROWS && n0 + nrows <= w.out && wt.len() >= 2 * ktiles * tile);
    assert!(w.codes_in(super::Layout::Rows).len() >= w.out * row_bytes && TILE * row_bytes <= i32::MAX as usize);
    let mask = _mm512_set1_epi32(0x0303_0303);
    // Lane i reads weight row i of the tile.
    let rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(row_bytes as i32),
    );
    for o in 0..2 {
        let valid = TILE.min(nrows.saturating_sub(TILE * o));
        let lanes: __mmask16 = ((1u32 << valid) - 1) as u16;
        let base = w.codes_in(super::Layout::Rows).as_ptr().wrapping_add((n0 + TILE * o) * row_bytes);
        for b in 0..w.blocks {
            let lo = wt.as_mut_ptr().add((o * ktiles + 2 * b) * tile);
            let hi = lo.add(tile);
            for r in 0..BLOCK_BYTES / 4 {
                // SAFETY: only the `valid` rows (< w.out, asserted) are read; the stores stay
                // within the chunk's two tiles of block b (asserted length).
                let at = base.wrapping_add(b * BLOCK_BYTES + 4 * r) as *const i32;
                let v = _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), lanes, rows, at as _);
                _mm512_storeu_si512(lo.add(r * TILE_K) as *mut _, _mm512_and_si512(v, mask));
                _mm512_storeu_si512(
                    lo.add((r + 8) * TILE_K) as *mut _,
                    _mm512_and_si512(_mm512_srli_epi32::<2>(v), mask),
                );
                _mm512_storeu_si512(hi.add(r * TILE_K) as *mut _, _mm512_and_si512(_mm512_srli_epi32::<4>(v), mask));
                _mm512_storeu_si512(
                    hi.add((r + 8) * TILE_K) as *mut _,
                    _mm512_and_si512(_mm512_srli_epi32::<6>(v), mask),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rpt_no_amx_turns_the_tiles_off() {
        assert!(super::allowed(None) && super::allowed(Some("")) && super::allowed(Some("0")));
        assert!(!super::allowed(Some("1")) && !super::allowed(Some("yes")));
    }
}
