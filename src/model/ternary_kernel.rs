//! CPU inference kernel for BitLinear: ternary weights packed 2 bits each times int8 per-token
//! activations, accumulated exactly in integers, then scaled once.
//!
//! The f32 path multiplies the fake-quantised activation `q/s` by the fake-quantised weight
//! `T/s_w` in floating point. Here the integer sum `Σ q·T` is exact, so the only rounding is the
//! final scaling `(Σ q·T) · 1/(s·s_w)` (latent weights) or `(Σ q·T) · weight_scale/s` (packed
//! checkpoints): closer to the exact product than the f32 path, and independent of the order of
//! summation (so of the thread count).
//!
//! Layout ([`PackedTernary`]): each weight row is split into blocks of 128 inputs (the last one
//! padded with zero weights); a block is 32 bytes, byte `j` holding the codes `w + 1 ∈ {0, 1, 2}`
//! of inputs `j`, `j + 32`, `j + 64`, `j + 96` in bits 0–1, 2–3, 4–5, 6–7. One 256-bit load and
//! four shift-and-mask steps give four vectors of 32 codes, each multiplied with 32 int8
//! activations by one `maddubs` (unsigned codes × signed activations, pairs summed to i16).
//! `Σ (T+1)·q − Σ q = Σ T·q`. The scaling is one multiply by a per-row factor. AVX2 is detected
//! at run time; elsewhere a portable loop computes the same integers. `vpdpbusd` loops run where
//! the CPU has AVX-VNNI or AVX-512 VNNI (on 256-bit vectors, and on 512-bit ones with AVX-512 BW),
//! and AMX tiles (`amx.rs`) for 16 tokens or more where it
//! has AMX-INT8: the same integers again.
//!
//! Where the 512-bit VNNI loop is the best one, weights are packed in a second layout instead
//! ([`Layout::Lanes`], `lanes.rs`): sixteen rows interleaved, so that each i32 lane of an
//! accumulator is one output and no lane sums are needed (1.3–1.7× the row loop on Zen 5).

use super::cpu_values::filled;
use super::simd::wide;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Inputs per packed block.
pub const BLOCK: usize = 128;
/// Bytes per packed block.
const BLOCK_BYTES: usize = BLOCK / 4;
/// Tokens processed together per weight row (the unpacked block is reused across them) by the
/// loops with 16 vector registers.
const TOKENS: usize = 4;
/// Tokens per group in [`tiled`]: the AVX-512 VNNI loop takes them at once (32 registers); the
/// others [`TOKENS`] at a time.
const GROUP: usize = 8;

/// How the integer sums become outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OutScale {
    /// Latent weights quantised by absmean: `y = acc / s_act / s_w` (`s_w = 1 / mean|W|`).
    DivBy(f32),
    /// Packed checkpoints: `y = acc / s_act · weight_scale`.
    MulBy(f32),
}

/// How a [`PackedTernary`] orders its codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Row by row in blocks of 128 inputs (the module docs): every loop but the 16-row one.
    Rows,
    /// Sixteen rows interleaved per 64-byte chunk of 16 inputs (`lanes.rs`): the 512-bit VNNI
    /// loop without horizontal sums.
    Lanes,
}

impl Layout {
    /// The layout the best loop of this CPU reads (`best_isa`, capped by `RPT_KERNEL_ISA`).
    pub fn preferred() -> Self {
        #[cfg(target_arch = "x86_64")]
        if best_isa() == Isa::Avx512Vnni512 {
            return Layout::Lanes;
        }
        Layout::Rows
    }

    /// Weight rows per unit of the layout (a row, or a group of 16), whose bytes are contiguous.
    fn unit_rows(self) -> usize {
        match self {
            Layout::Rows => 1,
            #[cfg(target_arch = "x86_64")]
            Layout::Lanes => lanes::GROUP_ROWS,
            #[cfg(not(target_arch = "x86_64"))]
            Layout::Lanes => 16,
        }
    }

    /// Byte and bit shift of the code of (`row`, input `i`), `blocks` blocks a row.
    fn position(self, row: usize, i: usize, blocks: usize) -> (usize, u32) {
        match self {
            Layout::Rows => {
                let (b, j) = (i / BLOCK, i % BLOCK);
                (row * blocks * BLOCK_BYTES + b * BLOCK_BYTES + j % BLOCK_BYTES, 2 * (j / BLOCK_BYTES) as u32)
            }
            Layout::Lanes => lanes_position(row, i, blocks),
        }
    }

    /// Bytes of `out` rows of `blocks` blocks (whole units, padded with zero weights).
    fn bytes(self, out: usize, blocks: usize) -> usize {
        out.div_ceil(self.unit_rows()) * self.unit_rows() * blocks * BLOCK_BYTES
    }
}

/// [`Layout::Lanes`]' positions (its loop is x86's; the layout itself is plain arithmetic).
#[cfg(target_arch = "x86_64")]
fn lanes_position(row: usize, i: usize, blocks: usize) -> (usize, u32) {
    lanes::position(row, i, blocks)
}

#[cfg(not(target_arch = "x86_64"))]
fn lanes_position(row: usize, i: usize, blocks: usize) -> (usize, u32) {
    let (c, w) = (i / 16, i % 16);
    (((row / 16) * (blocks * BLOCK / 16) + c) * 64 + 4 * (row % 16) + w % 4, 2 * (w / 4) as u32)
}

/// A ternary weight `[out, k]` packed 2 bits a weight, in the layout its best loop reads.
#[derive(Debug, Clone)]
pub struct PackedTernary {
    pub out: usize,
    pub k: usize,
    blocks: usize,
    layout: Layout,
    codes: Vec<u8>,
    /// The codes in the other layout, made on first demand (a loop that reads the other layout:
    /// tests and benchmarks comparing loops, or AMX's few-token fallback).
    other: OnceLock<Vec<u8>>,
    pub scale: OutScale,
}

impl PackedTernary {
    /// Packs row-major ternary values `t [out, k]` (each −1, 0 or 1, any float type converted to
    /// f32). Fails on any other value.
    pub fn pack(t: &[f32], out: usize, k: usize, scale: OutScale) -> anyhow::Result<Self> {
        anyhow::ensure!(t.len() == out * k, "ternary weight has {} values, expected {out}×{k}", t.len());
        Self::build(out, k, scale, Layout::preferred(), |row, i| match t[row * k + i] {
            -1.0 => Ok(0u8),
            0.0 => Ok(1),
            1.0 => Ok(2),
            other => anyhow::bail!("weight value {other} is not ternary"),
        })
    }

    /// Ternarises and packs latent weights `w [out, k]` in one pass, with the absmean scale `s_w`
    /// already computed (`quant::weight_inv_scale`): `T = clamp(round_half_even(clamp(w·s_w, −2,
    /// 2)), −1, 1)`, the same f32 operations as `quant::ternarize` (tested equal), without its
    /// intermediate tensors (the 2B model's first forward spent most of its time there).
    pub fn from_latent(w: &[f32], out: usize, k: usize, s_w: f32) -> anyhow::Result<Self> {
        anyhow::ensure!(w.len() == out * k, "weight has {} values, expected {out}×{k}", w.len());
        Self::build(out, k, OutScale::DivBy(s_w), Layout::preferred(), |row, i| {
            let t = super::quant::rne((w[row * k + i] * s_w).clamp(-2.0, 2.0)).clamp(-1.0, 1.0);
            Ok((t + 1.0) as u8)
        })
    }

