//! The user views the account endpoints return.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// GET /me and PUT /update-key.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Profile {
    pub id: Uuid,
    pub name: String,
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    pub key_updated_at: DateTime<Utc>,
}

/// GET /public-key/{user_id} and GET /users?name=.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct PublicKeyEntry {
    pub user_id: Uuid,
    pub name: String,
    pub public_key: String,
    pub key_updated_at: DateTime<Utc>,
}
