//! `rpt-flow completions SHELL`: a completion script for the shell, generated from the same
//! command definitions as `--help` (subcommands, options and their fixed values).

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{Cli, CliResult};

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    pub shell: Shell,
}

pub fn run(args: &CompletionsArgs) -> CliResult {
    let mut command = Cli::command();
    let name = command.get_name().to_string();
    clap_complete::generate(args.shell, &mut command, name, &mut std::io::stdout());
    Ok(())
}