    /// The codes `code(row, i)` (`w + 1`) in `layout`, units of rows in parallel.
    fn build(
        out: usize,
        k: usize,
        scale: OutScale,
        layout: Layout,
        code: impl Fn(usize, usize) -> anyhow::Result<u8> + Sync,
    ) -> anyhow::Result<Self> {
        let blocks = k.div_ceil(BLOCK);
        let (unit_rows, unit_bytes) = (layout.unit_rows(), layout.unit_rows() * blocks * BLOCK_BYTES);
        // Code 1 (weight 0) everywhere, so padding contributes nothing.
        let mut codes = vec![0b0101_0101u8; layout.bytes(out, blocks)];
        codes.par_chunks_mut(unit_bytes.max(1)).enumerate().try_for_each(|(u, dst)| {
            for row in u * unit_rows..((u + 1) * unit_rows).min(out) {
                for i in 0..k {
                    let (byte, shift) = layout.position(row, i, blocks);
                    let byte = byte - u * unit_bytes;
                    dst[byte] = (dst[byte] & !(3 << shift)) | (code(row, i)? << shift);
                }
            }
            anyhow::Ok(())
        })?;
        Ok(Self { out, k, blocks, layout, codes, other: OnceLock::new(), scale })
    }

    /// The same weight with `layout` as its own (tests and benchmarks compare the loops).
    pub fn in_layout(&self, layout: Layout) -> Self {
        if layout == self.layout {
            return self.clone();
        }
        let codes = self.codes_in(layout).to_vec();
        Self { layout, codes, other: OnceLock::new(), ..self.clone() }
    }

    /// The layout the codes were packed in.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The codes in `layout`: the packed ones, or a copy rearranged once.
    fn codes_in(&self, layout: Layout) -> &[u8] {
        if layout == self.layout {
            return &self.codes;
        }
        self.other.get_or_init(|| {
            let from = self.layout;
            let code = |row, i| {
                let (byte, shift) = from.position(row, i, self.blocks);
                Ok((self.codes[byte] >> shift) & 3)
            };
            Self::build(self.out, self.k, self.scale, layout, code).expect("codes read back are valid").codes
        })
    }

    /// How many weights are 0 (code 1), padding excluded.
    pub fn zeros(&self) -> u64 {
        // Codes equal to 1 per byte value, then the padding (all code 1) taken off.
        let per_byte: [u8; 256] = std::array::from_fn(|b| (0..4).filter(|i| (b >> (2 * i)) & 3 == 1).count() as u8);
        let all: u64 = self.codes.par_iter().map(|&b| per_byte[b as usize] as u64).sum();
        all - (4 * self.codes.len() - self.out * self.k) as u64
    }

    /// Bytes held (for memory accounting).
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.other.get().map_or(0, Vec::len)
    }
}

/// Activations `[m, k]` quantised per row as BitNet's activation quantiser does: `s = 127 / max|x|`
/// (computed as `(1 / max|x|) · 127`, like torch), `q = clamp(round_half_even(x·s), −128, 127)`.
#[derive(Debug, Clone)]
pub struct QuantRows {
    pub m: usize,
    pub k: usize,
    blocks: usize,
    /// `[m, blocks · 128]`, zero-padded.
    q: Vec<i8>,
    /// `s` per row.
    pub scale: Vec<f32>,
    /// `Σ q` per row (the offset of the `T + 1` codes).
    sum: Vec<i32>,
}

impl QuantRows {
    /// Quantises row-major `x [m, k]`.
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        Self::new_with(x, m, k, best_isa())
    }

    /// [`QuantRows::new`] with a chosen loop (tests compare them).
    pub fn new_with(x: &[f32], m: usize, k: usize, isa: Isa) -> Self {
        assert_eq!(x.len(), m * k, "activation shape");
        check_supported(isa);
        let blocks = k.div_ceil(BLOCK);
        let kp = blocks * BLOCK;
        let mut q = vec![0i8; m * kp];
        let mut scale = vec![0f32; m];
        let mut sum = vec![0i32; m];
        q.par_chunks_mut(kp.max(1)).zip(scale.par_iter_mut().zip(sum.par_iter_mut())).enumerate().for_each(
            |(r, (dst, (s, total)))| {
                (*s, *total) = quantise_row(&x[r * k..(r + 1) * k], dst, isa);
            },
        );
        Self { m, k, blocks, q, scale, sum }
    }

    /// The fake-quantised activations `q / s` (exactly what the f32 path multiplies).
    pub fn dequantize(&self) -> Vec<f32> {
        let kp = self.blocks * BLOCK;
        let mut out = Vec::with_capacity(self.m * self.k);
        for r in 0..self.m {
            let s = self.scale[r];
            out.extend(self.q[r * kp..r * kp + self.k].iter().map(|&c| c as f32 / s));
        }
        out
    }

    fn row(&self, r: usize) -> &[i8] {
        let kp = self.blocks * BLOCK;
        &self.q[r * kp..(r + 1) * kp]
    }
}

/// One activation row's int8 codes into `dst` (its first `row.len()` bytes); returns the scale
/// `s` and `Σ q`. The same values as `quant::act_scale` and `quant::act_code` (tested).
fn quantise_row(row: &[f32], dst: &mut [i8], isa: Isa) -> (f32, i32) {
    assert!(dst.len() >= row.len(), "code row too short");
    match isa {
        Isa::Portable => {
            let s = super::quant::act_scale(row);
            (s, codes_scalar(row, s, dst))
        }
        // SAFETY: the x86 variants are only produced after runtime detection of AVX2 (and
        // more); lengths checked above. The quantiser needs AVX2 alone.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni | Isa::Avx512Vnni | Isa::Avx512Vnni512 | Isa::Amx => unsafe {
            let s = super::quant::act_scale_of_max(avx2::max_abs(row));
            (s, avx2::codes(row, s, dst))
        },
    }
}

/// The int8 codes of `row` at scale `s` into `dst` (scalar `quant::act_code`); returns `Σ q`.
fn codes_scalar(row: &[f32], s: f32, dst: &mut [i8]) -> i32 {
    let mut total = 0i32;
    for (d, &v) in dst.iter_mut().zip(row) {
        let c = super::quant::act_code(v, s) as i8;
        total += c as i32;
        *d = c;
    }
    total
}

/// Which inner loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    /// `maddubs` to i16, widened to i32 every few blocks.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 with AVX-VNNI's `vpdpbusd` (VEX: Alder Lake and later clients): codes × activations
    /// summed four at a time straight into i32, one instruction where AVX2 needs two.
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// The same `vpdpbusd` on 256-bit vectors through AVX-512 VNNI + VL (EVEX: Xeons since
    /// Cascade Lake, AMD Zen 4 and later), which also gives the compiler 32 vector registers.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// `vpdpbusd` on 512-bit vectors (AVX-512 VNNI + BW): a token's 128 activations of a block
    /// in two registers (two 32-byte slots each), a weight row's block broadcast to both halves
    /// once and shifted per half to meet them, so one instruction does twice the products and
    /// the token loop only loads. Cores with full-width AVX-512 units (AMD Zen 5, Intel's server
    /// cores) run it at up to twice the 256-bit loop's rate; on Zen 4 (512-bit ops split in two)
    /// it saves instructions only. Weights packed in [`Layout::Lanes`] (the default where this
    /// is the best loop) take the 16-row loop of `lanes.rs` instead.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni512,
    /// AMX-INT8 tiles (`tdpbsud`, Xeons since Sapphire Rapids; Linux grants the tile state) for
    /// [`AMX_MIN_TOKENS`] tokens or more; fewer tokens take the best vector loop.
    #[cfg(target_arch = "x86_64")]
    Amx,
}

