//! `RPT_KERNEL_ISA` from the command line: a lesser ternary-kernel loop gives the same perplexity
//! to the bit (every loop sums the same integers), and a loop this CPU does not run fails the
//! stage with what it does run.

use crate::support::{Run, Sandbox};

const PIPELINE: &str = "[pipeline]\nname = \"k\"\n\
    [stages.m]\nkind = \"load\"\nmodel = \"builtin:tiny-bitnet\"\ndtype = \"f32\"\n\
    [stages.ppl]\nkind = \"eval-ppl\"\ninput = \"m\"\ndata = \"synthetic:facts:test\"\nseq_len = 64\nmax_windows = 4\n";

/// Runs the pipeline in a fresh sandbox with `RPT_KERNEL_ISA` set to `isa` (unset for `None`).
fn run(isa: Option<&str>) -> (Sandbox, Run) {
    let sb = Sandbox::real();
    let p = sb.write("k.toml", PIPELINE);
    let mut c = sb.cmd(&["run", p.to_str().unwrap(), "-q"]);
    match isa {
        Some(isa) => c.env("RPT_KERNEL_ISA", isa),
        None => c.env_remove("RPT_KERNEL_ISA"),
    };
    let out = Run(c.output().expect("rpt-flow runs"));
    (sb, out)
}

fn ppl_bits(sb: &Sandbox) -> u64 {
    sb.session("k.json")["stages"]["ppl"]["metrics"]["ppl"].as_f64().expect("a perplexity").to_bits()
}

#[test]
fn a_lesser_kernel_loop_gives_the_same_perplexity_and_an_unknown_one_fails_clearly() {
    let (best, out) = run(None);
    out.expect(0);
    let (portable, out) = run(Some("portable"));
    out.expect(0);
    assert_eq!(ppl_bits(&portable), ppl_bits(&best), "the portable loop and the best one differ");

    let (_, out) = run(Some("sse9"));
    assert_ne!(out.code(), 0, "an unknown loop must fail the run");
    let text = format!("{}{}", out.stdout(), out.stderr());
    assert!(
        text.contains("RPT_KERNEL_ISA=sse9") && text.contains("portable") && text.contains("unset the variable"),
        "the error names the setting, the loops this CPU runs and the fix:\n{text}"
    );
    assert!(!text.contains("panicked"), "loading the model reports it as an error, not a panic:\n{text}");
}
