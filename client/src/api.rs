//! The HTTP contract of `shared/API.md`, one blocking call per endpoint (ureq, rustls with ring).
//! Nothing here retries or logs: the caller decides (see `app`).

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::time::Duration;
use ureq::http::Response;
use uuid::Uuid;

/// A failed call. Never holds a password, a token or ciphertext: the server's own `message` is
/// by contract free of them, and transport errors name only the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the API ({reason})")]
    Transport { reason: String, timeout: bool },
    #[error("the API answered {status} {code}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("unexpected answer from the API (HTTP {status}): {reason}")]
    Decode { status: u16, reason: String },
    /// 409 `devices_changed` from `POST /messages/devices`: the recipient's devices as they are.
    #[error(
        "the API answered 409 devices_changed: the recipient's devices are not the ones sealed for"
    )]
    DevicesChanged(DevicesChanged),
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } | ApiError::Decode { status, .. } => Some(*status),
            ApiError::DevicesChanged(_) => Some(409),
            ApiError::Transport { .. } => None,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Status { code, .. } => Some(code),
            ApiError::DevicesChanged(_) => Some("devices_changed"),
            _ => None,
        }
    }

    /// A failure after which the same request may be sent again unchanged: no answer at all
    /// (timeout, reset), or a server-side 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Transport { .. } => true,
            ApiError::Status { status, .. } | ApiError::Decode { status, .. } => *status >= 500,
            ApiError::DevicesChanged(_) => false,
        }
    }
}

#[derive(Deserialize)]
pub struct Token {
    pub access_token: String,
    pub expires_in: u64,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(.., expires_in: {})", self.expires_in)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Account {
    pub id: Uuid,
    pub name: String,
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub key_updated_at: Option<DateTime<Utc>>,
}

/// `GET /users?name=` and `GET /public-key/{id}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Directory {
    pub user_id: Uuid,
    pub name: String,
    pub public_key: String,
    #[serde(default)]
    pub key_updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Message {
    pub id: Uuid,
    pub sender_id: Uuid,
    /// Absent on a server without devices: device 1, the account's key.
    #[serde(default = "device_one")]
    pub sender_device_id: u32,
    pub recipient_id: Uuid,
    #[serde(default = "device_one")]
    pub recipient_device_id: u32,
    pub encrypted_data: String,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

fn device_one() -> u32 {
    1
}

/// `POST /devices/link-codes`.
#[derive(Deserialize)]
pub struct LinkCode {
    pub code: String,
    pub expires_at: DateTime<Utc>,
}

impl fmt::Debug for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LinkCode(.., expires_at: {})", self.expires_at)
    }
}

/// `POST /devices`.
#[derive(Debug, Clone, Deserialize)]
pub struct LinkedDevice {
    pub device_id: u32,
    pub label: String,
    pub public_key: String,
    pub created_at: DateTime<Utc>,
}

/// One of our own devices (`GET /me/devices`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OwnDevice {
    pub device_id: u32,
    pub label: String,
    pub public_key: String,
    pub key_fingerprint: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub key_updated_at: Option<DateTime<Utc>>,
    pub current: bool,
}

#[derive(Debug, Deserialize)]
pub struct OwnDevices {
    pub devices: Vec<OwnDevice>,
}

/// A device as the directory lists it (`GET /users/{id}/devices`, and `devices_changed`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct DirectoryDevice {
    pub device_id: u32,
    pub public_key: String,
    pub key_fingerprint: String,
    #[serde(default)]
    pub key_updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct UserDevices {
    pub user_id: Uuid,
    pub devices: Vec<DirectoryDevice>,
}

/// The body of 409 `devices_changed`.
#[derive(Debug, Clone, Deserialize)]
pub struct DevicesChanged {
    #[serde(default)]
    pub missing: Vec<u32>,
    #[serde(default)]
    pub extra: Vec<u32>,
    #[serde(default)]
    pub stale: Vec<u32>,
    pub devices: Vec<DirectoryDevice>,
}

/// One envelope of `POST /messages/devices`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceEnvelope {
    pub device_id: u32,
    pub key_fingerprint: String,
    pub encrypted_data: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SentToDevice {
    pub device_id: u32,
    pub id: Uuid,
}

/// `POST /messages/devices`.
#[derive(Debug, Clone, Deserialize)]
pub struct SentToDevices {
    pub recipient_id: Uuid,
    pub timestamp: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub messages: Vec<SentToDevice>,
    #[serde(skip)]
    pub replayed: bool,
}