/// Fewer tokens than this leave most of a 16-token tile empty: the vector loops run them.
#[cfg(target_arch = "x86_64")]
pub const AMX_MIN_TOKENS: usize = 16;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod lanes;

/// Every inner loop this CPU can run, the portable one first and the best last.
pub fn available_isas() -> Vec<Isa> {
    isas().to_vec()
}

/// [`available_isas`], detected once, up to the loop `RPT_KERNEL_ISA` names.
fn isas() -> &'static [Isa] {
    static ISAS: OnceLock<Vec<Isa>> = OnceLock::new();
    ISAS.get_or_init(|| {
        match configured_isas() {
            Ok(v) => {
                tracing::debug!("ternary kernel: {:?} inner loop", v[v.len() - 1]);
                v
            }
            // A setting the CPU cannot honour is an error, not a silent fallback.
            Err(why) => panic!("{why}"),
        }
    })
}

/// Whether `RPT_KERNEL_ISA` names a loop this CPU runs (unset or empty: yes). Model loading
/// checks it, so that a bad setting fails with its reason before anything computes; the kernel
/// itself would stop at its first call.
pub fn check_setting() -> Result<(), String> {
    configured_isas().map(drop)
}

/// The detected loops capped by `RPT_KERNEL_ISA`.
fn configured_isas() -> Result<Vec<Isa>, String> {
    capped(detect_isas(), std::env::var("RPT_KERNEL_ISA").ok().as_deref())
}

/// The loops' names as `RPT_KERNEL_ISA` takes them.
pub fn isa_name(isa: Isa) -> &'static str {
    match isa {
        Isa::Portable => "portable",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => "avx-vnni",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => "avx512-vnni",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni512 => "avx512-vnni-512",
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => "amx",
    }
}

/// `detected` (portable first, best last) without the loops above the one `wanted` names
/// (`RPT_KERNEL_ISA`: to run, and compare, a lesser loop on a CPU that has better ones); unset or
/// empty keeps them all.
fn capped(detected: Vec<Isa>, wanted: Option<&str>) -> Result<Vec<Isa>, String> {
    let Some(wanted) = wanted.map(str::trim).filter(|w| !w.is_empty()) else { return Ok(detected) };
    let names = || detected.iter().map(|&i| isa_name(i)).collect::<Vec<_>>().join(", ");
    let Some(pos) = detected.iter().position(|&i| isa_name(i).eq_ignore_ascii_case(wanted)) else {
        return Err(format!(
            "RPT_KERNEL_ISA={wanted}: not a ternary-kernel loop this CPU runs; it runs {} (unset the variable for the best)",
            names()
        ));
    };
    Ok(detected[..=pos].to_vec())
}

/// Every loop this CPU (and `RPT_NO_AMX`) allows, portable first.
fn detect_isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        v.push(Isa::Avx2);
        if std::arch::is_x86_feature_detected!("avxvnni") {
            v.push(Isa::AvxVnni);
        }
        if std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512vl") {
            v.push(Isa::Avx512Vnni);
            if std::arch::is_x86_feature_detected!("avx512bw") {
                v.push(Isa::Avx512Vnni512);
            }
        }
        if amx::available() {
            v.push(Isa::Amx);
        }
    }
    v
}

/// The best loop of `isa`'s family that takes any number of tokens: `isa` itself, except AMX,
/// whose few-token work goes to the best vector loop.
fn vector_isa(isa: Isa) -> Isa {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => *isas().iter().rfind(|&&i| i != Isa::Amx).expect("the portable loop is always there"),
        other => other,
    }
}

/// Panics unless this CPU runs `isa`: the public entry points take any `Isa`, and a loop the
/// CPU lacks would fault on its first instruction.
fn check_supported(isa: Isa) {
    assert!(isas().contains(&isa), "the {isa:?} kernel loop is not supported by this CPU (it runs {:?})", isas());
}

/// The best inner loop this CPU supports (detected once). All of them give the same integers.
pub fn best_isa() -> Isa {
    *isas().last().expect("the portable loop is always there")
}

/// What the kernel writes per output: the exact sum, or the scaled BitLinear output.
pub(crate) trait Output: Copy + Default + Send + Sync {
    /// Whether [`Output::emit`] scales (the 16-row loop does it in registers).
    const SCALED: bool;
    /// The output of the integer sum `acc` (offset already taken off) and the row's factor.
    fn emit(acc: i32, factor: f32) -> Self;
}

impl Output for i32 {
    const SCALED: bool = false;
    fn emit(acc: i32, _: f32) -> i32 {
        acc
    }
}

impl Output for f32 {
    const SCALED: bool = true;
    fn emit(acc: i32, factor: f32) -> f32 {
        scale_one(acc, factor)
    }
}

/// Exact integer sums `Σ_k q[r,k] · T[n,k]` as `[m, out]` (row-major), with `isa`.
pub fn int_sums(x: &QuantRows, w: &PackedTernary, isa: Isa) -> Vec<i32> {
    // `tiled` writes every output row and column (or panics).
    filled(x.m * w.out, |y| tiled(x, w, isa, y, &x.scale, false))
}

/// `y [m, out] = scale(Σ q·T)`: the BitLinear output in f32.
pub fn matmul(x: &QuantRows, w: &PackedTernary) -> Vec<f32> {
    matmul_with(x, w, best_isa())
}

/// [`matmul`] with a chosen inner loop (tests compare them).
pub fn matmul_with(x: &QuantRows, w: &PackedTernary, isa: Isa) -> Vec<f32> {
    let factors: Vec<f32> = x.scale.iter().map(|&s| row_factor(s, w.scale)).collect();
    // `tiled` writes every output row and column (or panics).
    filled(x.m * w.out, |y| tiled(x, w, isa, y, &factors, false))
}

/// [`matmul_with`] into `y [m, out]` (row-major), every value written, for a caller that is
/// itself one of many parallel tasks (`mlp_kernel`): the work is split by tokens however few
/// there are, never into weight rows transposed and then placed.
pub fn matmul_into(x: &QuantRows, w: &PackedTernary, isa: Isa, y: &mut [MaybeUninit<f32>]) {
    assert_eq!(y.len(), x.m * w.out, "kernel output shape");
    let factors: Vec<f32> = x.scale.iter().map(|&s| row_factor(s, w.scale)).collect();
    tiled(x, w, isa, y, &factors, true)
}

/// Token rows per parallel task when there are many tokens.
const TOKENS_PER_TASK: usize = 32;
/// Bytes of packed weight rows walked per pass over a task's tokens (stays in L2).
const ROW_CHUNK_BYTES: usize = 96 * 1024;

