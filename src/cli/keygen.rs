//! `imgbuild keygen`: the key pair that signs provenance and checksum
//! files.

use super::{EXIT_OK, EXIT_USAGE, GlobalOptions};
use crate::attest::keys::{self, PASSWORD_ENV};
use crate::ui::OutputFormat;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct KeygenArgs {
    /// Where to write imgbuild.key and imgbuild.pub (created if missing)
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// Encrypt the secret key with a password asked on the terminal
    /// (IMGBUILD_SIGNING_KEY_PASSWORD, when set, is used instead, and
    /// always encrypts)
    #[arg(long)]
    encrypt: bool,
}

pub fn run(args: KeygenArgs, global: &GlobalOptions) -> i32 {
    let password = match std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()) {
        Some(password) => Some(password),
        None if args.encrypt => match ask_password() {
            Ok(password) => Some(password),
            Err(message) => {
                eprintln!("error: {message}");
                return EXIT_USAGE;
            }
        },
        None => None,
    };
    match keys::generate(&args.out, password) {
        Ok(generated) => {
            match global.output {
                OutputFormat::Json => super::print_result(
                    &serde_json::json!({
                        "event": "key_generated",
                        "key_id": generated.key_id,
                        "secret_key": generated.secret,
                        "public_key": generated.public,
                        "encrypted": generated.encrypted,
                    })
                    .to_string(),
                ),
                OutputFormat::Human => super::print_result(&format!(
                    "key {} written: {} (secret{}, mode 0600; keep it out of the repository) and {} (public, for `imgbuild verify --key` and `minisign -V -p`)",
                    generated.key_id,
                    generated.secret.display(),
                    if generated.encrypted {
                        ", encrypted"
                    } else {
                        ", not encrypted"
                    },
                    generated.public.display()
                )),
            }
            EXIT_OK
        }
        Err(err) => {
            eprintln!("error: {err}");
            EXIT_USAGE
        }
    }
}

fn ask_password() -> Result<String, String> {
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(format!(
            "--encrypt asks for a password on the terminal, and there is none: set {PASSWORD_ENV}"
        ));
    }
    let first = rpassword::prompt_password("Password for the new key: ")
        .map_err(|err| format!("cannot read the password: {err}"))?;
    if first.is_empty() {
        return Err("an empty password encrypts nothing: leave out --encrypt instead".into());
    }
    let second = rpassword::prompt_password("The same password again: ")
        .map_err(|err| format!("cannot read the password: {err}"))?;
    if first != second {
        return Err("the two passwords differ; nothing was written".into());
    }
    Ok(first)
}
