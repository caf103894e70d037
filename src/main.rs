fn main() -> std::process::ExitCode {
    rpt_flow::cli::main(rpt_flow::stages::registry())
}
