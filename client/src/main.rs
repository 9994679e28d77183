//! `messenger`: the reference end-to-end client of the Secure Messenger API.

use clap::{Parser, Subcommand};
use messenger_client::app::{App, HELP_FOOTER, Output, escape_controls, json_line};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "messenger",
    version,
    about = "End-to-end encrypted messages through the Secure Messenger API",
    long_about = "End-to-end encrypted messages through the Secure Messenger API. Messages are \
        sealed on this machine with HPKE (RFC 9180, auth mode, X25519, ChaCha20Poly1305) to the \
        recipient's key, which is pinned on first use; the server only relays ciphertext.",
    after_help = HELP_FOOTER,
    after_long_help = HELP_FOOTER,
)]
struct Cli {
    /// The API's base URL [default: the one the profile registered with, else http://127.0.0.1:9000]
    #[arg(long, env = "MESSENGER_API", global = true, value_name = "URL")]
    api: Option<String>,
    /// The profile (one account): a directory under $MESSENGER_HOME, else $XDG_CONFIG_HOME/messenger
    #[arg(
        long,
        env = "MESSENGER_PROFILE",
        global = true,
        default_value = "default",
        value_name = "NAME"
    )]
    profile: String,
    /// Print one JSON object as the result (for scripts) instead of text
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an X25519 key pair and register NAME with its public key
    Register { name: String },
    /// Log in again (tokens are also renewed by themselves when they expire)
    Login,
    /// Show this profile's account and its key fingerprint
    Whoami,
    /// Seal TEXT for NAME and send it (TEXT `-` reads standard input)
    Send { name: String, text: String },
    /// Fetch, open and show new messages, then confirm their delivery
    Inbox {
        /// Messages per page (1 to 500)
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Keep polling, every SECONDS
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        follow: Option<u64>,
    },
    /// List pinned contacts and their key fingerprints
    Contacts,
    /// Accept the changed key shown for NAME (by send, inbox or contacts), after checking its
    /// fingerprint with them
    Trust {
        name: String,
        /// Accept the key with this fingerprint (spaces allowed): the one shown, or the directory's
        /// if it has this fingerprint
        #[arg(long, value_name = "HEX")]
        fingerprint: Option<String>,
    },
    /// Make a new key pair and publish it; the old private key is kept for messages in flight
    RotateKey,
    /// Show a one-time code that links a new device to this account (run `join` on the new one)
    Link,
    /// On a new device: join the account NAME with the CODE that `link` showed on another
    Join {
        name: String,
        code: String,
        /// How the account's device list names this device [default: messenger on HOSTNAME]
        #[arg(long)]
        label: Option<String>,
    },
    /// List this account's devices and their key fingerprints
    Devices,
    /// Remove a device of this account (its tokens stop working, its undelivered messages are erased)
    RemoveDevice {
        device_id: u32,
        /// Removing this very device erases this profile: confirm it
        #[arg(long)]
        yes: bool,
    },
    /// Delete the account and every message to or from it, then erase this profile
    DeleteAccount {
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Output { json: cli.json };
    let result =
        App::new(&cli.profile, cli.api.as_deref(), out).and_then(|app| match &cli.command {
            Command::Register { name } => app.register(name),
            Command::Login => app.login(),
            Command::Whoami => app.whoami(),
            Command::Send { name, text } => app.send(name, text),
            Command::Inbox { limit, follow } => {
                app.inbox(*limit, follow.map(|s| Duration::from_secs(s.max(1))))
            }
            Command::Contacts => app.contacts(),
            Command::Trust { name, fingerprint } => app.trust(name, fingerprint.as_deref()),
            Command::RotateKey => app.rotate_key(),
            Command::Link => app.link(),
            Command::Join { name, code, label } => app.join(name, code, label.as_deref()),
            Command::Devices => app.devices(),
            Command::RemoveDevice { device_id, yes } => app.remove_device(*device_id, *yes),
            Command::DeleteAccount { yes } => app.delete_account(*yes),
        });
    match result {
        Ok(value) => {
            if cli.json {
                println!("{}", json_line(&value));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if cli.json {
                println!(
                    "{}",
                    json_line(
                        &serde_json::json!({"error": e.to_string(), "exit_code": e.exit_code()})
                    )
                );
            }
            eprintln!("messenger: {}", escape_controls(&e.to_string()));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
