//! `cargo bench --bench ternary`: the BitLinear kernel alone (int8 activations × packed ternary
//! weights) against candle's f32 matmul of the fake-quantised operands, per projection shape of
//! the mid-size bench model (1024 tokens) and of the 2B model (512 tokens), median of
//! `BENCH_REPS` (default 5), with every inner loop this CPU runs (AVX2, VNNI; the portable one with
//! `BENCH_PORTABLE=1`) side by side. Threads: `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS`.

use candle_core::{Device, Tensor};
use rpt_flow::model::quant::act_fake_quant;
use rpt_flow::model::ternary_kernel::{self as kernel, OutScale, PackedTernary, QuantRows};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> anyhow::Result<()> {
    // As the shipped binary runs a stage: freed memory kept, on a pool worker (exec::threads).
    rpt_flow::exec::memory::keep_freed_memory();
    rpt_flow::exec::threads::on_pool_worker(bench)
}

fn bench() -> anyhow::Result<()> {
    let reps = std::env::var("BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let shapes: &[(&str, usize, usize, usize)] = &[
        ("mid q/o", 1024, 512, 512),
        ("mid gate/up", 1024, 1376, 512),
        ("mid down", 1024, 512, 1376),
        ("2B q/o", 512, 2560, 2560),
        ("2B gate/up", 512, 6912, 2560),
        ("2B down", 512, 2560, 6912),
        ("2B gate/up, 1 token", 1, 6912, 2560),
    ];
    // The portable loop (the fallback without AVX2) is ~10x slower: only with BENCH_PORTABLE=1.
    let portable = std::env::var("BENCH_PORTABLE").is_ok_and(|v| v == "1");
    let isas: Vec<_> = kernel::available_isas()
        .into_iter()
        .filter(|&i| portable || i != kernel::Isa::Portable || kernel::best_isa() == kernel::Isa::Portable)
        .collect();
    println!("inner loops: {isas:?} (best {:?}); threads {}", kernel::best_isa(), rayon::current_num_threads());
    let isa_cols: String = isas.iter().map(|i| format!(" {i:?} (ms) | GMAC/s |")).collect();
    println!("| shape | m × out × k |{isa_cols} of which quantise (ms) | f32 matmul (ms) | GMAC/s | best vs f32 |");
    println!("|---|---|{}---:|---:|---:|---:|", "---:|---:|".repeat(isas.len()));
    for &(name, m, out, k) in shapes {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let tv: Vec<f32> = (0..out * k).map(|i| ((i * 2654435761usize) >> 7) % 3).map(|c| c as f32 - 1.0).collect();
        let t = Tensor::from_vec(tv.clone(), (out, k), &dev)?;
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let w = PackedTernary::pack(&tv, out, k, OutScale::DivBy(2.0))?;
        let gmac = (m * out * k) as f64 / 1e9;
        let mut cols = String::new();
        let mut best = f64::INFINITY;
        for &isa in &isas {
            let tk = time(reps, || {
                let q = QuantRows::new_with(&xv, m, k, isa);
                std::hint::black_box(kernel::matmul_with(&q, &w, isa));
            });
            best = best.min(tk);
            cols += &format!(" {:.2} | {:.1} |", tk * 1e3, gmac / tk);
        }
        let tq = time(reps, || {
            std::hint::black_box(QuantRows::new(&xv, m, k));
        });
        let tt = t.t()?;
        let tf = time(reps, || {
            let xq = act_fake_quant(&x).unwrap();
            std::hint::black_box(xq.matmul(&tt).unwrap());
        });
        println!(
            "| {name} | {m} × {out} × {k} |{cols} {:.2} | {:.2} | {:.1} | {:.2}× |",
            tq * 1e3,
            tf * 1e3,
            gmac / tf,
            tf / best
        );
    }
    Ok(())
}
