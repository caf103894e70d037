fn main() -> std::process::ExitCode {
    rpt_flow::exec::memory::keep_freed_memory();
    rpt_flow::cli::main(rpt_flow::stages::registry())
}
