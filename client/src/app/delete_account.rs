//! `delete-account`: erase the account and this profile.

use super::*;

impl App {
    pub fn delete_account(&self, yes: bool) -> Result<Value, Error> {
        let lock = self.profile.lock()?;
        let acct = self.account()?;
        if !yes {
            if !std::io::stdin().is_terminal() {
                return Err(Error::Usage(
                    "delete-account erases the account and every message: pass --yes".into(),
                ));
            }
            eprint!(
                "This erases {} and every message to or from it. Type the name to confirm: ",
                escape_controls(&acct.name)
            );
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| Error::Other(e.to_string()))?;
            if line.trim() != acct.name {
                return Err(Error::Usage("not confirmed; nothing was deleted".into()));
            }
        }
        let pw = self.password(
            &escape_controls(&format!("Password for {}: ", acct.name)),
            false,
        )?;
        self.authed("deleting the account", |api, t| api.delete_me(t, &pw))?;
        let name = self.profile.name.clone();
        let dir = self.profile.dir.display().to_string();
        Profile::at(
            self.profile.dir.parent().expect("a profile has a parent"),
            &name,
        )?
        .erase(lock)?;
        self.out.say(&format!(
            "deleted the account {}; erased the profile {name} ({dir})",
            acct.name
        ));
        Ok(json!({"deleted": acct.name, "id": acct.user_id, "profile": name}))
    }
}
