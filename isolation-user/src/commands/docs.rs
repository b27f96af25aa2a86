//! `completions SHELL` and the hidden `man DIR`: the shell completion scripts and the
//! manual pages, generated from the command line (`Cli::command()`, handed in).

use crate::state;

/// The shells `completions` writes for.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// The completion script of `shell` for this command line.
pub fn completions(mut cli: clap::Command, shell: Shell, out: &mut dyn std::io::Write) {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cli, "isolation-user", out);
}

/// The man pages: isolation-user(8) and one per verb (isolation-user-load(8), …).
pub fn man(cli: clap::Command, dir: &std::path::Path) -> anyhow::Result<()> {
    fn one(cmd: clap::Command, dir: &std::path::Path, n: &mut usize) -> anyhow::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            one(sub, dir, n)?;
        }
        let man = clap_mangen::Man::new(cmd).section("8");
        let mut page = Vec::new();
        man.render(&mut page)?;
        // A new file renamed into place: a link planted at a page's name in DIR is
        // replaced, never written through.
        state::write_atomic_mode(&dir.join(man.get_filename()), &page, 0o644)?;
        *n += 1;
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = cli.disable_help_subcommand(true);
    cmd.build();
    let mut n = 0;
    one(cmd, dir, &mut n)?;
    println!(
        "isolation-user: {n} manual pages written to {}",
        dir.display()
    );
    Ok(())
}