/// Runs the kernel over `y [m, out]`, writing `O::emit(Σ q·T, rowv[r])` at `[r, n]`.
///
/// Many tokens (prompts, perplexity windows): a task owns [`TOKENS_PER_TASK`] tokens (its rows
/// of `y`), walks the weight rows in chunks that stay in L2, and within a chunk takes its tokens
/// [`GROUP`] at a time, so each unpacked weight block serves several tokens and each group's
/// activations (in L1) serve the whole chunk. Few tokens (generation): tasks own weight rows
/// instead, computed transposed and then placed — unless `by_tokens` (the caller is one task of
/// many already).
fn tiled<T: Output>(
    x: &QuantRows,
    w: &PackedTernary,
    isa: Isa,
    y: &mut [MaybeUninit<T>],
    rowv: &[f32],
    by_tokens: bool,
) {
    assert_eq!(x.k, w.k, "inner dimensions differ");
    check_supported(isa);
    let (m, out) = (x.m, w.out);
    if m == 0 || out == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && m >= AMX_MIN_TOKENS {
        assert!(rowv.len() >= m && x.sum.len() >= m && y.len() == m * out, "kernel output shape");
        // SAFETY: `Isa::Amx` is only listed after `amx::available()` (CPU and OS support).
        unsafe { amx::tiled(x, w, y, rowv, T::emit) };
        return;
    }
    let isa = vector_isa(isa);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni512 && w.layout == Layout::Lanes {
        lanes::tiled(x, w, &w.codes, y, rowv, by_tokens);
        return;
    }
    let (emit, codes) = (T::emit, w.codes_in(Layout::Rows));
    let row_bytes = w.blocks * BLOCK_BYTES;
    let chunk_rows = (ROW_CHUNK_BYTES / row_bytes.max(1)).clamp(1, out);
    // Token-major sums of one chunk: token t of weight row i at `t · chunk_rows + i`, so that
    // each token's outputs are scaled in one contiguous (vectorised) pass.
    let sums = vec![0i32; GROUP * chunk_rows];
    if by_tokens || m >= 2 * TOKENS_PER_TASK || m >= 4 * rayon::current_num_threads() * TOKENS {
        y.par_chunks_mut(TOKENS_PER_TASK * out).enumerate().for_each_with(sums, |sums, (task, dst)| {
            let r0 = task * TOKENS_PER_TASK;
            let rows = dst.len() / out;
            for n0 in (0..out).step_by(chunk_rows) {
                let nrows = chunk_rows.min(out - n0);
                let wchunk = &codes[n0 * row_bytes..(n0 + nrows) * row_bytes];
                let mut r = r0;
                while r < r0 + rows {
                    let g = GROUP.min(r0 + rows - r);
                    let toks: [&[i8]; GROUP] = std::array::from_fn(|i| x.row(r + i.min(g - 1)));
                    group_sums(wchunk, nrows, w.blocks, &toks[..g], sums, chunk_rows, isa);
                    for j in 0..g {
                        let (s, off) = (rowv[r + j], x.sum[r + j]);
                        let yrow = &mut dst[(r + j - r0) * out + n0..][..nrows];
                        let (accs, emit) = (&sums[j * chunk_rows..][..nrows], &emit);
                        wide(move || {
                            for (y, &acc) in yrow.iter_mut().zip(accs) {
                                y.write(emit(acc - off, s));
                            }
                        });
                    }
                    r += g;
                }
            }
        });
    } else {
        let rows_per_task = out.div_ceil(4 * rayon::current_num_threads()).clamp(1, chunk_rows);
        let mut t = vec![T::default(); out * m];
        t.par_chunks_mut(rows_per_task * m).enumerate().for_each_with(sums, |sums, (task, dst)| {
            let n0 = task * rows_per_task;
            let nrows = dst.len() / m;
            let wchunk = &codes[n0 * row_bytes..(n0 + nrows) * row_bytes];
            let mut r = 0;
            while r < m {
                let g = GROUP.min(m - r);
                let toks: [&[i8]; GROUP] = std::array::from_fn(|i| x.row(r + i.min(g - 1)));
                group_sums(wchunk, nrows, w.blocks, &toks[..g], sums, chunk_rows, isa);
                for i in 0..nrows {
                    for j in 0..g {
                        dst[i * m + r + j] = emit(sums[j * chunk_rows + i] - x.sum[r + j], rowv[r + j]);
                    }
                }
                r += g;
            }
        });
        for (n, col) in t.chunks(m).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * out + n].write(v);
            }
        }
    }
}

/// Calls `f::<T>` with the token rows as an array: one variant per group size (at most
/// [`TOKENS`], or [`GROUP`] with `wide`), so a short last group costs only its rows.
#[cfg(target_arch = "x86_64")]
macro_rules! by_group_size {
    ($m:ident :: $f:ident, $w:expr, $nrows:expr, $blocks:expr, $toks:expr, $out:expr, $stride:expr) => {{
        let t = $toks;
        match t.len() {
            4 => $m::$f::<4>($w, $nrows, $blocks, [t[0], t[1], t[2], t[3]], $out, $stride),
            3 => $m::$f::<3>($w, $nrows, $blocks, [t[0], t[1], t[2]], $out, $stride),
            2 => $m::$f::<2>($w, $nrows, $blocks, [t[0], t[1]], $out, $stride),
            _ => $m::$f::<1>($w, $nrows, $blocks, [t[0]], $out, $stride),
        }
    }};
    (wide $m:ident :: $f:ident, $w:expr, $nrows:expr, $blocks:expr, $toks:expr, $out:expr, $stride:expr) => {{
        let t = $toks;
        match t.len() {
            8 => $m::$f::<8>($w, $nrows, $blocks, std::array::from_fn(|i| t[i]), $out, $stride),
            7 => $m::$f::<7>($w, $nrows, $blocks, std::array::from_fn(|i| t[i]), $out, $stride),
            6 => $m::$f::<6>($w, $nrows, $blocks, std::array::from_fn(|i| t[i]), $out, $stride),
            5 => $m::$f::<5>($w, $nrows, $blocks, std::array::from_fn(|i| t[i]), $out, $stride),
            _ => by_group_size!($m::$f, $w, $nrows, $blocks, t, $out, $stride),
        }
    }};
}

/// `Σ (T + 1)·q` of `nrows` packed weight rows against the (at most [`GROUP`]) token rows,
/// token `t`'s sum with row `i` into `out[t · stride + i]`.
fn group_sums(wblock: &[u8], nrows: usize, blocks: usize, toks: &[&[i8]], out: &mut [i32], stride: usize, isa: Isa) {
    assert!(toks.len() <= GROUP && nrows <= stride && out.len() >= toks.len().saturating_sub(1) * stride + nrows);
    match isa {
        Isa::Portable => group_sums_portable(wblock, nrows, blocks, toks, out, stride),
        // SAFETY: the x86 variants are only produced after runtime detection of their features;
        // bounds are asserted in the functions.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => in_fours(toks, out, stride, |t, o| unsafe {
            by_group_size!(avx2::group_sums, wblock, nrows, blocks, t, o, stride)
        }),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => in_fours(toks, out, stride, |t, o| unsafe {
            by_group_size!(vnni::group_sums_avx, wblock, nrows, blocks, t, o, stride)
        }),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe {
            by_group_size!(wide vnni::group_sums_evex, wblock, nrows, blocks, toks, out, stride)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni512 => unsafe {
            by_group_size!(wide vnni::group_sums_zmm, wblock, nrows, blocks, toks, out, stride)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => group_sums(wblock, nrows, blocks, toks, out, stride, vector_isa(isa)),
    }
}

/// Runs `f` on the tokens [`TOKENS`] at a time (the loops with 16 vector registers), each part
/// with the sums of its first token at the start of `out`.
#[cfg(target_arch = "x86_64")]
fn in_fours(toks: &[&[i8]], out: &mut [i32], stride: usize, mut f: impl FnMut(&[&[i8]], &mut [i32])) {
    for (i, part) in toks.chunks(TOKENS).enumerate() {
        f(part, &mut out[i * TOKENS * stride..]);
    }
}

/// The factor that turns a row's integer sums into outputs: `1 / (s_act · s_w)` (latent) or
/// `weight_scale / s_act` (packed), computed once per token row.
#[inline]
pub fn row_factor(s_act: f32, scale: OutScale) -> f32 {
    match scale {
        OutScale::DivBy(sw) => 1.0 / (s_act * sw),
        OutScale::MulBy(ws) => ws / s_act,
    }
}

