//! Signing keys and prekeys (API.md "Prekeys"): PUT /keys/signing-key, POST /keys/prekeys,
//! GET /keys/prekeys/count, GET /keys/{user_id}, POST /keys/claim, and PUT /update-key's
//! `binding_sig`; the rules and errors of each, and the promises that only show under
//! concurrency (a one-time key handed out once, the per-target and per-requester limits, uploads
//! against key changes), each on many Lambda instances at once.

use std::collections::HashSet;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer, SigningKey as Secret};
use functions::signatures::{
    Context, Signature, SigningKey, ed25519_pem, signed_message, x25519_pem,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::support::{PASSWORD, RequestBuilder, TestApp, TestResponse, until_waiting_on_locks};

/// A device of a test account: its ids, a token for it, its X25519 key's raw bytes.
#[derive(Clone)]
pub(crate) struct Device {
    pub name: String,
    pub user_id: Uuid,
    pub device_id: i32,
    pub token: String,
    pub x25519: [u8; 32],
}

/// A device's X25519 key, from a seed: hash output is never one of the few small-order points
/// (checked, to be sure).
pub(crate) fn x25519_raw(seed: &str) -> [u8; 32] {
    let raw: [u8; 32] = Sha256::digest(seed.as_bytes()).into();
    assert!(!common::domain::is_small_order_x25519(&raw));
    raw
}

pub(crate) fn secret(seed: u8) -> Secret {
    Secret::from_bytes(&[seed; 32])
}

fn pem(secret: &Secret) -> String {
    ed25519_pem(secret.verifying_key().as_bytes())
}

fn sign(secret: &Secret, context: Context, device: &Device, fields: &[&[u8]]) -> String {
    let message = signed_message(context, device.user_id, device.device_id, fields);
    BASE64.encode(secret.sign(&message).to_bytes())
}

/// `PUT /keys/signing-key` for `new`, bound to `device`'s key.
pub(crate) fn signing_key_body(device: &Device, new: &Secret) -> Value {
    json!({
        "signing_key": pem(new),
        "binding_sig": sign(new, Context::Bind, device, &[&device.x25519, new.verifying_key().as_bytes()]),
    })
}

/// The prekey of key id `key_id` (any 32 bytes but a small-order point will do).
fn prekey_bytes(key_id: u32) -> [u8; 32] {
    let raw: [u8; 32] = Sha256::digest(key_id.to_be_bytes()).into();
    assert!(!common::domain::is_small_order_x25519(&raw));
    raw
}

fn prekey(secret: &Secret, device: &Device, key_id: u32, context: Context) -> Value {
    let public_key = prekey_bytes(key_id);
    json!({
        "key_id": key_id,
        "public_key": BASE64.encode(public_key),
        "signature": sign(secret, context, device, &[&key_id.to_be_bytes(), &public_key]),
    })
}

fn prekeys(secret: &Secret, device: &Device, ids: impl IntoIterator<Item = u32>) -> Vec<Value> {
    ids.into_iter()
        .map(|id| prekey(secret, device, id, Context::Prekey))
        .collect()
}

/// Registers `name` with an X25519 key and logs device 1 in.
pub(crate) async fn x25519_user(app: &TestApp, name: &str) -> Device {
    let x25519 = x25519_raw(name);
    let r = app
        .request("POST", "/register")
        .json(json!({"name": name, "password": PASSWORD, "public_key": x25519_pem(&x25519)}))
        .send()
        .await;
    assert_eq!(r.status, 201, "register {name}: {}", r.body);
    let user_id = r.body["id"].as_str().unwrap().parse().unwrap();
    Device {
        name: name.to_string(),
        user_id,
        device_id: 1,
        token: app.login(name).await,
        x25519,
    }
}

/// Device 2 of `user`'s account, made directly in the database (linking is another module's),
/// with this X25519 key, logged in.
pub(crate) async fn add_device(app: &TestApp, user: &Device, x25519: [u8; 32]) -> Device {
    sqlx::query(
        "INSERT INTO devices (user_id, device_id, label, public_key) VALUES ($1, 2, 'second', $2)",
    )
    .bind(user.user_id)
    .bind(x25519_pem(&x25519))
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE users SET next_device_id = 3, device_count = 2 WHERE id = $1")
        .bind(user.user_id)
        .execute(&app.pool)
        .await
        .unwrap();
    let r = app
        .request("POST", "/login")
        .json(json!({"name": user.name, "password": PASSWORD, "device_id": 2}))
        .send()
        .await;
    assert_eq!(r.status, 200, "login device 2: {}", r.body);
    Device {
        device_id: 2,
        token: r.body["access_token"].as_str().unwrap().to_string(),
        x25519,
        ..user.clone()
    }
}

pub(crate) fn signing_key_request<'a>(
    app: &'a TestApp,
    device: &Device,
    body: Value,
) -> RequestBuilder<'a> {
    app.request("PUT", "/keys/signing-key")
        .bearer(&device.token)
        .json(body)
}

async fn put_signing_key(app: &TestApp, device: &Device, body: Value) -> TestResponse {
    signing_key_request(app, device, body).send().await
}

