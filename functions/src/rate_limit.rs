//! Attempt counters shared by every Lambda instance, in PostgreSQL: one row per bucket and key
//! over a fixed window that starts at the first attempt. Each attempt is counted by an atomic
//! upsert in the same statement that checks the limit, before the work it limits, so however
//! many attempts arrive at once no more than the limit get through. The purge deletes windows
//! that have ended.

/// Every counter kind; the migration's CHECK on `rate_limits.bucket` lists the same names (a
/// test holds the two together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Failed logins for one name from one address (`LOGIN_MAX_FAILURES`).
    LoginNameAddress,
    /// Failed logins for one name from every address (`LOGIN_MAX_FAILURES_PER_NAME`).
    LoginName,
    /// Failed logins from one address for every name (`LOGIN_MAX_FAILURES_PER_ADDRESS`).
    LoginAddress,
    /// Registrations from one address (`REGISTER_MAX_PER_ADDRESS`).
    RegisterAddress,
    /// Messages from one sender (`SEND_MAX_PER_WINDOW`); counted inside `send_envelopes()`.
    SendSender,
    /// Link codes one account created (`LINK_CODES_MAX_PER_WINDOW`), keyed by user id.
    LinkCodeAccount,
    /// Wrong link codes for one account (`LINK_MAX_FAILURES`), keyed by user id.
    LinkFailureAccount,
    /// Devices' prekeys one requester claimed (`PREKEY_CLAIMS_PER_WINDOW`), keyed by user id.
    PrekeyClaimRequester,
    /// One-time prekeys of one device handed out (`PREKEY_CLAIMS_PER_TARGET`), keyed by
    /// `user id/device id`.
    PrekeyClaimTarget,
}

impl Bucket {
    pub const ALL: [Bucket; 9] = [
        Self::LoginNameAddress,
        Self::LoginName,
        Self::LoginAddress,
        Self::RegisterAddress,
        Self::SendSender,
        Self::LinkCodeAccount,
        Self::LinkFailureAccount,
        Self::PrekeyClaimRequester,
        Self::PrekeyClaimTarget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoginNameAddress => "login_name_address",
            Self::LoginName => "login_name",
            Self::LoginAddress => "login_address",
            Self::RegisterAddress => "register_address",
            Self::SendSender => "send_sender",
            Self::LinkCodeAccount => "link_code_account",
            Self::LinkFailureAccount => "link_failure_account",
            Self::PrekeyClaimRequester => "prekey_claim_requester",
            Self::PrekeyClaimTarget => "prekey_claim_target",
        }
    }
}

// sql/record_attempt.sql is the upsert that counts one attempt per row of a CTE named
// `attempt_keys(bucket, key)`, with the window in `$3`. register.rs and create_link_code.rs
// compose it as `attempt AS (...)` with `concat!(..., include_str!(...), ...)`, which takes
// literals only, so there is no constant of it here. The three login counters are counted, and
// their keys made, by `count_login_attempt()` (migrations/20261204000009).