/// The final scaling of one integer sum (with the rounding of [`row_factor`], the only rounding
/// of the kernel): one multiply, no division per output.
#[inline]
pub fn scale_one(acc: i32, factor: f32) -> f32 {
    acc as f32 * factor
}

/// The bounds every `group_sums` relies on (the vector loops' loads are unchecked); returns the
/// bytes of one packed weight row.
fn check_group(wblock: &[u8], nrows: usize, blocks: usize, toks: &[&[i8]], out: &[i32], stride: usize) -> usize {
    let row_bytes = blocks * BLOCK_BYTES;
    let t = toks.len();
    assert!(wblock.len() >= nrows * row_bytes && (1..=GROUP).contains(&t));
    assert!(nrows <= stride && out.len() >= (t - 1) * stride + nrows);
    assert!(toks.iter().all(|r| r.len() >= blocks * BLOCK));
    row_bytes
}

/// Portable [`group_sums`], written for the compiler's auto-vectoriser (the fallback of CPUs
/// without AVX2, aarch64 among them, where it becomes NEON): each weight block is unpacked once
/// into 128 codes, then serves every token of the group as a plain 128-element dot product summed
/// in 16 lanes of i16. The sums are the same integers as the other loops'.
fn group_sums_portable(wblock: &[u8], nrows: usize, blocks: usize, toks: &[&[i8]], out: &mut [i32], stride: usize) {
    let row_bytes = check_group(wblock, nrows, blocks, toks, out, stride);
    let mut codes = [0i16; BLOCK];
    for n in 0..nrows {
        let wrow = &wblock[n * row_bytes..(n + 1) * row_bytes];
        let mut sums = [0i32; GROUP];
        for (b, wb) in wrow.chunks_exact(BLOCK_BYTES).enumerate() {
            unpack_block(wb.try_into().expect("a packed block"), &mut codes);
            for (s, tok) in sums.iter_mut().zip(toks) {
                *s += dot_block(&codes, tok[b * BLOCK..(b + 1) * BLOCK].try_into().expect("an activation block"));
            }
        }
        for (t, &s) in sums.iter().enumerate().take(toks.len()) {
            out[t * stride + n] = s;
        }
    }
}

/// The 128 codes (`w + 1`) of one packed block in input order (the layout in the module docs).
#[inline]
fn unpack_block(block: &[u8; BLOCK_BYTES], codes: &mut [i16; BLOCK]) {
    for (slot, dst) in codes.chunks_exact_mut(BLOCK_BYTES).enumerate() {
        for (d, &byte) in dst.iter_mut().zip(block) {
            *d = ((byte >> (2 * slot)) & 3) as i16;
        }
    }
}

/// Lanes of the portable dot product.
const LANES: usize = 16;

/// `Σ codes·a` over one block. Each i16 lane sums 128 / 16 = 8 products of magnitude at most
/// 2 · 128: within ±2048, exact.
#[inline]
fn dot_block(codes: &[i16; BLOCK], a: &[i8; BLOCK]) -> i32 {
    let mut acc = [0i16; LANES];
    for (c, q) in codes.chunks_exact(LANES).zip(a.chunks_exact(LANES)) {
        for ((s, &c), &q) in acc.iter_mut().zip(c).zip(q) {
            *s += c * q as i16;
        }
    }
    acc.iter().map(|&v| v as i32).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, BLOCK_BYTES};

    /// `max |x|` over `row`, NaNs skipped (as `f32::max` does): `max_ps(v, acc)` returns its
    /// second operand when either is NaN.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn max_abs(row: &[f32]) -> f32 {
        let sign = _mm256_set1_ps(-0.0);
        let mut acc = _mm256_setzero_ps();
        let n8 = row.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 ≤ row.len().
            let v = _mm256_andnot_ps(sign, _mm256_loadu_ps(row.as_ptr().add(i)));
            acc = _mm256_max_ps(v, acc);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let tail = row[n8..].iter().fold(0f32, |m, v| m.max(v.abs()));
        lanes.iter().fold(tail, |m, &v| m.max(v))
    }

    /// The codes `clamp(round_half_even(x·s), −128, 127)` of `row` into `dst`, NaN giving 0
    /// (as the scalar `as i8` does); returns `Σ q`. Clamping to ±128/127 before rounding gives
    /// the scalar form's codes (which clamps to −129/128 first): the rounding is monotone.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn codes(row: &[f32], s: f32, dst: &mut [i8]) -> i32 {
        let n32 = row.len() / 32 * 32;
        let (lo, hi, sv) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0), _mm256_set1_ps(s));
        // packs_epi32 / packs_epi16 interleave the 128-bit lanes; this puts the bytes back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut acc = _mm256_setzero_si256();
        for i in (0..n32).step_by(32) {
            let mut q = [_mm256_setzero_si256(); 4];
            for (j, qj) in q.iter_mut().enumerate() {
                // SAFETY: i + 32 ≤ row.len() ≤ dst.len() (asserted by the caller).
                let x = _mm256_mul_ps(_mm256_loadu_ps(row.as_ptr().add(i + 8 * j)), sv);
                let x = _mm256_and_ps(x, _mm256_cmp_ps::<_CMP_ORD_Q>(x, x));
                let x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
                *qj = _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x));
                acc = _mm256_add_epi32(acc, *qj);
            }
            let words = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let bytes = _mm256_permutevar8x32_epi32(words, order);
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, bytes);
        }
        let mut lanes = [0i32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc);
        lanes.iter().sum::<i32>() + super::codes_scalar(&row[n32..], s, &mut dst[n32..])
    }

    /// Blocks summed in i16 before widening: 16 × 2048 = 32768 fits (the extreme case is all
    /// codes 2 against q = −128, exactly −32768).
    const I16_BLOCKS: usize = 16;
    use std::arch::x86_64::*;

    /// AVX2 `Σ (T + 1)·q` for `nrows` weight rows × `T` tokens. Per block and token: 4 `maddubs`
    /// (codes ≤ 2 × |q| ≤ 128: pairs within ±512 in i16) summed to within ±2048; up to
    /// [`I16_BLOCKS`] blocks are summed in i16 (within ±32768) before one `madd` widens them to i32.
    // The reduction below takes the four token sums of a row at once.
    const _: () = assert!(super::TOKENS == 4);

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn group_sums<const T: usize>(
        wblock: &[u8],
        nrows: usize,
        blocks: usize,
        toks: [&[i8]; T],
        out: &mut [i32],
        stride: usize,
    ) {
        let row_bytes = super::check_group(wblock, nrows, blocks, &toks, out, stride);
        let mask = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        for n in 0..nrows {
            let w = wblock.as_ptr().add(n * row_bytes);
            let mut acc = [_mm256_setzero_si256(); T];
            let mut b0 = 0;
            while b0 < blocks {
                let b1 = (b0 + I16_BLOCKS).min(blocks);
                let mut s16 = [_mm256_setzero_si256(); T];
                for b in b0..b1 {
                    // SAFETY (all loads): in bounds by the asserts above; unaligned loads.
                    let [c0, c1, c2, c3] = codes_of_block(w.add(b * BLOCK_BYTES), mask);
                    for t in 0..T {
                        let a = toks[t].as_ptr().add(b * BLOCK) as *const __m256i;
                        let p0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(a));
                        let p1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256(a.add(1)));
                        let p2 = _mm256_maddubs_epi16(c2, _mm256_loadu_si256(a.add(2)));
                        let p3 = _mm256_maddubs_epi16(c3, _mm256_loadu_si256(a.add(3)));
                        let s = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
                        s16[t] = _mm256_add_epi16(s16[t], s);
                    }
                }
                for t in 0..T {
                    acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s16[t], ones));
                }
                b0 = b1;
            }
            store_lane_sums(acc, out, stride, n);
        }
    }

    /// The four vectors of 32 codes (`w + 1`: inputs `j`, `j + 32`, `j + 64`, `j + 96` of byte
    /// `j`) of the packed block at `block` (32 bytes, unaligned).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn codes_of_block(block: *const u8, mask: __m256i) -> [__m256i; 4] {
        let packed = _mm256_loadu_si256(block as *const __m256i);
        [
            _mm256_and_si256(packed, mask),
            _mm256_and_si256(_mm256_srli_epi16(packed, 2), mask),
            _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask),
            _mm256_and_si256(_mm256_srli_epi16(packed, 6), mask),
        ]
    }

    /// Stores the lane sum of `acc[t]` at `out[t · stride + n]`. The T horizontal sums at once:
    /// three hadds leave token t's lane sums in lanes t and t + 4; one add of the halves gives
    /// all four (missing tokens 0).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn store_lane_sums<const T: usize>(acc: [__m256i; T], out: &mut [i32], stride: usize, n: usize) {
        // Four tokens at a time (more only in the AVX-512 loop).
        for t0 in (0..T).step_by(4) {
            let a = |t: usize| if t0 + t < T { acc[t0 + t] } else { _mm256_setzero_si256() };
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(a(0), a(1)), _mm256_hadd_epi32(a(2), a(3)));
            let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            let mut o = [0i32; 4];
            _mm_storeu_si128(o.as_mut_ptr() as *mut __m128i, s);
            for (t, &v) in o.iter().enumerate().take(T - t0) {
                out[(t0 + t) * stride + n] = v;
            }
        }
    }
}