/// One device of `GET /keys/{user_id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceKey {
    pub device_id: u32,
    pub public_key: String,
    pub key_fingerprint: String,
    #[serde(default)]
    pub signing_key: Option<String>,
    #[serde(default)]
    pub binding_sig: Option<String>,
    #[serde(default)]
    pub signing_key_reset: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DeviceKeys {
    pub user_id: Uuid,
    pub devices: Vec<DeviceKey>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClaimedDevice {
    pub device_id: u32,
    pub prekey: Option<crate::olm::ClaimedPrekey>,
}

/// `POST /keys/claim`.
#[derive(Debug, Clone, Deserialize)]
pub struct Claimed {
    pub user_id: Uuid,
    pub devices: Vec<ClaimedDevice>,
}

#[derive(Debug, Deserialize)]
pub struct Page {
    pub messages: Vec<Message>,
    pub has_more: bool,
}

#[derive(Debug, Deserialize)]
pub struct Confirmed {
    pub confirmed: u64,
    #[serde(default)]
    pub not_found: Vec<Uuid>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: String,
}

/// A client of one API base URL.
#[derive(Clone)]
pub struct Api {
    agent: ureq::Agent,
    base: String,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Api({})", self.base)
    }
}

/// Per-call budgets: a connection is made quickly or not at all, and no call hangs forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Api {
    pub fn new(base: &str) -> Self {
        Self::with_timeout(base, CALL_TIMEOUT)
    }

    pub fn with_timeout(base: &str, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
            .timeout_global(Some(timeout))
            .user_agent(concat!("messenger/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Api {
            agent,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn register(
        &self,
        name: &str,
        password: &str,
        public_key: &str,
    ) -> Result<Account, ApiError> {
        let body =
            serde_json::json!({"name": name, "password": password, "public_key": public_key});
        let resp = self
            .agent
            .post(self.url("/register"))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 201)
    }

    /// `POST /login` as `device_id` (device 1 is sent as the contract's default: no field).
    pub fn login(&self, name: &str, password: &str, device_id: u32) -> Result<Token, ApiError> {
        let mut body = serde_json::json!({"name": name, "password": password});
        if device_id != 1 {
            body["device_id"] = device_id.into();
        }
        let resp = self
            .agent
            .post(self.url("/login"))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 200)
    }

    pub fn me(&self, token: &str) -> Result<Account, ApiError> {
        let resp = self
            .agent
            .get(self.url("/me"))
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    pub fn delete_me(&self, token: &str, password: &str) -> Result<(), ApiError> {
        let body = serde_json::json!({"password": password});
        let resp = self
            .agent
            .delete(self.url("/me"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .force_send_body()
            .send(body.to_string());
        expect_empty(resp, 204)
    }

    pub fn lookup_user(&self, token: &str, name: &str) -> Result<Directory, ApiError> {
        let resp = self
            .agent
            .get(self.url("/users"))
            .query("name", name)
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    pub fn public_key(&self, token: &str, user_id: Uuid) -> Result<Directory, ApiError> {
        let resp = self
            .agent
            .get(self.url(&format!("/public-key/{user_id}")))
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    pub fn update_key(&self, token: &str, public_key: &str) -> Result<Account, ApiError> {
        let body = serde_json::json!({"public_key": public_key});
        let resp = self
            .agent
            .put(self.url("/update-key"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 200)
    }

    /// `POST /messages/devices` with `Idempotency-Key`; one attempt. A 409 `devices_changed` is
    /// [`ApiError::DevicesChanged`], with the recipient's current devices.
    pub fn send_to_devices(
        &self,
        token: &str,
        recipient_id: Uuid,
        envelopes: &[DeviceEnvelope],
        idempotency_key: &str,
    ) -> Result<SentToDevices, ApiError> {
        let body = serde_json::json!({"recipient_id": recipient_id, "envelopes": envelopes});
        let resp = self
            .agent
            .post(self.url("/messages/devices"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", idempotency_key)
            .send(body.to_string());
        let mut replayed = false;
        let resp = resp.inspect(|r| {
            replayed = r
                .headers()
                .get("idempotent-replayed")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        });
        let mut sent: SentToDevices = expect(resp, 201)?;
        sent.replayed = replayed;
        Ok(sent)
    }

    /// `POST /devices/link-codes`.
    pub fn create_link_code(&self, token: &str) -> Result<LinkCode, ApiError> {
        let resp = self
            .agent
            .post(self.url("/devices/link-codes"))
            .header("Authorization", bearer(token))
            .send_empty();
        expect(resp, 201)
    }

    /// `POST /devices`: no token; the code and the password prove the new device.
    pub fn link_device(
        &self,
        name: &str,
        password: &str,
        link_code: &str,
        public_key: &str,
        label: &str,
    ) -> Result<LinkedDevice, ApiError> {
        let body = serde_json::json!({"name": name, "password": password, "link_code": link_code,
            "public_key": public_key, "label": label});
        let resp = self
            .agent
            .post(self.url("/devices"))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 201)
    }

    pub fn my_devices(&self, token: &str) -> Result<OwnDevices, ApiError> {
        let resp = self
            .agent
            .get(self.url("/me/devices"))
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    pub fn user_devices(&self, token: &str, user_id: Uuid) -> Result<UserDevices, ApiError> {
        let resp = self
            .agent
            .get(self.url(&format!("/users/{user_id}/devices")))
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    pub fn remove_device(
        &self,
        token: &str,
        device_id: u32,
        password: &str,
    ) -> Result<(), ApiError> {
        let body = serde_json::json!({"password": password});
        let resp = self
            .agent
            .delete(self.url(&format!("/devices/{device_id}")))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .force_send_body()
            .send(body.to_string());
        expect_empty(resp, 204)
    }

    /// `PUT /keys/signing-key` (the body: `olm::SigningKeyUpload`).
    pub fn set_signing_key(&self, token: &str, body: &impl Serialize) -> Result<Value, ApiError> {
        let resp = self
            .agent
            .put(self.url("/keys/signing-key"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .send(serde_json::to_string(body).expect("a JSON body"));
        expect(resp, 200)
    }

    /// `POST /keys/prekeys` (the body: `olm::PrekeyUpload`).
    pub fn upload_prekeys(
        &self,
        token: &str,
        body: &impl Serialize,
    ) -> Result<crate::olm::PrekeyCount, ApiError> {
        let resp = self
            .agent
            .post(self.url("/keys/prekeys"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .send(serde_json::to_string(body).expect("a JSON body"));
        expect(resp, 200)
    }

    pub fn prekey_count(&self, token: &str) -> Result<crate::olm::PrekeyCount, ApiError> {
        let resp = self
            .agent
            .get(self.url("/keys/prekeys/count"))
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    /// `GET /keys/{user_id}`: every device's keys, nothing used up.
    pub fn device_keys(&self, token: &str, user_id: Uuid) -> Result<DeviceKeys, ApiError> {
        let resp = self
            .agent
            .get(self.url(&format!("/keys/{user_id}")))
            .header("Authorization", bearer(token))
            .call();
        expect(resp, 200)
    }

    /// `POST /keys/claim` for `device_ids` of `user_id`.
    pub fn claim_prekeys(
        &self,
        token: &str,
        user_id: Uuid,
        device_ids: &[u32],
    ) -> Result<Claimed, ApiError> {
        let body = serde_json::json!({"user_id": user_id, "device_ids": device_ids});
        let resp = self
            .agent
            .post(self.url("/keys/claim"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 200)
    }

    pub fn messages(&self, token: &str, after: Option<Uuid>, limit: u32) -> Result<Page, ApiError> {
        let mut req = self
            .agent
            .get(self.url("/messages"))
            .query("limit", limit.to_string())
            .header("Authorization", bearer(token));
        if let Some(after) = after {
            req = req.query("after", after.to_string());
        }
        expect(req.call(), 200)
    }

    /// `POST /messages/delivered`: many confirmations in one round trip.
    pub fn confirm_many(&self, token: &str, ids: &[Uuid]) -> Result<Confirmed, ApiError> {
        let body = serde_json::json!({"ids": ids});
        let resp = self
            .agent
            .post(self.url("/messages/delivered"))
            .header("Authorization", bearer(token))
            .header("Content-Type", "application/json")
            .send(body.to_string());
        expect(resp, 200)
    }

    /// `PUT /messages/{id}/delivered`.
    pub fn confirm_one(&self, token: &str, id: Uuid) -> Result<(), ApiError> {
        let resp = self
            .agent
            .put(self.url(&format!("/messages/{id}/delivered")))
            .header("Authorization", bearer(token))
            .send_empty();
        expect_empty(resp, 204)
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn transport(e: ureq::Error) -> ApiError {
    let timeout = matches!(e, ureq::Error::Timeout(_));
    ApiError::Transport {
        reason: e.to_string(),
        timeout,
    }
}

fn read_body(resp: Response<ureq::Body>) -> Result<(u16, Option<u64>, Vec<u8>), ApiError> {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let body = resp
        .into_body()
        .with_config()
        .limit(16 * 1024 * 1024)
        .read_to_vec()
        .map_err(transport)?;
    Ok((status, retry_after, body))
}

fn error_from(status: u16, retry_after: Option<u64>, body: &[u8]) -> ApiError {
    if status == 409
        && serde_json::from_slice::<ErrorBody>(body).is_ok_and(|e| e.error == "devices_changed")
        && let Ok(changed) = serde_json::from_slice::<DevicesChanged>(body)
    {
        return ApiError::DevicesChanged(changed);
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ApiError::Status {
            status,
            code: e.error,
            message: e.message,
            retry_after,
        },
        Err(_) => ApiError::Status {
            status,
            code: "unknown".into(),
            message: "(no error body from the contract)".into(),
            retry_after,
        },
    }
}

fn expect<T: DeserializeOwned>(
    resp: Result<Response<ureq::Body>, ureq::Error>,
    want: u16,
) -> Result<T, ApiError> {
    let (status, retry_after, body) = read_body(resp.map_err(transport)?)?;
    if status != want {
        return Err(error_from(status, retry_after, &body));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::Decode {
        status,
        // Where, never what: serde's own message can quote a value (a token, say).
        reason: format!(
            "{:?} error in its JSON at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ),
    })
}

fn expect_empty(
    resp: Result<Response<ureq::Body>, ureq::Error>,
    want: u16,
) -> Result<(), ApiError> {
    let (status, retry_after, body) = read_body(resp.map_err(transport)?)?;
    if status != want {
        return Err(error_from(status, retry_after, &body));
    }
    Ok(())
}
