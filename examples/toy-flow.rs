//! The rpt-flow CLI with toy stage kinds instead of the model stages: the engine's test harness.
//! `cargo run --example toy-flow -- run tests/pipelines/chain.toml` runs an engine-only pipeline.

#[path = "../tests/support/toy_stages.rs"]
mod toy_stages;

fn main() -> std::process::ExitCode {
    rpt_flow::cli::main(toy_stages::registry())
}