/// The VNNI loops: per block, row and token, four `vpdpbusd` (unsigned codes × signed
/// activations, four products summed into each i32 lane) into two accumulators, so that at least
/// eight independent chains hide the instruction's latency. With AVX-512's 32 registers two
/// weight rows share each activation load (1.65× on the 2B q/o projection on Zen 4), and each
/// unpacked weight block serves [`GROUP`] = 8 tokens, whose 16 (row, token) chains need one
/// accumulator each (the activations come from memory operands): half the unpacking per
/// product of the 4-token groups, 10–25 % faster on the AMX Xeon. AVX-VNNI's 16 registers allow
/// one row and 4 tokens (8 tokens were slower there). Sums stay far inside i32 (|Σ| ≤ 2·128·k).
/// One body, compiled for each encoding.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::avx2::{codes_of_block, store_lane_sums};
    use super::{BLOCK, BLOCK_BYTES};
    use std::arch::x86_64::*;

    /// The rows that fill whole groups of `R`.
    fn whole_groups<const R: usize>(nrows: usize) -> usize {
        nrows - nrows % R
    }

    macro_rules! vnni_group_sums {
        ($name:ident, $features:literal, $dpbusd:ident, $rows:literal) => {
            /// `Σ (T + 1)·q` for `nrows` weight rows × `T` tokens, as `avx2::group_sums`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const T: usize>(
                wblock: &[u8],
                nrows: usize,
                blocks: usize,
                toks: [&[i8]; T],
                out: &mut [i32],
                stride: usize,
            ) {
                let row_bytes = super::check_group(wblock, nrows, blocks, &toks, out, stride);
                /// Rows `n .. n + R` against the tokens: each activation load serves R rows.
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn rows<const T: usize, const R: usize>(
                    wblock: &[u8],
                    row_bytes: usize,
                    n: usize,
                    blocks: usize,
                    toks: &[&[i8]; T],
                    out: &mut [i32],
                    stride: usize,
                ) {
                    let mask = _mm256_set1_epi8(3);
                    let mut even = [[_mm256_setzero_si256(); T]; R];
                    let mut odd = [[_mm256_setzero_si256(); T]; R];
                    for b in 0..blocks {
                        // SAFETY (all loads): in bounds by `check_group`; unaligned loads.
                        let c: [[__m256i; 4]; R] = std::array::from_fn(|i| {
                            codes_of_block(wblock.as_ptr().add((n + i) * row_bytes + b * BLOCK_BYTES), mask)
                        });
                        for t in 0..T {
                            let a = toks[t].as_ptr().add(b * BLOCK) as *const __m256i;
                            let a: [__m256i; 4] = std::array::from_fn(|j| _mm256_loadu_si256(a.add(j)));
                            for i in 0..R {
                                for j in 0..4 {
                                    // With 10 or more (row, token) chains one accumulator each
                                    // is enough (two would not fit in the registers).
                                    let acc = if R * T < 10 && j % 2 == 1 { &mut odd[i][t] } else { &mut even[i][t] };
                                    *acc = $dpbusd(*acc, c[i][j], a[j]);
                                }
                            }
                        }
                    }
                    for i in 0..R {
                        let acc: [__m256i; T] = std::array::from_fn(|t| _mm256_add_epi32(even[i][t], odd[i][t]));
                        store_lane_sums(acc, out, stride, n + i);
                    }
                }
                // Whole groups of rows, then the rest one at a time.
                let grouped = whole_groups::<$rows>(nrows);
                for n in (0..grouped).step_by($rows) {
                    rows::<T, $rows>(wblock, row_bytes, n, blocks, &toks, out, stride);
                }
                for n in grouped..nrows {
                    rows::<T, 1>(wblock, row_bytes, n, blocks, &toks, out, stride);
                }
            }
        };
    }

    // AVX-VNNI has 16 vector registers: one row at a time (8 accumulators, 4 codes, 4 inputs).
    vnni_group_sums!(group_sums_avx, "avx2,avxvnni", _mm256_dpbusd_avx_epi32, 1);
    // AVX-512 has 32: two rows share each activation load (16 accumulators, 8 codes, 4 inputs).
    vnni_group_sums!(group_sums_evex, "avx2,avx512vnni,avx512vl", _mm256_dpbusd_epi32, 2);

    /// Weight rows per step of [`group_sums_zmm`] for `T` tokens: two at eight tokens (16
    /// accumulators, 4 code registers), four at four tokens or fewer, where each row's code
    /// unpacking serves few products (one token, the 2B gate/up shape, Zen 5: 0.11–0.13 ms
    /// against 0.15–0.17 with two rows).
    const fn zmm_rows(tokens: usize) -> usize {
        if tokens <= 4 {
            4
        } else {
            2
        }
    }

    /// The most rows [`zmm_rows`] gives.
    const ZMM_MAX_ROWS: usize = 4;

    /// `Σ (T + 1)·q` on 512-bit vectors, as `avx2::group_sums`. A token's 128 activations of a
    /// block load as two registers, slots 0–1 and slots 2–3 (32 bytes each) side by side; a weight
    /// row's 32-byte block is broadcast to both halves once per block and shifted by 0 and 2 bits
    /// (4 and 6) per half, so that each half's codes meet that half's slot: two `vpdpbusd` per
    /// row and token. The token loop only loads: the earlier layout (two rows' blocks per
    /// register) broadcast each 32-byte slot of every token, and on an AMD Zen 5 the loop ran
    /// 1.2–1.4× faster with plain loads in their place. Two rows share each load (four at four
    /// tokens or fewer, [`zmm_rows`]); rows left over take the 256-bit loop.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni,avx512vl")]
    pub(super) unsafe fn group_sums_zmm<const T: usize>(
        wblock: &[u8],
        nrows: usize,
        blocks: usize,
        toks: [&[i8]; T],
        out: &mut [i32],
        stride: usize,
    ) {
        let row_bytes = super::check_group(wblock, nrows, blocks, &toks, out, stride);
        let mask = _mm512_set1_epi8(3);
        // Per 16-bit lane: the low half's shift, then the high half's (slots 0 | 1, 2 | 3).
        let half_shifts = |lo: i16, hi: i16| _mm512_inserti64x4::<1>(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi));
        let (shift01, shift23) = (half_shifts(0, 2), half_shifts(4, 6));
        let rows = zmm_rows(T);
        let grouped = nrows - nrows % rows;
        for n in (0..grouped).step_by(rows) {
            // Rows past `rows` are never touched (a constant per `T`: the compiler drops them).
            let mut acc = [[_mm512_setzero_si512(); T]; ZMM_MAX_ROWS];
            for b in 0..blocks {
                // SAFETY (all loads): in bounds by `check_group` (rows n .. n + rows ≤ nrows,
                // block b < blocks; activation rows hold blocks · 128 bytes); unaligned loads.
                let c: [[__m512i; 2]; ZMM_MAX_ROWS] = std::array::from_fn(|r| {
                    if r >= rows {
                        return [_mm512_setzero_si512(); 2];
                    }
                    let at = wblock.as_ptr().add((n + r) * row_bytes + b * BLOCK_BYTES) as *const __m256i;
                    let w = _mm512_broadcast_i64x4(_mm256_loadu_si256(at));
                    [
                        _mm512_and_si512(_mm512_srlv_epi16(w, shift01), mask),
                        _mm512_and_si512(_mm512_srlv_epi16(w, shift23), mask),
                    ]
                });
                for t in 0..T {
                    let a = toks[t].as_ptr().add(b * BLOCK) as *const __m512i;
                    let (a01, a23) = (_mm512_loadu_si512(a), _mm512_loadu_si512(a.add(1)));
                    for r in 0..rows {
                        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], c[r][0], a01);
                        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], c[r][1], a23);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate().take(rows) {
                let sums: [__m256i; T] = std::array::from_fn(|t| {
                    _mm256_add_epi32(_mm512_castsi512_si256(row[t]), _mm512_extracti64x4_epi64::<1>(row[t]))
                });
                store_lane_sums(sums, out, stride, n + r);
            }
        }
        if grouped < nrows {
            let rest = &mut out[grouped..];
            group_sums_evex(&wblock[grouped * row_bytes..], nrows - grouped, blocks, toks, rest, stride);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// `RPT_KERNEL_ISA` keeps the loops up to the one it names (any case), unset or blank keeps
    /// them all, and a loop not detected is an error naming those that are.
    #[test]
    fn the_kernel_isa_setting_caps_the_loops() {
        let all = detect_isas();
        assert_eq!(capped(all.clone(), None).unwrap(), all);
        assert_eq!(capped(all.clone(), Some("  ")).unwrap(), all);
        assert_eq!(capped(all.clone(), Some("Portable")).unwrap(), vec![Isa::Portable]);
        for (i, &isa) in all.iter().enumerate() {
            assert_eq!(capped(all.clone(), Some(isa_name(isa))).unwrap(), all[..=i].to_vec());
        }
        let err = capped(vec![Isa::Portable], Some("avx2")).unwrap_err();
        assert!(err.contains("RPT_KERNEL_ISA=avx2") && err.contains("it runs portable"), "{err}");
        assert!(capped(all, Some("sse9")).is_err());
    }

    /// Every loop with the layouts it reads: each vector loop on the row layout, the 512-bit VNNI
    /// loop also on the 16-row one (AMX's few-token fallback reads rows with it).
    fn loops() -> Vec<(Isa, Layout)> {
        let mut v: Vec<_> = available_isas().into_iter().map(|i| (i, Layout::Rows)).collect();
        #[cfg(target_arch = "x86_64")]
        if available_isas().contains(&Isa::Avx512Vnni512) {
            v.push((Isa::Avx512Vnni512, Layout::Lanes));
        }
        v
    }

    fn random_case(m: usize, out: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut rng = SplitMix64::new(seed);
        let x: Vec<f32> = (0..m * k).map(|_| (rng.normal() * 2.0) as f32).collect();
        let t: Vec<f32> = (0..out * k).map(|_| (rng.next_u64() % 3) as f32 - 1.0).collect();
        (x, t)
    }

    /// Σ q·T in i64 straight from the definitions.
    fn naive(q: &QuantRows, t: &[f32], out: usize) -> Vec<i64> {
        let (m, k) = (q.m, q.k);
        let deq = q.dequantize();
        let mut y = vec![0i64; m * out];
        for r in 0..m {
            for n in 0..out {
                y[r * out + n] =
                    (0..k).map(|i| (deq[r * k + i] * q.scale[r]).round() as i64 * t[n * k + i] as i64).sum();
            }
        }
        y
    }

    #[test]
    fn integer_sums_are_exact_on_odd_shapes() {
        let loops = loops();
        eprintln!("inner loops compared: {loops:?}");
        for (i, &(m, out, k)) in [
            (1, 1, 1),
            (3, 5, 127),
            (5, 17, 128),
            (9, 33, 129),
            (4, 8, 300),
            (13, 40, 512),
            (70, 9, 260),
            (131, 3, 1000),
            // Rows of 2 KiB: 48 per L2 chunk, so several chunks (and i16 stages) per output.
            (70, 100, 8192),
            (3, 100, 8192),
            // AMX edges: whole and partial 16-token tiles and 32-token steps, weight chunks of
            // 32 rows with 1, 15, 16 or 17 left over, one 64-input tile past a block.
            (16, 16, 64),
            (31, 33, 128),
            (32, 47, 192),
            (33, 49, 129),
            (200, 65, 640),
        ]
        .iter()
        .enumerate()
        {
            let (x, t) = random_case(m, out, k, i as u64);
            let q = QuantRows::new(&x, m, k);
            let w = PackedTernary::pack(&t, out, k, OutScale::MulBy(1.0)).unwrap();
            let want: Vec<i32> = naive(&q, &t, out).into_iter().map(|v| v as i32).collect();
            for &(isa, layout) in &loops {
                let w = w.in_layout(layout);
                assert_eq!(int_sums(&q, &w, isa), want, "{isa:?} {layout:?} m={m} out={out} k={k}");
                let y = matmul_with(&q, &w, isa);
                let scaled: Vec<u32> = want
                    .iter()
                    .enumerate()
                    .map(|(i, &a)| scale_one(a, row_factor(q.scale[i / out], w.scale)).to_bits())
                    .collect();
                assert_eq!(y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), scaled, "{isa:?} {layout:?} scaled");
            }
        }
    }

    #[test]
    fn every_loop_gives_the_same_sums_on_several_threads() {
        // Tasks split tokens (and, for few tokens, weight rows) across threads; with AMX each
        // thread configures its own tiles.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (i, &(m, out, k)) in [(300, 70, 512), (5, 300, 256), (129, 64, 1376)].iter().enumerate() {
            let (x, t) = random_case(m, out, k, 100 + i as u64);
            let q = QuantRows::new(&x, m, k);
            let w = PackedTernary::pack(&t, out, k, OutScale::MulBy(1.0)).unwrap();
            let want: Vec<i32> = naive(&q, &t, out).into_iter().map(|v| v as i32).collect();
            for (isa, layout) in loops() {
                let w = w.in_layout(layout);
                assert_eq!(pool.install(|| int_sums(&q, &w, isa)), want, "{isa:?} {layout:?} m={m} out={out} k={k}");
            }
        }
    }

    #[test]
    fn vector_quantiser_equals_the_scalar_one() {
        // Ties at every scale (x·s = n + 0.5 exactly), values past the clamp, ±∞, NaN, −0 and
        // row lengths around the 8- and 32-lane steps.
        let mut rng = SplitMix64::new(7);
        for k in [1, 7, 8, 31, 32, 33, 100, 512, 1001] {
            let m = 3;
            let mut x: Vec<f32> = (0..m * k).map(|_| (rng.normal() * 3.0) as f32).collect();
            for (i, v) in x.iter_mut().enumerate().skip(1).step_by(5) {
                *v = (i % 256) as f32 - 128.5; // exact ties once the row's scale is 1 (below)
            }
            let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e30, -1e30];
            for (j, v) in specials.iter().enumerate() {
                if j * 3 < x.len() {
                    x[j * 3] = *v;
                }
            }
            // Row 2 has max |x| = 127, so its scale is exactly 1 and the .5 values are ties.
            for v in x[2 * k..].iter_mut() {
                *v = v.clamp(-127.0, 127.0);
            }
            if let Some(v) = x[2 * k..].first_mut() {
                *v = 127.0;
            }
            let want = QuantRows::new_with(&x, m, k, Isa::Portable);
            let got = QuantRows::new_with(&x, m, k, best_isa());
            assert_eq!(got.q, want.q, "codes, k = {k}");
            assert_eq!(got.sum, want.sum, "sums, k = {k}");
            assert_eq!(
                got.scale.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.scale.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "scales, k = {k}"
            );
            let scalar: Vec<f32> = x.chunks(k).map(crate::model::quant::act_scale).collect();
            assert_eq!(want.scale, scalar);
        }
    }

    #[test]
    fn extreme_activations_do_not_overflow() {
        // Every activation at ±127 (one row all positive, one alternating) and all weights +1:
        // the i16 partial sums reach their largest magnitude.
        let k = 4096; // 32 blocks: crosses the i16 accumulation span twice
        let x: Vec<f32> = (0..2 * k).map(|i| if i < k || i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let q = QuantRows::new(&x, 2, k);
        let w = PackedTernary::pack(&vec![1.0; 3 * k], 3, k, OutScale::MulBy(1.0)).unwrap();
        for (isa, layout) in loops() {
            let s = int_sums(&q, &w.in_layout(layout), isa);
            assert_eq!(s, vec![127 * k as i32, 127 * k as i32, 127 * k as i32, 0, 0, 0], "{isa:?}");
        }
    }

    #[test]
    fn scaled_output_is_the_scaled_exact_sum() {
        let (m, out, k) = (67, 11, 200);
        let (x, t) = random_case(m, out, k, 42);
        let q = QuantRows::new(&x, m, k);
        for scale in [OutScale::DivBy(3.7), OutScale::MulBy(0.41)] {
            let w = PackedTernary::pack(&t, out, k, scale).unwrap();
            let y = matmul(&q, &w);
            let sums = naive(&q, &t, out);
            for (i, (&yv, &a)) in y.iter().zip(&sums).enumerate() {
                assert_eq!(yv.to_bits(), scale_one(a as i32, row_factor(q.scale[i / out], scale)).to_bits());
                // Within a few ulps of the exact quotient.
                let exact = match scale {
                    OutScale::DivBy(sw) => a as f64 / q.scale[i / out] as f64 / sw as f64,
                    OutScale::MulBy(ws) => a as f64 / q.scale[i / out] as f64 * ws as f64,
                };
                assert!((yv as f64 - exact).abs() <= exact.abs() * 4e-7, "{yv} vs {exact}");
            }
        }
    }

    #[test]
    fn packing_latent_weights_equals_ternarize_then_pack() -> candle_core::Result<()> {
        use crate::model::quant::{ternarize, weight_inv_scale};
        use candle_core::{Device, Tensor};
        let (out, k) = (9, 300);
        let mut wv: Vec<f32> = (Tensor::randn(0f32, 1.0, (out, k), &Device::Cpu)? * 0.05)?.flatten_all()?.to_vec1()?;
        // Values that land exactly on rounding ties after scaling (±0.5, ±1.5 in units of β):
        // replace four weights by ties of the scale they leave unchanged (their |w| sum is kept).
        let beta = wv.iter().map(|v| v.abs()).sum::<f32>() / wv.len() as f32;
        let sum4: f32 = wv[..4].iter().map(|v| v.abs()).sum();
        if sum4 > 4.0 * beta {
            wv[..4].copy_from_slice(&[0.5 * beta, -0.5 * beta, 1.5 * beta, -1.5 * beta]);
        }
        let w = Tensor::from_vec(wv.clone(), (out, k), &Device::Cpu)?;
        let s = weight_inv_scale(&w)?.flatten_all()?.to_vec1::<f32>()?[0];
        let (t, _) = ternarize(&w)?;
        let want = PackedTernary::pack(&t.flatten_all()?.to_vec1::<f32>()?, out, k, OutScale::DivBy(s)).unwrap();
        let got = PackedTernary::from_latent(&wv, out, k, s).unwrap();
        assert_eq!(got.codes, want.codes);
        assert_eq!(got.scale, want.scale);
        Ok(())
    }

    #[test]
    fn zeros_count_zero_weights_only() {
        for (out, k) in [(3, 5), (4, 128), (2, 300)] {
            let (_, t) = random_case(1, out, k, (out * k) as u64);
            let w = PackedTernary::pack(&t, out, k, OutScale::MulBy(1.0)).unwrap();
            for layout in [Layout::Rows, Layout::Lanes] {
                let w = w.in_layout(layout);
                assert_eq!(w.zeros(), t.iter().filter(|&&v| v == 0.0).count() as u64, "{out}×{k} {layout:?}");
            }
        }
    }

    /// Each layout rearranged into the other and back gives the same bytes, and the codes read
    /// back from either are the weights packed (padding rows and inputs hold code 1).
    #[test]
    fn layouts_convert_both_ways() {
        for (out, k) in [(1, 1), (17, 130), (33, 300), (16, 128)] {
            let (_, t) = random_case(1, out, k, (7 * out + k) as u64);
            let w = PackedTernary::pack(&t, out, k, OutScale::MulBy(1.0)).unwrap();
            for layout in [Layout::Rows, Layout::Lanes] {
                let a = w.in_layout(layout);
                assert_eq!(a.layout(), layout);
                let other = if layout == Layout::Rows { Layout::Lanes } else { Layout::Rows };
                assert_eq!(a.in_layout(other).in_layout(layout).codes, a.codes, "{out}×{k} {layout:?}");
                for row in 0..out {
                    for i in 0..k {
                        let (byte, shift) = layout.position(row, i, a.blocks);
                        assert_eq!(
                            (a.codes[byte] >> shift) & 3,
                            (t[row * k + i] + 1.0) as u8,
                            "{layout:?} ({row}, {i})"
                        );
                    }
                }
                let padding = 4 * a.codes.len() - out * k;
                let ones = a.codes.iter().map(|&b| (0..4).filter(|s| (b >> (2 * s)) & 3 == 1).count()).sum::<usize>();
                assert!(ones >= padding, "{layout:?}: padding must be zero weights");
            }
        }
    }

    #[test]
    fn rejects_non_ternary_values() {
        let err = PackedTernary::pack(&[0.5, 1.0], 1, 2, OutScale::MulBy(1.0)).unwrap_err();
        assert!(err.to_string().contains("not ternary"), "{err}");
    }
}