/// Sets `key` as the device's first signing key.
async fn set_signing_key(app: &TestApp, device: &Device, key: &Secret) {
    let r = put_signing_key(app, device, signing_key_body(device, key)).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

async fn upload(app: &TestApp, device: &Device, body: Value) -> TestResponse {
    app.request("POST", "/keys/prekeys")
        .bearer(&device.token)
        .json(body)
        .send()
        .await
}

/// Uploads these one-time key ids (and a last-resort key) signed by `key`; must succeed.
async fn upload_ok(
    app: &TestApp,
    device: &Device,
    key: &Secret,
    ids: impl IntoIterator<Item = u32>,
    last_resort: Option<u32>,
) -> Value {
    let mut body = json!({"prekeys": prekeys(key, device, ids)});
    if let Some(id) = last_resort {
        body["last_resort"] = prekey(key, device, id, Context::LastResort);
    }
    let r = upload(app, device, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

async fn count(app: &TestApp, device: &Device) -> Value {
    let r = app
        .request("GET", "/keys/prekeys/count")
        .bearer(&device.token)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

async fn claim(app: &TestApp, token: &str, body: Value) -> TestResponse {
    app.request("POST", "/keys/claim")
        .bearer(token)
        .json(body)
        .send()
        .await
}

async fn stored_signing_key(pool: &PgPool, device: &Device) -> Option<String> {
    sqlx::query_scalar("SELECT signing_key FROM devices WHERE user_id = $1 AND device_id = $2")
        .bind(device.user_id)
        .bind(device.device_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn update_key(app: &TestApp, device: &Device, body: Value) -> TestResponse {
    app.request("PUT", "/update-key")
        .bearer(&device.token)
        .json(body)
        .send()
        .await
}

/// Devices' keys `requester` claimed in this window, as its counter holds them.
async fn claims_counted(pool: &PgPool, requester: &Device) -> i32 {
    sqlx::query_scalar(
        "SELECT attempts FROM rate_limits WHERE bucket = 'prekey_claim_requester' AND key = $1",
    )
    .bind(requester.user_id.to_string())
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The instances of a race share the test's one thread, and a debug build verifies signatures
/// slowly: an instance may wait for the thread longer than the deployed 1.5 s to get its
/// connection, which is the test's doing, not the database's.
const SLOW_ACQUIRE: (&str, &str) = ("DB_ACQUIRE_TIMEOUT_MS", "30000");

/// Holds every write to `prekeys` back (a SHARE lock on the table) until `racers` sessions wait
/// on a lock, then lets them all go. The instances of a test share its one thread, which would
/// otherwise run them mostly one after another (a debug build verifies signatures slowly); the
/// gate makes them meet in the database, as Lambda instances do.
struct Gate(sqlx::Transaction<'static, sqlx::Postgres>);

impl Gate {
    async fn close(pool: &PgPool) -> Self {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("LOCK TABLE prekeys IN SHARE MODE")
            .execute(&mut *tx)
            .await
            .unwrap();
        Self(tx)
    }

    async fn open_when_waiting(self, pool: &PgPool, racers: usize) {
        until_waiting_on_locks(pool, racers, std::time::Duration::from_secs(30)).await;
        self.0.commit().await.unwrap();
    }
}

fn instances(pool: &PgPool, count: usize, vars: &[(&str, &str)]) -> Vec<Arc<TestApp>> {
    (0..count)
        .map(|_| Arc::new(TestApp::with_env(pool.clone(), vars)))
        .collect()
}

/// The one-time key ids and the number of last-resort answers among claim responses.
fn tally(claims: &[Value]) -> (Vec<u64>, usize) {
    let mut one_time = Vec::new();
    let mut last_resort = 0;
    for body in claims {
        for device in body["devices"].as_array().unwrap() {
            let prekey = &device["prekey"];
            if prekey["last_resort"] == json!(true) {
                last_resort += 1;
            } else {
                one_time.push(prekey["key_id"].as_u64().expect("a prekey"));
            }
        }
    }
    (one_time, last_resort)
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_signing_key_needs_an_x25519_device(pool: PgPool) {
    let app = TestApp::new(pool);
    // The harness registers with an Ed25519 key: not an X25519 device.
    let (id, token) = app.user("edward").await;
    let device = Device {
        name: "edward".into(),
        user_id: id.parse().unwrap(),
        device_id: 1,
        token,
        x25519: [9; 32],
    };
    let key = secret(1);
    put_signing_key(&app, &device, signing_key_body(&device, &key))
        .await
        .assert_error(409, "conflict");
    upload(&app, &device, json!({"prekeys": []}))
        .await
        .assert_error(409, "conflict");
    assert_eq!(
        count(&app, &device).await,
        json!({"available": 0, "lowest_key_id": null, "last_resort_key_id": null, "last_resort_claims": null})
    );
    let r = app
        .request("GET", &format!("/keys/{id}"))
        .bearer(&device.token)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let entry = &r.body["devices"][0];
    assert_eq!(
        (
            &entry["signing_key"],
            &entry["binding_sig"],
            &entry["signing_key_reset"],
            &entry["last_resort"]
        ),
        (&Value::Null, &Value::Null, &json!(false), &Value::Null)
    );

    // An X25519 device without a signing key cannot upload either.
    let alice = x25519_user(&app, "alice").await;
    upload(&app, &alice, json!({"prekeys": []}))
        .await
        .assert_error(409, "conflict");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn set_signing_key_proves_the_key_and_binds_it(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let alice = x25519_user(&app, "alice").await;
    let key = secret(1);
    let good = signing_key_body(&alice, &key);

    let without = |field: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    put_signing_key(&app, &alice, without("binding_sig"))
        .await
        .assert_error(422, "validation_failed");
    put_signing_key(&app, &alice, without("signing_key"))
        .await
        .assert_error(422, "validation_failed");
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    put_signing_key(&app, &alice, with("signing_key", json!(42)))
        .await
        .assert_error(400, "bad_request");
    // An X25519 key is no signing key.
    put_signing_key(
        &app,
        &alice,
        with("signing_key", json!(x25519_pem(&alice.x25519))),
    )
    .await
    .assert_error(422, "validation_failed");
    put_signing_key(
        &app,
        &alice,
        with("binding_sig", json!(BASE64.encode([0u8; 63]))),
    )
    .await
    .assert_error(422, "validation_failed");
    // Signatures that do not verify: by another key, over another device key, another context.
    let other = secret(2);
    let verifying_key = key.verifying_key();
    let fields: [&[u8]; 2] = [&alice.x25519, verifying_key.as_bytes()];
    for binding in [
        sign(&other, Context::Bind, &alice, &fields),
        sign(
            &key,
            Context::Bind,
            &alice,
            &[&x25519_raw("mallory"), key.verifying_key().as_bytes()],
        ),
        sign(&key, Context::Rotate, &alice, &fields),
    ] {
        let r = put_signing_key(&app, &alice, with("binding_sig", json!(binding))).await;
        r.assert_error(422, "invalid_signature");
        assert_eq!(r.body["field"], "binding_sig");
    }
    assert_eq!(
        stored_signing_key(&pool, &alice).await,
        None,
        "nothing stored"
    );

    // A PEM with other line endings and spaces around it is stored in its canonical form.
    let loose = format!("  {}  ", pem(&key).replace('\n', "\r\n"));
    let r = put_signing_key(&app, &alice, with("signing_key", json!(loose))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"device_id": 1, "signing_key": pem(&key), "signing_key_reset": false})
    );
    assert_eq!(stored_signing_key(&pool, &alice).await, Some(pem(&key)));
    let r = app
        .request("GET", &format!("/keys/{}", alice.user_id))
        .bearer(&alice.token)
        .send()
        .await;
    assert_eq!(r.body["devices"][0]["signing_key"], pem(&key));
    assert_eq!(r.body["devices"][0]["binding_sig"], good["binding_sig"]);

    // The same key again is a no-op: no rotation or password needed, the prekeys stay.
    upload_ok(&app, &alice, &key, [1, 2], Some(3)).await;
    let r = put_signing_key(&app, &alice, good.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["signing_key_reset"], false);
    let stock = count(&app, &alice).await;
    assert_eq!(
        (&stock["available"], &stock["last_resort_key_id"]),
        (&json!(2), &json!(3))
    );
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn replacing_a_signing_key_needs_the_old_key_or_the_password(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let alice = x25519_user(&app, "alice").await;
    let (k1, k2, k3) = (secret(1), secret(2), secret(3));
    set_signing_key(&app, &alice, &k1).await;
    upload_ok(&app, &alice, &k1, 1..=3, Some(4)).await;

    // Neither a rotation signature nor the password.
    let r = put_signing_key(&app, &alice, signing_key_body(&alice, &k2)).await;
    r.assert_error(422, "validation_failed");
    assert_eq!(r.body["field"], "rotation_sig");
    // Rotation signatures that do not verify: by the new key, or by the old one for another key.
    for rotation in [
        sign(
            &k2,
            Context::Rotate,
            &alice,
            &[k2.verifying_key().as_bytes()],
        ),
        sign(
            &k1,
            Context::Rotate,
            &alice,
            &[k3.verifying_key().as_bytes()],
        ),
        sign(&k1, Context::Bind, &alice, &[k2.verifying_key().as_bytes()]),
    ] {
        let mut body = signing_key_body(&alice, &k2);
        body["rotation_sig"] = json!(rotation);
        let r = put_signing_key(&app, &alice, body).await;
        r.assert_error(422, "invalid_signature");
        assert_eq!(r.body["field"], "rotation_sig");
    }
    // A wrong password: 401, counted as a failed login.
    let mut body = signing_key_body(&alice, &k2);
    body["password"] = json!("not the password");
    put_signing_key(&app, &alice, body)
        .await
        .assert_error(401, "invalid_credentials");
    let failures: i32 = sqlx::query_scalar(
        "SELECT attempts FROM rate_limits WHERE bucket = 'login_name' AND key = 'alice'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(failures, 1);
    assert_eq!(stored_signing_key(&pool, &alice).await, Some(pem(&k1)));
    assert_eq!(count(&app, &alice).await["available"], 3, "nothing changed");

    // The password: the key is replaced, marked reset, and the prekeys go.
    let mut body = signing_key_body(&alice, &k2);
    body["password"] = json!(PASSWORD);
    let r = put_signing_key(&app, &alice, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"device_id": 1, "signing_key": pem(&k2), "signing_key_reset": true})
    );
    // Its success gave its own count back, in the statement that set the key: the earlier
    // failure still counts against the name and the address, none against the two together.
    let counted: Vec<(String, i32)> = sqlx::query_as(
        "SELECT bucket, attempts FROM rate_limits WHERE bucket LIKE 'login%' ORDER BY bucket",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        counted,
        [
            ("login_address".to_string(), 1),
            ("login_name".to_string(), 1),
            ("login_name_address".to_string(), 0),
        ],
        "{counted:?}"
    );
    assert_eq!(
        count(&app, &alice).await,
        json!({"available": 0, "lowest_key_id": null, "last_resort_key_id": null, "last_resort_claims": null})
    );
    let keys = app
        .request("GET", &format!("/keys/{}", alice.user_id))
        .bearer(&alice.token)
        .send()
        .await;
    assert_eq!(keys.body["devices"][0]["signing_key_reset"], true);
    // Key ids start afresh under the new key.
    upload_ok(&app, &alice, &k2, [1], None).await;

    // A rotation by the current key: reset is cleared, the prekeys go again.
    let mut body = signing_key_body(&alice, &k3);
    body["rotation_sig"] = json!(sign(
        &k2,
        Context::Rotate,
        &alice,
        &[k3.verifying_key().as_bytes()]
    ));
    let r = put_signing_key(&app, &alice, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["signing_key_reset"], false);
    assert_eq!(count(&app, &alice).await["available"], 0);
    let high_water: Option<i64> = sqlx::query_scalar(
        "SELECT prekey_high_water FROM devices WHERE user_id = $1 AND device_id = 1",
    )
    .bind(alice.user_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(high_water, None);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn upload_checks_every_key_and_stores_all_or_nothing(pool: PgPool) {
    let app = TestApp::with_env(
        pool.clone(),
        &[("PREKEY_UPLOAD_MAX", "5"), ("PREKEY_MAX_STORED", "8")],
    );
    let alice = x25519_user(&app, "alice").await;
    let key = secret(1);
    set_signing_key(&app, &alice, &key).await;

    upload(&app, &alice, json!({}))
        .await
        .assert_error(422, "validation_failed");
    upload(&app, &alice, json!({"prekeys": {}}))
        .await
        .assert_error(400, "bad_request");
    upload(
        &app,
        &alice,
        json!({"prekeys": prekeys(&key, &alice, 1..=6)}),
    )
    .await
    .assert_error(422, "validation_failed");

    let good = prekey(&key, &alice, 1, Context::Prekey);
    let with = |field: &str, value: Value| {
        let mut item = good.clone();
        if value.is_null() {
            item.as_object_mut().unwrap().remove(field);
        } else {
            item[field] = value;
        }
        json!({"prekeys": [item]})
    };
    let cases = [
        (json!({"prekeys": [1]}), 400, "bad_request"),
        (with("key_id", json!("1")), 400, "bad_request"),
        (with("key_id", json!(1.5)), 400, "bad_request"),
        (with("key_id", Value::Null), 422, "validation_failed"),
        (with("key_id", json!(-1)), 422, "validation_failed"),
        (
            with("key_id", json!(4_294_967_296u64)),
            422,
            "validation_failed",
        ),
        (with("public_key", json!(7)), 400, "bad_request"),
        (with("public_key", Value::Null), 422, "validation_failed"),
        (
            with("public_key", json!(BASE64.encode([0u8; 32]))),
            422,
            "validation_failed",
        ),
        (
            with("public_key", json!(BASE64.encode([9u8; 31]))),
            422,
            "validation_failed",
        ),
        (
            with("signature", json!(BASE64.encode([0u8; 63]))),
            422,
            "validation_failed",
        ),
        (
            with("signature", json!("not base64!")),
            422,
            "validation_failed",
        ),
        // The same key id twice, or the last-resort key under a one-time key's id.
        (
            json!({"prekeys": [good.clone(), good.clone()]}),
            422,
            "validation_failed",
        ),
        (
            json!({"prekeys": [good.clone()], "last_resort": prekey(&key, &alice, 1, Context::LastResort)}),
            422,
            "validation_failed",
        ),
        (
            json!({"prekeys": [], "last_resort": "x"}),
            400,
            "bad_request",
        ),
    ];
    for (body, status, code) in cases {
        let r = upload(&app, &alice, body.clone()).await;
        assert_eq!(
            (r.status, r.error_code()),
            (status, code),
            "{body}: {}",
            r.body
        );
    }
    // The small-order point's message names the rule, and the prekey.
    let r = upload(
        &app,
        &alice,
        with("public_key", json!(BASE64.encode([0u8; 32]))),
    )
    .await;
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("prekeys[0].public_key"),
        "{}",
        r.body
    );

    // One signature in three that does not verify: nothing is stored.
    let other = secret(2);
    let mut items = prekeys(&key, &alice, 1..=3);
    items[1] = prekey(&other, &alice, 2, Context::Prekey);
    let r = upload(&app, &alice, json!({"prekeys": items})).await;
    r.assert_error(422, "invalid_signature");
    assert_eq!(r.body["field"], "prekeys");
    let mut items = prekeys(&key, &alice, 1..=3);
    items[2] = prekey(&key, &alice, 3, Context::LastResort);
    upload(&app, &alice, json!({"prekeys": items}))
        .await
        .assert_error(422, "invalid_signature");
    // A last-resort key signed as a one-time key does not verify either.
    let r = upload(
        &app,
        &alice,
        json!({"prekeys": prekeys(&key, &alice, 1..=3), "last_resort": prekey(&key, &alice, 4, Context::Prekey)}),
    )
    .await;
    r.assert_error(422, "invalid_signature");
    assert_eq!(r.body["field"], "last_resort");
    assert_eq!(
        count(&app, &alice).await,
        json!({"available": 0, "lowest_key_id": null, "last_resort_key_id": null, "last_resort_claims": null}),
        "nothing stored"
    );

    // Any order within an upload; the answer is the stock.
    assert_eq!(
        upload_ok(&app, &alice, &key, [3, 1, 2], Some(10)).await,
        json!({"available": 3, "lowest_key_id": 1})
    );
    // Every key id above every id uploaded before, the last-resort one's included.
    for ids in [vec![5], vec![10], vec![11, 4], vec![3]] {
        let r = upload(&app, &alice, json!({"prekeys": prekeys(&key, &alice, ids)})).await;
        r.assert_error(422, "validation_failed");
    }
    let r = upload(
        &app,
        &alice,
        json!({"prekeys": [], "last_resort": prekey(&key, &alice, 9, Context::LastResort)}),
    )
    .await;
    r.assert_error(422, "validation_failed");
    assert_eq!(count(&app, &alice).await["available"], 3);

    // The stock: 3 + 5 = 8 fits, one more does not (and nothing of that upload is stored).
    assert_eq!(
        upload_ok(&app, &alice, &key, 11..=15, None).await,
        json!({"available": 8, "lowest_key_id": 1})
    );
    let r = upload(
        &app,
        &alice,
        json!({"prekeys": prekeys(&key, &alice, [16]), "last_resort": prekey(&key, &alice, 17, Context::LastResort)}),
    )
    .await;
    r.assert_error(422, "validation_failed");
    let stock = count(&app, &alice).await;
    assert_eq!(
        (&stock["available"], &stock["last_resort_key_id"]),
        (&json!(8), &json!(10))
    );

    // The last-resort key is replaced, its claims counted from zero; an empty upload is fine.
    sqlx::query("UPDATE prekeys SET claims = 5 WHERE user_id = $1 AND last_resort")
        .bind(alice.user_id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(count(&app, &alice).await["last_resort_claims"], 5);
    upload_ok(&app, &alice, &key, [], Some(20)).await;
    assert_eq!(
        count(&app, &alice).await,
        json!({"available": 8, "lowest_key_id": 1, "last_resort_key_id": 20, "last_resort_claims": 0})
    );
    // The highest key id there is; then nothing is above it.
    sqlx::query("DELETE FROM prekeys WHERE user_id = $1 AND NOT last_resort")
        .bind(alice.user_id)
        .execute(&pool)
        .await
        .unwrap();
    upload_ok(&app, &alice, &key, [u32::MAX], None).await;
    upload(
        &app,
        &alice,
        json!({"prekeys": [], "last_resort": prekey(&key, &alice, u32::MAX, Context::LastResort)}),
    )
    .await
    .assert_error(422, "validation_failed");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn get_keys_lists_every_device_and_uses_nothing_up(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let alice = x25519_user(&app, "alice").await;
    let alice2 = add_device(&app, &alice, x25519_raw("alice 2")).await;
    let bob = x25519_user(&app, "bob").await;
    let key = secret(1);
    set_signing_key(&app, &alice, &key).await;
    upload_ok(&app, &alice, &key, 1..=2, Some(3)).await;

    app.request("GET", "/keys/not-a-uuid")
        .bearer(&bob.token)
        .send()
        .await
        .assert_error(400, "bad_request");
    app.request("GET", &format!("/keys/{}", Uuid::now_v7()))
        .bearer(&bob.token)
        .send()
        .await
        .assert_error(404, "not_found");
    app.request("GET", &format!("/keys/{}", alice.user_id))
        .send()
        .await
        .assert_error(401, "unauthorized");

    let r = app
        .request("GET", &format!("/keys/{}", alice.user_id))
        .bearer(&bob.token)
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let fingerprint = |raw: &[u8; 32]| {
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(raw);
        Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let binding = signing_key_body(&alice, &key)["binding_sig"].clone();
    let last_resort = prekey(&key, &alice, 3, Context::LastResort);
    assert_eq!(
        r.body,
        json!({"user_id": alice.user_id, "devices": [
            {"device_id": 1, "public_key": x25519_pem(&alice.x25519),
             "key_fingerprint": fingerprint(&alice.x25519), "signing_key": pem(&key),
             "binding_sig": binding, "signing_key_reset": false, "last_resort": last_resort},
            {"device_id": 2, "public_key": x25519_pem(&alice2.x25519),
             "key_fingerprint": fingerprint(&alice2.x25519), "signing_key": null,
             "binding_sig": null, "signing_key_reset": false, "last_resort": null},
        ]})
    );
    // What a sender checks: the binding and the last-resort signature verify.
    let signing_key = SigningKey::parse("signing_key", &pem(&key)).unwrap();
    let sig = |v: &Value| Signature::parse("sig", v.as_str().unwrap()).unwrap();
    assert!(signing_key.verifies(
        &signed_message(
            Context::Bind,
            alice.user_id,
            1,
            &[&alice.x25519, signing_key.raw()]
        ),
        &sig(&r.body["devices"][0]["binding_sig"])
    ));
    // Read-only.
    assert_eq!(count(&app, &alice).await["available"], 2);
    assert_eq!(count(&app, &alice).await["last_resort_claims"], 0);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_claim_takes_the_lowest_key_once_then_the_last_resort(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let alice = x25519_user(&app, "alice").await;
    let alice2 = add_device(&app, &alice, x25519_raw("alice 2")).await;
    let bob = x25519_user(&app, "bob").await;
    let key = secret(1);
    set_signing_key(&app, &alice, &key).await;
    upload_ok(&app, &alice, &key, [6, 5], Some(7)).await;
    // Device 2 has a signing key but no prekey at all.
    set_signing_key(&app, &alice2, &secret(2)).await;

    let r = claim(&app, &bob.token, json!({"user_id": alice.user_id})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"user_id": alice.user_id, "devices": [
            {"device_id": 1, "prekey": {
                "key_id": 5, "public_key": BASE64.encode(prekey_bytes(5)),
                "signature": prekey(&key, &alice, 5, Context::Prekey)["signature"],
                "last_resort": false}},
            {"device_id": 2, "prekey": null},
        ]})
    );
    // The signature verifies as a sender checks it, under the pinned signing key.
    let signing_key = SigningKey::parse("signing_key", &pem(&key)).unwrap();
    let claimed = &r.body["devices"][0]["prekey"];
    assert!(signing_key.verifies(
        &signed_message(
            Context::Prekey,
            alice.user_id,
            1,
            &[&5u32.to_be_bytes(), &prekey_bytes(5)]
        ),
        &Signature::parse("s", claimed["signature"].as_str().unwrap()).unwrap()
    ));

    let one = json!({"user_id": alice.user_id, "device_ids": [1]});
    let r = claim(&app, &bob.token, one.clone()).await;
    assert_eq!(
        (
            &r.body["devices"][0]["prekey"]["key_id"],
            &r.body["devices"][0]["prekey"]["last_resort"]
        ),
        (&json!(6), &json!(false))
    );
    // None left: the last-resort key, which stays, each time counted.
    for _ in 0..2 {
        let r = claim(&app, &bob.token, one.clone()).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let mut expected = prekey(&key, &alice, 7, Context::LastResort);
        expected["last_resort"] = json!(true);
        assert_eq!(
            r.body["devices"],
            json!([{"device_id": 1, "prekey": expected}])
        );
    }
    assert_eq!(
        count(&app, &alice).await,
        json!({"available": 0, "lowest_key_id": null, "last_resort_key_id": 7, "last_resort_claims": 2})
    );
    // A device may claim its own account's keys, in the order asked or not: device order.
    upload_ok(&app, &alice, &key, [8], None).await;
    let r = claim(
        &app,
        &alice2.token,
        json!({"user_id": alice.user_id, "device_ids": [2, 1]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["devices"][0]["device_id"], 1);
    assert_eq!(r.body["devices"][0]["prekey"]["key_id"], 8);
    assert_eq!(
        r.body["devices"][1],
        json!({"device_id": 2, "prekey": null})
    );

    // Refusals, none of which claims or counts anything.
    upload_ok(&app, &alice, &key, [9], None).await;
    let before = claims_counted(&pool, &bob).await;
    let refusals = [
        (json!({"user_id": Uuid::now_v7()}), 404, "not_found"),
        (
            json!({"user_id": alice.user_id, "device_ids": [1, 3]}),
            404,
            "not_found",
        ),
        (
            json!({"user_id": bob.user_id, "device_ids": [2]}),
            404,
            "not_found",
        ),
        (
            json!({"user_id": alice.user_id, "device_ids": []}),
            422,
            "validation_failed",
        ),
        (
            json!({"user_id": alice.user_id, "device_ids": [1, 1]}),
            422,
            "validation_failed",
        ),
        (
            json!({"user_id": alice.user_id, "device_ids": [0]}),
            422,
            "validation_failed",
        ),
        (
            json!({"user_id": alice.user_id, "device_ids": [4_294_967_296u64]}),
            422,
            "validation_failed",
        ),
        (
            json!({"user_id": alice.user_id, "device_ids": ["1"]}),
            400,
            "bad_request",
        ),
        (
            json!({"user_id": alice.user_id, "device_ids": [1.5]}),
            400,
            "bad_request",
        ),
        (
            json!({"user_id": alice.user_id, "device_ids": 1}),
            400,
            "bad_request",
        ),
        (json!({"user_id": "not-a-uuid"}), 422, "validation_failed"),
        (json!({"user_id": 5}), 400, "bad_request"),
        (json!({}), 422, "validation_failed"),
    ];
    for (body, status, code) in refusals {
        let r = claim(&app, &bob.token, body.clone()).await;
        assert_eq!(
            (r.status, r.error_code()),
            (status, code),
            "{body}: {}",
            r.body
        );
    }
    assert_eq!(claims_counted(&pool, &bob).await, before);
    assert_eq!(count(&app, &alice).await["available"], 1, "nothing claimed");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn the_claim_limits_per_requester_and_per_target(pool: PgPool) {
    let app = TestApp::with_env(
        pool.clone(),
        &[
            ("PREKEY_CLAIMS_PER_WINDOW", "3"),
            ("PREKEY_CLAIMS_PER_TARGET", "2"),
        ],
    );
    let alice = x25519_user(&app, "alice").await;
    let alice2 = add_device(&app, &alice, x25519_raw("alice 2")).await;
    let (bob, carol) = (
        x25519_user(&app, "bob").await,
        x25519_user(&app, "carol").await,
    );
    let (k1, k2) = (secret(1), secret(2));
    set_signing_key(&app, &alice, &k1).await;
    set_signing_key(&app, &alice2, &k2).await;
    upload_ok(&app, &alice, &k1, 1..=5, Some(100)).await;
    upload_ok(&app, &alice2, &k2, 1..=5, Some(100)).await;

    // Bob: two devices, then one: 3 of 3. The next is 429 and claims nothing.
    let r = claim(&app, &bob.token, json!({"user_id": alice.user_id})).await;
    assert_eq!(tally(&[r.body]), (vec![1, 1], 0));
    let device_1 = json!({"user_id": alice.user_id, "device_ids": [1]});
    let r = claim(&app, &bob.token, device_1.clone()).await;
    assert_eq!(tally(&[r.body]), (vec![2], 0));
    let r = claim(&app, &bob.token, device_1.clone()).await;
    r.assert_error(429, "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry), "Retry-After {retry}");
    // A request for more devices than are left in the window is refused whole.
    assert_eq!(count(&app, &alice).await["available"], 3);

    // Device 1 has handed out its 2 one-time keys this window: carol gets its last-resort key
    // (never 429 for that), while device 2 still has one to give.
    let r = claim(&app, &carol.token, json!({"user_id": alice.user_id})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["devices"][0]["prekey"]["last_resort"], true);
    assert_eq!(r.body["devices"][0]["prekey"]["key_id"], 100);
    assert_eq!(r.body["devices"][1]["prekey"]["key_id"], 2);
    assert_eq!(count(&app, &alice).await["available"], 3);
    assert_eq!(count(&app, &alice).await["last_resort_claims"], 1);
    assert_eq!(count(&app, &alice2).await["available"], 3);

    // A new window: one-time keys again.
    sqlx::query("UPDATE rate_limits SET window_start = now() - interval '2 hours'")
        .execute(&pool)
        .await
        .unwrap();
    let r = claim(&app, &bob.token, device_1).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["devices"][0]["prekey"]["key_id"], 3);
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn a_removed_devices_token_is_refused_before_anything_counts(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let alice = x25519_user(&app, "alice").await;
    let alice2 = add_device(&app, &alice, x25519_raw("alice 2")).await;
    let key = secret(1);
    set_signing_key(&app, &alice2, &key).await;
    let upload_body = json!({"prekeys": prekeys(&key, &alice2, [1])});
    let key_body = signing_key_body(&alice2, &secret(2));
    sqlx::query("DELETE FROM devices WHERE user_id = $1 AND device_id = 2")
        .bind(alice.user_id)
        .execute(&pool)
        .await
        .unwrap();

    put_signing_key(&app, &alice2, key_body)
        .await
        .assert_error(401, "unauthorized");
    upload(&app, &alice2, upload_body)
        .await
        .assert_error(401, "unauthorized");
    app.request("GET", "/keys/prekeys/count")
        .bearer(&alice2.token)
        .send()
        .await
        .assert_error(401, "unauthorized");
    app.request("GET", &format!("/keys/{}", alice.user_id))
        .bearer(&alice2.token)
        .send()
        .await
        .assert_error(401, "unauthorized");
    claim(&app, &alice2.token, json!({"user_id": alice.user_id}))
        .await
        .assert_error(401, "unauthorized");
    let counted = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*) FILTER (WHERE bucket LIKE 'prekey%'), coalesce(sum(attempts), 0) \
             FROM rate_limits",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = counted().await;
    assert_eq!(before.0, 0, "no claim counted");
    // The password path too: 401 before any login attempt is counted.
    let mut body = signing_key_body(&alice2, &secret(3));
    body["password"] = json!("wrong password");
    put_signing_key(&app, &alice2, body)
        .await
        .assert_error(401, "unauthorized");
    assert_eq!(counted().await, before, "nothing counted");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn update_key_keeps_the_signing_key_only_with_a_binding(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let alice = x25519_user(&app, "alice").await;
    let key = secret(1);
    set_signing_key(&app, &alice, &key).await;
    upload_ok(&app, &alice, &key, 1..=3, Some(4)).await;
    let stock = count(&app, &alice).await;

    let new_x25519 = x25519_raw("alice, re-keyed");
    let binding_for = |x25519: &[u8; 32]| {
        sign(
            &key,
            Context::Bind,
            &alice,
            &[x25519, key.verifying_key().as_bytes()],
        )
    };
    // A binding over the old key, or by another key: 422, nothing changes.
    for binding in [
        binding_for(&alice.x25519),
        sign(
            &secret(2),
            Context::Bind,
            &alice,
            &[&new_x25519, key.verifying_key().as_bytes()],
        ),
    ] {
        let r = update_key(
            &app,
            &alice,
            json!({"public_key": x25519_pem(&new_x25519), "binding_sig": binding}),
        )
        .await;
        r.assert_error(422, "invalid_signature");
    }
    let device_key: String =
        sqlx::query_scalar("SELECT public_key FROM devices WHERE user_id = $1 AND device_id = 1")
            .bind(alice.user_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(device_key, x25519_pem(&alice.x25519));
    assert_eq!(count(&app, &alice).await, stock);

    // A valid binding: the new key, the signing key and prekeys kept (and the high-water mark).
    let r = update_key(
        &app,
        &alice,
        json!({"public_key": x25519_pem(&new_x25519), "binding_sig": binding_for(&new_x25519)}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["public_key"], x25519_pem(&new_x25519));
    assert_eq!(stored_signing_key(&pool, &alice).await, Some(pem(&key)));
    assert_eq!(count(&app, &alice).await, stock);
    upload(&app, &alice, json!({"prekeys": prekeys(&key, &alice, [2])}))
        .await
        .assert_error(422, "validation_failed");
    let keys = app
        .request("GET", &format!("/keys/{}", alice.user_id))
        .bearer(&alice.token)
        .send()
        .await;
    assert_eq!(
        keys.body["devices"][0]["binding_sig"],
        binding_for(&new_x25519)
    );

    // No binding: the signing key, prekeys and last-resort key go.
    let r = update_key(
        &app,
        &alice,
        json!({"public_key": x25519_pem(&alice.x25519)}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(stored_signing_key(&pool, &alice).await, None);
    assert_eq!(
        count(&app, &alice).await,
        json!({"available": 0, "lowest_key_id": null, "last_resort_key_id": null, "last_resort_claims": null})
    );
    upload(&app, &alice, json!({"prekeys": prekeys(&key, &alice, [5])}))
        .await
        .assert_error(409, "conflict");
}

#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn signatures_are_bound_to_the_account_and_the_device(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let alice = x25519_user(&app, "alice").await;
    // Device 2 with the very same X25519 key: only the device id tells the signatures apart.
    let alice2 = add_device(&app, &alice, alice.x25519).await;
    let key = secret(1);

    // Device 1's binding, sent by device 2.
    put_signing_key(&app, &alice2, signing_key_body(&alice, &key))
        .await
        .assert_error(422, "invalid_signature");
    // Another account's device with the same keys: alice's binding does not verify for it.
    let bob_raw = alice.x25519;
    let r = app
        .request("POST", "/register")
        .json(json!({"name": "bob", "password": PASSWORD, "public_key": x25519_pem(&bob_raw)}))
        .send()
        .await;
    assert_eq!(r.status, 201);
    let bob = Device {
        name: "bob".into(),
        user_id: r.body["id"].as_str().unwrap().parse().unwrap(),
        device_id: 1,
        token: app.login("bob").await,
        x25519: bob_raw,
    };
    put_signing_key(&app, &bob, signing_key_body(&alice, &key))
        .await
        .assert_error(422, "invalid_signature");

    // The same signing key on all three devices, each with its own binding.
    for device in [&alice, &alice2, &bob] {
        set_signing_key(&app, device, &key).await;
    }
    // Prekeys signed for device 1 do not verify for device 2, nor for bob's device 1.
    for device in [&alice2, &bob] {
        let r = upload(&app, device, json!({"prekeys": prekeys(&key, &alice, [1])})).await;
        r.assert_error(422, "invalid_signature");
        let r = upload(
            &app,
            device,
            json!({"prekeys": [], "last_resort": prekey(&key, &alice, 2, Context::LastResort)}),
        )
        .await;
        r.assert_error(422, "invalid_signature");
        assert_eq!(count(&app, device).await["available"], 0);
    }
    upload_ok(&app, &alice2, &key, [1], None).await;
    // A rotation signed for device 1 does not rotate device 2.
    let k2 = secret(2);
    let mut body = signing_key_body(&alice2, &k2);
    body["rotation_sig"] = json!(sign(
        &key,
        Context::Rotate,
        &alice,
        &[k2.verifying_key().as_bytes()]
    ));
    put_signing_key(&app, &alice2, body)
        .await
        .assert_error(422, "invalid_signature");
    assert_eq!(count(&app, &alice2).await["available"], 1);
}

/// 200 one-time keys, 40 instances claiming 10 times each, at once: every key handed out exactly
/// once, and no claim answered with the last-resort key while a one-time key was left.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn racing_claims_hand_out_each_one_time_key_once(pool: PgPool) {
    const INSTANCES: usize = 40;
    const EACH: usize = 10;
    let vars = [("PREKEY_CLAIMS_PER_TARGET", "1000"), SLOW_ACQUIRE];
    let app = TestApp::with_env(pool.clone(), &vars);
    let alice = x25519_user(&app, "alice").await;
    let key = secret(1);
    set_signing_key(&app, &alice, &key).await;
    upload_ok(&app, &alice, &key, 1..=100, None).await;
    upload_ok(&app, &alice, &key, 101..=200, Some(1000)).await;
    let mut requesters = Vec::new();
    for i in 0..4 {
        requesters.push(x25519_user(&app, &format!("requester{i}")).await.token);
    }

    let apps = instances(&pool, INSTANCES, &vars);
    let gate = Gate::close(&pool).await;
    let tasks: Vec<_> = apps
        .into_iter()
        .enumerate()
        .map(|(i, app)| {
            let (token, target) = (requesters[i % requesters.len()].clone(), alice.user_id);
            tokio::spawn(async move {
                let mut bodies = Vec::new();
                for _ in 0..EACH {
                    let r = claim(&app, &token, json!({"user_id": target})).await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    bodies.push(r.body);
                }
                bodies
            })
        })
        .collect();
    gate.open_when_waiting(&pool, INSTANCES).await;
    let mut bodies = Vec::new();
    for task in tasks {
        let claims = task.await.unwrap();
        // Keys are only taken, never added, here: once an instance got the last-resort key, no
        // one-time key was left for its later claims either.
        let kinds: Vec<bool> = claims
            .iter()
            .map(|body| body["devices"][0]["prekey"]["last_resort"] == json!(true))
            .collect();
        assert!(
            kinds.windows(2).all(|pair| pair[0] <= pair[1]),
            "a last-resort answer while one-time keys were left: {kinds:?}"
        );
        bodies.extend(claims);
    }
    let (one_time, last_resort) = tally(&bodies);
    let distinct: HashSet<u64> = one_time.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        one_time.len(),
        "a one-time key handed out twice"
    );
    assert_eq!(distinct, (1..=200).collect::<HashSet<u64>>());
    assert_eq!(last_resort, INSTANCES * EACH - 200);
    assert_eq!(
        count(&app, &alice).await,
        json!({"available": 0, "lowest_key_id": null, "last_resort_key_id": 1000,
               "last_resort_claims": INSTANCES * EACH - 200})
    );
}

/// PREKEY_CLAIMS_PER_TARGET=5 and 40 claims at once from 20 instances and 4 requesters: exactly
/// 5 one-time keys leave, every other answer is the last-resort key, none is 429.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn racing_claims_keep_the_per_target_limit(pool: PgPool) {
    const INSTANCES: usize = 20;
    const EACH: usize = 2;
    let vars = [("PREKEY_CLAIMS_PER_TARGET", "5"), SLOW_ACQUIRE];
    let app = TestApp::with_env(pool.clone(), &vars);
    let alice = x25519_user(&app, "alice").await;
    let key = secret(1);
    set_signing_key(&app, &alice, &key).await;
    upload_ok(&app, &alice, &key, 1..=50, Some(100)).await;
    let mut requesters = Vec::new();
    for i in 0..4 {
        requesters.push(x25519_user(&app, &format!("requester{i}")).await.token);
    }

    let apps = instances(&pool, INSTANCES, &vars);
    let gate = Gate::close(&pool).await;
    let tasks: Vec<_> = apps
        .into_iter()
        .enumerate()
        .map(|(i, app)| {
            let (token, target) = (requesters[i % requesters.len()].clone(), alice.user_id);
            tokio::spawn(async move {
                let mut bodies = Vec::new();
                for _ in 0..EACH {
                    let r =
                        claim(&app, &token, json!({"user_id": target, "device_ids": [1]})).await;
                    assert_eq!(r.status, 200, "never 429: {}", r.text);
                    bodies.push(r.body);
                }
                bodies
            })
        })
        .collect();
    gate.open_when_waiting(&pool, INSTANCES).await;
    let mut bodies = Vec::new();
    for task in tasks {
        bodies.extend(task.await.unwrap());
    }
    let (mut one_time, last_resort) = tally(&bodies);
    one_time.sort_unstable();
    assert_eq!(one_time, [1, 2, 3, 4, 5]);
    assert_eq!(last_resort, INSTANCES * EACH - 5);
    assert_eq!(count(&app, &alice).await["available"], 45);
}

/// PREKEY_CLAIMS_PER_WINDOW=7 and 20 requests at once from one requester, for one or two
/// devices each: never more than 7 devices claimed, every other request 429 with nothing taken.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn racing_claims_keep_the_per_requester_limit(pool: PgPool) {
    const INSTANCES: usize = 20;
    let vars = [("PREKEY_CLAIMS_PER_WINDOW", "7"), SLOW_ACQUIRE];
    let app = TestApp::with_env(pool.clone(), &vars);
    let alice = x25519_user(&app, "alice").await;
    let alice2 = add_device(&app, &alice, x25519_raw("alice 2")).await;
    let bob = x25519_user(&app, "bob").await;
    let key = secret(1);
    for device in [&alice, &alice2] {
        set_signing_key(&app, device, &key).await;
        upload_ok(&app, device, &key, 1..=50, Some(100)).await;
    }

    let apps = instances(&pool, INSTANCES, &vars);
    let gate = Gate::close(&pool).await;
    let tasks: Vec<_> = apps
        .into_iter()
        .enumerate()
        .map(|(i, app)| {
            let (token, target) = (bob.token.clone(), alice.user_id);
            let devices = if i % 2 == 0 {
                json!([1, 2])
            } else {
                json!([2])
            };
            tokio::spawn(async move {
                claim(
                    &app,
                    &token,
                    json!({"user_id": target, "device_ids": devices}),
                )
                .await
            })
        })
        .collect();
    gate.open_when_waiting(&pool, INSTANCES).await;
    let mut claimed = Vec::new();
    for task in tasks {
        let r = task.await.unwrap();
        match r.status {
            200 => claimed.push(r.body),
            _ => {
                r.assert_error(429, "rate_limited");
                assert!(r.headers.contains_key("retry-after"));
            }
        }
    }
    let (one_time, last_resort) = tally(&claimed);
    assert_eq!(last_resort, 0);
    // Never past the limit; and a refusal only when the request did not fit, so at least 6.
    assert!(
        (6..=7).contains(&one_time.len()),
        "{} devices claimed",
        one_time.len()
    );
    let left = count(&app, &alice).await["available"].as_u64().unwrap()
        + count(&app, &alice2).await["available"].as_u64().unwrap();
    assert_eq!(
        left as usize,
        100 - one_time.len(),
        "refused requests took nothing"
    );
    let counted: i32 = sqlx::query_scalar(
        "SELECT attempts FROM rate_limits WHERE bucket = 'prekey_claim_requester'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(counted as usize, one_time.len());
}

/// Uploads racing each other, 20 at once with the same key ids in pairs: never two under one key
/// id, none at or below the high-water mark, never past PREKEY_MAX_STORED.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn racing_uploads_keep_the_key_ids_and_the_stock(pool: PgPool) {
    const INSTANCES: usize = 20;
    let vars = [("PREKEY_MAX_STORED", "5"), SLOW_ACQUIRE];
    let app = TestApp::with_env(pool.clone(), &vars);
    let alice = x25519_user(&app, "alice").await;
    let key = secret(1);
    set_signing_key(&app, &alice, &key).await;

    // Two keys each: at most 2 uploads fit.
    let apps = instances(&pool, INSTANCES, &vars);
    let gate = Gate::close(&pool).await;
    let tasks: Vec<_> = apps
        .into_iter()
        .enumerate()
        .map(|(i, app)| {
            let alice = alice.clone();
            let first = (i / 2) as u32 * 10 + 1;
            let body = json!({"prekeys": prekeys(&key, &alice, first..first + 2)});
            tokio::spawn(async move { upload(&app, &alice, body).await })
        })
        .collect();
    gate.open_when_waiting(&pool, INSTANCES).await;
    let mut stored = 0;
    for task in tasks {
        let r = task.await.unwrap();
        match r.status {
            200 => stored += 1,
            _ => r.assert_error(422, "validation_failed"),
        }
    }
    assert!((1..=2).contains(&stored), "{stored} uploads stored");
    assert_eq!(count(&app, &alice).await["available"], 2 * stored);
}

/// Rotations racing uploads signed by the key each rotation replaces: the upload is stored
/// before the rotation (which then deletes it) or refused after it, so no prekey outlives the
/// key that signed it.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn racing_key_changes_leave_no_prekey_of_the_old_key(pool: PgPool) {
    let vars = [SLOW_ACQUIRE];
    let app = TestApp::with_env(pool.clone(), &vars);
    let alice = x25519_user(&app, "alice").await;
    let key = secret(1);
    set_signing_key(&app, &alice, &key).await;
    let apps = instances(&pool, 2, &vars);

    // Rotations racing uploads signed by the key each rotation replaces.
    let mut current = key;
    for round in 0..20u8 {
        let next = secret(10 + round);
        let mut body = signing_key_body(&alice, &next);
        body["rotation_sig"] = json!(sign(
            &current,
            Context::Rotate,
            &alice,
            &[next.verifying_key().as_bytes()]
        ));
        let first = 1000 * (u32::from(round) + 1);
        let upload_body = json!({
            "prekeys": prekeys(&current, &alice, first..first + 20),
            "last_resort": prekey(&current, &alice, first + 500, Context::LastResort),
        });
        let (a, b) = (apps[0].clone(), apps[1].clone());
        let (alice_a, alice_b) = (alice.clone(), alice.clone());
        let uploading = tokio::spawn(async move { upload(&a, &alice_a, upload_body).await });
        let rotating = tokio::spawn(async move { put_signing_key(&b, &alice_b, body).await });
        let (uploaded, rotated) = (uploading.await.unwrap(), rotating.await.unwrap());
        assert_eq!(rotated.status, 200, "{}", rotated.text);
        // Stored before the rotation (then deleted by it) or refused after it: either way no
        // prekey signed by the replaced key is left.
        if uploaded.status != 200 {
            uploaded.assert_error(422, "invalid_signature");
        }
        let left: Vec<i64> = sqlx::query_scalar("SELECT key_id FROM prekeys WHERE user_id = $1")
            .bind(alice.user_id)
            .fetch_all(&pool)
            .await
            .unwrap();
        assert!(
            left.is_empty(),
            "round {round}: prekeys {left:?} outlived the key that signed them"
        );
        current = next;
    }
}

/// Every statement of these endpoints prepares against the migrated schema.
#[sqlx::test(migrator = "common::db::MIGRATOR")]
async fn the_prekey_statements_prepare_against_the_schema(pool: PgPool) {
    use sqlx::Executor;
    for sql in [
        functions::set_signing_key::DEVICE_SQL,
        functions::set_signing_key::SET_SQL,
        functions::upload_prekeys::STORE_SQL,
        functions::prekey_count::SQL,
        functions::get_keys::SQL,
        functions::claim_prekeys::CLAIM_SQL,
    ] {
        if let Err(error) = pool.describe(sqlx::SqlSafeStr::into_sql_str(sql)).await {
            panic!("{error}\n{sql}");
        }
    }
}
